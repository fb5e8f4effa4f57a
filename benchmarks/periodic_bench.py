"""Periodic boxes: the cost of a plain step with N, against OpenMM's CPU platform (issue 20).
A benchmark, not a test: it prints a table and writes JSON (atomically).

    python benchmarks/periodic_bench.py [--json benchmarks/periodic_bench.json]
        [--edges 2.2 3 4 5 6.2] [--method PME] [--steps 20]

The systems: cubic boxes of flexible TIP3P water (``Modeller.addSolvent`` with the given
edge, nm), N ≈ 100 L³ atoms, under ``nonbonded_method`` (PME or CutoffPeriodic) with a
0.9 nm cutoff, 0.5 fs steps at 300 K, γ = 1/ps. For each box, side by side in one run:

* ``ours_ms``: one plain Langevin step of the engine (``EquilibriumChains``: the jitted
  step, the energy's gradient by autodiff), the median over 3 timings of ``--steps``
  steps after a warm-up that compiles; pairs through the cell list where every edge
  holds 3 cutoffs (``cell_list``), densely otherwise;
* ``openmm_ms``: one step of OpenMM's CPU platform (its own PME and neighbour list,
  ``LangevinMiddleIntegrator``, all threads), timed the same way;
* ``pairs``: how the step sums its cutoff pairs: over a Verlet list carried through the
  steps (``timemachine.neighbours``, the default of ``load_system`` with a cutoff; skin
  0.1 nm), or densely where the box is too small for one.

Then the sensitivity row, side by side on one system: trialanine in TIP3P (flexible,
PME 0.9 nm, ``--sensitivity-padding`` nm of water, about 1,600 atoms), one step of
``tm.simulate`` carrying dx/dθ for P ≈ 40 parameters (every torsion barrier and charge
of the solute, water's charges and oxygen's σ and ε), against one plain step of the
same System and one OpenMM CPU step: ``sensitivity_over_plain``. Both of ours are the
marginal cost of a step (the slope of a call's time between ``--steps`` and 3×
``--steps`` steps, medians of 3 calls), with each call's fixed cost (start checks, the
first list build, the frames' copies) reported beside it as ``*_call_ms``.

The exponent is the least-squares slope of log(ours_ms) against log(N) over the water
boxes (1: linear; 2: all pairs).
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
from timemachine import neighbours  # noqa: E402
from timemachine.files import atomic_write_text  # noqa: E402
from timemachine.fitting.sampling import EquilibriumChains  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ("amber99sbildn.xml", "tip3p.xml")


def water_box(edge):
    """(topology, positions nm) of a cubic box of TIP3P water, edge nm."""
    import openmm as mm
    import openmm.app as app
    import openmm.unit as unit

    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField(*FILES), model="tip3p",
                        boxSize=mm.Vec3(edge, edge, edge) * unit.nanometer)  # fmt: skip
    x = np.asarray(modeller.positions.value_in_unit(unit.nanometer)).reshape(-1, 3)
    return modeller.topology, x


def _median_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_ours(system, x, integ, steps):
    chains = EquilibriumChains(system, x, integ, n_chains=1, save_every=steps)
    theta = np.asarray(system.params)
    chains.sample(theta, steps)  # compiles
    return _median_time(lambda: chains.sample(theta, steps)) / steps


def time_openmm(topology, x, method, integ, steps):
    import openmm as mm
    import openmm.app as app
    import openmm.unit as unit

    omm = app.ForceField(*FILES).createSystem(
        topology, nonbondedMethod=getattr(app, method), nonbondedCutoff=0.9 * unit.nanometer,
        constraints=None, rigidWater=False,
    )  # fmt: skip
    lmi = mm.LangevinMiddleIntegrator(integ.temperature, integ.friction, integ.dt)
    ctx = mm.Context(omm, lmi, mm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(x * unit.nanometer)
    lmi.step(steps)
    return _median_time(lambda: (lmi.step(steps), ctx.getState(getEnergy=True))) / steps


def _marginal(run, steps, repeats=3):
    """(ms per step, ms per call): the slope and intercept of a call's time against its
    steps, from the medians of ``repeats`` calls of ``steps`` and of 3 ``steps`` steps.
    What one more step costs, without the call's fixed work (start checks, the first
    list build, the frames' copies), which a long run spreads over its steps."""
    short = _median_time(lambda: run(steps), repeats)
    long = _median_time(lambda: run(3 * steps), repeats)
    per_step = (long - short) / (2 * steps)
    return 1e3 * per_step, 1e3 * (short - steps * per_step)


def time_sensitivity(system, x, integ, steps, wrt=None):
    """(ms per step, ms per call, P) of ``tm.simulate`` carrying dx/dθ for ``wrt``."""
    wrt = np.arange(system.n_params) if wrt is None else np.asarray(wrt)

    def run(n):
        tm.simulate(system, x, integ, n, wrt=wrt, save_every=n, progress=False)

    run(steps), run(3 * steps)  # compiles (the program is compiled once per save_every)
    return _marginal(run, steps) + (wrt.size,)


