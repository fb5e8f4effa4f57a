"""M independent sensitivity trajectories as one vectorised computation.

Replica r runs the Langevin scheme with its own noise stream ``noise(seed, t, N, r)`` and
its own Maxwell-Boltzmann starting velocities ``maxwell_boltzmann_velocities(m, T, seed,
r)``, carrying dx/dθ forward exactly as ``timemachine.sensitivity.simulate(...,
replica=r)`` does: both run the chunk program of ``timemachine.sensitivity.program``
(``exact_step``/``window_step`` with the system's ζ), and both check their arguments and
set up the window with ``timemachine.sensitivity.options``. All replicas of a batch are
one ``jax.vmap`` of that program (``replica_program``), compiled once: on a CPU the step's small
kernels become M-wide, on a GPU the device is filled. The last frames of the M replicas
are M independent samples for ensemble averages (docs/design.md, "Observable gradients");
saved frames along the way give time averages per replica.

With ``backend="cuda"`` the replicas run one after another through the CUDA kernels
(``timemachine.backends.cupy_backend``; one program, its tables uploaded once), each the
same run as ``simulate(..., backend="cuda", replica=r)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.checks import check_int, check_vectors
from timemachine.errors import InputError
from timemachine.fitting.executor import (
    Executor,
    content_key,
    device_sharding,
    open_executor,
    runs_on_dask,
    worker_copy,
)
from timemachine.integrator.langevin import (
    LangevinIntegrator,
    _check_replica,
    maxwell_boltzmann_velocities,
)
from timemachine.precision import check_run_precision, warn_long_float32
from timemachine.sensitivity.diagnosis import check_batch
from timemachine.sensitivity.options import (
    check_max_sensitivity,
    check_run,
    check_steps,
    physical_memory,
    window_setup,
)
from timemachine.sensitivity.program import (
    backend_program,
    frame_bytes,
    replica_program,
    start_state,
)
from timemachine.sensitivity.propagation import expected_state_bytes
from timemachine.start_checks import check_start
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
    precision: str = "float64",
    max_sensitivity: float | None = 1e8,
    executor="in-process",
    n_workers: int | None = None,
    replicas_per_task: int | None = None,
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
        precision: "float64" (default) or "float32", as in ``simulate``
            (``timemachine.precision``): the replicas' step in single precision, their
            frames and final states float32.
        max_sensitivity: SimulationError once any |dx/dθ| in a saved frame (every
            ``save_every`` steps, or the last frame) exceeds this, nm per unit of θ_p, as
            in ``simulate``; None switches that check off (non-finite dx/dθ is refused
            all the same).
        executor: where the replicas run (``timemachine.fitting.executor``):
            "in-process" (one vmapped program here, its batches sharded over the JAX
            devices present), "dask" (a local cluster of ``n_workers`` processes, started
            and stopped for this call), a scheduler address, a ``distributed.Client`` or
            an open ``Executor`` (a fit keeps one open over its epochs). On Dask each
            task is ``replicas_per_task`` replicas run in-process on a worker; the rows
            come back in replica order whichever worker finished first.
        n_workers: workers of the local cluster (executor "dask"); default 2.
        replicas_per_task: replicas per Dask task (vmapped there); default M divided
            among the cluster's worker threads, so that each thread gets one task.

    Returns:
        ``ReplicaResult`` (numpy arrays).

    Raises:
        InputError: invalid arguments, named with their values; a start that fails
            ``timemachine.start_checks.check_start`` (two atoms closer than 0.05 nm, or
            a non-finite or enormous energy or gradient: the atoms are named).
        SimulationError: a replica blew up (``sensitivity.diagnosis.check_batch``, after
            each vmapped batch): non-finite coordinates or velocities, an overflowing
            energy (|E| > 1e10 kJ/mol), non-finite dx/dθ or |dx/dθ| above
            ``max_sensitivity`` at a saved frame. The replica that went bad at the
            earliest saved step is named with that step, the atom, the parameter (for
            dx/dθ) and what to try; the error carries ``.replica``, ``.step``, ``.atom``
            and ``.parameter``.
    """
    dtype = check_run_precision(precision, system, backend, method, window, window_tol)
    method, zeta = check_run(system, integrator, backend, method, zeta)
    check_max_sensitivity(max_sensitivity)
    keep_frames = save_every is not None
    n_steps, save_every = check_steps(n_steps, save_every if keep_frames else n_steps)
    warn_long_float32(dtype, n_steps, integrator.dt, "run_replicas")
    replicas = _check_replicas(replicas, n_replicas, first_replica)
    if runs_on_dask(executor):  # checked here, so that warnings and errors reach the caller
        per_task = replicas_per_task
        if per_task is not None:
            per_task = check_int(replicas_per_task, "replicas_per_task", minimum=1)
        options = dict(wrt=wrt, params=params, save_every=save_every if keep_frames else None,
                       method=method,
                       window=window, window_tol=window_tol, zeta=zeta,
                       batch_size=batch_size, backend=backend, precision=precision,
                       max_sensitivity=max_sensitivity)  # fmt: skip
        shared = (system, content_key(system), integrator, n_steps, options)

        def run(ex):
            per = per_task or -(-replicas.size // ex.slots())
            return ex.map(_replica_task, _tasks(replicas, x0, v0, system.n_atoms, per), *shared)

        if isinstance(executor, Executor):
            parts = run(executor)
        else:
            with open_executor(executor, n_workers) as ex:
                parts = run(ex)
        return _merge(parts)
    m_rep, n = replicas.size, system.n_atoms
    wrt = system.resolve_wrt(wrt)
    theta = system.resolve_params(params)
    p = wrt.size

    x_start = _per_replica(x0, "x0", m_rep, n, "nm")
    _check_starts(system, x_start, theta)
    v_start = _start_velocities(v0, system, integrator, replicas)
    k, wcoeffs = window_setup(method, window, window_tol, integrator)

    n_blocks = n_steps // save_every
    # the chunk program's arguments all replicas share: blocks, steps per block, θ, the
    # integrator's and the window's coefficients, the seed
    shared = (
        n_blocks,
        save_every,
        theta,
        integrator.coefficients(system.masses),
        wcoeffs,
        integrator.seed,
    )
    starts = (method, x_start, v_start, p, k)
    if backend == "cuda":
        program = backend_program("cuda", system, wrt, zeta, method)
        batches = _run_cuda(program, shared, starts, replicas)
    else:
        batch_size = _batch_size(batch_size, m_rep, method, n, p, k, n_blocks)
        key = tuple(int(i) for i in wrt)
        program = replica_program(system, key, zeta, method, dtype.name)
        batches = _run_jax(program, shared, starts, replicas, batch_size)

    param_names = tuple(system.param_names[i] for i in wrt)
    check = _batch_check(system, theta, param_names, max_sensitivity, integrator)
    finals, frames_x, frames_dx, energies = zip(*map(check, batches), strict=True)
    final = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *finals)
    result = ReplicaResult(
        x=final.x,
        v=final.v,
        dx_dtheta=final.dx_dtheta,
        potential_energy=np.concatenate(energies),
        replicas=replicas.astype(np.int64),
        param_names=param_names,
        wrt=wrt,
        steps=np.arange(1, n_blocks + 1, dtype=np.int64) * save_every
        if keep_frames
        else np.zeros(0, np.int64),
        frames_x=np.concatenate(frames_x) if keep_frames else None,
        frames_dx_dtheta=np.concatenate(frames_dx) if keep_frames else None,
        final_state=final,
    )
    return result


