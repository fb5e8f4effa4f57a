"""OBC2 (no cutoff) plain MD: our step against OpenMM CPU's native GBSAOBCForce (issue 20).
A benchmark, not a test: it prints a table and writes JSON (atomically).

    python benchmarks/obc2_plain_bench.py [--json benchmarks/obc2_plain_bench.json]
        [--cases villin-obc2 peptide2k-obc2] [--repeats 5]

The systems are ``timemachine.bench.systems``' (amber99sbildn + implicit/obc2, all pairs,
no constraints, minimised once): villin (582 atoms) and the 144-residue helical peptide
(1,987 atoms). As in ``timemachine.bench.plain_md``, OpenMM runs the same force field
with obc2.xml's CustomGBForce swapped for its native ``GBSAOBCForce``
(``plain_md.native_gb_system``), on its CPU platform with all its threads, same T, γ, δt
and starting velocities. Three engines, interleaved in every repeat so that the load of
a shared machine falls on all of them alike; each number is the median over repeats of
one timed run of ``--steps`` steps (after a run that compiles / warms up):

* ``ours_us``: ``timemachine.integrator.run`` with ``gradient_fn`` (the all-pairs OBC2
  and LJ + Coulomb in the CPU custom call ``tm_xla_cpu_gb.cpp``, bonded terms in
  ``tm_xla_cpu.cpp``; ``timemachine.backends.xla_cpu_gb``);
* ``jax_us``: the same run with the JAX reference gradient (``structured.make_gradient``,
  what the step used before, and what ``TIMEMACHINE_HOST_KERNELS=0`` gives);
* ``openmm_us``: ``Context.step`` of OpenMM's LangevinIntegrator, CPU platform.

``ratio`` = ours_us / openmm_us (below 1: we are faster). ``max_dx_vs_jax_nm``: the largest
position difference between our run and the JAX-gradient run after the same steps (the
same noise): round-off, not a different trajectory. ``grad_rel_err``: our gradient
against ``jax.grad`` of the reference energy at the start.
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

import jax.numpy as jnp  # noqa: E402

import timemachine as tm  # noqa: E402
from timemachine.backends import xla_cpu_gb  # noqa: E402
from timemachine.bench import plain_md  # noqa: E402
from timemachine.bench.systems import load_case  # noqa: E402
from timemachine.files import atomic_write_text  # noqa: E402
from timemachine.structured import gradient_fn, make_gradient  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = {"villin-obc2": 200, "peptide2k-obc2": 20}


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(name, integrator, n_steps, repeats):
    case = load_case(name)
    system = case.system
    theta = jnp.asarray(system.params)
    fast = gradient_fn(system)
    assert "xla_cpu_gb" in fast.__module__, "the custom call is not in use"
    ours = jax.jit(lambda x: fast(x, theta))
    ref = jax.jit(lambda x: make_gradient(system)(x, theta))
    x0 = jnp.asarray(case.positions)
    want = jax.jit(jax.grad(system.energy_fn()))(x0, theta)
    grad_err = float(jnp.linalg.norm(ours(x0) - want) / jnp.linalg.norm(want))
    v0 = plain_md.initial_velocities(case, integrator)

    def run(g):
        return plain_md._run_ours(case, integrator, n_steps, g, v0)

    x_ours, x_ref = run(ours), run(ref)  # compile both
    max_dx = float(np.abs(np.asarray(x_ours) - np.asarray(x_ref)).max())
    system_omm = plain_md.native_gb_system(case.openmm_system)
    context = plain_md.openmm_context(case, "CPU", integrator, v0, system_omm)
    context.getIntegrator().step(5)
    plain_md.openmm_positions(context)

    def omm():
        context.getIntegrator().step(n_steps)
        plain_md.openmm_positions(context)

    t = {"ours": [], "jax": [], "openmm": []}
    for _ in range(repeats):
        t["ours"].append(_timed(lambda: run(ours)))
        t["openmm"].append(_timed(omm))
        t["jax"].append(_timed(lambda: run(ref)))
    us = {k: 1e6 * statistics.median(v) / n_steps for k, v in t.items()}
    return {
        "case": name,
        "n_atoms": case.n_atoms,
        "n_steps": n_steps,
        "repeats": repeats,
        "ours_us": us["ours"],
        "jax_us": us["jax"],
        "openmm_us": us["openmm"],
        "ratio": us["ours"] / us["openmm"],
        "jax_ratio": us["jax"] / us["openmm"],
        "ours_us_all": [1e6 * s / n_steps for s in t["ours"]],
        "openmm_us_all": [1e6 * s / n_steps for s in t["openmm"]],
        "openmm_threads": context.getPlatform().getPropertyValue(context, "Threads"),
        "max_dx_vs_jax_nm": max_dx,
        "grad_rel_err": grad_err,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(HERE, "obc2_plain_bench.json"))
    parser.add_argument("--cases", nargs="+", default=list(STEPS))
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    ok, why = xla_cpu_gb.available()
    if not ok:
        sys.exit(f"the CPU custom call cannot run here: {why}")
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.0015, seed=0)
    rows = []
    print(f"{'case':16s} {'N':>5s} {'ours µs':>10s} {'JAX µs':>10s} {'OpenMM µs':>10s} "
          f"{'ours/OpenMM':>12s} {'JAX/OpenMM':>11s} {'max dx nm':>10s}")  # fmt: skip
    for name in args.cases:
        row = bench_case(name, integrator, args.steps or STEPS.get(name, 20), args.repeats)
        rows.append(row)
        print(f"{row['case']:16s} {row['n_atoms']:5d} {row['ours_us']:10.0f} "
              f"{row['jax_us']:10.0f} {row['openmm_us']:10.0f} {row['ratio']:12.2f} "
              f"{row['jax_ratio']:11.2f} {row['max_dx_vs_jax_nm']:10.1e}", flush=True)  # fmt: skip
    result = {
        "benchmark": "obc2_plain_bench",
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "jax": jax.__version__,
        "rows": rows,
    }
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
