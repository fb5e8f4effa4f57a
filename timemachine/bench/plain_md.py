"""Plain Langevin MD, µs per step: timemachine's JAX backend against OpenMM's platforms.

Every engine integrates the same OpenMM force field (NoCutoff all pairs, no constraints)
at the same temperature, friction and step. OpenMM's ``LangevinIntegrator`` is a leapfrog
Langevin scheme like paper eqs. 3-4, but not bitwise the same one: started from the same
positions and velocities with the noise off (0 K), trialanine's positions differ by
2e-6 nm after one step. ``max_dx_vs_reference_nm`` reports that distance after
``agreement_steps`` noise-free steps, which checks that the timings compare the same
dynamics of the same energy.

Our time is one compiled ``timemachine.integrator.run`` (a ``lax.scan`` over all steps,
one saved frame) after a first call that compiles it; the compile time is reported
separately. OpenMM's time is ``Context.step(n)`` after a few warm-up steps; building the
Context is reported separately. Every timing is the best of ``repeats`` runs (the machine
is shared: the minimum is the run least disturbed by other processes), with the process
CPU time (all threads) of that run next to it.

With OBC2, the System that ``load_system`` reproduces holds OpenMM's ``implicit/obc2.xml``
as a ``CustomGBForce``; OpenMM's native ``GBSAOBCForce`` computes the same energy (OBC
type II with the ACE surface term) with hand-written kernels. ``native_gb_system`` swaps
one for the other, so the OpenMM rows are timed both ways.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.structured import gradient_fn

__all__ = [
    "best_of",
    "steps_within",
    "bench_ours",
    "bench_openmm",
    "native_gb_system",
    "openmm_platforms",
    "reference_agreement",
]


def best_of(fn, repeats: int = 3, budget_s: float = float("inf")):
    """Call ``fn()`` up to ``repeats`` times (at least once; no new call once ``budget_s``
    seconds have passed) and return (wall s, process CPU s, value) of the fastest call."""
    best, spent = None, 0.0
    for _ in range(max(int(repeats), 1)):
        c0, t0 = time.process_time(), time.perf_counter()
        value = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        spent += wall
        if best is None or wall < best[0]:
            best = (wall, cpu, value)
        if spent >= budget_s:
            break
    return best


@functools.cache
def _gradient_fn(system):
    """One jitted ∇E per System (the closed-form ``structured.gradient_fn``), so every run of
    it reuses one compiled program."""
    gradient = gradient_fn(system)
    theta = jnp.asarray(system.params)
    return jax.jit(lambda x: gradient(x, theta))


def initial_velocities(case, integrator):
    """Maxwell-Boltzmann velocities (N, 3) nm/ps at the integrator's T and seed."""
    from timemachine.integrator import maxwell_boltzmann_velocities

    return np.asarray(
        maxwell_boltzmann_velocities(case.system.masses, integrator.temperature, integrator.seed)
    )


def _run_ours(case, integrator, n_steps, gradient_fn, v0):
    from timemachine.integrator import run

    traj = run(
        gradient_fn,
        case.system.masses,
        case.positions,
        integrator,
        n_steps,
        v0=v0,
        save_every=n_steps,
    )
    return jax.block_until_ready(traj.state.x)


def bench_ours(case, integrator, n_steps: int, repeats: int = 3) -> dict:
    """µs per step of ``timemachine.integrator.run`` on ``case`` (JAX, default device),
    best of ``repeats`` runs of ``n_steps``.

    Returns a dict: engine, device, n_steps, us_per_step (wall), cpu_us_per_step (process
    CPU time, all threads), compile_s, final_x (N, 3).
    """
    gradient_fn = _gradient_fn(case.system)
    v0 = initial_velocities(case, integrator)
    t0 = time.perf_counter()
    _run_ours(case, integrator, n_steps, gradient_fn, v0)
    first = time.perf_counter() - t0
    elapsed, cpu, x = best_of(
        lambda: _run_ours(case, integrator, n_steps, gradient_fn, v0), repeats
    )
    return {
        "engine": "timemachine (JAX)",
        "device": next(iter(x.devices())).platform,
        "n_steps": n_steps,
        "us_per_step": 1e6 * elapsed / n_steps,
        "cpu_us_per_step": 1e6 * cpu / n_steps,
        "compile_s": max(first - elapsed, 0.0),
        "final_x": np.asarray(x),
    }


