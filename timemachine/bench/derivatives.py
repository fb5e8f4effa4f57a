"""Trajectory derivatives dx_T/dθ for P torsion barriers, four ways, on the same work.

Methods (θ = the first P ``torsion/*/k*`` types of the system, T steps):

``timemachine``   ``tm.sensitivity.simulate(method="exact")``: dx/dθ carried forward with
                  the structured ζ (the result every other method is compared with).
``openmm-fd``     central finite differences with OpenMM's CPU platform: 2P trajectories,
                  each barrier type moved by ±h in every PeriodicTorsionForce entry of
                  that type (``updateParametersInContext``), one Context reused.
``jaxmd-forward`` forward-mode autodiff (``jax.jacfwd``, P tangents) through JAX MD's
                  ``simulate.nvt_langevin`` (BAOAB). In vacuum the energy is JAX MD's own
                  AMBER energy loaded from the OpenMM System by
                  ``jax_md.mm_forcefields.io.openmm.convert_openmm_system`` (its loader has
                  no GB force, so with OBC2 JAX MD integrates *our* JAX energy instead).
``reverse``       reverse mode, ``jax.grad`` of the scalar O = r·x_T (r a fixed unit
                  random vector) through a ``lax.scan`` of ``langevin_step``: one
                  gradient, not the (P, N, 3) Jacobian; compared with r·dx_T/dθ from ours.

Common random numbers: the thermostat runs at 0 K (friction, δt and Maxwell-Boltzmann
starting velocities at 300 K kept), so every run, and each of FD's 2P runs, follows a
deterministic trajectory from the same start. OpenMM's LangevinIntegrator and JAX MD's
BAOAB are other discretisations of the same dynamics (OpenMM's is 2e-6 nm from ours after
one trialanine step), so their errors against ours include that O(δt) difference (and,
for FD, its truncation and OpenMM CPU's single-precision forces): they measure what a user
would get from those tools, not only the error of their differentiation. Ours and
OpenMM's leapfrog start from the half-step velocity v_{-1/2}; BAOAB's momentum is on the
step, so JAX MD starts from v_0 = v_{-1/2} - (δt/2) ∇E(x_0; θ)/m (θ-dependent, inside the
differentiated function). Starting BAOAB from v_{-1/2} itself would shift its whole
trajectory by half a kick, an O(1/T) relative difference in dx_T/dθ that is no error of
its differentiation.

``own_fd_rel_error`` (timemachine's row) checks our dx/dθ independently of every other
tool: central differences of our own float64 trajectory (the primal of ``simulate`` at
θ ± h) for a few of the P parameters, against the same rows of our result.

Timings are the best of ``repeats`` runs (within a time budget), with the process CPU
time (all threads) of that run as ``cpu_s``.

Each method runs in its own subprocess (``python -m timemachine.bench.derivatives``) so
that its peak resident memory (``VmHWM``, see ``_maxrss_bytes``) is its own;
``baseline_rss_bytes`` is the high-water mark after building the system, before the
method's own work. Reverse mode's memory against the number of steps comes from XLA's
compiled memory analysis at two lengths, extrapolated linearly to the step count that
would fill 24 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError, SimulationError

__all__ = ["METHODS", "DerivativeSettings", "run_method", "run_methods", "relative_error"]

METHODS = ("timemachine", "openmm-fd", "jaxmd-forward", "reverse")
MEMORY_LIMIT_BYTES = 24 * 2**30
# no further timing repeat of a method once its runs have taken this long
REPEAT_BUDGET_S = 30.0


@dataclasses.dataclass(frozen=True)
class DerivativeSettings:
    """Settings of one derivative comparison.

    Attributes:
      case: a key of ``timemachine.bench.systems.CASES``.
      n_params: P, the number of torsion barrier types (the first P of
        ``system.select("torsion/*/k*")``).
      n_steps: T, steps per trajectory.
      temperature: K, for the starting velocities only (the thermostat runs at 0 K).
      friction: 1/ps. dt: ps. seed: starting-velocity seed.
      fd_rel_step: FD step h = fd_rel_step · max(|θ_p|, 1 kJ/mol).
      repeats: timings are the best of this many runs (fewer once a method has spent
        ``REPEAT_BUDGET_S``).
      own_fd_params: how many parameters our own float64 FD check covers (0: none).
    """

    case: str
    n_params: int
    n_steps: int
    temperature: float = 300.0
    friction: float = 1.0
    dt: float = 0.001
    seed: int = 0
    fd_rel_step: float = 1e-3
    repeats: int = 3
    own_fd_params: int = 2


def _setup(settings: DerivativeSettings):
    import timemachine as tm
    from timemachine.bench.plain_md import initial_velocities
    from timemachine.bench.systems import load_case

    case = load_case(settings.case)
    pool = case.system.select("torsion/*/k*")
    if settings.n_params > pool.size:
        raise InputError(
            f"n_params = {settings.n_params} but {settings.case} has only {pool.size} "
            f"torsion barrier types (torsion/*/k*)"
        )
    wrt = pool[: settings.n_params]
    warm = tm.LangevinIntegrator(
        settings.temperature, settings.friction, settings.dt, settings.seed
    )
    v0 = initial_velocities(case, warm)
    cold = tm.LangevinIntegrator(0.0, settings.friction, settings.dt, settings.seed)
    return case, wrt, cold, v0


def _projection(n_atoms: int) -> np.ndarray:
    r = np.random.default_rng(12345).normal(size=(n_atoms, 3))
    return r / np.linalg.norm(r)


# --------------------------------------------------------------------------- methods


def compiled_sensitivity_run(case, integrator, wrt, v0=None):
    """(``go(n)``, compile seconds): ``go`` runs ``simulate`` for n exact sensitivity steps
    on ``case`` in one chunk, saving only the last frame; it is compiled (by one 1-step
    run) before it is returned. Loop counts are runtime values, so every n reuses it."""
    from timemachine.sensitivity import simulate

    def go(n):
        return simulate(
            case.system,
            case.positions,
            integrator,
            n,
            wrt=wrt,
            save_every=n,
            v0=v0,
            progress=False,
            chunk_steps=n,
        )

    t0 = time.perf_counter()
    go(1)
    return go, time.perf_counter() - t0


def _timemachine(case, wrt, integrator, v0, n_steps, repeats=1, own_fd_params=0):
    from timemachine.bench.plain_md import best_of

    go, compile_s = compiled_sensitivity_run(case, integrator, wrt, v0)
    elapsed, cpu, traj = best_of(lambda: go(n_steps), repeats, REPEAT_BUDGET_S)
    dx = np.asarray(traj.dx_dtheta[-1])
    extra = {"state_bytes": int(traj.memory_bytes["state"]), "cpu_s": cpu}
    if own_fd_params:
        extra.update(_own_fd_check(case, wrt, integrator, v0, n_steps, dx, own_fd_params))
    return dx, elapsed, compile_s, extra


def _own_fd_check(case, wrt, integrator, v0, n_steps, dx, n_check):
    """Central differences of our own float64 trajectory for ``n_check`` of the
    parameters (evenly spread over wrt), against the same rows of ``dx`` (P, N, 3).

    The perturbed trajectories are the primal x of ``simulate`` runs at θ ± h: θ is a
    runtime argument of the compiled program, so this check compiles nothing new."""
    from timemachine.sensitivity import simulate

    theta = np.asarray(case.system.params)
    rows = np.unique(np.linspace(0, len(wrt) - 1, min(n_check, len(wrt))).astype(int))

    def final(th):
        traj = simulate(
            case.system,
            case.positions,
            integrator,
            n_steps,
            wrt=wrt,
            params=th,
            save_every=n_steps,
            v0=v0,
            progress=False,
            chunk_steps=n_steps,
        )
        return np.asarray(traj.x[-1])

    fd = []
    for p in rows:
        h = 1e-4 * max(abs(theta[wrt[p]]), 1.0)
        plus, minus = theta.copy(), theta.copy()
        plus[wrt[p]] += h
        minus[wrt[p]] -= h
        fd.append((final(plus) - final(minus)) / (2 * h))
    fd = np.stack(fd)
    return {
        "own_fd_rows": rows.tolist(),
        "own_fd_rel_error": float(np.linalg.norm(fd - dx[rows]) / np.linalg.norm(dx[rows])),
    }


def _openmm_fd(case, wrt, integrator, v0, n_steps, rel_step, repeats=1):
    import openmm as mm

    from timemachine.bench.plain_md import best_of, openmm_context, openmm_positions
    from timemachine.bench.systems import torsion_k_map

    t0 = time.perf_counter()
    context = openmm_context(case, "CPU", integrator, v0)
    force = next(
        f for f in case.openmm_system.getForces() if isinstance(f, mm.PeriodicTorsionForce)
    )
    # updateParametersInContext copies this force's parameters into the Context; every
    # entry is put back after each run, so the shared System is left as it was
    entries = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
    keys = [tuple(e[:5]) for e in entries]
    owners = torsion_k_map(case.system, keys, wrt)
    theta = np.asarray(case.system.params)[wrt]
    steps = rel_step * np.maximum(np.abs(theta), 1.0)
    setup_s = time.perf_counter() - t0

    def trajectory(p, sign):
        for t in owners[p]:
            *atoms, n, phase, _ = entries[t]
            force.setTorsionParameters(int(t), *atoms, n, phase, theta[p] + sign * steps[p])
        force.updateParametersInContext(context)
        context.setPositions(case.positions)
        context.setVelocities(v0)
        context.setTime(0.0)
        context.getIntegrator().step(n_steps)
        x = openmm_positions(context)
        for t in owners[p]:
            force.setTorsionParameters(int(t), *entries[t])
        return x

    def all_trajectories():
        return np.stack(
            [(trajectory(p, +1) - trajectory(p, -1)) / (2 * steps[p]) for p in range(len(wrt))]
        )

    elapsed, cpu, dx = best_of(all_trajectories, repeats, REPEAT_BUDGET_S)
    if not np.isfinite(dx).all():
        raise SimulationError(f"OpenMM FD on {case.name}: non-finite positions")
    threads = context.getPlatform().getPropertyValue(context, "Threads")
    extra = {
        "trajectories": 2 * len(wrt),
        "platform": "CPU",
        "threads": threads,
        "h": steps.tolist(),
        "cpu_s": cpu,
    }
    return dx, elapsed, setup_s, extra


def _jaxmd_energy(case, wrt):
    """E(R nm, θ_sel) kJ/mol through JAX MD's AMBER energy (vacuum) or ours (OBC2)."""
    theta_all = jnp.asarray(case.system.params)
    wrt_j = jnp.asarray(wrt)
    if case.solvent is not None:
        ours = case.system.energy_fn()

        def energy(R, theta):
            return ours(R, theta_all.at[wrt_j].set(theta))

        return energy, "timemachine JAX energy (JAX MD has no GB loader)"

    import openmm.unit as unit
    from jax_md.mm_forcefields.amber.energy import energy as amber_energy
    from jax_md.mm_forcefields.io.openmm import convert_openmm_system
    from jax_md.mm_forcefields.nonbonded.electrostatics import CutoffCoulomb

    from timemachine.bench.systems import torsion_k_map

    ms = convert_openmm_system(
        case.openmm_system, case.topology, case.positions * unit.nanometer, None
    )
    efn, neighbor_fn, _, _ = amber_energy(
        ms.params,
        ms.topology,
        None,
        CutoffCoulomb(r_cut=None),
        ms.nb_options._replace(use_pbc=False),
    )
    neighbors = neighbor_fn.allocate(jnp.asarray(10.0 * case.positions))
    bonded = ms.params.bonded
    keys = [
        tuple(q) + (n,)
        for q, n in zip(
            np.asarray(ms.topology.torsions).tolist(), np.asarray(bonded.torsion_n), strict=True
        )
    ]
    owners = torsion_k_map(case.system, keys, wrt)
    term_of = np.full(len(keys), -1)
    for p, idx in enumerate(owners):
        term_of[idx] = p
    moved = jnp.asarray(term_of >= 0)
    which = jnp.asarray(np.maximum(term_of, 0))
    base_k = jnp.asarray(bonded.torsion_k)
    kcal = 4.184

    def energy(R, theta):
        # JAX MD works in Å and kcal/mol; θ and R stay in kJ/mol and nm
        k = jnp.where(moved, theta[which] / kcal, base_k)
        params = ms.params._replace(bonded=bonded._replace(torsion_k=k))
        return kcal * efn(10.0 * R, neighbors, params=params)["etotal"]

    return energy, "JAX MD AMBER energy (jax_md.mm_forcefields, from the OpenMM System)"


