"""M independent sensitivity trajectories as one vectorised computation.

Replica r runs the Langevin scheme with its own noise stream ``noise(seed, t, N, r)`` and
its own Maxwell-Boltzmann starting velocities ``maxwell_boltzmann_velocities(m, T, seed,
r)``, carrying dx/dθ forward exactly as ``timemachine.sensitivity.simulate(...,
replica=r)`` does (``exact_step``/``window_step`` with the system's ζ). All replicas of a
batch are one ``jax.vmap`` of the step loop, compiled once: on a CPU the step's small
kernels become M-wide, on a GPU the device is filled. The last frames of the M replicas
are M independent samples for ensemble averages (docs/design.md, "Observable gradients");
saved frames along the way give time averages per replica.

With ``backend="cuda"`` the replicas run one after another through the CUDA kernels
(``timemachine.backends.cupy_backend``; one program, its tables uploaded once), each the
same run as ``simulate(..., backend="cuda", replica=r)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.backends import check_backend
from timemachine.checks import check_int, check_vectors
from timemachine.errors import InputError, SimulationError
from timemachine.integrator.langevin import (
    LangevinIntegrator,
    _check_replica,
    maxwell_boltzmann_velocities,
)
from timemachine.sensitivity.options import physical_memory
from timemachine.sensitivity.propagation import (
    exact_init,
    exact_step,
    expected_state_bytes,
    window_coefficients,
    window_init,
    window_size,
    window_step,
)
from timemachine.sensitivity.zeta import make_gradient_and_zeta
from timemachine.system import System

__all__ = ["ReplicaResult", "run_replicas"]


class ReplicaResult(NamedTuple):
    """The outcome of ``run_replicas``; M replicas, P parameters, N atoms, F saved frames.

    Attributes:
        x: (M, N, 3) last positions, nm.
        v: (M, N, 3) last half-step velocities, nm/ps.
        dx_dtheta: (M, P, N, 3) last sensitivities, nm/[θ].
        potential_energy: (M,) kJ/mol at the last positions.
        replicas: (M,) int replica index of each row (noise and velocity stream).
        param_names: P names of θ[wrt]; wrt: (P,) int indices into ``system.params``.
        steps: (F,) int64 step of each saved frame (empty without ``save_every``).
        frames_x: (M, F, N, 3) saved positions, or None.
        frames_dx_dtheta: (M, F, P, N, 3) saved sensitivities, or None.
        final_state: batched ``ExactState``/``WindowState`` (leading axis M); row r passed
            to ``simulate`` as ``x0`` with ``replica=replicas[r]`` continues replica r.
    """

    x: np.ndarray
    v: np.ndarray
    dx_dtheta: np.ndarray
    potential_energy: np.ndarray
    replicas: np.ndarray
    param_names: tuple
    wrt: np.ndarray
    steps: np.ndarray
    frames_x: np.ndarray | None
    frames_dx_dtheta: np.ndarray | None
    final_state: object


@functools.lru_cache(maxsize=8)
def _program(system, wrt_key, zeta_method, method, n_blocks, save_every, keep_frames):
    """The jitted vmapped run for one (system, wrt, ζ, mode, shape of the loop)."""
    energy_fn = system.energy_fn()
    gz_fn = make_gradient_and_zeta(system, np.asarray(wrt_key, dtype=np.int64), zeta_method)

    def one_replica(state, replica, theta, coeffs, wcoeffs, seed):
        def gz(y, dx):  # ∇E and ζ from one fused call, as in simulate
            return gz_fn(y, theta, dx)

        def one(_, s):
            if method == "exact":
                return exact_step(None, None, coeffs, s, seed, replica, gradient_and_zeta_fn=gz)
            return window_step(
                None, None, coeffs, wcoeffs, s, seed, replica, gradient_and_zeta_fn=gz
            )

        def block(s, _):
            s = jax.lax.fori_loop(0, save_every, one, s)
            return s, ((s.x, s.dx_dtheta) if keep_frames else None)

        final, frames = jax.lax.scan(block, state, None, length=n_blocks)
        return final, frames, energy_fn(final.x, theta)

    run = jax.vmap(one_replica, in_axes=(0, 0, None, None, None, None))
    return jax.jit(run)


def run_replicas(
    system: System,
    x0,
    integrator: LangevinIntegrator,
    n_steps: int,
    wrt="torsion*",
    n_replicas: int = 8,
    params=None,
    first_replica: int = 0,
    replicas=None,
    save_every: int | None = None,
    method: str = "exact",
    window: int | None = None,
    window_tol: float = 1e-8,
    zeta: str = "structured",
    v0=None,
    batch_size: int | None = None,
    backend: str = "jax",
) -> ReplicaResult:
    """Run M independent trajectories carrying dx/dθ, vmapped over replicas.

    Replica r of the result equals ``tm.sensitivity.simulate(system, x0, integrator,
    n_steps, wrt, replica=replicas[r], method=..., params=...)`` up to round-off.

    Args:
        system: a ``timemachine.System``.
        x0: (N, 3) starting positions shared by all replicas, or (M, N, 3), one per
            replica, nm.
        integrator: ``LangevinIntegrator``; its seed with the replica index fixes the
            noise and the starting velocities.
        n_steps: steps per replica.
        wrt: parameters θ_p: a glob, a list of globs, or int indices into
            ``system.params``.
        n_replicas: M, used when ``replicas`` is None.
        params: (P_all,) θ to run at; default ``system.params``.
        first_replica: replica indices are ``first_replica + arange(M)`` (give each
            batch of a fit its own offset for fresh noise).
        replicas: explicit (M,) replica indices, overriding the two above.
        save_every: also keep every this many steps' (x, dx/dθ) for time averages;
            None keeps only the last frame.
        method: "exact" or "window" (paper eq. 9; ``window``, ``window_tol`` as in
            ``simulate``).
        zeta: "structured" or "reference" (see ``timemachine.sensitivity.zeta``).
        v0: (N, 3) or (M, N, 3) starting velocities, nm/ps; default Maxwell-Boltzmann
            per replica.
        batch_size: replicas per vmapped call; default all that fit in a quarter of the
            physical memory (backend "jax" only).
        backend: "jax" (vmapped, on CPU or GPU through XLA) or "cuda" (the CUDA kernels
            through CuPy, replica after replica on the GPU; as in ``simulate``, its noise
            is the Philox stream and ``zeta`` is not used).

    Returns:
        ``ReplicaResult`` (numpy arrays).

    Raises:
        InputError: invalid arguments, named with their values.
        SimulationError: non-finite coordinates or sensitivities in a replica (named).
    """
    check_backend(backend)
    if not isinstance(system, System):
        raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
    if not isinstance(integrator, LangevinIntegrator):
        raise InputError(
            f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
        )
    if method not in ("exact", "window"):
        raise InputError(f"method must be 'exact' or 'window', got {method!r}")
    if zeta not in ("structured", "reference"):
        raise InputError(f"zeta must be 'structured' or 'reference', got {zeta!r}")
    n_steps = check_int(n_steps, "n_steps", minimum=1)
    keep_frames = save_every is not None
    save_every = n_steps if save_every is None else check_int(save_every, "save_every", minimum=1)
    if n_steps % save_every:
        raise InputError(f"n_steps = {n_steps} must be a multiple of save_every = {save_every}")
    if replicas is None:
        n_replicas = check_int(n_replicas, "n_replicas", minimum=1)
        first_replica = _check_replica(first_replica)
        replicas = np.arange(first_replica, first_replica + n_replicas)
    replicas = np.asarray(replicas)
    if replicas.ndim != 1 or replicas.size == 0 or not np.issubdtype(replicas.dtype, np.integer):
        raise InputError(f"replicas must be a non-empty 1-D list of ints, got {replicas!r}")
    for r in replicas:
        _check_replica(int(r))
    if np.unique(replicas).size != replicas.size:
        raise InputError(f"replicas repeat an index (identical noise): {replicas.tolist()}")
    m_rep, n = replicas.size, system.n_atoms
    wrt = system.resolve_wrt(wrt)
    theta = system.resolve_params(params)
    p = wrt.size

    x_start = _per_replica(x0, "x0", m_rep, n, "nm")
    if v0 is None:
        v_start = np.stack(
            [
                np.asarray(
                    maxwell_boltzmann_velocities(
                        system.masses, integrator.temperature, integrator.seed, int(r)
                    )
                )
                for r in replicas
            ]
        )
    else:
        v_start = _per_replica(v0, "v0", m_rep, n, "nm/ps")

    k, wcoeffs = None, None
    if method == "window":
        k = window_size(integrator, window_tol) if window is None else window
        k = check_int(k, "window", minimum=1)
        wcoeffs = window_coefficients(integrator, k)
    elif window is not None:
        raise InputError(f"window = {window!r} is only used with method='window'")

    coeffs = integrator.coefficients(system.masses)
    n_blocks = n_steps // save_every
    if backend == "cuda":
        finals, frames_x, frames_dx, energies = _run_cuda(
            system, wrt, method, k, theta, coeffs, wcoeffs, integrator.seed, replicas,
            x_start, v_start, n_blocks, save_every,
        )  # fmt: skip
    else:
        per_replica = expected_state_bytes(method, n, p, k)["total"] * 3  # state, copy, ζ
        if keep_frames:
            per_replica += n_blocks * 8 * (n * 3 + p * n * 3)
        if batch_size is None:
            phys = physical_memory() or 8 * 2**30
            batch_size = max(1, min(m_rep, (phys // 4) // per_replica))
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        program = _program(
            system, tuple(int(i) for i in wrt), zeta, method, n_blocks, save_every, keep_frames
        )
        finals, frames_x, frames_dx, energies = _run_jax(
            program, method, k, p, theta, coeffs, wcoeffs, integrator.seed, replicas,
            x_start, v_start, batch_size,
        )  # fmt: skip

    final = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *finals)
    result = ReplicaResult(
        x=final.x,
        v=final.v,
        dx_dtheta=final.dx_dtheta,
        potential_energy=np.concatenate(energies),
        replicas=replicas.astype(np.int64),
        param_names=tuple(system.param_names[i] for i in wrt),
        wrt=wrt,
        steps=np.arange(1, n_blocks + 1, dtype=np.int64) * save_every
        if keep_frames
        else np.zeros(0, np.int64),
        frames_x=np.concatenate(frames_x) if keep_frames else None,
        frames_dx_dtheta=np.concatenate(frames_dx) if keep_frames else None,
        final_state=final,
    )
    _check_finite(result, integrator)
    return result


def _run_jax(program, method, k, p, theta, coeffs, wcoeffs, seed, replicas, x_start, v_start,
             batch_size):  # fmt: skip
    """The replicas in vmapped batches of ``batch_size`` → per-batch lists of (final
    states, frames of x, frames of dx/dθ, last energies), replicas along axis 0."""
    m_rep = replicas.size
    seed = jnp.asarray(seed, dtype=jnp.int64)
    finals, frames_x, frames_dx, energies = [], [], [], []
    for start in range(0, m_rep, batch_size):
        # the last batch is padded with copies of its last row, so every batch has the
        # same shape and the program compiles once; the copies are dropped
        rows = np.minimum(np.arange(start, start + batch_size), m_rep - 1)
        used = min(batch_size, m_rep - start)
        if method == "exact":
            init = jax.vmap(lambda x, v: exact_init(x, v, p))
        else:
            init = jax.vmap(lambda x, v: window_init(x, v, p, k))
        state = init(jnp.asarray(x_start[rows]), jnp.asarray(v_start[rows]))
        final, frames, pe = program(
            state,
            jnp.asarray(replicas[rows], dtype=jnp.int64),
            jnp.asarray(theta),
            coeffs,
            wcoeffs,
            seed,
        )
        finals.append(jax.tree_util.tree_map(lambda a, n=used: np.asarray(a)[:n], final))
        energies.append(np.asarray(pe)[:used])
        if frames is not None:
            frames_x.append(np.asarray(frames[0])[:used])
            frames_dx.append(np.asarray(frames[1])[:used])
    return finals, frames_x, frames_dx, energies


def _run_cuda(system, wrt, method, k, theta, coeffs, wcoeffs, seed, replicas, x_start,
              v_start, n_blocks, save_every):  # fmt: skip
    """The replicas one after another on the CUDA kernels (one program: the tables are
    uploaded once) → the lists of ``_run_jax``, one row per replica."""
    from timemachine.backends import cupy_backend

    program = cupy_backend.make_program(system, wrt, method)
    p = wrt.size
    finals, frames_x, frames_dx, energies = [], [], [], []
    for r, replica in enumerate(replicas):
        if method == "exact":
            state = exact_init(x_start[r], v_start[r], p)
        else:
            state = window_init(x_start[r], v_start[r], p, k)
        final, frames, _ = program(
            n_blocks, state, n_blocks, save_every, theta, coeffs, wcoeffs, seed, int(replica)
        )
        # the next replica reuses the device buffers: copy this one's state out now (the
        # window ring would otherwise be read from the device later)
        finals.append(type(final)(*(np.asarray(f)[None] for f in final)))
        frames_x.append(frames[0][None])
        frames_dx.append(frames[2][None])
        energies.append(frames[5][-1:])
    return finals, frames_x, frames_dx, energies


def _per_replica(value, name, m_rep, n, unit):
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2:
        return np.broadcast_to(check_vectors(arr, name, n, unit=unit), (m_rep, n, 3))
    if arr.ndim != 3 or arr.shape[0] != m_rep:
        raise InputError(
            f"{name} must have shape ({n}, 3) or ({m_rep}, {n}, 3) ({unit}), got {arr.shape}"
        )
    return np.stack([check_vectors(a, f"{name}[{r}]", n, unit=unit) for r, a in enumerate(arr)])


def _check_finite(result: ReplicaResult, integrator: LangevinIntegrator) -> None:
    ok = np.isfinite(result.x).all(axis=(1, 2)) & np.isfinite(result.dx_dtheta).all(axis=(1, 2, 3))
    if ok.all():
        return
    r = int(np.argmax(~ok))
    what = "coordinates" if not np.isfinite(result.x[r]).all() else "sensitivities dx/dθ"
    raise SimulationError(
        f"run_replicas: replica {int(result.replicas[r])} ended with non-finite {what} "
        f"({int((~ok).sum())} of {ok.size} replicas bad), dt = {integrator.dt} ps; minimize "
        f"first, use a smaller dt, or shorter runs"
    )