def _check_replicas(replicas, n_replicas, first_replica):
    """The (M,) replica indices: ``replicas``, or ``first_replica + arange(n_replicas)``;
    non-empty, valid and distinct (a repeated index would repeat its noise)."""
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
    return replicas


def _start_velocities(v0, system, integrator, replicas):
    """(M, N, 3) starting velocities, nm/ps: ``v0`` per replica, or Maxwell-Boltzmann at
    the integrator's temperature from its seed and each replica's index."""
    if v0 is not None:
        return _per_replica(v0, "v0", replicas.size, system.n_atoms, "nm/ps")
    return np.stack(
        [
            np.asarray(
                maxwell_boltzmann_velocities(
                    system.masses, integrator.temperature, integrator.seed, int(r)
                )
            )
            for r in replicas
        ]
    )


def _tasks(replicas, x0, v0, n, per_task):
    """(replica indices, x0, v0) of each task: ``per_task`` consecutive replicas, with
    their rows of a per-replica (M, N, 3) x0 or v0 (a shared (N, 3) one as it is)."""

    def rows(a, lo, hi):
        if a is None:
            return None
        arr = np.asarray(a)
        if arr.ndim == 3 and arr.shape[0] == replicas.size:
            return arr[lo:hi]
        return arr  # shared, or a shape run_replicas names on the worker

    m = replicas.size
    return [
        (replicas[lo : lo + per_task], rows(x0, lo, lo + per_task), rows(v0, lo, lo + per_task))
        for lo in range(0, m, per_task)
    ]