def _jaxmd_forward(case, wrt, integrator, v0, n_steps, repeats=1):
    from jax_md import simulate as jmd_simulate
    from jax_md import space

    from timemachine.bench.plain_md import best_of
    from timemachine.constants import BOLTZMANN

    energy, source = _jaxmd_energy(case, wrt)
    _, shift = space.free()
    init_fn, apply_fn = jmd_simulate.nvt_langevin(
        energy,
        shift,
        integrator.dt,
        BOLTZMANN * integrator.temperature,
        gamma=integrator.friction,
        center_velocity=False,
    )
    mass = jnp.asarray(case.system.masses)[:, None]
    v_half = jnp.asarray(v0)
    x0 = jnp.asarray(case.positions)
    key = jax.random.key(integrator.seed)
    grad = jax.grad(energy)

    def final_positions(theta):
        # BAOAB's momentum is on the step: v_0 = v_{-1/2} - (δt/2) ∇E(x_0)/m (see above)
        momenta = mass * v_half - 0.5 * integrator.dt * grad(x0, theta)
        state = init_fn(key, x0, mass=mass, momenta=momenta, theta=theta)
        state = jax.lax.fori_loop(0, n_steps, lambda _, s: apply_fn(s, theta=theta), state)
        return state.position

    theta0 = jnp.asarray(case.system.params)[jnp.asarray(wrt)]
    t0 = time.perf_counter()
    jac = jax.jit(jax.jacfwd(final_positions)).lower(theta0).compile()
    compile_s = time.perf_counter() - t0
    elapsed, cpu, d = best_of(
        lambda: np.asarray(jax.block_until_ready(jac(theta0))), repeats, REPEAT_BUDGET_S
    )  # (N, 3, P)
    extra = {"energy": source, "integrator": "BAOAB", "cpu_s": cpu}
    return np.moveaxis(d, -1, 0), elapsed, compile_s, extra


