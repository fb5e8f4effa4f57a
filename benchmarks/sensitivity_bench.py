"""Cost of a Langevin step that carries dx/dθ, against a plain step and finite differences.

    python benchmarks/sensitivity_bench.py [--json benchmarks/sensitivity_bench.json] [--quick]

Cases (issue 3, "What it must show"):

* villin headpiece in vacuum, amber99sbildn, every proper-torsion force constant
  (``torsion/*/k*``, P = 79). The issue quotes 584 atoms: OpenMM's data/test.pdb has 582
  protein atoms plus two Cl⁻ ions; ``tm.strip_solvent`` removes the water and both ions,
  so N = 582 here.
* trialanine (``tm.build_peptide("AAA")``, 33 atoms) under OBC2, every torsion force
  constant (P = 18).

Variants, measured side by side in one process and interleaved repeat by repeat:

* ``plain``: ``langevin_step`` (the integrator's step and noise) in a compiled loop whose
  trip count is a runtime value, θ a runtime argument, with the closed-form gradient
  ``System.gradient_fn`` (the fastest plain step we have: FD would use it).
* ``structured``: ``simulate``'s own compiled chunk program (exact mode, structured ζ,
  its bonds, angles, torsions and 1-4 exceptions in the C++ custom call of
  ``timemachine.backends.xla_cpu``, as simulate runs it on CPU).
* ``structured_jax_bonded``: the same with those terms in XLA (``bonded="jax"``).
* ``plain_host_bonded``: the plain step with its bonded gradient in the custom call too,
  so that the ratio can also be read against a plain step that gets the same help.
* ``reference``: the same program with the reference ζ (one jvp of ∇E per parameter).

Each variant is compiled and warmed up first; each repeat runs ``steps`` steps from the
same minimised start and Maxwell-Boltzmann velocities, and the time per step is the
minimum over repeats (the machine is shared: the minimum is the least disturbed run).
``2P·plain / sens`` is the speed-up over central finite differences, which need 2P plain
runs of the same length. Per-call costs of the pieces (gradient, gradient + ζ) are
reported too (``--no-pieces`` skips them), with the dense (P + 3, 3N)·(3N, 3N) float64
product timed alone: the floor under the pure-JAX structured ζ (``bonded="jax"``), which
the custom call's upper-triangle pair contraction replaces on CPU. Prints a markdown
table and writes JSON.
"""

import argparse
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timemachine as tm  # noqa: E402
from timemachine.files import atomic_json  # noqa: E402
from timemachine.integrator.langevin import (  # noqa: E402
    LangevinState,
    langevin_init,
    langevin_step,
)
from timemachine.sensitivity.program import chunk_program  # noqa: E402
from timemachine.sensitivity.propagation import exact_init  # noqa: E402
from timemachine.sensitivity.zeta import make_gradient, make_gradient_and_zeta  # noqa: E402

GOALS = {"villin-vacuum": 8.0, "trialanine-obc2": 4.0}


def villin_structure():
    import openmm.app as app

    pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
    return tm.strip_solvent(pdb.topology, pdb.positions)


# name: (structure, implicit solvent, wrt, steps (plain, sens), reference steps, note)
CASES = {
    "villin-vacuum": (
        villin_structure,
        None,
        "torsion/*/k*",
        200,
        4,
        "OpenMM test.pdb: 584 atoms with 2 Cl⁻; water and both ions removed: 582 atoms",
    ),
    "trialanine-obc2": (
        lambda: tm.build_peptide("AAA"),
        "obc2",
        "torsion/*/k*",
        4000,
        400,
        "tm.build_peptide('AAA'), zwitterionic, 33 atoms",
    ),
}


def plain_program(system, grad=None):
    """Jitted ``run(state, n_steps, θ, coeffs, seed, replica) -> state``: n plain steps
    with the closed-form gradient (``System.gradient_fn``, or ``grad``)."""
    grad = system.gradient_fn() if grad is None else grad

    def run(state, n_steps, theta, coeffs, seed, replica):
        def one(i, s):
            return langevin_step(lambda y: grad(y, theta), coeffs, s, seed, replica)

        return jax.lax.fori_loop(0, n_steps, one, state)

    return jax.jit(run)


