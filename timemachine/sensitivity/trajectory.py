"""``simulate``: Langevin dynamics that carries dx/dθ, saved as a ``SensitivityTrajectory``.

A run is ``n_steps // save_every`` blocks; each block is ``save_every`` steps of
``exact_step`` or ``window_step`` (``timemachine.sensitivity.propagation``) and saves its
last state. Many blocks form a chunk: one call of one jit-compiled program (a loop over
blocks around a loop over steps), so no Python or dispatch cost is paid per step
(docs/design.md, "Performance principles"). Between chunks the host checks the saved frames
for blow-ups, advances the progress bar, and either keeps the frames or, with
``out_dir``, writes them to ``chunk_XXXXX.npz`` and lets them go, so the memory of a long
run does not grow with its length.

The primal trajectory is the integrator's: the same ``langevin_step`` and the same
``noise(seed, t, N, replica)``, with ∇E taken from the fused ∇E-and-ζ call
(``make_gradient_and_zeta``), which equals ``jax.grad`` of the energy to round-off, so x
and v agree with ``integrator.run`` to round-off (~1e-13 nm after tens of steps; chaos
amplifies it over long runs as it does any last-bit difference). Both loop counts are
runtime values, so XLA compiles one step for every chunking, and a run continued from
``final_state`` is bitwise one longer run; θ is a runtime argument too (one compilation
serves every θ).

The pieces live by job: the compiled chunk program in ``sensitivity.program``, argument
checks and set-up in ``sensitivity.options``, blow-up diagnosis in
``sensitivity.diagnosis`` and the file format with its lazy frames in
``sensitivity.frames``; this module strings them into a run.
"""

from __future__ import annotations

import functools
import os
import sys

import jax.numpy as jnp
import numpy as np

from timemachine.constants import BOLTZMANN
from timemachine.errors import InputError, SimulationError
from timemachine.integrator.langevin import LangevinIntegrator, _check_replica
from timemachine.precision import check_run_precision, warn_long_float32
from timemachine.sensitivity.diagnosis import annotate, check_frames
from timemachine.sensitivity.frames import (
    SensitivityTrajectory,
    prepare_out_dir,
    run_settings,
    save_state,
    write_chunk,
    write_meta,
)
from timemachine.sensitivity.options import (
    check_max_sensitivity,
    check_progress,
    check_run,
    check_state_memory,
    check_steps,
    chunk_blocks,
    initial_state,
    window_setup,
)
from timemachine.sensitivity.program import backend_program, frame_bytes
from timemachine.system import System

__all__ = ["SensitivityTrajectory", "simulate"]


