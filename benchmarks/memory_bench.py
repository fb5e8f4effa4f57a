"""Resident memory of long sensitivity runs, and the state each propagation mode holds.

    python benchmarks/memory_bench.py [--json benchmarks/memory_bench.json] [--quick]

1. Peak RSS against run length. Trialanine (``tm.build_peptide("AAA")``, 33 atoms) under
   OBC2, exact mode, dx/dθ for every torsion force constant (P = 18), frames streamed to
   disk (``simulate(..., out_dir=tmp, save_every=...)``). Each length runs in a fresh
   subprocess, which reports its own peak resident set size (``VmHWM`` from
   /proc/self/status, else ``ru_maxrss``). With streaming the frames of one chunk are the
   only ones in memory, so the peak must not grow with the run: 10,000 and 100,000 steps
   should give about the same number. A 1,000-step run is included as a baseline.
2. State memory (``traj.memory_bytes``): exact mode holds x, v, dx/dθ, dv/dθ, O(P·N);
   window mode adds its ring of k ζ's, O(k·P·N). Reported for several k, for trialanine
   (P = 18) and, by the same formula, villin (N = 582, P = 79).

Prints markdown tables and writes JSON.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def peak_rss_bytes():
    """Peak resident set size of this process, bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def child(n_steps, save_every, chunk_steps, out_dir):
    """Run one streamed simulation in this process; print a JSON line with its numbers."""
    sys.path.insert(0, ROOT)
    import jax

    jax.config.update("jax_enable_x64", True)
    import random

    import timemachine as tm

    random.seed(2024)  # Modeller.addHydrogens draws from Python's random
    system, x = tm.load_system(
        tm.build_peptide("AAA"), forcefield=("amber99sbildn.xml",), implicit_solvent="obc2"
    )
    energy, theta = system.energy_fn(), jax.numpy.asarray(system.params)
    x = tm.minimize(
        lambda y: energy(y, theta), jax.grad(lambda y: energy(y, theta)), x, tolerance=1.0
    )
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    before = peak_rss_bytes()
    t0 = time.perf_counter()
    # max_sensitivity=None: pathwise dx/dθ of chaotic dynamics grow exponentially (here
    # past the default guard of 1e8 nm per unit θ after ~21,500 steps); this run measures
    # memory, so it keeps going and reports the final magnitude instead
    traj = tm.simulate(
        system, x, integrator, n_steps, wrt="torsion/*/k*", save_every=save_every,
        chunk_steps=chunk_steps, out_dir=out_dir, progress=False, max_sensitivity=None,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    files = [f for f in os.listdir(out_dir) if f.startswith("chunk_")]
    disk = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    print(
        json.dumps(
            {
                "n_steps": n_steps,
                "save_every": save_every,
                "chunk_steps": chunk_steps,
                "frames": traj.n_frames,
                "chunks": len(files),
                "disk_bytes": disk,
                "peak_rss_before_run": before,
                "peak_rss": peak_rss_bytes(),
                "wall_s": wall,
                "P": len(traj.param_names),
                "n_atoms": int(traj.x.shape[1]),
                "memory_bytes": traj.memory_bytes,
                "max_abs_dx_dtheta_last": float(abs(traj.dx_dtheta[-1]).max()),
            }
        )
    )


def run_length(n_steps, save_every, chunk_steps):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, os.path.abspath(__file__), "--child", str(n_steps),
            "--save-every", str(save_every), "--chunk-steps", str(chunk_steps),
            "--out-dir", os.path.join(tmp, "traj"),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory_bench child for {n_steps} steps failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def state_table(ks):
    sys.path.insert(0, ROOT)
    from timemachine.sensitivity.propagation import expected_state_bytes

    rows = []
    for system, n, p in (("trialanine-obc2", 33, 18), ("villin-vacuum", 582, 79)):
        rows.append({"system": system, "N": n, "P": p, "method": "exact", "window": None,
                     "bytes": expected_state_bytes("exact", n, p)["total"]})  # fmt: skip
        for k in ks:
            rows.append({"system": system, "N": n, "P": p, "method": "window", "window": k,
                         "bytes": expected_state_bytes("window", n, p, k)["total"]})  # fmt: skip
    return rows


def measured_state(ks):
    """``traj.memory_bytes['state']`` of short real runs (trialanine), to check the formula."""
    sys.path.insert(0, ROOT)
    import jax

    jax.config.update("jax_enable_x64", True)
    import timemachine as tm

    system, x = tm.load_system(tm.build_peptide("AAA"), implicit_solvent="obc2")
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    out = {}
    for method, k in [("exact", None)] + [("window", k) for k in ks]:
        # a short run is enough: the state has its full size from the first step
        traj = tm.simulate(system, x, integrator, 2, wrt="torsion/*/k*", save_every=1,
                           method=method, window=k, progress=False)  # fmt: skip
        from timemachine.sensitivity import state_memory_bytes

        held = state_memory_bytes(traj.final_state)["total"]
        out[f"{method}-{k}"] = {"reported": traj.memory_bytes["state"], "held": held}
    return out


def mib(b):
    return b / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(HERE, "memory_bench.json"))
    parser.add_argument("--quick", action="store_true", help="10k-step ladder only to 20k")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--chunk-steps", type=int, default=5000)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.save_every, args.chunk_steps, args.out_dir)
        return

    lengths = [1_000, 10_000, 20_000] if args.quick else [1_000, 10_000, 100_000]
    runs = []
    for n in lengths:
        r = run_length(n, args.save_every, args.chunk_steps)
        runs.append(r)
        print(f"  {n} steps: peak RSS {mib(r['peak_rss']):.1f} MiB, {r['wall_s']:.1f} s",
              file=sys.stderr)  # fmt: skip
    ks = [10, 100, 1000, 5000]
    states = state_table(ks)
    measured = measured_state(ks[:3])

    print("trialanine (33 atoms) in OBC2, exact mode, P = 18 torsion k's, γ = 1/ps, δt = 1 fs;")
    print(f"frames every {args.save_every} steps streamed to disk in chunks of "
          f"{args.chunk_steps} steps; one subprocess per length\n")  # fmt: skip
    print("| steps | frames | chunk files | on disk MiB | peak RSS MiB | RSS before run MiB "
          "| wall s |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['n_steps']} | {r['frames']} | {r['chunks']} | {mib(r['disk_bytes']):.1f} "
              f"| {mib(r['peak_rss']):.1f} | {mib(r['peak_rss_before_run']):.1f} "
              f"| {r['wall_s']:.1f} |")  # fmt: skip
    by_len = {r["n_steps"]: r for r in runs}
    short, long_ = by_len[lengths[1]], by_len[lengths[-1]]
    growth = long_["peak_rss"] / short["peak_rss"]
    print("\nmax |dx/dθ| at the last frame: " + ", ".join(
        f"{r['n_steps']} steps {r['max_abs_dx_dtheta_last']:.3g} nm" for r in runs))  # fmt: skip
    print(f"\npeak RSS {lengths[-1]} steps / {lengths[1]} steps = {growth:.3f} "
          f"(flat: ≈ 1; frames held in memory at once: one chunk, "
          f"{mib(long_['memory_bytes']['chunk']):.2f} MiB)\n")  # fmt: skip
    print("| system | N | P | method | window k | state MiB |")
    print("|---|---:|---:|---|---:|---:|")
    for s in states:
        k = "" if s["window"] is None else s["window"]
        print(f"| {s['system']} | {s['N']} | {s['P']} | {s['method']} | {k} "
              f"| {mib(s['bytes']):.3f} |")  # fmt: skip
    print("\nmeasured on trialanine runs (traj.memory_bytes['state'] vs the arrays held):")
    for key, v in measured.items():
        print(f"- {key}: reported {v['reported']} B, held {v['held']} B")

    import jax

    out = {
        "device": "cpu",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "save_every": args.save_every,
        "chunk_steps": args.chunk_steps,
        "runs": runs,
        "peak_rss_ratio_long_over_short": growth,
        "state_bytes": states,
        "state_measured": measured,
    }
    sys.path.insert(0, ROOT)
    from timemachine.files import atomic_json  # light: no JAX

    atomic_json(args.json, out, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