def _replica_task(task, system, key, integrator, n_steps, options):
    """One Dask task: ``run_replicas`` of its replicas, in-process on the worker (with the
    worker's first System of this content, whose compiled programs are cached)."""
    replicas, x0, v0 = task
    system = worker_copy(system, key)
    return run_replicas(system, x0, integrator, n_steps, replicas=replicas, v0=v0, **options)


def _merge(parts):
    """One ``ReplicaResult`` of the tasks' results, rows in task order."""
    first = parts[0]

    def cat(*arrays):
        return np.concatenate([np.asarray(a) for a in arrays])

    frames = first.frames_x is not None
    return ReplicaResult(
        x=cat(*(r.x for r in parts)),
        v=cat(*(r.v for r in parts)),
        dx_dtheta=cat(*(r.dx_dtheta for r in parts)),
        potential_energy=cat(*(r.potential_energy for r in parts)),
        replicas=cat(*(r.replicas for r in parts)),
        param_names=first.param_names,
        wrt=first.wrt,
        steps=first.steps,
        frames_x=cat(*(r.frames_x for r in parts)) if frames else None,
        frames_dx_dtheta=cat(*(r.frames_dx_dtheta for r in parts)) if frames else None,
        final_state=jax.tree_util.tree_map(cat, *(r.final_state for r in parts)),
    )


