"""Langevin dynamics: coefficients, seeded noise, the step, and whole runs.

The scheme is the one of the timemachine paper (eqs. 3-4), per atom i with mass m_i,
friction gamma, temperature T and step dt::

    a   = exp(-gamma dt)
    b_i = (1 - a) / (gamma m_i)              (b_i = dt / m_i when gamma = 0)
    c_i = sqrt(k_B T (1 - a^2) / m_i)
    v_t = a v_{t-1} - b * grad E(x_{t-1}) + c * n_{t-1},   n ~ N(0, 1)      (eq. 3)
    x_t = x_{t-1} + dt v_t                                                  (eq. 4)

It is OpenMM's leapfrog ``LangevinIntegrator`` (before 7.5): ``v_t`` is the velocity at the
half step ``t - 1/2``, i.e. ``(x_t - x_{t-1}) / dt``. With gamma = 0 it reduces to
symplectic Euler / leapfrog; with dt -> 0 its stationary distribution is Boltzmann.

Style follows JAX MD: data lives in small immutable containers (``LangevinState``,
``LangevinCoefficients``) and the simulation is an ``init``/``step`` pair of pure
functions (``langevin_init``, ``langevin_step``) that compose with ``jit``, ``vmap`` and
``scan``. ``run`` strings blocks of steps together into one compiled program.

Reproducibility: the noise at step t is a pure function of (seed, t, replica) (see
``noise``), so any chunking of a run reproduces the same bits on the same backend.

Units are OpenMM's: nm, ps, kJ/mol, amu, K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.checks import check_int, check_masses, check_real, check_vectors
from timemachine.constants import BOLTZMANN
from timemachine.errors import InputError, SimulationError

__all__ = [
    "LangevinCoefficients",
    "LangevinIntegrator",
    "LangevinState",
    "LangevinTrajectory",
    "on_step_kinetic_energy",
    "kinetic_energy",
    "kinetic_temperature",
    "langevin_coefficients",
    "langevin_init",
    "langevin_step",
    "maxwell_boltzmann_velocities",
    "noise",
    "run",
]

# Maxwell-Boltzmann velocities fold this tag in where the noise stream folds in the
# replica index, so the two streams cannot share a key unless replica == _MB_TAG; the
# public entry points refuse that replica index.
_MB_TAG = 0xFFFFFFFF
_MAX_REPLICA = _MB_TAG - 1

GradientFn = Callable[[jax.Array], jax.Array]
EnergyFn = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- containers


class LangevinCoefficients(NamedTuple):
    """Per-atom coefficients of the Langevin step (paper eq. 3).

    Attributes:
        a: scalar, ``exp(-gamma dt)``, dimensionless.
        b: (N,), ``(1 - a) / (gamma m_i)`` (``dt / m_i`` when gamma = 0), ps/amu, so that
            ``b * grad E`` (kJ/mol/nm) is a velocity in nm/ps.
        c: (N,), ``sqrt(k_B T (1 - a^2) / m_i)``, nm/ps.
        dt: scalar, the time step in ps (eq. 4).
    """

    a: jax.Array
    b: jax.Array
    c: jax.Array
    dt: jax.Array


class LangevinState(NamedTuple):
    """The dynamical state after ``step`` steps.

    Attributes:
        x: (N, 3) positions x_t, nm.
        v: (N, 3) velocities v_t = (x_t - x_{t-1}) / dt, nm/ps: the half-step velocity
            at time (t - 1/2) dt.
        step: int64 scalar array t, the number of steps taken; the next step draws
            ``noise(seed, t, N, replica)``.
    """

    x: jax.Array
    v: jax.Array
    step: jax.Array


class LangevinTrajectory(NamedTuple):
    """Frames saved by ``run``; frame f is the state after ``steps[f]`` steps.

    Attributes:
        x: (F, N, 3) positions, nm.
        v: (F, N, 3) half-step velocities v_t, nm/ps.
        steps: (F,) int64 step index t of each frame.
        kinetic_energy: (F,) kJ/mol, the on-step estimate at time t,
            ``on_step_kinetic_energy(v_t, v_{t+1}, masses)``.
        temperature: (F,) K, the kinetic temperature of ``kinetic_energy`` (3N degrees of
            freedom).
        potential_energy: (F,) kJ/mol, ``energy_fn(x_t)``, or None without ``energy_fn``.
        state: the final ``LangevinState``; pass it back to ``run`` as ``x0`` to continue
            the same trajectory bit for bit.
    """

    x: jax.Array
    v: jax.Array
    steps: jax.Array
    kinetic_energy: jax.Array
    temperature: jax.Array
    potential_energy: jax.Array | None
    state: LangevinState


# --------------------------------------------------------------------------- validation


def _check_replica(replica) -> int:
    return check_int(replica, "replica", minimum=0, maximum=_MAX_REPLICA)


# --------------------------------------------------------------------------- integrator


@dataclasses.dataclass(frozen=True)
class LangevinIntegrator:
    """Settings of the Langevin integrator (paper eqs. 3-4); immutable and hashable.

    Attributes:
        temperature: K, >= 0. Zero switches the noise off (c = 0).
        friction: gamma in 1/ps, >= 0. Zero gives plain leapfrog (symplectic Euler).
        dt: time step in ps, > 0.
        seed: non-negative integer; with the step index and the replica index it fixes
            every random number of the run (see ``noise``).

    Raises:
        InputError: a field is not a finite number in its range; the message names the
            field and the value.
    """

    temperature: float = 300.0
    friction: float = 1.0
    dt: float = 0.0015
    seed: int = 0

    def __post_init__(self):
        checked = {
            "temperature": check_real(
                self.temperature, "LangevinIntegrator.temperature", allow_zero=True, unit="K"
            ),
            "friction": check_real(
                self.friction, "LangevinIntegrator.friction", allow_zero=True, unit="1/ps"
            ),
            "dt": check_real(self.dt, "LangevinIntegrator.dt", allow_zero=False, unit="ps"),
            "seed": check_int(self.seed, "LangevinIntegrator.seed", minimum=0),
        }
        for field, value in checked.items():
            object.__setattr__(self, field, value)

    def coefficients(self, masses) -> LangevinCoefficients:
        """The coefficients a, b, c, dt of eq. 3 for these masses.

        Args:
            masses: (N,) amu, all finite and > 0.

        Returns:
            ``LangevinCoefficients`` with a, dt scalars and b, c of shape (N,), float64.

        Raises:
            InputError: masses are not 1-D, or the first non-finite/non-positive mass
                (its atom index and value are in the message).
        """
        m = check_masses(masses)
        return langevin_coefficients(m, self.temperature, self.friction, self.dt)


def langevin_coefficients(masses, temperature, friction, dt) -> LangevinCoefficients:
    """Pure-array form of ``LangevinIntegrator.coefficients`` (no validation; jittable).

    ``1 - a`` and ``1 - a^2`` are evaluated as ``-expm1(-gamma dt)`` and
    ``-expm1(-2 gamma dt)``: the same closed forms without the cancellation that loses
    digits when gamma dt is small.

    Args:
        masses: (N,) amu. temperature: K. friction: gamma, 1/ps. dt: ps.
    """
    m = jnp.asarray(masses, dtype=jnp.float64)
    gamma = jnp.asarray(friction, dtype=jnp.float64)
    dt = jnp.asarray(dt, dtype=jnp.float64)
    kt = BOLTZMANN * jnp.asarray(temperature, dtype=jnp.float64)
    a = jnp.exp(-gamma * dt)
    one_minus_a = -jnp.expm1(-gamma * dt)
    one_minus_a2 = -jnp.expm1(-2.0 * gamma * dt)
    has_friction = gamma > 0
    safe_gamma = jnp.where(has_friction, gamma, 1.0)
    b = jnp.where(has_friction, one_minus_a / (safe_gamma * m), dt / m)
    c = jnp.sqrt(kt * one_minus_a2 / m)
    return LangevinCoefficients(a=a, b=b, c=c, dt=dt)


# --------------------------------------------------------------------------- randomness


def _noise_key(seed, step, replica):
    root = jax.random.key(seed)
    return jax.random.fold_in(jax.random.fold_in(root, replica), step)


def noise(seed, step, n_atoms: int, replica=0) -> jax.Array:
    """The standard-normal noise n_t of eq. 3 for step ``step``, shape (n_atoms, 3).

    A pure function of (seed, step, replica): the key is
    ``fold_in(fold_in(key(seed), replica), step)``. ``seed``, ``step`` and ``replica``
    may be traced (jit, scan, vmap); ``n_atoms`` must be static. ``fold_in`` takes the
    low 32 bits of ``step`` and ``replica``, so the stream repeats after 2^32 steps.
    """
    return jax.random.normal(_noise_key(seed, step, replica), (n_atoms, 3), dtype=jnp.float64)


def maxwell_boltzmann_velocities(masses, temperature, seed, replica=0) -> jax.Array:
    """Velocities drawn from the Maxwell-Boltzmann distribution, shape (N, 3), nm/ps.

    Each component of atom i is normal with mean 0 and variance k_B T / m_i. The key is
    ``fold_in(fold_in(key(seed), 0xFFFFFFFF), replica)``: the tag sits where ``noise``
    folds in the replica, so these velocities never share a key with ``noise(seed, t,
    replica)`` for any step t and any replica < 0xFFFFFFFF.

    Args:
        masses: (N,) amu, finite and > 0.
        temperature: K, >= 0 (0 gives zero velocities).
        seed: non-negative integer.
        replica: integer in [0, 2^32 - 2].
    """
    m = check_masses(masses)
    temperature = check_real(temperature, "temperature", allow_zero=True, unit="K")
    seed = check_int(seed, "seed", minimum=0)
    replica = _check_replica(replica)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _MB_TAG), replica)
    z = jax.random.normal(key, (m.shape[0], 3), dtype=jnp.float64)
    sigma = jnp.sqrt(BOLTZMANN * temperature / jnp.asarray(m))
    return sigma[:, None] * z


# --------------------------------------------------------------------------- energies


def kinetic_energy(v, masses) -> jax.Array:
    """Kinetic energy 1/2 sum_i m_i |v_i|^2 in kJ/mol.

    Args:
        v: (..., N, 3) nm/ps; leading axes (frames) are kept.
        masses: (N,) amu.

    Returns:
        Array of shape (...), kJ/mol (amu nm^2/ps^2 = kJ/mol).
    """
    v = jnp.asarray(v)
    m = jnp.asarray(masses, dtype=v.dtype)
    return 0.5 * jnp.sum(m[:, None] * v * v, axis=(-2, -1))


def on_step_kinetic_energy(v_prev, v_next, masses) -> jax.Array:
    """Kinetic energy at time t from the two half-step velocities around it, kJ/mol.

    The velocities of this scheme, v_t = (x_t - x_{t-1}) / dt, live at half steps. The
    velocity at time t is their mean, ``u_t = (v_t + v_{t+1}) / 2 = (x_{t+1} - x_{t-1}) / (2 dt)``,
    exactly velocity Verlet's on-step velocity (with γ = 0 the scheme *is* velocity Verlet
    written as leapfrog). ``K(u_t) + E(x_t)`` is therefore the velocity-Verlet total energy.
    The half-step kinetic energies overestimate the temperature when stiff X-H stretches
    are integrated without constraints (trialanine at dt = 1 fs: +1.8 %, against -0.8 %
    for this estimator). Shapes as in ``kinetic_energy``.
    """
    return kinetic_energy(0.5 * (jnp.asarray(v_prev) + jnp.asarray(v_next)), masses)


def kinetic_temperature(v, masses) -> jax.Array:
    """Instantaneous kinetic temperature 2 K / (3 N k_B) in K (3N degrees of freedom).

    No degrees of freedom are removed for constraints or centre-of-mass motion.
    Shapes as in ``kinetic_energy``.
    """
    n_atoms = jnp.shape(masses)[0]
    return 2.0 * kinetic_energy(v, masses) / (3 * n_atoms * BOLTZMANN)


def _temperature_from_kinetic_energy(ke, n_atoms: int):
    return 2.0 * ke / (3 * n_atoms * BOLTZMANN)


# --------------------------------------------------------------------------- init / step


def langevin_init(x0, masses, integrator: LangevinIntegrator, replica=0, velocities=None):
    """Initial ``LangevinState`` at step 0.

    Args:
        x0: (N, 3) positions, nm, finite.
        masses: (N,) amu, finite and > 0.
        integrator: a ``LangevinIntegrator``; its seed and temperature draw the velocities.
        replica: integer replica index; selects an independent velocity (and noise) stream.
        velocities: optional (N, 3) nm/ps; default Maxwell-Boltzmann at
            ``integrator.temperature`` (``maxwell_boltzmann_velocities``).

    Raises:
        InputError: wrong shapes, non-finite values (the first bad atom is named), bad
            masses, or a replica index out of range.
    """
    if not isinstance(integrator, LangevinIntegrator):
        raise InputError(
            f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
        )
    m = check_masses(masses)
    x = check_vectors(x0, "x0", n_atoms=m.shape[0])
    replica = _check_replica(replica)
    if velocities is None:
        v = maxwell_boltzmann_velocities(m, integrator.temperature, integrator.seed, replica)
    else:
        v = jnp.asarray(check_vectors(velocities, "velocities", m.shape[0], unit="nm/ps"))
    return LangevinState(x=jnp.asarray(x), v=v, step=jnp.asarray(0, dtype=jnp.int64))


def langevin_step(
    gradient_fn: GradientFn, coeffs: LangevinCoefficients, state: LangevinState, seed, replica=0
) -> LangevinState:
    """One step of eqs. 3-4; pure and traceable (jit, scan, vmap over replicas).

    ``v_t = a v_{t-1} - b * grad E(x_{t-1}) + c * n_{t-1}`` and ``x_t = x_{t-1} + dt v_t``,
    with ``n_{t-1} = noise(seed, state.step, N, replica)``; ``step`` increases by one.

    Args:
        gradient_fn: x (N, 3) -> grad E (N, 3), kJ/mol/nm.
        coeffs: ``LangevinCoefficients`` (b, c of shape (N,)).
        state: ``LangevinState`` at step t - 1.
        seed, replica: integer (possibly traced) noise-stream indices.
    """
    x, v, step = state
    # a float32 step (timemachine.precision) sees the float64 stream rounded, no new one
    normals = noise(seed, step, x.shape[0], replica).astype(x.dtype)
    x_new, v_new = langevin_update(coeffs, x, v, gradient_fn(x), normals)
    return LangevinState(x=x_new, v=v_new, step=step + 1)


def langevin_update(coeffs: LangevinCoefficients, x, v, grad, normals):
    """Eqs. 3-4 with the noise as an input: ``(x_t, v_t)`` from step t - 1.

    ``v_t = a v_{t-1} - b ∘ ∇E(x_{t-1}) + c ∘ n_{t-1}``, ``x_t = x_{t-1} + δt v_t``.

    Args:
        coeffs: ``LangevinCoefficients`` (b, c of shape (N,)).
        x, v: (N, 3) positions (nm) and velocities (nm/ps) at step t - 1.
        grad: (N, 3) ∇E(x_{t-1}), kJ/mol/nm.
        normals: (N, 3) standard normals n_{t-1} (``noise``, or any other stream, such as
            the CUDA backend's ``backends.noise.philox_normal``).
    """
    v_new = coeffs.a * v - coeffs.b[:, None] * grad + coeffs.c[:, None] * normals
    return x + coeffs.dt * v_new, v_new


# --------------------------------------------------------------------------- run


def _run_blocks(gradient_fn, energy_fn, n_blocks, save_every, coeffs, state, seed, replica, m):
    """n_blocks blocks of save_every steps; one saved frame per block."""

    def one_step(carry, i):
        s, v_first = carry
        s = langevin_step(gradient_fn, coeffs, s, seed, replica)
        # v after the block's first step is v_{t+1} of the previous block's frame.
        v_first = jnp.where(i == 0, s.v, v_first)
        return (s, v_first), None

    def block(s, _):
        (s, v_first), _ = jax.lax.scan(one_step, (s, jnp.zeros_like(s.v)), jnp.arange(save_every))
        pe = energy_fn(s.x) if energy_fn is not None else None
        return s, (s.x, s.v, s.step, v_first, pe)

    final, (xs, vs, steps, v_first, pe) = jax.lax.scan(block, state, None, length=n_blocks)
    # v_{t+1} of the last frame: the step the next run would take (same noise), discarded.
    lookahead = langevin_step(gradient_fn, coeffs, final, seed, replica)
    v_next = jnp.concatenate([v_first[1:], lookahead.v[None]])
    ke = on_step_kinetic_energy(vs, v_next, m)
    return xs, vs, steps, ke, pe, final


_run_jit = jax.jit(
    _run_blocks, static_argnames=("gradient_fn", "energy_fn", "n_blocks", "save_every")
)


def run(
    gradient_fn: GradientFn,
    masses,
    x0,
    integrator: LangevinIntegrator,
    n_steps: int,
    v0=None,
    replica: int = 0,
    save_every: int = 1,
    energy_fn: EnergyFn | None = None,
) -> LangevinTrajectory:
    """Run ``n_steps`` Langevin steps (eqs. 3-4) as one compiled ``lax.scan``.

    The outer scan runs ``n_steps // save_every`` blocks; each block is an inner scan of
    ``save_every`` steps and saves its last state. The program is compiled once per
    (gradient_fn, energy_fn, n_steps // save_every, save_every, shapes); pass the same
    function objects to reuse it.

    Args:
        gradient_fn: x (N, 3) -> grad E (N, 3), kJ/mol/nm; must be traceable by JAX.
        masses: (N,) amu.
        x0: (N, 3) positions, nm, starting at step 0; or the ``state`` of a previous
            ``LangevinTrajectory`` to continue that run: the result is then bitwise the
            same as one longer run.
        integrator: ``LangevinIntegrator`` (temperature, friction, dt, seed).
        n_steps: number of steps, a positive multiple of ``save_every``.
        v0: optional (N, 3) initial velocities, nm/ps (default Maxwell-Boltzmann at the
            integrator's temperature, seed and ``replica``); must be None when ``x0`` is a
            state.
        replica: replica index, selects the noise stream.
        save_every: save one frame every this many steps.
        energy_fn: optional x (N, 3) -> E, kJ/mol, evaluated on saved frames only.

    Returns:
        ``LangevinTrajectory`` with F = n_steps // save_every frames (steps
        t0 + save_every, ..., t0 + n_steps), the on-step kinetic energy and temperature of
        each frame, and the final state. One extra gradient evaluation per call gives the
        last frame's kinetic energy; it does not change the trajectory.

    Raises:
        InputError: invalid arguments (see ``langevin_init``).
        SimulationError: the coordinates became NaN or infinite; the message gives the
            first saved step where that was seen.
    """
    if not callable(gradient_fn):
        raise InputError(f"gradient_fn must be callable, got {gradient_fn!r}")
    if energy_fn is not None and not callable(energy_fn):
        raise InputError(f"energy_fn must be callable or None, got {energy_fn!r}")
    if not isinstance(integrator, LangevinIntegrator):
        raise InputError(
            f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
        )
    n_steps = check_int(n_steps, "n_steps", minimum=1)
    save_every = check_int(save_every, "save_every", minimum=1)
    if n_steps % save_every:
        raise InputError(f"n_steps = {n_steps} must be a multiple of save_every = {save_every}")
    replica = _check_replica(replica)
    m = check_masses(masses)
    coeffs = integrator.coefficients(m)

    if isinstance(x0, LangevinState):
        if v0 is not None:
            raise InputError("v0 must be None when x0 is a LangevinState (it has velocities)")
        x = check_vectors(x0.x, "x0.x", m.shape[0])
        v = check_vectors(x0.v, "x0.v", m.shape[0], unit="nm/ps")
        step = check_int(int(np.asarray(x0.step)), "x0.step", minimum=0)
        state = LangevinState(jnp.asarray(x), jnp.asarray(v), jnp.asarray(step, jnp.int64))
    else:
        state = langevin_init(x0, m, integrator, replica=replica, velocities=v0)

    xs, vs, steps, ke, pe, final = _run_jit(
        gradient_fn,
        energy_fn,
        n_steps // save_every,
        save_every,
        coeffs,
        state,
        jnp.asarray(integrator.seed, dtype=jnp.int64),
        jnp.asarray(replica, dtype=jnp.int64),
        jnp.asarray(m),
    )
    traj = LangevinTrajectory(
        x=xs,
        v=vs,
        steps=steps,
        kinetic_energy=ke,
        temperature=_temperature_from_kinetic_energy(ke, m.shape[0]),
        potential_energy=pe,
        state=final,
    )
    _check_finite_run(traj, integrator)
    return traj


def _check_finite_run(traj: LangevinTrajectory, integrator: LangevinIntegrator) -> None:
    final_ok = bool(jnp.isfinite(traj.state.x).all() & jnp.isfinite(traj.state.v).all())
    frames_ok = np.isfinite(np.asarray(traj.x)).all(axis=(1, 2))
    if final_ok and frames_ok.all():
        return
    f = int(np.argmax(~frames_ok)) if not frames_ok.all() else len(frames_ok) - 1
    frame = np.asarray(traj.x[f])
    bad_atoms = ~np.isfinite(frame).all(axis=1)
    atom = int(np.argmax(bad_atoms)) if bad_atoms.any() else None
    where = f" (atom {atom} first)" if atom is not None else " (velocities)"
    err = SimulationError(
        f"Langevin run went bad: non-finite coordinates in the frame saved at step "
        f"{int(traj.steps[f])}{where}, with dt = {integrator.dt} ps; minimize first or "
        f"use a smaller dt"
    )
    err.trajectory = traj
    raise err
