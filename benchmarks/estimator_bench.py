"""Error per CPU second of the equilibrium gradient estimators: fluctuation, hybrid, pathwise.

    python benchmarks/estimator_bench.py [--json benchmarks/estimator_bench.json] [--quick]

Trialanine (``tm.build_peptide("AAA")``, OBC2, minimised), Langevin 300 K, γ = 1/ps,
δt = 2 fs. Observables: ³J(HN,Hα), ³J(HN,C′), ³J(HN,Cβ) of ALA2 and ALA3 (K = 6, Hz);
parameters: the φ/ψ torsion force constants ``torsion/C-N-CT-C/k*`` and
``torsion/N-CT-C-N/k*`` (P = 5, kJ/mol). Gradients d⟨O⟩/dθ are in Hz per unit k.

1. Reference: a long fluctuation estimate (``EquilibriumChains``, 2 chains, a frame every
   250 steps, 10k decorrelation steps, default 2 × 1 ns; ``--quick`` 2 × 0.4 ns;
   ``fluctuation_gradient(..., blocks=20)``), integrator seed 0.
2. Independent runs (integrator seed 1), each with its own cost:

   * ``fluctuation``: a shorter segment of 2 fresh chains (default 2 × 0.2 ns), blocks=10;
   * ``hybrid``: M = 96 starts drawn from that segment's frames, ``run_replicas`` for a
     horizon n, ``hybrid_gradient``; n chosen automatically (a pilot of
     ``--pilot-replicas`` replicas to ``--pilot-steps`` with ``save_every = n_max // 20``,
     then ``choose_horizon(..., cap=0.05)``) and a fixed n = 100;
   * ``pathwise``: the pathwise term alone on the same replicas (``pathwise_gradient``),
     the gradient of the n-step protocol average, biased for ⟨O⟩.

   Replica indices 10_000 + arange(M) (n auto), 20_000 + arange(M) (n fixed) and
   30_000 + arange(pilot) (pilot) are distinct from the chains' (0, 1).

Cost = the dynamics that produce an estimator's samples, in process CPU seconds
(``time.process_time``, all threads) and wall seconds (``perf_counter``). Every compiled
program is warmed up on throwaway inputs of the same shapes first, so no XLA compile is
counted (the compile-and-first-run times are reported apart); chains run in fixed chunks
so that one chain program serves every segment. The hybrid and pathwise costs include the
segment that supplies their starts (``cpu_s``) and are also quoted without it
(``cpu_s_replicas``: starts taken from chains that a fit keeps running anyway); the
automatic horizon's cost includes its pilot. Evaluating an estimator (``estimate_s``) is
reported but not counted.

Per estimator: bias against the reference (``compare_estimators``: max |z|, consistent at
the Bonferroni 1 % level over the K·P entries, mean |difference|), the median standard
error se over the K·P entries, the figure of merit FOM = 1 / (se² · cpu_s) (larger is
better: the inverse of the variance times the cost, constant in the run length for an
unbiased estimator) and the CPU seconds to reach se = 0.01 Hz per unit k,
se² · cpu_s / 0.01². Prints a markdown table and writes JSON.
"""

import argparse
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timemachine as tm  # noqa: E402
from timemachine.files import atomic_json  # noqa: E402
from timemachine.fitting import (  # noqa: E402
    JCoupling3HNC,
    JCoupling3HNCB,
    JCoupling3HNHA,
    ObservableSet,
    compare_estimators,
    fluctuation_gradient,
    pathwise_gradient,
    run_replicas,
)
from timemachine.fitting.estimators import choose_horizon, hybrid_gradient  # noqa: E402
from timemachine.fitting.sampling import EquilibriumChains, effective_sample_size  # noqa: E402

WRT = ["torsion/C-N-CT-C/k*", "torsion/N-CT-C-N/k*"]
TARGET_SE = 0.01  # Hz per unit k
SAVE_EVERY = 250
DT = 0.002