def seconds(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def best_per_call_us(fn, *args, repeats, calls):
    jax.block_until_ready(fn(*args))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return 1e6 * best


def run_case(name, repeats, scale, pieces):
    build, solvent, pattern, steps, ref_steps, note = CASES[name]
    steps, ref_steps = max(1, int(steps * scale)), max(1, int(ref_steps * scale))
    system, x = tm.load_system(build(), forcefield=("amber99sbildn.xml",), implicit_solvent=solvent)
    x = tm.minimize_system(system, x, tolerance=1.0, max_iterations=500)
    wrt = system.select(pattern)
    p = int(wrt.size)
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    coeffs = integrator.coefficients(system.masses)
    theta = jnp.asarray(system.params)
    seed = jnp.asarray(0, jnp.int64)
    replica = jnp.asarray(0, jnp.int64)
    start = langevin_init(x, system.masses, integrator)
    plain_state = LangevinState(start.x, start.v, start.step)
    sens_state = exact_init(start.x, start.v, p)
    key = tuple(int(i) for i in wrt)

    plain = plain_program(system)
    # plain MD with its bonded gradient in the C++ custom call too, so that the ratio is
    # also quoted against a plain step that gets the same help
    plain_host = plain_program(system, make_gradient(system, bonded="host"))
    programs = {zm: chunk_program(system, key, zm, "exact") for zm in ("structured", "reference")}
    # the same structured program with the bonded terms in XLA instead of the C++ call
    programs["structured_jax_bonded"] = chunk_program(system, key, "structured", "exact", "jax")

    def run_plain(n):
        return plain(plain_state, jnp.asarray(n, jnp.int64), theta, coeffs, seed, replica)

    def run_plain_host(n):
        return plain_host(plain_state, jnp.asarray(n, jnp.int64), theta, coeffs, seed, replica)

    def run_sens(zm, n):
        # simulate's chunk program: one block of n steps, one saved frame
        one = jnp.asarray(1, jnp.int64)
        return programs[zm](1, sens_state, one, jnp.asarray(n, jnp.int64), theta, coeffs, None,
                            seed, replica)  # fmt: skip

    variants = {
        "plain": (lambda: run_plain(steps), steps),
        "plain_host_bonded": (lambda: run_plain_host(steps), steps),
        "structured": (lambda: run_sens("structured", steps), steps),
        "structured_jax_bonded": (lambda: run_sens("structured_jax_bonded", steps), steps),
        "reference": (lambda: run_sens("reference", ref_steps), ref_steps),
    }
    compile_s = {}
    for v, (fn, _) in variants.items():
        compile_s[v] = seconds(fn)  # compile + one run
    # the three programs' trajectories must coincide: same step, same noise
    final_plain = np.asarray(run_plain(ref_steps).x)
    final_s = run_sens("structured", ref_steps)[0]
    final_r = run_sens("reference", ref_steps)[0]
    primal_diff = float(np.abs(np.asarray(final_s.x) - final_plain).max())
    dx_s, dx_r = np.asarray(final_s.dx_dtheta), np.asarray(final_r.dx_dtheta)
    dx_rel = float(np.linalg.norm(dx_s - dx_r) / np.linalg.norm(dx_r))
    dx_j = np.asarray(run_sens("structured_jax_bonded", ref_steps)[0].dx_dtheta)
    dx_rel_j = float(np.linalg.norm(dx_s - dx_j) / np.linalg.norm(dx_j))

    best = dict.fromkeys(variants, np.inf)
    for _ in range(repeats):
        for v, (fn, n) in variants.items():  # interleaved: load changes hit all alike
            best[v] = min(best[v], seconds(fn) / n)
    us = {v: 1e6 * t for v, t in best.items()}
    row = {
        "case": name,
        "note": note,
        "n_atoms": system.n_atoms,
        "P": p,
        "wrt": pattern,
        "implicit_solvent": solvent,
        "steps": steps,
        "reference_steps": ref_steps,
        "repeats": repeats,
        "plain_us": us["plain"],
        "structured_us": us["structured"],
        "reference_us": us["reference"],
        "structured_jax_bonded_us": us["structured_jax_bonded"],
        "structured_jax_bonded_over_plain": us["structured_jax_bonded"] / us["plain"],
        "plain_host_bonded_us": us["plain_host_bonded"],
        "structured_over_plain_host_bonded": us["structured"] / us["plain_host_bonded"],
        "structured_over_plain": us["structured"] / us["plain"],
        "reference_over_plain": us["reference"] / us["plain"],
        "fd_over_structured": 2 * p * us["plain"] / us["structured"],
        "fd_over_reference": 2 * p * us["plain"] / us["reference"],
        "goal_structured_over_plain": GOALS.get(name),
        "compile_and_first_run_s": compile_s,
        "primal_max_abs_diff_nm": primal_diff,
        "dx_dtheta_rel_diff_structured_reference": dx_rel,
        "dx_dtheta_rel_diff_host_jax_bonded": dx_rel_j,
    }
    if pieces:
        grad = jax.jit(system.gradient_fn())
        joint = jax.jit(make_gradient_and_zeta(system, wrt))
        dx = jnp.asarray(dx_s)
        calls = max(1, steps // 10)
        row["gradient_call_us"] = best_per_call_us(grad, start.x, theta, repeats=3, calls=calls)
        row["gradient_and_zeta_call_us"] = best_per_call_us(
            joint, start.x, theta, dx, repeats=3, calls=calls
        )
        # the pure-JAX structured ζ's floor: its dense (P + 3, 3N)·(3N, 3N) float64 product
        # (tangents and three unit rows times the assembled Hessian), timed alone
        rng = np.random.default_rng(0)
        width = 3 * system.n_atoms
        ext = jnp.asarray(rng.normal(size=(p + 3, width)))
        hess = jnp.asarray(rng.normal(size=(width, width)))
        row["dense_product_call_us"] = best_per_call_us(
            jax.jit(jnp.matmul), ext, hess, repeats=3, calls=calls
        )
    return row


def markdown(rows):
    lines = [
        "| case | N | P | plain µs/step | sens µs/step (structured ζ) | sens µs/step "
        "(reference ζ) | structured/plain | goal | 2P·plain/structured | reference/plain "
        "| 2P·plain/reference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        goal = r["goal_structured_over_plain"]
        ok = "" if goal is None else (f"≤ {goal:g} ✓" if r["structured_over_plain"] <= goal else
                                      f"≤ {goal:g} ✗")  # fmt: skip
        lines.append(
            f"| {r['case']} | {r['n_atoms']} | {r['P']} | {r['plain_us']:.1f} "
            f"| {r['structured_us']:.1f} | {r['reference_us']:.1f} "
            f"| {r['structured_over_plain']:.2f} | {ok} | {r['fd_over_structured']:.1f} "
            f"| {r['reference_over_plain']:.1f} | {r['fd_over_reference']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(here, "sensitivity_bench.json"))
    parser.add_argument("--quick", action="store_true", help="a quarter of the steps, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=None)
    parser.add_argument("--no-pieces", action="store_true", help="skip per-call piece timings")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    scale = 0.25 if args.quick else 1.0
    names = args.cases or list(CASES)
    rows = [run_case(n, repeats, scale, not args.no_pieces) for n in names]
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, float64")
    print("Langevin 300 K, γ = 1/ps, δt = 1 fs; exact mode; min over repeats, interleaved\n")
    print(markdown(rows))
    print()
    for r in rows:
        print(f"- {r['case']}: {r['note']}; {r['steps']} steps per repeat "
              f"({r['reference_steps']} with the reference ζ), {r['repeats']} repeats; "
              f"primal vs plain max |Δx| = {r['primal_max_abs_diff_nm']:.1e} nm, "
              f"structured vs reference dx/dθ rel. diff = "
              f"{r['dx_dtheta_rel_diff_structured_reference']:.1e}")  # fmt: skip
        print(
            f"  bonded terms in XLA instead of the C++ custom call: sens "
            f"{r['structured_jax_bonded_us']:.1f} µs/step "
            f"({r['structured_jax_bonded_over_plain']:.2f}× plain); plain step with its bonded "
            f"gradient in the custom call {r['plain_host_bonded_us']:.1f} µs "
            f"(structured over it: {r['structured_over_plain_host_bonded']:.2f}×)"
        )
        if "gradient_call_us" in r:
            print(
                f"  per call: gradient {r['gradient_call_us']:.1f} µs, gradient + ζ "
                f"{r['gradient_and_zeta_call_us']:.1f} µs "
                f"({r['gradient_and_zeta_call_us'] / r['gradient_call_us']:.2f}×); the "
                f"pure-JAX path's dense (P+3, 3N)·(3N, 3N) product alone "
                f"{r['dense_product_call_us']:.1f} µs "
                f"= {r['dense_product_call_us'] / r['plain_us']:.2f} plain steps"
            )
    out = {
        "device": f"{device.platform} ({device.device_kind})",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "quick": args.quick,
        "integrator": {"temperature": 300.0, "friction": 1.0, "dt": 0.001, "seed": 0},
        "rows": rows,
    }
    atomic_json(args.json, out, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