def openmm_platforms() -> list[str]:
    """OpenMM platforms this machine has, among Reference, CPU, CUDA, OpenCL."""
    import openmm as mm

    names = {mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())}
    return [p for p in ("Reference", "CPU", "CUDA", "OpenCL") if p in names]


def native_gb_system(openmm_system, cutoff=None):
    """A copy of ``openmm_system`` with OpenMM's ``implicit/obc2.xml`` CustomGBForce
    replaced by the equivalent native ``GBSAOBCForce`` (OBC II, ACE surface term,
    NoCutoff, or CutoffNonPeriodic with ``cutoff`` nm; the same charges, radii and scale
    factors); None when it has no such force.

    The obc2.xml per-particle parameters are (charge, or = radius - 0.009 nm,
    sr = scale · or); GBSAOBCForce takes (charge, radius, scale).
    """
    import openmm as mm

    forces = list(openmm_system.getForces())
    gb = [i for i, f in enumerate(forces) if isinstance(f, mm.CustomGBForce)]
    if len(gb) != 1:
        return None
    custom = forces[gb[0]]
    names = [custom.getPerParticleParameterName(i) for i in range(3)]
    if custom.getNumPerParticleParameters() != 3 or names != ["charge", "or", "sr"]:
        return None
    system = mm.XmlSerializer.clone(openmm_system)
    system.removeForce(gb[0])
    native = mm.GBSAOBCForce()
    if cutoff is None:
        native.setNonbondedMethod(mm.GBSAOBCForce.NoCutoff)
    else:
        native.setNonbondedMethod(mm.GBSAOBCForce.CutoffNonPeriodic)
        native.setCutoffDistance(cutoff)
    native.setSolventDielectric(78.5)
    native.setSoluteDielectric(1.0)
    for i in range(custom.getNumParticles()):
        charge, offset_radius, scaled = custom.getParticleParameters(i)
        native.addParticle(charge, offset_radius + 0.009, scaled / offset_radius)
    system.addForce(native)
    return system


def openmm_context(case, platform: str, integrator, v0, openmm_system=None):
    """An OpenMM Context on ``platform`` with OpenMM's LangevinIntegrator at the same
    T, γ, δt, positions ``case.positions`` and velocities ``v0`` (N, 3) nm/ps, for
    ``openmm_system`` (default ``case.openmm_system``)."""
    import openmm as mm
    import openmm.unit as unit

    omm_integrator = mm.LangevinIntegrator(
        integrator.temperature * unit.kelvin,
        integrator.friction / unit.picosecond,
        integrator.dt * unit.picosecond,
    )
    # OpenMM draws a fresh seed for 0; any fixed non-zero seed makes its runs repeatable.
    omm_integrator.setRandomNumberSeed(integrator.seed + 1)
    properties = {"Precision": "double"} if platform in ("CUDA", "OpenCL") else {}
    context = mm.Context(
        case.openmm_system if openmm_system is None else openmm_system,
        omm_integrator,
        mm.Platform.getPlatformByName(platform),
        properties,
    )
    context.setPositions(case.positions * unit.nanometer)
    context.setVelocities(v0 * unit.nanometer / unit.picosecond)
    return context


def openmm_positions(context) -> np.ndarray:
    import openmm.unit as unit

    x = context.getState(getPositions=True).getPositions(asNumpy=True)
    return np.asarray(x.value_in_unit(unit.nanometer), dtype=np.float64)


def _first_step_s(context) -> float:
    """Seconds one step of ``context`` takes, its positions read back (GPU platforms run
    asynchronously)."""
    t0 = time.perf_counter()
    context.getIntegrator().step(1)
    openmm_positions(context)
    return time.perf_counter() - t0


