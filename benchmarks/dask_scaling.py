"""Replicas on a local Dask cluster: the scaling of one pathwise epoch with the workers,
and the overhead per task (issue 19). A benchmark, not a test: it prints a table and
writes JSON (atomically).

    python benchmarks/dask_scaling.py [--json benchmarks/dask_scaling.json]
                                      [--steps 2500] [--replicas 8] [--workers 1 2 4]

The epoch: one epoch of ``tm.fit(estimator="pathwise")`` on trialanine (amber99sbildn +
OBC2, ``tm.build_peptide("AAA")``, minimised), θ the φ/ψ barriers ``torsion/C-N-CT-C/k*``
and ``torsion/N-CT-C-N/k*``, fitted to the Graf et al. 2007 couplings; M replicas of
``--steps`` steps of 2 fs (5 ps: near the longest pathwise horizon over which dx/dθ of
this chaotic system stays usable; at 8 ps it is past 1e12 nm per unit), divided evenly
among the workers (one task per worker, vmapped there). For each worker count a
``LocalCluster`` is started (single-threaded workers, each pinned to one CPU: workers
beyond the CPU count share them) and one fit of 1 + ``--repeat`` epochs runs on it: the
first epoch compiles on every worker (``first_epoch_s``), the others are timed
(``epoch_s``: the median of their records' ``wall_s``; the fit's set-up left out).
``in-process`` is the same fit as one vmapped program in this process (XLA's threads on
every core), for reference. The first epoch's gradient of every run is compared with the
in-process one (max relative difference).

The same for the equilibrium fit's chains (``--chains``, default 4; 0 skips them): one
fluctuation epoch samples each chain for ``--decorrelation-steps`` + ``--chain-steps``
steps, one chain a task; every epoch resamples (``reweight_threshold`` above 1), so each
timed epoch runs the chains on the cluster.

The overhead per task is the wall time of ``Executor.map`` over ``--replicas`` no-op
tasks on the warm 1-worker cluster, divided by their number: the scheduling and
transfer cost that a task must be long against.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import timemachine as tm  # noqa: E402
from timemachine.files import atomic_write_text  # noqa: E402
from timemachine.fitting.executor import open_executor  # noqa: E402
from timemachine.fitting.targets import graf2007_targets  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WRT = ["torsion/C-N-CT-C/k*", "torsion/N-CT-C-N/k*"]


def _noop(i):
    return i


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "dask_scaling.json"))
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--chain-steps", type=int, default=5000)
    ap.add_argument("--decorrelation-steps", type=int, default=1000)
    args = ap.parse_args()

    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x), implicit_solvent="obc2")
    x = np.asarray(tm.minimize_system(system, x))
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.002, seed=0)
    targets = graf2007_targets(system.topology)

    def fit(executor):
        """(wall s of each epoch, the first epoch's gradient) of one fit of 1 + repeat
        epochs: the first compiles (the programs, the observables), the others are timed."""
        r = tm.fit(system, x, integ, targets, WRT, estimator="pathwise",
                   epochs=1 + args.repeat, n_replicas=args.replicas, n_steps=args.steps,
                   progress=False, executor=executor)  # fmt: skip
        walls = [rec["wall_s"] for rec in r.history]
        return walls, np.asarray(r.history[0]["gradient"])

    def sample(executor):
        """The same for the fluctuation estimator's chains (every epoch sampled)."""
        r = tm.fit(system, x, integ, targets, WRT, estimator="fluctuation",
                   epochs=1 + args.repeat, n_chains=args.chains, sample_steps=args.chain_steps,
                   decorrelation_steps=args.decorrelation_steps, save_every=250, blocks=4,
                   min_ess=1.0, max_extend=0, reweight_threshold=2.0,
                   patience=args.repeat + 2, progress=False, executor=executor)  # fmt: skip
        assert all(rec["sampled"] for rec in r.history)
        walls = [rec["wall_s"] for rec in r.history]
        return walls, np.asarray(r.history[0]["gradient"])

    runs = {"replicas": fit} | ({"chains": sample} if args.chains else {})
    tables = {kind: {} for kind in runs}
    refs = {}
    overhead = None

    def record(kind, name, walls, g):
        diff = float(np.abs(g - refs[kind]).max() / np.abs(refs[kind]).max())
        tables[kind][name] = {"first_epoch_s": walls[0], "epoch_s": statistics.median(walls[1:]),
                              "gradient_rel_diff": diff}  # fmt: skip
        print(f"{kind}, {name}: {tables[kind][name]['epoch_s']:.2f} s", file=sys.stderr)

    for kind, run in runs.items():
        walls, refs[kind] = run("in-process")
        record(kind, "in-process", walls, refs[kind])
    for n in args.workers:
        with open_executor("dask", n_workers=n) as ex:
            for kind, run in runs.items():
                record(kind, f"{n} workers", *run(ex))
            if n == 1:
                ex.map(_noop, range(args.replicas))  # warm
                t0 = time.perf_counter()
                ex.map(_noop, range(args.replicas))
                overhead = (time.perf_counter() - t0) / args.replicas

    for rows in tables.values():
        base = rows.get("1 workers", {}).get("epoch_s")
        for r in rows.values():
            r["speedup_over_1_worker"] = None if base is None else base / r["epoch_s"]
    rows = tables["replicas"]
    record = {
        "machine": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "replicas": args.replicas,
        "steps": args.steps,
        "dt_ps": 0.002,
        "overhead_per_task_s": overhead,
        "rows": rows,
        "chains": None
        if not args.chains
        else {"n_chains": args.chains, "sample_steps": args.chain_steps,
              "decorrelation_steps": args.decorrelation_steps, "rows": tables["chains"]},
    }  # fmt: skip
    atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    print("| work | executor | epoch (s) | first epoch, compiling (s) | speed-up over 1 worker "
          "| gradient vs in-process |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for kind, kind_rows in tables.items():
        for name, r in kind_rows.items():
            s = r["speedup_over_1_worker"]
            s = "" if s is None else f"{s:.2f}×"
            print(f"| {kind} | {name} | {r['epoch_s']:.2f} | {r['first_epoch_s']:.1f} | {s} | "
                  f"{r['gradient_rel_diff']:.1e} |")  # fmt: skip
    if overhead is not None:
        print(f"overhead per task (no-op tasks, warm 1-worker cluster): {overhead * 1e3:.1f} ms")
    chains = (f"; {args.chains} chains × ({args.decorrelation_steps} + {args.chain_steps}) "
              "steps" if args.chains else "")  # fmt: skip
    print(f"{args.replicas} replicas × {args.steps} steps{chains}; JSON: {args.json}")


if __name__ == "__main__":
    main()
