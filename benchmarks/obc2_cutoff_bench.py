"""Cutoff OBC2 implicit solvent: the cost of a plain step with N, on the Verlet list and
summed over all pairs, against OpenMM CPU's native GBSAOBCForce (issue 20). A benchmark,
not a test: it prints a table and writes JSON (atomically).

    python benchmarks/obc2_cutoff_bench.py [--json benchmarks/obc2_cutoff_bench.json]
        [--copies 2 4 9 18 35] [--cutoff 1.0] [--steps 10] [--exact-up-to 6000]

The systems: ``--copies`` copies of the villin headpiece (``examples/rg_villin``, 582
atoms, amber99sbildn + implicit/obc2) on a cubic grid 3.5 nm apart, N = 582 × copies
(1,164 to 20,370 atoms by default): a crowded solution of a small protein, where each
atom meets about as many others within the cutoff as in a larger protein. OpenMM's
``CutoffNonPeriodic`` with ``--cutoff`` (reaction field, dielectric 1, and the GB term
with the same cutoff), 1 fs steps at 300 K, γ = 1/ps, no constraints. Side by side for
each N, interleaved:

* ``list_ms``: one plain Langevin step of the engine (``EquilibriumChains``), the Born
  integrals and GB pairs summed over the term's Verlet list (``gbsa.obc2_neighbour_*``,
  skin 0.1 nm, the default of ``load_system``), the LJ + reaction-field pairs over theirs;
* ``exact_ms``: the same with the lists off (``with_neighbour_list(skin=0)``): every
  pair at every step, O(N²) (up to ``--exact-up-to`` atoms);
* ``openmm_ms``: one step of OpenMM's CPU platform with obc2.xml's CustomGBForce
  swapped for the native ``GBSAOBCForce`` with the same cutoff
  (``plain_md.native_gb_system``), all threads.

Each is the median of 3 timings of ``--steps`` steps after a compiling warm-up. The
exponents are least-squares slopes of log(ms) against log(N) (1: linear; 2: all pairs).

Then the sensitivity rows, for ``--zeta-copies`` copies, P = ``--params`` torsion
barriers (the first of ``torsion/*/k*``):

* ``gb_zeta_ms``: one call of the GB term's structured ζ on its list as the sensitivity
  step runs it (``OBC2.gradient_and_zeta`` with the CPU custom call ``tm_gb_list_zeta``:
  per-pair scalars and the Born-radius chain contracted with all P tangents at once),
  against ``gb_zeta_jax_ms``: its XLA reference (``gbsa.obc2_neighbour_gradient_and_zeta``),
  ``gb_linearize_ms``: the same ζ by ``jax.linearize`` of the term's list gradient,
  vmapped over the tangents (what ζ was before), and ``gb_gradient_ms``: the plain list
  gradient (the custom call ``tm_gb_list_gradient``);
* ``sensitivity_ms`` and ``plain_ms``: the marginal cost of one step of ``tm.simulate``
  carrying dx/dθ and of one plain step of the whole System (``periodic_bench``'s
  ``_marginal``), and their ratio.
"""

import argparse
import json
import os
import platform
import statistics
import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import timemachine as tm  # noqa: E402
from timemachine import neighbours  # noqa: E402
from timemachine.bench.plain_md import native_gb_system  # noqa: E402
from timemachine.files import atomic_write_text  # noqa: E402
from timemachine.fitting.sampling import EquilibriumChains  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from periodic_bench import _median_time, time_plain_marginal, time_sensitivity  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VILLIN = os.path.join(HERE, "..", "examples", "rg_villin", "villin_hp35.pdb")
FILES = ("amber99sbildn.xml", "implicit/obc2.xml")
SPACING = 3.5  # nm between the copies' centres


