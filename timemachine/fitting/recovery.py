"""The parameter-recovery experiment of issue 5 (``timemachine fit --experiment recovery``).

Trialanine in OBC2 (amber99sbildn): the φ (or φ and ψ) torsion barriers are perturbed by
± ``perturbation``, then fitted back with the pathwise estimator to ³J, Rg and NOE targets
that the same protocol generates at the original force field (common random numbers, so
the original θ is an exact minimiser of the loss). ``recovery_problem`` builds the problem;
``run_recovery`` runs the whole experiment, writes its files and returns its summary.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from timemachine.backends import check_backend
from timemachine.checks import check_int, check_real
from timemachine.errors import InputError
from timemachine.files import atomic_write_text
from timemachine.fitting.loss import observable_samples, target_vector
from timemachine.fitting.observables import observable_from_spec
from timemachine.fitting.replicas import run_replicas
from timemachine.fitting.targets import make_target, save_targets
from timemachine.fitting.train import fit, load_checkpoint
from timemachine.integrator import LangevinIntegrator, minimize, run
from timemachine.structured import gradient_fn

__all__ = [
    "RECOVERY_LOSS_DROP",
    "RECOVERY_SIZES",
    "RECOVERY_TARGETS",
    "RECOVERY_TOLERANCE",
    "RECOVERY_TORSIONS",
    "RECOVERY_WRT",
    "print_recovery_summary",
    "recovery_problem",
    "run_recovery",
]

#: The recovery experiment's observables (issue 5): ³J couplings report on φ, Rg on the
#: overall shape, the sequential Hα(i)–HN(i+1) NOEs on ψ.
RECOVERY_TARGETS = (
    ({"name": "3J(HN,HA)", "type": "J3_HN_HA"}, 0.5),
    ({"name": "3J(HN,C')", "type": "J3_HN_C"}, 0.5),
    ({"name": "3J(HN,CB)", "type": "J3_HN_CB"}, 0.5),
    ({"name": "Rg", "type": "Rg"}, 0.01),
    (
        {
            "name": "NOE HA(i)-HN(i+1)",
            "type": "NOE",
            "pairs": [
                ["resid 0 and name HA", "resid 1 and name H"],
                ["resid 1 and name HA", "resid 2 and name H"],
            ],
        },
        0.02,
    ),
)
#: the fitted torsion types of amber99sbildn: φ is C-N-CT-C (periodicities 3, 2), ψ is
#: N-CT-C-N (periodicities 3, 2, 1)
RECOVERY_TORSIONS = {
    "phi": ("torsion/C-N-CT-C/k*",),
    "phi+psi": ("torsion/C-N-CT-C/k*", "torsion/N-CT-C-N/k*"),
}
RECOVERY_WRT = RECOVERY_TORSIONS["phi"]

RECOVERY_SIZES = {
    # name: (replicas, steps per epoch, epochs, equilibration spacing)
    "tiny": (2, 20, 2, 0),
    "quick": (8, 250, 30, 250),
    "default": (16, 500, 40, 250),
}

#: what the recovery experiment must show (issue 5)
RECOVERY_LOSS_DROP = 0.9
RECOVERY_TOLERANCE = 0.1


def recovery_problem(
    n_replicas,
    n_steps,
    perturbation=0.3,
    wrt=RECOVERY_WRT,
    equilibration=250,
    seed=0,
    friction=5.0,
    dt=0.002,
    progress=False,
    log=None,
    backend="jax",
):
    """The parameter-recovery experiment on trialanine in OBC2 (amber99sbildn).

    The torsion k's ``wrt`` are scaled by 1 ± ``perturbation`` (alternating signs); the
    replicas start from frames of a plain run at the perturbed force field (``equilibration``
    steps apart; 0: all from the minimised structure); the targets are the averages of the
    same protocol (same starts, replica noise and length) at the original force field, so the
    original θ is an exact minimiser of the fit's loss (common random numbers).

    Args:
        n_replicas: M, replicas per epoch.
        n_steps: Langevin steps per replica.
        perturbation: relative ± change of the k's.
        wrt: parameter-name patterns of the fitted k's.
        equilibration: steps between the starting frames.
        seed, friction (1/ps), dt (ps): the Langevin integrator's (300 K).
        log: optional ``log(message)`` called at each stage.
        backend: where the target replicas run ("jax" or "cuda", as the fit will).

    Returns:
        dict with system, x0 (M, N, 3), integrator, targets, wrt, start (P_all,), truth (P_all,).
    """
    import jax
    import jax.numpy as jnp

    from timemachine.io import build_peptide, load_system

    log = log or (lambda message: None)
    topology, x = build_peptide("AAA")
    system, x = load_system((topology, x), implicit_solvent="obc2")
    idx = system.select(list(wrt))
    truth = np.array(system.params)
    start = truth.copy()
    start[idx] *= 1.0 + perturbation * np.where(np.arange(idx.size) % 2, -1.0, 1.0)
    energy = system.energy_fn()
    theta = jnp.asarray(start)
    gradient = gradient_fn(system)
    grad = jax.jit(lambda y: gradient(y, theta))
    x = minimize(jax.jit(lambda y: energy(y, theta)), grad, x)
    integrator = LangevinIntegrator(temperature=300.0, friction=friction, dt=dt, seed=seed)
    if equilibration:
        log(
            f"starting structures: {n_replicas} frames {equilibration} steps apart from a run "
            "at the perturbed force field"
        )
        traj = run(
            grad,
            system.masses,
            x,
            integrator,
            equilibration * (n_replicas + 4),
            save_every=equilibration,
        )
        x0 = np.asarray(traj.x)[-n_replicas:]
    else:
        x0 = np.broadcast_to(x, (n_replicas,) + x.shape).copy()
    observables = [observable_from_spec(spec, topology) for spec, _ in RECOVERY_TARGETS]
    probe = target_vector([make_target(o, np.zeros(len(o.labels)), 1.0) for o in observables])
    log(
        f"targets: {n_replicas} replicas × {n_steps} steps at the original force field "
        f"({', '.join(spec['name'] for spec, _ in RECOVERY_TARGETS)})"
    )
    ref = run_replicas(
        system,
        x0,
        integrator,
        n_steps,
        wrt=idx,
        n_replicas=n_replicas,
        params=truth,
        backend=backend,
    )
    values = observable_samples(probe.observable, ref.x, ref.dx_dtheta).mean
    targets, i = [], 0
    for (spec, sigma), obs in zip(RECOVERY_TARGETS, observables, strict=True):
        k = len(obs.labels)
        body = {key: v for key, v in spec.items() if key != "name"}
        targets.append(make_target(obs, values[i : i + k], sigma, name=spec["name"], spec=body))
        i += k
    return dict(
        system=system,
        x0=x0,
        integrator=integrator,
        targets=targets,
        wrt=idx,
        start=start,
        truth=truth,
    )


def _fmt_time(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def run_recovery(
    out,
    *,
    size="quick",
    replicas=None,
    steps=None,
    epochs=None,
    learning_rate=0.05,
    perturbation=0.3,
    torsions="phi",
    seed=0,
    backend="jax",
    executor="in-process",
    n_workers=None,
    resume=False,
    quiet=False,
) -> dict:
    """Run the recovery experiment: build the problem, fit, write the files, print a summary.

    Writes ``out/``: summary.json (this function's return value), history.json, fitted.xml
    (an OpenMM force field), targets.json, checkpoint.npz and the plots loss.png,
    observables.png, parameters.png.

    Args:
        out: output folder (created).
        size: a ``RECOVERY_SIZES`` preset: replicas × steps × epochs and the equilibration.
        replicas, steps, epochs: override the preset's (None: keep it).
        learning_rate: Adam step in relative parameter space.
        perturbation: relative ± change of the k's.
        torsions: a ``RECOVERY_TORSIONS`` key, the fitted torsion types.
        seed: the integrator's seed.
        backend: where the replicas run ("jax" or "cuda").
        executor, n_workers: where the replicas' tasks run (``timemachine.fit``'s):
            "in-process", "dask" (a local cluster of n_workers) or a scheduler address.
        resume: continue from ``out/checkpoint.npz``.
        quiet: no progress messages or bar (the summary is printed regardless).

    Returns:
        the summary dict: parameters (P names), original, perturbed_start, fitted and
        fitted_over_original (P values each, k in kJ/mol), loss_per_epoch, loss_reduction,
        recovered (loss ≥ ``RECOVERY_LOSS_DROP`` lower and every k within
        ``RECOVERY_TOLERANCE`` of the original), the settings, fit_wall_s and wall_s (s).
    """
    from timemachine.fitting.plots import plot_fit
    from timemachine.io import export_forcefield

    check_backend(backend)  # before minutes of set-up, not after
    for name, value, known in (
        ("size", size, RECOVERY_SIZES),
        ("torsions", torsions, RECOVERY_TORSIONS),
    ):
        if value not in known:
            raise InputError(f"{name} {value!r}: not one of {', '.join(sorted(known))}")
    n_replicas, n_steps, n_epochs, equil = RECOVERY_SIZES[size]
    # None keeps the preset's; 0 or a negative count is an error, not the preset
    replicas = n_replicas if replicas is None else check_int(replicas, "replicas", minimum=1)
    steps = n_steps if steps is None else check_int(steps, "steps", minimum=1)
    epochs = n_epochs if epochs is None else check_int(epochs, "epochs", minimum=1)
    learning_rate = check_real(learning_rate, "learning_rate")
    perturbation = check_real(perturbation, "perturbation", allow_zero=True)
    if perturbation >= 1:
        raise InputError(
            f"perturbation must be < 1 (k × (1 - perturbation) > 0), got {perturbation:g}"
        )
    t0 = time.perf_counter()

    def log(message):
        if not quiet:
            print(f"[{time.perf_counter() - t0:5.0f} s] {message}", flush=True)

    wrt_patterns = RECOVERY_TORSIONS[torsions]
    log(
        f"timemachine fit (preset {size}): recover trialanine's {torsions} torsion "
        f"barriers {', '.join(p.split('/')[1] for p in wrt_patterns)} from "
        f"±{perturbation:.0%} perturbed values"
    )
    problem = recovery_problem(
        replicas,
        steps,
        perturbation,
        wrt=wrt_patterns,
        equilibration=equil,
        seed=seed,
        log=log,
        backend=backend,
    )
    system, wrt = problem["system"], problem["wrt"]
    names = [system.param_names[i] for i in wrt]
    truth = problem["truth"][wrt]
    os.makedirs(out, exist_ok=True)
    save_targets(os.path.join(out, "targets.json"), problem["targets"])
    done = 0
    if resume:
        ckpt = load_checkpoint(out)
        done = 0 if ckpt is None else min(ckpt["epoch"], epochs)
    log(
        f"fitting {len(names)} parameters: {epochs} epochs × {replicas} replicas × {steps} "
        f"steps (dt {problem['integrator'].dt * 1000:g} fs), Adam lr {learning_rate:g}"
        + (f"; resuming after epoch {done}" if done else "")
    )

    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(  # disable=None: no bar when stderr is not a terminal
            total=epochs, initial=done, unit="epoch", desc="fit", dynamic_ncols=True, disable=None
        )

    def on_epoch(record):
        if bar is not None:
            ratio = ",".join(f"{p / t:.2f}" for p, t in zip(record["params"], truth, strict=True))
            bar.set_postfix_str(f"loss={record['loss']:.4g} k/k_orig={ratio}", refresh=False)
            bar.update(1)

    t_fit = time.perf_counter()
    try:
        result = fit(
            system,
            problem["x0"],
            problem["integrator"],
            problem["targets"],
            wrt,
            params=problem["start"],
            epochs=epochs,
            n_replicas=replicas,
            n_steps=steps,
            learning_rate=learning_rate,
            fresh_noise=False,
            estimator="pathwise",
            out_dir=out,
            resume=resume,
            progress=False,
            callback=on_epoch,
            backend=backend,
            executor=executor,
            n_workers=n_workers,
        )
    finally:
        if bar is not None:
            bar.close()
    t_fit = time.perf_counter() - t_fit
    export_forcefield(system, result.params, os.path.join(out, "fitted.xml"))
    plot_fit(result, out, reference_params=truth)
    wall = time.perf_counter() - t0
    losses = [r["loss"] for r in result.history]
    ratio = result.theta / truth
    reduction = 1.0 - losses[-1] / losses[0] if losses[0] > 0 else 0.0
    worst = int(np.argmax(np.abs(ratio - 1.0)))
    recovered = bool(
        reduction >= RECOVERY_LOSS_DROP and abs(ratio[worst] - 1.0) <= RECOVERY_TOLERANCE
    )
    summary = {
        "system": "trialanine (AAA), amber99sbildn + OBC2",
        "torsions": torsions,
        "parameters": names,
        "original": truth.tolist(),
        "perturbed_start": problem["start"][wrt].tolist(),
        "fitted": result.theta.tolist(),
        "fitted_over_original": ratio.tolist(),
        "loss_per_epoch": losses,
        "loss_reduction": reduction,
        "recovered": recovered,
        "criteria": {
            "loss_reduction_at_least": RECOVERY_LOSS_DROP,
            "relative_error_at_most": RECOVERY_TOLERANCE,
        },
        "size": size,
        "replicas": replicas,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "learning_rate": learning_rate,
        "backend": backend,
        "fit_wall_s": t_fit,
        "wall_s": wall,
    }
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    print_recovery_summary(summary, out)
    return summary


def print_recovery_summary(summary, out):
    """Print ``run_recovery``'s summary dict as a table (k's, loss, verdict, files in ``out``)."""
    s, names = summary, summary["parameters"]
    losses = s["loss_per_epoch"]
    width = max(len(n) for n in names)
    print(
        f"\nsummary ({len(losses)} epochs, {_fmt_time(s['wall_s'])}; "
        f"fitting {_fmt_time(s['fit_wall_s'])}):"
    )
    print(f"  {'parameter':<{width}}  original     start    fitted  fitted/original")
    for n, a, b, c in zip(names, s["original"], s["perturbed_start"], s["fitted"], strict=True):
        print(f"  {n:<{width}}  {a:8.4f}  {b:8.4f}  {c:8.4f}  {c / a:6.3f} ({c / a - 1:+.1%})")
    print(f"  loss {losses[0]:.4g} -> {losses[-1]:.4g} ({s['loss_reduction']:.1%} lower)")
    recovered = s["recovered"]
    verdict = "met" if recovered else "NOT met"
    print(
        f"  recovery (loss ≥ {RECOVERY_LOSS_DROP:.0%} lower, every k within "
        f"{RECOVERY_TOLERANCE:.0%} of the original): {verdict}"
        + ("" if recovered or s["size"] == "default" else " — the full run is --size default")
    )
    print(
        f"wrote {out}/: summary.json, history.json, fitted.xml (OpenMM force field), "
        "targets.json, checkpoint.npz, loss.png, observables.png, parameters.png"
    )