def _reverse_program(case, wrt, integrator, v0, n_steps):
    from timemachine.integrator import LangevinState, langevin_step

    energy = case.system.energy_fn()
    theta_all = jnp.asarray(case.system.params)
    wrt_j = jnp.asarray(wrt)
    coeffs = integrator.coefficients(case.system.masses)
    r = jnp.asarray(_projection(case.n_atoms))
    x0, v0 = jnp.asarray(case.positions), jnp.asarray(v0)

    def observable(theta):
        params = theta_all.at[wrt_j].set(theta)
        grad = jax.grad(energy)

        def step(state, _):
            return langevin_step(lambda y: grad(y, params), coeffs, state, integrator.seed), None

        state0 = LangevinState(x0, v0, jnp.asarray(0, jnp.int64))
        final, _ = jax.lax.scan(step, state0, None, length=n_steps)
        return jnp.sum(r * final.x)

    return jax.jit(jax.grad(observable)).lower(theta_all[wrt_j]).compile()


def _temp_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def _reverse(case, wrt, integrator, v0, n_steps, repeats=1):
    from timemachine.bench.plain_md import best_of

    theta0 = jnp.asarray(case.system.params)[jnp.asarray(wrt)]
    t0 = time.perf_counter()
    grad = _reverse_program(case, wrt, integrator, v0, n_steps)
    compile_s = time.perf_counter() - t0
    elapsed, cpu, g = best_of(
        lambda: np.asarray(jax.block_until_ready(grad(theta0))), repeats, REPEAT_BUDGET_S
    )
    # XLA's buffer assignment at two lengths: the slope is what each step keeps for the
    # backward pass
    lengths = [n_steps, 2 * n_steps]
    sizes = [
        _temp_bytes(grad),
        _temp_bytes(_reverse_program(case, wrt, integrator, v0, 2 * n_steps)),
    ]
    extra = {"memory_steps": lengths, "memory_bytes": sizes, "cpu_s": cpu}
    if None not in sizes:
        slope = (sizes[1] - sizes[0]) / n_steps
        intercept = sizes[0] - slope * n_steps
        extra["bytes_per_step"] = slope
        extra["steps_to_24GiB"] = (
            float((MEMORY_LIMIT_BYTES - intercept) / slope) if slope > 0 else None
        )
    return g, elapsed, compile_s, extra