class Timer:
    """Process CPU seconds and wall seconds of a block (results blocked on by the caller)."""

    def __enter__(self):
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self.cpu0
        self.wall = time.perf_counter() - self.wall0


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_chains(system, x, integrator, decorrelate, steps, chunk):
    """Two fresh chains: ``decorrelate`` steps discarded, then ``steps`` sampled in chunks
    (one compiled program for all) → (frames (C·F, N, 3) chain by chain, Timer)."""
    chains = EquilibriumChains(system, x, integrator, n_chains=2, save_every=SAVE_EVERY)
    parts = []
    with Timer() as t:
        chains.decorrelate(system.params, decorrelate)
        for _ in range(steps // chunk):
            parts.append(chains.sample(system.params, chunk).x)
    frames = np.concatenate(parts, axis=1)  # (C, F, N, 3), time order per chain
    return frames.reshape(-1, *frames.shape[2:]), frames, t


def timed_replicas(system, starts, integrator, n, wrt, replicas, save_every=None):
    """``run_replicas`` timed warm: the same program is run once first on another set of
    replica indices (compile + first run, returned apart)."""
    kw = dict(wrt=wrt, save_every=save_every)
    with Timer() as warm:
        run_replicas(system, starts, integrator, n, replicas=np.asarray(replicas) + 500_000, **kw)
    with Timer() as t:
        res = run_replicas(system, starts, integrator, n, replicas=replicas, **kw)
    return res, t, warm


def summarise(name, est, reference, cost, extra=None):
    """One row: bias against the reference, median se, the figure of merit."""
    se = float(np.median(est.stderr))
    row = {
        "estimator": name,
        "method": est.method,
        "n_samples": int(est.n_samples),
        "median_stderr": se,
        "max_stderr": float(est.stderr.max()),
        "gradient": est.gradient.tolist(),
        "stderr": est.stderr.tolist(),
        "value": np.asarray(est.value).tolist(),
        "value_stderr": np.asarray(est.value_stderr).tolist(),
    }
    row.update(cost)
    row["fom"] = 1.0 / (se**2 * row["cpu_s"])  # 1 / (se² · CPU s): larger is better
    row["cpu_s_to_target_se"] = se**2 * row["cpu_s"] / TARGET_SE**2
    if "cpu_s_replicas" in row:
        row["fom_replicas"] = 1.0 / (se**2 * row["cpu_s_replicas"])
        row["cpu_s_replicas_to_target_se"] = se**2 * row["cpu_s_replicas"] / TARGET_SE**2
    if reference is not None:
        cmp = compare_estimators(est, reference)
        row["vs_reference"] = {
            "max_abs_z": cmp.max_abs_z,
            "threshold": cmp.threshold,
            "consistent": bool(cmp.consistent),
            "mean_abs_difference": float(np.abs(cmp.difference).mean()),
            "max_abs_difference": float(np.abs(cmp.difference).max()),
            "beyond_2_sigma": int((np.abs(cmp.z) > 2).sum()),
            "z": cmp.z.tolist(),
            "summary": cmp.summary,
        }
    if est.diagnostics:
        diag = {}
        for k, v in est.diagnostics.items():
            diag[k] = np.asarray(v).tolist() if isinstance(v, np.ndarray) else v
        row["diagnostics"] = diag
    if extra:
        row.update(extra)
    return row


def run(args, log=print):
    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x), implicit_solvent="obc2")
    x = tm.minimize_system(system, x)
    obs = ObservableSet([JCoupling3HNHA(top), JCoupling3HNC(top), JCoupling3HNCB(top)])
    wrt = system.select(WRT)
    theta = np.asarray(system.params)[wrt]
    ref_integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=DT, seed=0)
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=DT, seed=1)
    chunk = args.chunk
    for name in ("ref_steps", "segment_steps", "decorrelate"):
        if getattr(args, name) % chunk:
            raise SystemExit(f"--{name.replace('_', '-')} must be a multiple of --chunk {chunk}")
    if args.decorrelate != chunk:
        log(f"note: --decorrelate {args.decorrelate} != --chunk {chunk} compiles a 2nd program")
    compile_s = {}

    # warm up the chain program (decorrelate(chunk) and sample(chunk) share it)
    with Timer() as warm:
        throwaway = EquilibriumChains(
            system, x, integrator, n_chains=2, save_every=SAVE_EVERY, first_replica=900_000
        )
        throwaway.sample(system.params, chunk)
        if args.decorrelate != chunk:
            throwaway.decorrelate(system.params, args.decorrelate)
    compile_s["chains"] = warm.wall

    # 1. the long fluctuation reference
    log(f"reference: 2 chains × {args.ref_steps} steps ({args.ref_steps * DT / 1000:g} ns)")
    ref_flat, ref_frames, t_ref = run_chains(
        system, x, ref_integrator, args.decorrelate, args.ref_steps, chunk
    )
    with Timer() as t_est:
        reference = fluctuation_gradient(obs, system, ref_flat, wrt=wrt, blocks=args.ref_blocks)
    ref_values = np.asarray(jax.jit(jax.vmap(obs))(ref_flat))
    ref_ess = effective_sample_size(
        ref_values.reshape(ref_frames.shape[0], -1, ref_values.shape[1])
    )
    rows = [
        summarise(
            "reference (fluctuation)",
            reference,
            None,
            {"cpu_s": t_ref.cpu, "wall_s": t_ref.wall, "estimate_s": t_est.wall},
            {
                "steps_per_chain": args.ref_steps,
                "blocks": args.ref_blocks,
                "ess_autocorrelation": ref_ess.tolist(),
            },
        )
    ]
    se_ref = rows[0]["median_stderr"]
    log(f"  {t_ref.cpu:.0f} CPU s, {t_ref.wall:.0f} s wall; median se {se_ref:.3g}")

    # 2a. fluctuation from an independent, shorter segment
    log(f"segment: 2 chains × {args.segment_steps} steps, seed 1")
    seg_flat, seg_frames, t_seg = run_chains(
        system, x, integrator, args.decorrelate, args.segment_steps, chunk
    )
    with Timer() as t_est:
        fluct = fluctuation_gradient(obs, system, seg_flat, wrt=wrt, blocks=args.segment_blocks)
    seg_cost = {"cpu_s": t_seg.cpu, "wall_s": t_seg.wall}
    rows.append(
        summarise(
            "fluctuation",
            fluct,
            reference,
            dict(seg_cost, estimate_s=t_est.wall),
            {"steps_per_chain": args.segment_steps, "blocks": args.segment_blocks},
        )
    )

    rng = np.random.default_rng(0)
    m = args.replicas
    if m > seg_flat.shape[0]:
        raise SystemExit(f"--replicas {m} > the segment's {seg_flat.shape[0]} frames")
    starts = seg_flat[rng.choice(seg_flat.shape[0], m, replace=False)]

    # 2b. pilot → automatic horizon
    n_max = args.pilot_steps
    pilot_every = max(1, n_max // 20)
    pilot_starts = seg_flat[rng.choice(seg_flat.shape[0], args.pilot_replicas, replace=False)]
    log(f"pilot: {args.pilot_replicas} replicas × {n_max} steps, a frame every {pilot_every}")
    pilot, t_pilot, warm = timed_replicas(
        system, pilot_starts, integrator, n_max, wrt,
        30_000 + np.arange(args.pilot_replicas), save_every=pilot_every,
    )  # fmt: skip
    compile_s["pilot"] = warm.wall
    choice = choose_horizon(pilot.steps, pilot.frames_dx_dtheta, theta, DT, cap=args.cap)
    log(f"  growth rate {choice.growth_rate:.2f}/ps, horizon n = {choice.n_steps} steps")
    horizon = {
        "n_steps": int(choice.n_steps),
        "growth_rate_per_ps": float(choice.growth_rate),
        "cap_nm": float(choice.cap),
        "pilot_steps": choice.steps.tolist(),
        "pilot_growth_nm": choice.growth.tolist(),
        "pilot_replicas": args.pilot_replicas,
        "pilot_max_steps": n_max,
        "pilot_save_every": pilot_every,
        "pilot_cpu_s": t_pilot.cpu,
        "pilot_wall_s": t_pilot.wall,
    }

    # 2c. hybrid and pathwise at the automatic and the fixed horizon
    runs = [("auto", choice.n_steps, 10_000), ("fixed", args.fixed_horizon, 20_000)]
    for label, n, offset in runs:
        log(f"replicas ({label}): {m} × {n} steps")
        res, t_rep, warm = timed_replicas(system, starts, integrator, n, wrt, offset + np.arange(m))
        compile_s[f"replicas_{label}"] = warm.wall
        rep_cpu, rep_wall = t_rep.cpu, t_rep.wall
        if label == "auto":
            rep_cpu, rep_wall = rep_cpu + t_pilot.cpu, rep_wall + t_pilot.wall
        cost = {
            "cpu_s": seg_cost["cpu_s"] + rep_cpu,
            "wall_s": seg_cost["wall_s"] + rep_wall,
            "cpu_s_replicas": rep_cpu,
            "wall_s_replicas": rep_wall,
        }
        extra = {"horizon_steps": int(n), "horizon_ps": n * DT, "horizon_choice": label}
        with Timer() as t_est:
            hyb = hybrid_gradient(obs, system, starts, res.x, res.dx_dtheta, wrt=wrt, horizon=n)
        rows.append(
            summarise(
                f"hybrid (n {label})", hyb, reference, dict(cost, estimate_s=t_est.wall), extra
            )
        )
        with Timer() as t_est:
            path = pathwise_gradient(obs, res.x, res.dx_dtheta, param_names=hyb.param_names)
        rows.append(
            summarise(
                f"pathwise (n {label})", path, reference, dict(cost, estimate_s=t_est.wall), extra
            )
        )
    return {
        "labels": list(reference.labels),
        "param_names": list(reference.param_names),
        "theta": theta.tolist(),
        "horizon": horizon,
        "compile_and_first_run_s": compile_s,
        "rows": rows,
    }


def fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def markdown(rows):
    lines = [
        "| estimator | n (steps) | samples | CPU s | wall s | median se | max \\|z\\| "
        "| consistent (1 %) | mean \\|Δ\\| | FOM 1/(se²·CPU s) ↑ | CPU s to se=0.01 "
        "| FOM, replicas only ↑ |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cmp = r.get("vs_reference")
        lines.append(
            f"| {r['estimator']} | {r.get('horizon_steps', '—')} | {r['n_samples']} "
            f"| {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['median_stderr']:.3g} "
            f"| {fmt(cmp and cmp['max_abs_z'], '.2f')} "
            f"| {'—' if cmp is None else ('yes' if cmp['consistent'] else 'NO')} "
            f"| {fmt(cmp and cmp['mean_abs_difference'])} | {r['fom']:.3g} "
            f"| {r['cpu_s_to_target_se']:.3g} | {fmt(r.get('fom_replicas'))} |"
        )
    return "\n".join(lines)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(here, "estimator_bench.json"))
    parser.add_argument("--quick", action="store_true", help="a 2 × 0.4 ns reference")
    parser.add_argument(
        "--ref-steps", type=int, default=None, help="per chain (default 500k = 1 ns; 200k --quick)"
    )
    parser.add_argument("--ref-blocks", type=int, default=20)
    parser.add_argument("--segment-steps", type=int, default=100_000, help="per chain (0.2 ns)")
    parser.add_argument("--segment-blocks", type=int, default=10)
    parser.add_argument("--decorrelate", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=10_000, help="chain steps per call")
    parser.add_argument("--replicas", type=int, default=96)
    parser.add_argument("--pilot-replicas", type=int, default=32)
    parser.add_argument("--pilot-steps", type=int, default=500, help="n_max of the pilot")
    parser.add_argument("--cap", type=float, default=0.05, help="choose_horizon cap, nm")
    parser.add_argument("--fixed-horizon", type=int, default=100)
    args = parser.parse_args(argv)
    if args.ref_steps is None:
        args.ref_steps = 200_000 if args.quick else 500_000
    t0 = time.perf_counter()
    result = run(args)
    total = time.perf_counter() - t0
    rows = result["rows"]
    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    hz = result["horizon"]
    print(f"\ncpu: {cpu_model()}, {os.cpu_count()} CPUs ({cores} usable); {device.platform}, "
          f"float64; total {total:.0f} s wall")  # fmt: skip
    print(f"trialanine OBC2, Langevin 300 K, γ = 1/ps, δt = {DT * 1000:g} fs; K = "
          f"{len(result['labels'])} couplings × P = {len(result['param_names'])} φ/ψ torsion k; "
          f"gradients in Hz per unit k\n")  # fmt: skip
    print(markdown(rows))
    print(
        f"\nFOM = 1/(se²·CPU s), se the median standard error over the K·P entries: larger is "
        f"better. CPU s to se=0.01 = se²·CPU s/0.01². 'replicas only' leaves out the segment "
        f"that supplies the starts. Compiles not counted.\nmeasured sensitivity growth rate "
        f"{hz['growth_rate_per_ps']:.2f}/ps (pilot: {hz['pilot_replicas']} replicas × "
        f"{hz['pilot_max_steps']} steps); chosen horizon n = {hz['n_steps']} steps "
        f"({hz['n_steps'] * DT:g} ps, cap {hz['cap_nm']:g} nm)"
    )
    ranked = sorted(
        (r for r in rows[1:] if r["vs_reference"]["consistent"]), key=lambda r: -r["fom"]
    )
    if ranked:
        best = ranked[0]
        runner = ""
        if len(ranked) > 1:
            runner = f", {best['fom'] / ranked[1]['fom']:.2f}× the next ({ranked[1]['estimator']})"
        print(
            f"largest FOM among the estimators consistent with the reference: "
            f"{best['estimator']}{runner}"
        )
    else:
        print("no estimator is consistent with the reference")
    out = {
        "benchmark": "estimator_bench",
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cores": cores,
            "machine": platform.machine(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "device": f"{device.platform} ({device.device_kind})",
        },
        "settings": {
            "quick": args.quick,
            "system": "trialanine (tm.build_peptide('AAA')), OBC2, minimised",
            "observables": "3J(HN,HA), 3J(HN,C'), 3J(HN,CB) of ALA2, ALA3",
            "wrt": WRT,
            "integrator": {"temperature": 300.0, "friction": 1.0, "dt": DT},
            "reference_seed": 0,
            "independent_seed": 1,
            "n_chains": 2,
            "save_every": SAVE_EVERY,
            "decorrelate": args.decorrelate,
            "chunk": args.chunk,
            "ref_steps": args.ref_steps,
            "ref_blocks": args.ref_blocks,
            "segment_steps": args.segment_steps,
            "segment_blocks": args.segment_blocks,
            "replicas": args.replicas,
            "pilot_replicas": args.pilot_replicas,
            "pilot_steps": args.pilot_steps,
            "cap_nm": args.cap,
            "fixed_horizon": args.fixed_horizon,
            "target_se": TARGET_SE,
            "fom": "1 / (median se² · cpu_s), larger is better",
        },
        "total_wall_s": total,
        **result,
    }
    atomic_json(args.json, out, indent=2)
    print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