def villin_grid(copies):
    """(topology, positions nm) of ``copies`` villin headpieces on a cubic grid."""
    import openmm.app as app
    import openmm.unit as unit

    pdb = app.PDBFile(VILLIN)
    x = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    x = x - x.mean(axis=0)
    side = int(np.ceil(copies ** (1 / 3)))
    modeller = app.Modeller(app.Topology(), [])
    for c in range(copies):
        shift = SPACING * np.array([c // (side * side), (c // side) % side, c % side])
        modeller.add(pdb.topology, (x + shift) * unit.nanometer)
    return modeller.topology, np.asarray(modeller.positions.value_in_unit(unit.nanometer))


def ours(system, x, integ, steps):
    """A function timing ``steps`` plain steps (compiled on the first call)."""
    chains = EquilibriumChains(system, x, integ, n_chains=1, save_every=steps)
    theta = np.asarray(system.params)
    chains.sample(theta, steps)  # compiles
    return lambda: chains.sample(theta, steps)


def openmm_runner(topology, x, cutoff, integ, steps):
    import openmm as mm
    import openmm.app as app
    import openmm.unit as unit

    omm = app.ForceField(*FILES).createSystem(
        topology, nonbondedMethod=app.CutoffNonPeriodic, nonbondedCutoff=cutoff * unit.nanometer,
        constraints=None, rigidWater=False,
    )  # fmt: skip
    omm = native_gb_system(omm, cutoff=cutoff)
    lmi = mm.LangevinMiddleIntegrator(integ.temperature, integ.friction, integ.dt)
    ctx = mm.Context(omm, lmi, mm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(x * unit.nanometer)
    lmi.step(steps)
    return lambda: (lmi.step(steps), ctx.getState(getEnergy=True))


def zeta_row(copies, cutoff, n_params, integ, steps):
    """The sensitivity row (module docstring) of ``copies`` villins."""
    import jax.numpy as jnp

    from timemachine.backends import xla_cpu, xla_cpu_gb
    from timemachine.structured.autodiff import autodiff_part

    top, x = villin_grid(copies)
    system, x = tm.load_system(
        (top, x), forcefield=FILES[:1], implicit_solvent="obc2",
        nonbonded_method="CutoffNonPeriodic", cutoff=cutoff,
    )  # fmt: skip
    k = next(i for i, t in enumerate(system.terms) if t.kind == "gb")
    gb = system.terms[k]
    wrt = system.select(["torsion/*/k*"])[:n_params]
    theta = jnp.asarray(system.params)
    nb = jax.jit(lambda y: neighbours.build(system, y))(x)[k]
    t = jnp.asarray(np.random.default_rng(0).normal(0.0, 0.01, (wrt.size,) + x.shape))
    calls = {
        "gb_zeta_ms": jax.jit(
            lambda y, th, dx, nb: gb.gradient_and_zeta(y, th, dx, wrt, nb, host=xla_cpu)
        ),
        "gb_zeta_jax_ms": jax.jit(lambda y, th, dx, nb: gb.gradient_and_zeta(y, th, dx, wrt, nb)),
        "gb_linearize_ms": jax.jit(lambda y, th, dx, nb: autodiff_part(gb, wrt)(y, th, dx, nb)),
    }
    args = {name: (x, theta, t, nb) for name in calls}
    calls["gb_gradient_ms"] = jax.jit(lambda y, th, nb: xla_cpu_gb.gb_list_gradient(gb, y, th, nb))
    args["gb_gradient_ms"] = (x, theta, nb)
    row = {"copies": copies, "n_atoms": int(system.n_atoms), "n_params": int(wrt.size),
           "gb_list_capacity": int(gb.neighbour_capacity)}  # fmt: skip
    for name, fn in calls.items():
        jax.block_until_ready(fn(*args[name]))  # compiles
        row[name] = 1e3 * _median_time(lambda f=fn, a=args[name]: jax.block_until_ready(f(*a)))
    row["gb_linearize_over_zeta"] = row["gb_linearize_ms"] / row["gb_zeta_ms"]
    row["gb_zeta_over_gradient"] = row["gb_zeta_ms"] / row["gb_gradient_ms"]
    row["plain_ms"], _ = time_plain_marginal(system, x, integ, steps)
    row["sensitivity_ms"], _, _ = time_sensitivity(system, x, integ, steps, wrt=wrt)
    row["sensitivity_over_plain"] = row["sensitivity_ms"] / row["plain_ms"]
    return row


def _exponent(rows, key):
    pts = [(r["n_atoms"], r[key]) for r in rows if r.get(key)]
    if len(pts) < 2:
        return None
    n, t = np.array(pts, dtype=float).T
    return float(np.polyfit(np.log(n), np.log(t), 1)[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "obc2_cutoff_bench.json"))
    ap.add_argument("--copies", type=int, nargs="*", default=[2, 4, 9, 18, 35])
    ap.add_argument("--cutoff", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--exact-up-to", type=int, default=6000)
    ap.add_argument("--zeta-copies", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--params", type=int, default=20)
    args = ap.parse_args()
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.001, seed=0)
    rows = []
    for copies in args.copies:
        top, x = villin_grid(copies)
        system, x = tm.load_system(
            (top, x), forcefield=FILES[:1], implicit_solvent="obc2",
            nonbonded_method="CutoffNonPeriodic", cutoff=args.cutoff,
        )  # fmt: skip
        assert neighbours.has_neighbours(system)
        gb = next(t for t in system.terms if t.kind == "gb")
        runs = {"list_ms": ours(system, x, integ, args.steps),
                "openmm_ms": openmm_runner(top, x, args.cutoff, integ, args.steps)}  # fmt: skip
        if system.n_atoms <= args.exact_up_to:
            exact = neighbours.with_neighbour_list(system, x, skin=0)
            runs["exact_ms"] = ours(exact, x, integ, args.steps)
        times = {k: [] for k in runs}
        for _ in range(3):  # interleaved: a shared machine's load falls on all alike
            for k, run in runs.items():
                times[k].append(_median_time(run, 1))
        row = {"copies": copies, "n_atoms": int(system.n_atoms),
               "gb_list_capacity": int(gb.neighbour_capacity)}  # fmt: skip
        row.update({k: 1e3 * statistics.median(v) / args.steps for k, v in times.items()})
        row["list_over_openmm"] = row["list_ms"] / row["openmm_ms"]
        rows.append(row)
        print(f"{copies} copies: {row}", file=sys.stderr, flush=True)
    zeta_rows = []
    for copies in args.zeta_copies:
        zeta_rows.append(zeta_row(copies, args.cutoff, args.params, integ, args.steps))
        print(f"sensitivity, {copies} copies: {zeta_rows[-1]}", file=sys.stderr, flush=True)
    record = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
              "jax": jax.__version__, "cutoff_nm": args.cutoff, "dt_ps": integ.dt,
              "steps_timed": args.steps, "rows": rows, "zeta_rows": zeta_rows,
              "exponent_list": _exponent(rows, "list_ms"),
              "exponent_exact": _exponent(rows, "exact_ms"),
              "exponent_openmm": _exponent(rows, "openmm_ms")}  # fmt: skip
    atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    print("| N | list (ms/step) | all pairs (ms/step) | OpenMM CPU (ms/step) | list / OpenMM |")
    print("|---|---|---|---|---|")
    for r in rows:
        exact = f"{r['exact_ms']:.1f}" if "exact_ms" in r else "-"
        print(f"| {r['n_atoms']} | {r['list_ms']:.1f} | {exact} | {r['openmm_ms']:.2f} | "
              f"{r['list_over_openmm']:.1f} |")  # fmt: skip
    print(
        "| N | P | GB ζ, custom call (ms) | GB ζ, XLA (ms) | GB ζ, linearize (ms) | "
        "GB gradient (ms) | sensitivity step (ms) | plain step (ms) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in zeta_rows:
        print(f"| {r['n_atoms']} | {r['n_params']} | {r['gb_zeta_ms']:.1f} | "
              f"{r['gb_zeta_jax_ms']:.0f} | "
              f"{r['gb_linearize_ms']:.0f} | {r['gb_gradient_ms']:.2f} | "
              f"{r['sensitivity_ms']:.1f} | {r['plain_ms']:.2f} | "
              f"{r['sensitivity_over_plain']:.1f} |")  # fmt: skip

    def fmt(e):
        return "n/a" if e is None else f"{e:.2f}"

    print(
        f"cost ∝ N^{fmt(record['exponent_list'])} on the list, "
        f"N^{fmt(record['exponent_exact'])} over all pairs, "
        f"OpenMM CPU N^{fmt(record['exponent_openmm'])}; JSON: {args.json}"
    )


if __name__ == "__main__":
    main()