def run_method(settings: DerivativeSettings, method: str) -> tuple[dict, np.ndarray]:
    """Run one method in this process; (record, result array).

    The result is dx_T/dθ (P, N, 3) nm per unit θ, except for ``reverse``: dO/dθ (P,),
    O = r·x_T. The record holds time_s (the timed work), compile_s (or setup_s for
    OpenMM), peak_rss_bytes and baseline_rss_bytes (this process's high-water marks,
    meaningful when the process ran only this method) and method-specific extras.
    """
    if method not in METHODS:
        raise InputError(f"unknown derivative method {method!r}; known: {', '.join(METHODS)}")
    case, wrt, integrator, v0 = _setup(settings)
    baseline = _maxrss_bytes()
    n, reps = settings.n_steps, settings.repeats
    if method == "timemachine":
        out, elapsed, prep, extra = _timemachine(
            case, wrt, integrator, v0, n, reps, settings.own_fd_params
        )
    elif method == "openmm-fd":
        out, elapsed, prep, extra = _openmm_fd(
            case, wrt, integrator, v0, n, settings.fd_rel_step, reps
        )
    elif method == "jaxmd-forward":
        out, elapsed, prep, extra = _jaxmd_forward(case, wrt, integrator, v0, n, reps)
    else:
        out, elapsed, prep, extra = _reverse(case, wrt, integrator, v0, n, reps)
    record = {
        "method": method,
        "case": settings.case,
        "n_atoms": case.n_atoms,
        "P": int(len(wrt)),
        "n_steps": settings.n_steps,
        "time_s": elapsed,
        "prepare_s": prep,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": _maxrss_bytes(),
        **extra,
    }
    return record, out