def steps_within(first_step_s: float, n_steps: int, budget_s: float, least: int = 2) -> int:
    """``n_steps``, or fewer (at least ``least``, at most ``n_steps``) when ``n_steps``
    steps of ``first_step_s`` seconds each would take longer than ``budget_s``."""
    if first_step_s * n_steps <= budget_s:
        return int(n_steps)
    return min(int(n_steps), max(int(least), int(budget_s / max(first_step_s, 1e-9))))


def bench_openmm(
    case,
    platform: str,
    integrator,
    n_steps: int,
    warmup: int = 5,
    repeats: int = 3,
    native_gb: bool = False,
    budget_s: float = float("inf"),
) -> dict | None:
    """µs per step of OpenMM's LangevinIntegrator on ``platform``, best of ``repeats``
    runs of ``n_steps``. ``native_gb``: time ``native_gb_system`` (GBSAOBCForce) instead
    of the CustomGBForce System (None when the case has no GB force).

    ``budget_s`` caps one timed run: where the first (untimed) step shows that
    ``n_steps`` would take longer, a run has fewer steps (at least 2), the warm-up is that
    one step, and no new repeat starts after 2 · ``budget_s`` of timed runs. OpenMM's
    Reference platform with the obc2.xml CustomGBForce takes seconds per step on
    thousands of atoms; the returned ``n_steps`` is the count that was timed.

    Returns a dict: engine, device, n_steps, us_per_step (wall), cpu_us_per_step (process
    CPU time, all threads), setup_s, threads, and with ``native_gb`` the energy difference
    to the CustomGBForce System at the start, ``gb_energy_diff_kj_mol``.
    """
    import openmm.unit as unit

    system = None
    if native_gb:
        system = native_gb_system(case.openmm_system)
        if system is None:
            return None
    v0 = initial_velocities(case, integrator)
    t0 = time.perf_counter()
    context = openmm_context(case, platform, integrator, v0, system)
    extra = {}
    if native_gb:
        custom = openmm_context(case, platform, integrator, v0)
        energies = [
            c.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            for c in (context, custom)
        ]
        extra["gb_energy_diff_kj_mol"] = energies[0] - energies[1]
        del custom
    first_step = _first_step_s(context)
    n_steps = steps_within(first_step, n_steps, budget_s)
    if first_step * warmup <= budget_s:
        context.getIntegrator().step(max(warmup - 1, 0))
        openmm_positions(context)
    setup = time.perf_counter() - t0

    def go():
        context.getIntegrator().step(n_steps)
        openmm_positions(context)  # GPU platforms run asynchronously

    elapsed, cpu, _ = best_of(go, repeats, budget_s=2 * budget_s)
    threads = (
        context.getPlatform().getPropertyValue(context, "Threads") if platform == "CPU" else ""
    )
    return {
        "engine": f"OpenMM {platform}" + (" GBSAOBCForce" if native_gb else ""),
        "device": platform,
        "n_steps": n_steps,
        "us_per_step": 1e6 * elapsed / n_steps,
        "cpu_us_per_step": 1e6 * cpu / n_steps,
        "setup_s": setup,
        "threads": threads,
        **extra,
    }


def reference_agreement(
    case, integrator, n_steps: int, budget_s: float = float("inf")
) -> tuple[float, int]:
    """max |x_ours - x_OpenMM Reference| (nm) after ``n_steps`` noise-free steps, and the
    number of steps compared: fewer (at least 2) where OpenMM Reference's first step
    shows that ``n_steps`` would take longer than ``budget_s`` seconds.

    The thermostat temperature is set to 0 K (friction, δt and the Maxwell-Boltzmann
    starting velocities at ``integrator.temperature`` are kept) so both engines follow one
    deterministic trajectory.
    """
    import dataclasses

    cold = dataclasses.replace(integrator, temperature=0.0)
    v0 = initial_velocities(case, integrator)
    context = openmm_context(case, "Reference", cold, v0)
    n_steps = steps_within(_first_step_s(context), n_steps, budget_s)
    context.getIntegrator().step(n_steps - 1)
    ours = np.asarray(_run_ours(case, cold, n_steps, _gradient_fn(case.system), v0))
    return float(np.abs(ours - openmm_positions(context)).max()), n_steps