def time_plain_marginal(system, x, integ, steps):
    """(ms per step, ms per call) of the plain step (``EquilibriumChains``), as
    ``time_sensitivity``'s."""
    chains = EquilibriumChains(system, x, integ, n_chains=1, save_every=steps)
    theta = np.asarray(system.params)
    chains.sample(theta, 3 * steps)  # compiles
    return _marginal(lambda n: chains.sample(theta, n), steps)


def sensitivity_row(padding, integ, steps):
    """The sensitivity row (module docstring) on trialanine in ``padding`` nm of water."""
    top, x = tm.build_peptide("AAA")
    box = tm.solvate((top, x), padding=padding, cutoff=0.9, constraints=None, rigid_water=False)
    system, x = tm.load_system((box.topology, box.positions), forcefield=FILES,
                               nonbonded_method="PME", cutoff=0.9)  # fmt: skip
    x = np.asarray(tm.minimize_system(system, x, tolerance=100.0, max_iterations=100,
                                      warn=False))  # fmt: skip
    wrt = system.select(["torsion/*/k*", "charge/*", "sigma/OW/*", "epsilon/OW/*"])
    plain, plain_call = time_plain_marginal(system, x, integ, steps)
    sens, sens_call, _ = time_sensitivity(system, x, integ, steps, wrt=wrt)
    omm = 1e3 * time_openmm(box.topology, x, "PME", integ, steps)
    return {"system": f"trialanine + {(system.n_atoms - 33) // 3} TIP3P, PME 0.9 nm",
            "n_atoms": int(system.n_atoms), "n_params": int(wrt.size), "plain_ms": plain,
            "plain_call_ms": plain_call, "sensitivity_ms": sens,
            "sensitivity_call_ms": sens_call, "sensitivity_over_plain": sens / plain,
            "openmm_ms": omm, "neighbour_list": neighbours.has_neighbours(system)}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "periodic_bench.json"))
    ap.add_argument("--edges", type=float, nargs="+", default=[2.2, 3.0, 4.0, 5.0, 6.2])
    ap.add_argument("--method", default="PME", choices=["PME", "CutoffPeriodic"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sensitivity-padding", type=float, default=1.3)
    args = ap.parse_args()
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0005, seed=0)
    rows = []
    for edge in args.edges:
        top, x = water_box(edge)
        system, x = tm.load_system((top, x), forcefield=FILES, nonbonded_method=args.method,
                                   cutoff=0.9)  # fmt: skip
        x = np.asarray(tm.minimize_system(system, x, tolerance=100.0, max_iterations=100,
                                          warn=False))  # fmt: skip
        row = {
            "edge_nm": edge,
            "n_atoms": int(system.n_atoms),
            "pairs": "Verlet list" if neighbours.has_neighbours(system) else "dense",
        }
        row["ours_ms"] = 1e3 * time_ours(system, x, integ, args.steps)
        row["openmm_ms"] = 1e3 * time_openmm(top, x, args.method, integ, args.steps)
        row["ours_over_openmm"] = row["ours_ms"] / row["openmm_ms"]
        rows.append(row)
        print(f"{edge} nm: {row}", file=sys.stderr, flush=True)
    exponent = openmm_exponent = None
    if len(rows) >= 2:
        log_n = np.log([r["n_atoms"] for r in rows])
        exponent = float(np.polyfit(log_n, np.log([r["ours_ms"] for r in rows]), 1)[0])
        openmm_exponent = float(np.polyfit(log_n, np.log([r["openmm_ms"] for r in rows]), 1)[0])
    sens = sensitivity_row(args.sensitivity_padding, integ, args.steps)
    print(f"sensitivity: {sens}", file=sys.stderr, flush=True)
    record = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
              "jax": jax.__version__, "method": args.method, "dt_ps": integ.dt,
              "steps_timed": args.steps, "rows": rows, "exponent": exponent,
              "openmm_exponent": openmm_exponent, "sensitivity": sens}  # fmt: skip
    atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    print("| edge (nm) | N | pairs | ours (ms/step) | OpenMM CPU (ms/step) | ours / OpenMM |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['edge_nm']} | {r['n_atoms']} | {r['pairs']} | {r['ours_ms']:.1f} | "
              f"{r['openmm_ms']:.2f} | {r['ours_over_openmm']:.1f} |")  # fmt: skip
    print(f"sensitivity step, {sens['system']} (N = {sens['n_atoms']}, P = {sens['n_params']}): "
          f"{sens['sensitivity_ms']:.0f} ms = {sens['sensitivity_over_plain']:.1f} plain steps "
          f"({sens['plain_ms']:.1f} ms; OpenMM CPU {sens['openmm_ms']:.1f} ms; per call "
          f"{sens['sensitivity_call_ms']:.0f} ms and {sens['plain_call_ms']:.0f} ms)")  # fmt: skip
    if exponent is not None:
        print(f"cost ∝ N^{exponent:.2f} (OpenMM CPU: N^{openmm_exponent:.2f}); JSON: {args.json}")


if __name__ == "__main__":
    main()