def _maxrss_bytes() -> int:
    """This process's resident-memory high-water mark, bytes.

    Linux's ``VmHWM`` belongs to the address space, which ``exec`` replaces, so a worker
    subprocess starts from zero. ``ru_maxrss`` does not: Linux carries the parent's high
    water across fork and exec, so every worker of a 1.3 GB parent would report at least
    1.3 GB. ``ru_maxrss`` is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def relative_error(value, reference) -> float:
    """‖value - reference‖ / ‖reference‖ (Frobenius norms)."""
    value, reference = np.asarray(value), np.asarray(reference)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def run_methods(
    settings: DerivativeSettings, methods=METHODS, isolate: bool = True, timeout_s: float = 3600.0
) -> list[dict]:
    """Run ``methods`` (``timemachine`` first, always) and compare each with it.

    Args:
      settings: the shared ``DerivativeSettings``.
      methods: names from ``METHODS``.
      isolate: one subprocess per method, so peak memory is per method; False runs all in
        this process (faster; then peak_rss_bytes is the process's, not the method's).
      timeout_s: per subprocess.

    Returns:
      One record per method with ``rel_error_vs_timemachine`` (dx_T/dθ, or dO/dθ for
      ``reverse``) and ``speedup_of_timemachine`` (its time / ours), or ``error`` when the
      method failed.
    """
    methods = ["timemachine"] + [m for m in methods if m != "timemachine"]
    results = []
    for method in methods:
        try:
            if isolate:
                record, out = _in_subprocess(settings, method, timeout_s)
            else:
                record, out = run_method(settings, method)
        except Exception as exc:  # a competitor that fails is reported, not fatal
            if method == "timemachine":
                raise
            results.append({"method": method, "case": settings.case, "error": str(exc)[-2000:]})
            continue
        results.append((record, out))
    ours_record, ours = results[0]
    records = []
    for item in results:
        if isinstance(item, dict):
            records.append(item)
            continue
        record, out = item
        if record["method"] == "reverse":
            reference = np.einsum("pnc,nc->p", ours, _projection(ours.shape[1]))
        else:
            reference = ours
        record["rel_error_vs_timemachine"] = relative_error(out, reference)
        record["speedup_of_timemachine"] = record["time_s"] / ours_record["time_s"]
        records.append(record)
    return records


def _in_subprocess(settings, method, timeout_s):
    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
        out_json, out_npy = os.path.join(tmp, "record.json"), os.path.join(tmp, "result.npy")
        cmd = [
            sys.executable,
            "-m",
            "timemachine.bench.derivatives",
            "--method",
            method,
            "--settings",
            json.dumps(dataclasses.asdict(settings)),
            "--json",
            out_json,
            "--npy",
            out_npy,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise SimulationError(
                f"derivative method {method!r} on {settings.case} failed "
                f"(exit {proc.returncode}): {proc.stderr[-1500:]}"
            )
        with open(out_json) as f:
            record = json.load(f)
        return record, np.load(out_npy)


def main(argv=None):
    parser = argparse.ArgumentParser(description="One dx/dθ method (worker of the benchmark).")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--settings", required=True, help="DerivativeSettings as JSON")
    parser.add_argument("--json", required=True)
    parser.add_argument("--npy", required=True)
    args = parser.parse_args(argv)
    settings = DerivativeSettings(**json.loads(args.settings))
    record, out = run_method(settings, args.method)
    np.save(args.npy, out)
    with open(args.json, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