def _batch_size(batch_size, m_rep, method, n, p, k, n_blocks):
    """Replicas per vmapped call: ``batch_size``, or by default as many (up to M) as fit
    in a quarter of the physical memory (8 GiB if unknown)."""
    if batch_size is None:
        # per replica: the state, a copy and ζ, and the chunk program's frame buffers
        per_replica = expected_state_bytes(method, n, p, k)["total"] * 3
        per_replica += n_blocks * frame_bytes(n, p)
        phys = physical_memory() or 8 * 2**30
        batch_size = max(1, min(m_rep, (phys // 4) // per_replica))
    return check_int(batch_size, "batch_size", minimum=1)


def _outputs(final, frames, used, replicas):
    """The first ``used`` rows of a batch's (final states, x frames (B, F, N, 3), dx/dθ
    frames (B, F, P, N, 3), last potential energies (B,)), as numpy arrays, and what the
    blow-up check needs besides: (v frames (B, F, N, 3), potential energy frames (B, F),
    frame steps (B, F), the rows' replica indices (B,)); ``frames`` are the chunk
    program's (``timemachine.sensitivity.program.make_chunk``), batched."""
    x, dx, pe = np.asarray(frames[0]), np.asarray(frames[2]), np.asarray(frames[5])
    v, steps = np.asarray(frames[1]), np.asarray(frames[3])
    return (
        jax.tree_util.tree_map(lambda a: np.asarray(a)[:used], final),
        x[:used],
        dx[:used],
        pe[:used, -1],
    ), (v[:used], pe[:used], steps[:used], np.asarray(replicas)[:used])


def _batch_check(system, theta, param_names, max_sensitivity, integrator):
    """The check each batch of ``_run_jax``/``_run_cuda`` passes before the next runs:
    ``check_batch`` on its frames (raises at the replica that blew up first); returns the
    batch's ``_outputs``."""

    def check(batch):
        outputs, (v, pe, steps, labels) = batch
        check_batch(
            outputs[1],
            outputs[2],
            steps,
            param_names,
            max_sensitivity,
            integrator,
            labels,
            vs=v,
            energies=pe,
            gradient=lambda x: system.gradient(x, theta),
        )
        return outputs

    return check


def _run_jax(program, shared, starts, replicas, batch_size):
    """Yield per vmapped batch of ``batch_size`` replicas ``_outputs``: (final states,
    frames of x, frames of dx/dθ, last energies), replicas along axis 0."""
    n_blocks, save_every, theta, coeffs, wcoeffs, seed = shared
    method, x_start, v_start, p, k = starts
    m_rep = replicas.size
    counts = (jnp.asarray(n_blocks, dtype=jnp.int64), jnp.asarray(save_every, dtype=jnp.int64))
    seed = jnp.asarray(seed, dtype=jnp.int64)
    init = jax.vmap(lambda x, v: start_state(method, x, v, p, k))
    put, batch_size = device_sharding(batch_size)
    for start in range(0, m_rep, batch_size):
        # the last batch is padded with copies of its last row, so every batch has the
        # same shape and the program compiles once; the copies are dropped
        rows = np.minimum(np.arange(start, start + batch_size), m_rep - 1)
        used = min(batch_size, m_rep - start)
        state = put(init(jnp.asarray(x_start[rows]), jnp.asarray(v_start[rows])))
        final, frames = program(
            n_blocks,
            state,
            *counts,
            jnp.asarray(theta),
            coeffs,
            wcoeffs,
            seed,
            put(jnp.asarray(replicas[rows], dtype=jnp.int64)),
        )
        yield _outputs(final, frames, used, replicas[rows])


def _run_cuda(program, shared, starts, replicas):
    """Yield per replica, one after another on the CUDA kernels (one program: the tables
    are uploaded once), the ``_outputs`` of ``_run_jax`` with one row."""
    n_blocks, save_every, theta, coeffs, wcoeffs, seed = shared
    method, x_start, v_start, p, k = starts
    for r, replica in enumerate(replicas):
        state = start_state(method, x_start[r], v_start[r], p, k)
        final, frames, _ = program(
            n_blocks, state, n_blocks, save_every, theta, coeffs, wcoeffs, seed, int(replica)
        )
        # the next replica reuses the device buffers: copy this one's state out now (the
        # window ring would otherwise be read from the device later)
        final = type(final)(*(np.asarray(f)[None] for f in final))
        yield _outputs(final, tuple(np.asarray(a)[None] for a in frames), 1, replicas[r : r + 1])


def _per_replica(value, name, m_rep, n, unit):
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2:
        return np.broadcast_to(check_vectors(arr, name, n, unit=unit), (m_rep, n, 3))
    if arr.ndim != 3 or arr.shape[0] != m_rep:
        raise InputError(
            f"{name} must have shape ({n}, 3) or ({m_rep}, {n}, 3) ({unit}), got {arr.shape}"
        )
    return np.stack([check_vectors(a, f"{name}[{r}]", n, unit=unit) for r, a in enumerate(arr)])


def _check_starts(system, x_start, theta):
    """``check_start`` on each distinct start of the (M, N, 3) ``x_start`` (a shared x0
    is checked once)."""
    if x_start.strides[0] == 0:  # one x0 broadcast to every replica
        check_start(system, x_start[0], theta, "x0")
        return
    for r, x in enumerate(x_start):
        check_start(system, x, theta, f"x0[{r}]")