def simulate(
    system: System,
    x0,
    integrator: LangevinIntegrator,
    n_steps: int,
    wrt="torsion*",
    save_every: int = 100,
    method: str = "exact",
    window: int | None = None,
    window_tol: float = 1e-8,
    backend: str = "jax",
    v0=None,
    replica: int = 0,
    params=None,
    zeta: str = "structured",
    progress: bool | None = None,
    out_dir=None,
    chunk_steps: int | None = None,
    max_sensitivity: float | None = 1e8,
    resume: bool = False,
    precision: str = "float64",
) -> SensitivityTrajectory:
    """Langevin dynamics (paper eqs. 3-4) carrying dx/dθ forward (eqs. 6-9).

    Args:
        system: a ``timemachine.System``.
        x0: (N, 3) starting positions, nm (dx/dθ = dv/dθ = 0 there), or the
            ``final_state`` of a previous run with the same method to continue it.
        integrator: ``LangevinIntegrator`` (temperature, friction, dt, seed).
        n_steps: steps to run, a positive multiple of ``save_every``.
        wrt: the parameters θ_p: a glob over ``system.param_names`` (``"torsion*"``,
            ``"torsion/*/k*"``), a list of globs, or int indices into ``system.params``.
        save_every: save one frame every this many steps.
        method: "exact" (O(P·N) memory, no truncation) or "window" (paper eq. 9,
            O(k·P·N) memory; needs friction > 0).
        window: k, the window in steps; default ``ceil(log(window_tol) / log(a))``.
        window_tol: the a^k a folded ζ may be mis-weighted by (relative), if no window.
        backend: "jax" (the reference; CPU, or GPU through XLA) or "cuda" (the CUDA
            kernels through CuPy, ``timemachine.backends.cupy_backend``; its noise is the
            counter-based Philox stream, not jax.random; ``zeta`` is then ignored: the
            kernels compute ζ exactly).
        v0: (N, 3) initial velocities, nm/ps; default Maxwell-Boltzmann at the
            integrator's temperature, seed and ``replica`` (as ``integrator.run``).
        replica: noise-stream index.
        params: (P_all,) θ to run at; default ``system.params``.
        zeta: "structured" (fast closed-form Hessian contraction) or "reference"
            (one jvp of ∇E per parameter).
        progress: a tqdm progress bar over the steps; None: shown when the run has more
            than 3 chunks and stderr is a terminal.
        out_dir: if given, each chunk's frames go to ``out_dir/chunk_XXXXX.npz`` and the
            propagation state after it to the checkpoint ``out_dir/state.npz`` with its
            SHA-256 record ``state.json`` (the previous one kept as ``state.prev.*``), all
            written atomically (docs/design.md, "File formats"); the result is
            ``SensitivityTrajectory.load(out_dir)`` (frames read lazily). The directory
            must be empty or absent unless ``resume``.
        resume: continue the run in ``out_dir`` from its last good checkpoint (a killed
            run, or a finished one made longer), bit for bit the run an uninterrupted call
            would have made. ``x0`` is then either the state that run started from (the
            same call again: the run ends ``n_steps`` after x0) or its ``final_state``
            (``n_steps`` more). The system, θ, integrator, wrt, method, window,
            save_every, replica, backend and zeta must be the run's (a
            ``CheckpointError`` names what differs); a last checkpoint that fails its
            checksums falls back to the previous one with a
            ``CheckpointFallbackWarning``. An empty or absent directory starts afresh.
        chunk_steps: steps per compiled call (a multiple of ``save_every``); default:
            at least 16 chunks, with at most 64 MiB of frames each.
        max_sensitivity: SimulationError once any |dx/dθ| in a saved frame exceeds this
            (nm per unit of θ); None switches the check off.
        precision: "float64" (default) or "float32": the whole step in single precision
            (``timemachine.precision``; frames and state are then float32). Its accuracy
            against float64 is in docs/float32.md; it is refused with backend "cuda",
            with a custom term, or with ``window_tol`` < 1e-6, and a run longer than
            ``FLOAT32_PATHWISE_PS`` warns (``Float32Warning``).

    Returns:
        ``SensitivityTrajectory`` with F = n_steps // save_every frames at steps
        t0 + save_every, …, t0 + n_steps (with ``out_dir``: every frame in the folder).

    Raises:
        InputError: an invalid argument (named, with its value); a non-empty ``out_dir``
            without ``resume``, or one whose run ``x0`` does not belong to.
        CheckpointError: (an InputError) ``resume`` into a folder of a different run;
            ``CorruptCheckpointError`` when no copy of its checkpoint, or a chunk it
            lists, passes its checksums (the file is named).
        InputError: also a start that fails ``timemachine.start_checks.check_start``:
            two interacting atoms closer than 0.05 nm (both named, with their distance),
            or a non-finite or enormous (|E| > 1e10 kJ/mol, |∇E| > 1e12 kJ/mol/nm)
            starting energy or gradient.
        SimulationError: at the first bad saved frame (``sensitivity.diagnosis``):
            non-finite coordinates or velocities (step and the atom that ran away), a
            non-finite or overflowing potential energy (|E| > 1e10 kJ/mol: step and the
            atom of the largest |∇E|), non-finite dx/dθ, or a sensitivity above
            ``max_sensitivity`` (step, parameter, atom); with what to try. The error
            carries ``.step``, ``.atom`` and ``.parameter``; with ``out_dir`` no chunk
            or checkpoint holds a bad frame, so the folder loads (the good frames) and
            resumes from the last good chunk.
    """
    dtype = check_run_precision(precision, system, backend, method, window, window_tol)
    method, zeta = check_run(system, integrator, backend, method, zeta)
    n_steps, save_every = check_steps(n_steps, save_every)
    warn_long_float32(dtype, n_steps, integrator.dt)
    replica = _check_replica(replica)
    check_progress(progress)
    check_max_sensitivity(max_sensitivity)
    wrt = system.resolve_wrt(wrt)
    theta = system.resolve_params(params)
    param_names = tuple(system.param_names[i] for i in wrt)
    n, p = system.n_atoms, wrt.size
    k, wcoeffs = window_setup(method, window, window_tol, integrator)
    state_bytes = check_state_memory(method, n, p, k)
    state = initial_state(system, x0, integrator, method, k, wrt, v0, replica, theta)

    if resume and out_dir is None:
        raise InputError("resume=True needs out_dir (where the run to continue lives)")
    log, first_chunk = None, 0
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        settings = run_settings(
            system, theta, integrator, method, k, wrt, param_names, save_every, replica,
            backend, zeta, dtype.name,
        )  # fmt: skip
        plan = prepare_out_dir(out_dir, state, n_steps, settings, resume, method)
        state, n_steps, log = plan.state, plan.n_steps, plan.log
        first_chunk = plan.first_chunk

    n_blocks = n_steps // save_every
    per_chunk = chunk_blocks(max(n_blocks, 1), frame_bytes(n, p), chunk_steps, save_every)
    memory = _memory_bytes(state_bytes, n_blocks, per_chunk, frame_bytes(n, p), out_dir)
    if out_dir is not None:
        write_meta(
            out_dir, system, method, k, param_names, wrt, save_every, memory, integrator,
            replica, log.settings,
        )  # fmt: skip
        if n_blocks == 0:  # a resumed run that was already complete
            return SensitivityTrajectory.load(out_dir)

    program = backend_program(backend, system, wrt, zeta, method, dtype)
    args = _program_args(system, integrator, theta, save_every, wcoeffs, replica)
    bar = _progress_bar(progress, -(-n_blocks // per_chunk), n_steps, method)
    kept = []
    try:
        diagnose = functools.partial(
            check_frames,
            param_names=param_names,
            max_sensitivity=max_sensitivity,
            integrator=integrator,
            gradient=lambda x: system.gradient(x, theta),  # names an overflow's atom
        )
        masses = np.asarray(system.masses)
        chunks = _run_chunks(program, state, n_blocks, per_chunk, args, masses, diagnose)
        try:
            for c, (state, chunk) in enumerate(chunks):
                if out_dir is not None:
                    write_chunk(out_dir, first_chunk + c, chunk, log)
                    save_state(out_dir, state, log)
                else:
                    kept.append(chunk)
                if bar is not None:
                    bar.update(chunk["steps"].shape[0] * save_every)
        except SimulationError as err:
            if out_dir is None:
                raise
            raise annotate(err, suffix=_what_is_kept(out_dir, log)) from None
    finally:
        if bar is not None:
            bar.close()

    if out_dir is not None:
        return SensitivityTrajectory.load(out_dir)
    return SensitivityTrajectory.from_chunks(
        kept,
        param_names=param_names,
        wrt=wrt,
        final_state=state,
        memory_bytes=memory,
        method=method,
        window=k,
    )


def _what_is_kept(out_dir, log):
    """What a blow-up leaves in ``out_dir``: the chunks its checkpoint lists were all
    checked before they were written (the bad chunk never is)."""
    if not log.chunks:
        return f"; no chunk passed, so {out_dir!r} holds no frame and no checkpoint of the run"
    last = log.chunks[-1]["last_step"]
    frames = sum(int(r["frames"]) for r in log.chunks)
    return (
        f"; {out_dir!r} keeps the {frames} frames up to step {last} that passed, and the "
        f"checkpoint there: SensitivityTrajectory.load reads them, and simulate(..., "
        f"resume=True) continues from it"
    )


def _memory_bytes(state_bytes, n_blocks, per_chunk, frame, out_dir):
    """``SensitivityTrajectory.memory_bytes``: each state array, ``"state"`` (their total),
    ``"frames"`` (saved frames held in memory, 0 when streamed to ``out_dir``) and
    ``"chunk"`` (one chunk's frames); ``frame`` is the bytes of one saved frame."""
    memory = {name: b for name, b in state_bytes.items() if name != "total"}
    memory.update(
        state=state_bytes["total"],
        frames=0 if out_dir is not None else n_blocks * frame,
        chunk=per_chunk * frame,
    )
    return memory


def _progress_bar(progress, n_chunks, n_steps, method):
    """A tqdm bar over the steps, or None; ``progress`` None shows it for runs of more
    than 3 chunks when stderr is a terminal."""
    show = progress if progress is not None else (n_chunks > 3 and sys.stderr.isatty())
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n_steps, unit="step", desc=f"simulate ({method})")


def _program_args(system, integrator, theta, save_every, wcoeffs, replica):
    """The chunk program's arguments after (capacity, state, n_blocks): save_every, θ,
    the integrator's coefficients, the window's, the seed and the replica."""
    return (
        jnp.asarray(save_every, dtype=jnp.int64),
        jnp.asarray(theta),
        integrator.coefficients(system.masses),
        wcoeffs,
        jnp.asarray(integrator.seed, dtype=jnp.int64),
        jnp.asarray(replica, dtype=jnp.int64),
    )


def _run_chunks(program, state, n_blocks, per_chunk, args, masses, diagnose):
    """Run ``n_blocks`` blocks, ``per_chunk`` per call of ``program`` (the last call may
    run fewer), yielding per call the state after it and its ``_chunk_record``; each
    chunk's (x, dx/dθ, steps, v, E) go to ``diagnose`` first, which raises on a blow-up
    before the chunk is yielded (so it is never written)."""
    done = 0
    while done < n_blocks:
        blocks = min(per_chunk, n_blocks - done)
        state, frames, v_look = program(
            per_chunk, state, jnp.asarray(blocks, dtype=jnp.int64), *args
        )
        frames = tuple(np.asarray(a)[:blocks] for a in frames)
        diagnose(frames[0], frames[2], frames[3], vs=frames[1], energies=frames[5])
        yield state, _chunk_record(frames, v_look, masses)
        done += blocks


def _chunk_record(frames, v_look, masses):
    """One chunk's ``FRAME_KEYS`` dict from the program's frames (x, v, dx/dθ, steps, v
    after each block's first step, potential energy) and the look-ahead ``v_look``: the
    on-step kinetic energy (kJ/mol) and kinetic temperature (K, 3N degrees of freedom)."""
    xs, vs, dxs, steps, v_first, pe = frames
    v_look = getattr(v_look, "v", v_look)  # JAX returns the whole next state
    v_next = np.concatenate([v_first[1:], np.asarray(v_look)[None]])
    ke = _on_step_kinetic_energy(vs, v_next, masses)
    temp = 2.0 * ke / (3 * masses.shape[0] * BOLTZMANN)
    return dict(
        x=xs,
        v=vs,
        dx_dtheta=dxs,
        steps=steps,
        potential_energy=pe,
        kinetic_energy=ke,
        temperature=temp,
    )


def _on_step_kinetic_energy(v, v_next, masses):
    """``on_step_kinetic_energy`` frame by frame on the host (numpy): the same bits
    whatever the number of frames in a chunk, so chunking never changes them."""
    u = 0.5 * (v + v_next)
    with np.errstate(over="ignore", invalid="ignore"):  # a blow-up is reported elsewhere
        return np.array([0.5 * np.sum(masses[:, None] * f * f) for f in u])
