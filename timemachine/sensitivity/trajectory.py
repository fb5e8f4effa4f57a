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
"""

from __future__ import annotations

import functools
import glob
import json
import numbers
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.backends import check_backend
from timemachine.checks import check_int, check_vectors
from timemachine.constants import BOLTZMANN
from timemachine.errors import InputError, SimulationError
from timemachine.files import atomic_json, atomic_savez
from timemachine.integrator.langevin import (
    LangevinIntegrator,
    _check_replica,
    langevin_init,
)
from timemachine.sensitivity import zeta as zeta_module
from timemachine.sensitivity.propagation import (
    ExactState,
    WindowState,
    exact_init,
    exact_step,
    expected_state_bytes,
    window_coefficients,
    window_init,
    window_size,
    window_step,
)
from timemachine.system import System

__all__ = ["SensitivityTrajectory", "simulate"]

METHODS = ("exact", "window")
ZETA_METHODS = ("structured", "reference")
# saved frames of one chunk are kept below this many bytes by default
_CHUNK_BYTES = 64 * 2**20
# a default chunking aims for at least this many chunks (progress, blow-up checks)
_MIN_CHUNKS = 16
_FORMAT = "timemachine.SensitivityTrajectory"
_FRAME_KEYS = ("x", "v", "dx_dtheta")


# --------------------------------------------------------------------------- trajectory


class ChunkedFrames:
    """A read-only (F, ...) array of frames stored across ``chunk_XXXXX.npz`` files.

    Indexing loads only the chunks it touches (the last one is cached); ``np.asarray``
    loads everything; ``chunks()`` iterates chunk by chunk in bounded memory.
    """

    def __init__(self, files, key, counts, frame_shape):
        self.files = list(files)
        self.key = key
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.shape = (int(self.offsets[-1]),) + tuple(frame_shape)
        self.dtype = np.dtype(np.float64)
        self._cache = (None, None)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape)))

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"ChunkedFrames({self.key!r}, shape={self.shape}, {len(self.files)} files)"

    def _chunk(self, c):
        if self._cache[0] != c:
            with np.load(self.files[c]) as data:
                self._cache = (c, data[self.key])
        return self._cache[1]

    def chunks(self):
        """Yield each chunk's frames, (F_c, ...), in order."""
        for c in range(len(self.files)):
            yield self._chunk(c)

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, numbers.Integral):
            f = int(first) + (len(self) if first < 0 else 0)
            if not 0 <= f < len(self):
                raise IndexError(f"frame {first} out of range for {len(self)} frames")
            c = int(np.searchsorted(self.offsets, f, side="right") - 1)
            return self._chunk(c)[(f - self.offsets[c],) + rest]
        frames = np.arange(len(self))[first]
        chunk_of = np.searchsorted(self.offsets, frames, side="right") - 1
        parts = [
            self._chunk(int(c))[f - self.offsets[c]] for f, c in zip(frames, chunk_of, strict=True)
        ]
        out = np.stack(parts) if parts else np.zeros((0,) + self.shape[1:])
        return out[(slice(None),) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        if not self.files:
            out = np.zeros(self.shape)
        else:
            out = np.concatenate(list(self.chunks()))
        return out if dtype is None else out.astype(dtype)


class SensitivityTrajectory:
    """Saved frames of a ``simulate`` run; frame f is the state after ``steps[f]`` steps.

    Attributes:
        x: (F, N, 3) positions, nm.
        v: (F, N, 3) half-step velocities v_t, nm/ps.
        dx_dtheta: (F, P, N, 3) dx_t/dθ, nm per unit of each parameter.
        param_names: P names of the parameters θ[wrt].
        wrt: (P,) int indices into ``system.params``.
        steps: (F,) int64 step index of each frame.
        potential_energy: (F,) kJ/mol at x_t.
        kinetic_energy: (F,) kJ/mol, on-step ``on_step_kinetic_energy(v_t, v_{t+1})``.
        temperature: (F,) K, its kinetic temperature (3N degrees of freedom).
        final_state: ``ExactState`` or ``WindowState``; pass it as ``x0`` to ``simulate``
            to continue the same trajectory bit for bit.
        memory_bytes: dict, bytes of each propagation state array, ``"state"`` (their
            total), ``"frames"`` (saved frames held in memory: 0 when streamed to disk)
            and ``"chunk"`` (frames of one chunk, the transient peak).
        method: "exact" or "window"; window: k (steps) for the window mode, else None.
        out_dir: the directory the frames live in when streamed, else None. Then x, v
            and dx_dtheta are ``ChunkedFrames``: loaded lazily, chunk by chunk.
    """

    def __init__(
        self,
        *,
        x,
        v,
        dx_dtheta,
        steps,
        potential_energy,
        kinetic_energy,
        temperature,
        param_names,
        wrt,
        final_state,
        memory_bytes,
        method,
        window=None,
        out_dir=None,
    ):
        self.x = x
        self.v = v
        self.dx_dtheta = dx_dtheta
        self.steps = np.asarray(steps, dtype=np.int64)
        self.potential_energy = np.asarray(potential_energy)
        self.kinetic_energy = np.asarray(kinetic_energy)
        self.temperature = np.asarray(temperature)
        self.param_names = tuple(param_names)
        self.wrt = np.asarray(wrt, dtype=np.int64)
        self.final_state = final_state
        self.memory_bytes = dict(memory_bytes)
        self.method = method
        self.window = window
        self.out_dir = out_dir

    @property
    def n_frames(self) -> int:
        return int(self.steps.shape[0])

    def __len__(self):
        return self.n_frames

    def __repr__(self):
        where = f", out_dir={self.out_dir!r}" if self.out_dir else ""
        win = f", window={self.window}" if self.window else ""
        return (
            f"SensitivityTrajectory(frames={self.n_frames}, steps={self.steps[:1].tolist()}"
            f"..{self.steps[-1:].tolist()}, P={len(self.param_names)}, "
            f"N={self.x.shape[1]}, method={self.method!r}{win}{where})"
        )

    @classmethod
    def load(cls, out_dir) -> SensitivityTrajectory:
        """The trajectory streamed to ``out_dir``; frames are read lazily, per chunk.

        Raises:
            MissingFileError / InputError: no ``meta.json`` there, or not a trajectory.
        """
        from timemachine.errors import MissingFileError

        meta_path = os.path.join(out_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise MissingFileError(
                f"{meta_path} does not exist: {out_dir!r} holds no streamed trajectory"
            )
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT:
            raise InputError(f"{meta_path} is not a {_FORMAT} (format {meta.get('format')!r})")
        files = _chunk_files(out_dir)
        n, p = int(meta["n_atoms"]), len(meta["param_names"])
        small = {k: [] for k in ("steps", "potential_energy", "kinetic_energy", "temperature")}
        counts = []
        for path in files:
            with np.load(path) as data:
                for key in small:
                    small[key].append(data[key])
                counts.append(data["steps"].shape[0])

        def cat(key, dtype=np.float64):
            return np.concatenate(small[key]) if files else np.zeros(0, dtype)

        state = _load_state(out_dir, meta)
        steps = cat("steps", np.int64)
        if state is not None and steps.size and int(state.step) != int(steps[-1]):
            state = None  # the state file belongs to another chunk (interrupted write)
        return cls(
            x=ChunkedFrames(files, "x", counts, (n, 3)),
            v=ChunkedFrames(files, "v", counts, (n, 3)),
            dx_dtheta=ChunkedFrames(files, "dx_dtheta", counts, (p, n, 3)),
            steps=steps,
            potential_energy=cat("potential_energy"),
            kinetic_energy=cat("kinetic_energy"),
            temperature=cat("temperature"),
            param_names=meta["param_names"],
            wrt=meta["wrt"],
            final_state=state,
            memory_bytes=dict(meta["memory_bytes"], frames=0),
            method=meta["method"],
            window=meta["window"],
            out_dir=str(out_dir),
        )


# --------------------------------------------------------------------------- files


def _chunk_files(out_dir):
    return sorted(glob.glob(os.path.join(glob.escape(str(out_dir)), "chunk_[0-9]*.npz")))


def _save_state(out_dir, state):
    atomic_savez(
        os.path.join(out_dir, "state.npz"), **{k: np.asarray(v) for k, v in state._asdict().items()}
    )


def _load_state(out_dir, meta):
    path = os.path.join(out_dir, "state.npz")
    if not os.path.isfile(path):
        return None
    cls = ExactState if meta["method"] == "exact" else WindowState
    with np.load(path) as data:
        return cls(**{k: jnp.asarray(data[k]) for k in cls._fields})


# --------------------------------------------------------------------------- program


@functools.lru_cache(maxsize=8)
def _program(system, wrt_key, zeta_method, method, bonded="auto"):
    """The jitted chunk program for one (system, wrt, ζ method, mode).

    ``chunk(capacity, state, n_blocks, save_every, θ, coeffs, wcoeffs, seed, replica)``
    runs ``n_blocks <= capacity`` blocks of ``save_every`` steps. Both counts are traced:
    the loops are ``while`` loops whose trip count XLA cannot see, so it never removes or
    unrolls a loop of one trip (which would fuse the step differently and change its
    bits). The step is therefore the same machine code for every chunking and every
    continuation, and only ``capacity`` (the frame buffers' length) is compiled for.
    """
    energy_fn = system.energy_fn()
    gz_fn = zeta_module.make_gradient_and_zeta(
        system, np.asarray(wrt_key, dtype=np.int64), method=zeta_method, bonded=bonded
    )

    def chunk(capacity, state, n_blocks, save_every, theta, coeffs, wcoeffs, seed, replica):
        # ∇E and ζ from one fused call: the structured path gets ∇E from the same pair
        # scalars as ζ, which saves about one gradient per step over separate calls
        def gz(y, dx):
            return gz_fn(y, theta, dx)

        def step(s):
            if method == "exact":
                return exact_step(None, None, coeffs, s, seed, replica, gradient_and_zeta_fn=gz)
            return window_step(
                None, None, coeffs, wcoeffs, s, seed, replica, gradient_and_zeta_fn=gz
            )

        def one(i, carry):
            s, v_first = carry
            s = step(s)
            # v after the block's first step is v_{t+1} of the previous block's frame
            return s, jnp.where(i == 0, s.v, v_first)

        def block(j, carry):
            s, frames = carry
            s, v_first = jax.lax.fori_loop(0, save_every, one, (s, jnp.zeros_like(s.v)))
            saved = (s.x, s.v, s.dx_dtheta, s.step, v_first, energy_fn(s.x, theta))
            frames = tuple(
                jax.lax.dynamic_update_index_in_dim(buf, value, j, axis=0)
                for buf, value in zip(frames, saved, strict=True)
            )
            return s, frames

        empty = tuple(
            jnp.zeros((capacity,) + jnp.shape(a), jnp.result_type(a))
            for a in (state.x, state.v, state.dx_dtheta, state.step, state.v, state.x[0, 0])
        )
        final, frames = jax.lax.fori_loop(0, n_blocks, block, (state, empty))

        # v_{t+1} of the last frame (the next step's, same noise), for its kinetic energy.
        # It is the whole next step, in a loop of (traced) trip count 1, and all of its
        # state is returned (nothing of it can be pruned), so that XLA compiles it as the
        # step inside the next chunk's loop and its v has the same bits.
        once = jnp.minimum(save_every, 1)
        look = jax.lax.fori_loop(0, once, lambda i, s: step(s), final)
        return final, frames, look

    return jax.jit(chunk, static_argnums=(0,))


# --------------------------------------------------------------------------- validation


def _choose(value, name, options):
    if value not in options:
        raise InputError(f"{name} must be one of {options}, got {value!r}")
    return value


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _chunk_blocks(n_blocks, frame_bytes, chunk_steps, save_every):
    if chunk_steps is not None:
        chunk_steps = check_int(chunk_steps, "chunk_steps", minimum=1)
        if chunk_steps % save_every:
            raise InputError(
                f"chunk_steps = {chunk_steps} must be a multiple of save_every = {save_every}"
            )
        return min(n_blocks, chunk_steps // save_every)
    return min(n_blocks, max(1, _CHUNK_BYTES // frame_bytes), max(1, -(-n_blocks // _MIN_CHUNKS)))


def _initial_state(system, x0, integrator, method, k, wrt, v0, replica):
    n, p = system.n_atoms, wrt.size
    if isinstance(x0, (ExactState, WindowState)):
        want = ExactState if method == "exact" else WindowState
        if not isinstance(x0, want):
            raise InputError(
                f"x0 is a {type(x0).__name__} but method={method!r}; continue a run with the "
                f"method it was started with"
            )
        if v0 is not None:
            raise InputError("v0 must be None when x0 is a state (it carries velocities)")
        x = check_vectors(x0.x, "x0.x", n)
        v = check_vectors(x0.v, "x0.v", n, unit="nm/ps")
        step = check_int(int(np.asarray(x0.step)), "x0.step", minimum=0)
        shape = (p, n, 3)
        for name in ("dx_dtheta", "dv_dtheta"):
            if np.shape(getattr(x0, name)) != shape:
                raise InputError(
                    f"x0.{name} has shape {np.shape(getattr(x0, name))} but wrt selects {p} "
                    f"parameters: expected {shape}"
                )
        if method == "window" and np.shape(x0.zeta_window)[0] != k:
            raise InputError(
                f"x0 was run with window = {np.shape(x0.zeta_window)[0]} steps but window = {k}"
            )
        fields = {f: jnp.asarray(getattr(x0, f)) for f in x0._fields}
        fields.update(x=jnp.asarray(x), v=jnp.asarray(v), step=jnp.asarray(step, jnp.int64))
        return want(**fields)
    start = langevin_init(x0, system.masses, integrator, replica=replica, velocities=v0)
    if method == "exact":
        return exact_init(start.x, start.v, p)
    return window_init(start.x, start.v, p, k)


# --------------------------------------------------------------------------- blow-ups


def _on_step_kinetic_energy(v, v_next, masses):
    """``on_step_kinetic_energy`` frame by frame on the host (numpy): the same bits
    whatever the number of frames in a chunk, so chunking never changes them."""
    u = 0.5 * (v + v_next)
    with np.errstate(over="ignore", invalid="ignore"):  # a blow-up is reported elsewhere
        return np.array([0.5 * np.sum(masses[:, None] * f * f) for f in u])


def _check_chunk(xs, dxs, steps, param_names, max_sensitivity, integrator):
    finite = np.isfinite(xs).all(axis=2)  # (F, N)
    if not finite.all():
        f, atom = np.argwhere(~finite)[0]
        how = "first"
        if (~finite[f]).sum() > 1 and f >= 2:
            # NaN spreads to every atom a bad one interacts with within a few steps: name
            # the one that ran away, the largest move between the last two good frames
            with np.errstate(over="ignore", invalid="ignore"):
                moved = np.linalg.norm(xs[f - 1] - xs[f - 2], axis=-1)
            atom, how = int(np.argmax(moved)), "ran away first"
        err = SimulationError(
            f"simulate: non-finite coordinates at step {int(steps[f])} (first bad saved "
            f"frame), atom {int(atom)} {how} ({int((~finite[f]).sum())} atoms bad), with "
            f"dt = {integrator.dt} ps; minimize first or use a smaller dt"
        )
        err.step, err.atom, err.parameter = int(steps[f]), int(atom), None
        raise err
    if max_sensitivity is None:
        return
    mag = np.abs(dxs).max(axis=3)  # (F, P, N)
    mag = np.where(np.isnan(mag), np.inf, mag)
    over = (mag > max_sensitivity).any(axis=(1, 2))
    if over.any():
        f = int(np.argmax(over))
        p, atom = np.unravel_index(int(np.argmax(mag[f])), mag[f].shape)
        err = SimulationError(
            f"simulate: sensitivity blow-up at step {int(steps[f])}: |dx/dθ| = "
            f"{mag[f, p, atom]:.3g} nm per unit of parameter {param_names[p]!r} at atom "
            f"{int(atom)} exceeds max_sensitivity = {max_sensitivity:g}. Pathwise "
            f"sensitivities of chaotic dynamics grow exponentially: use shorter runs, more "
            f"friction, or raise max_sensitivity"
        )
        err.step, err.atom, err.parameter = int(steps[f]), int(atom), param_names[p]
        raise err


# --------------------------------------------------------------------------- simulate


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
        out_dir: if given, each chunk's frames go to ``out_dir/chunk_XXXXX.npz`` (written
            atomically) and the propagation state after it to ``out_dir/state.npz``; the
            result is ``SensitivityTrajectory.load(out_dir)`` (frames read lazily). A
            directory that already holds chunks is continued, which requires ``x0`` to be
            its ``final_state``.
        chunk_steps: steps per compiled call (a multiple of ``save_every``); default:
            at least 16 chunks, with at most 64 MiB of frames each.
        max_sensitivity: SimulationError once any |dx/dθ| in a saved frame exceeds this
            (nm per unit of θ); None switches the check off.

    Returns:
        ``SensitivityTrajectory`` with F = n_steps // save_every frames at steps
        t0 + save_every, …, t0 + n_steps.

    Raises:
        InputError: an invalid argument (named, with its value).
        SimulationError: non-finite coordinates (the first bad saved step and atom are
            named) or a sensitivity above ``max_sensitivity`` (step, parameter, atom).
    """
    check_backend(backend)
    if not isinstance(system, System):
        raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
    if not isinstance(integrator, LangevinIntegrator):
        raise InputError(
            f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
        )
    method = _choose(method, "method", METHODS)
    zeta = _choose(zeta, "zeta", ZETA_METHODS)
    n_steps = check_int(n_steps, "n_steps", minimum=1)
    save_every = check_int(save_every, "save_every", minimum=1)
    if n_steps % save_every:
        raise InputError(f"n_steps = {n_steps} must be a multiple of save_every = {save_every}")
    replica = _check_replica(replica)
    if progress not in (None, True, False):
        raise InputError(f"progress must be True, False or None, got {progress!r}")
    if max_sensitivity is not None and not (
        isinstance(max_sensitivity, numbers.Real) and max_sensitivity > 0
    ):
        raise InputError(f"max_sensitivity must be a number > 0 or None, got {max_sensitivity!r}")
    wrt = system.resolve_wrt(wrt)
    theta = system.resolve_params(params)
    param_names = tuple(system.param_names[i] for i in wrt)
    n, p = system.n_atoms, wrt.size

    k = None
    wcoeffs = None
    if method == "window":
        if window is None:
            k = window_size(integrator, window_tol)
        else:
            k = check_int(window, "window", minimum=1)
        wcoeffs = window_coefficients(integrator, k)
    elif window is not None:
        raise InputError(f"window = {window!r} is only used with method='window'")
    state_bytes = expected_state_bytes(method, n, p, k)
    phys = _physical_memory()
    if phys is not None and state_bytes["total"] > phys // 2:
        shape = f"window k = {k} steps × " if k else ""
        raise InputError(
            f"the {method} state needs {state_bytes['total'] / 2**30:.1f} GiB "
            f"({shape}P = {p} × N = {n}), more than half of this machine's "
            f"{phys / 2**30:.1f} GiB; use a smaller window, fewer parameters or method='exact'"
        )
    state = _initial_state(system, x0, integrator, method, k, wrt, v0, replica)

    n_blocks = n_steps // save_every
    frame_bytes = 8 * (2 * n * 3 + p * n * 3 + 4)
    per_chunk = _chunk_blocks(n_blocks, frame_bytes, chunk_steps, save_every)
    n_chunks = -(-n_blocks // per_chunk)

    first_chunk = 0
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        first_chunk = _prepare_out_dir(out_dir, state, method, k, param_names, wrt, n)

    memory = {name: b for name, b in state_bytes.items() if name != "total"}
    memory.update(
        state=state_bytes["total"],
        frames=0 if out_dir is not None else n_blocks * frame_bytes,
        chunk=per_chunk * frame_bytes,
    )
    if out_dir is not None:
        atomic_json(
            os.path.join(out_dir, "meta.json"),
            _meta(system, method, k, param_names, wrt, save_every, memory, integrator, replica),
        )

    if backend == "cuda":
        from timemachine.backends import cupy_backend

        program = cupy_backend.make_program(system, wrt, method)
    else:
        program = _program(system, tuple(int(i) for i in wrt), zeta, method)
    args = (
        jnp.asarray(save_every, dtype=jnp.int64),
        jnp.asarray(theta),
        integrator.coefficients(system.masses),
        wcoeffs,
        jnp.asarray(integrator.seed, dtype=jnp.int64),
        jnp.asarray(replica, dtype=jnp.int64),
    )
    show = progress if progress is not None else (n_chunks > 3 and sys.stderr.isatty())
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, unit="step", desc=f"simulate ({method})")
    kept = []
    done = 0
    masses = np.asarray(system.masses)
    try:
        for c in range(n_chunks):
            blocks = min(per_chunk, n_blocks - done)
            state, frames, v_look = program(
                per_chunk, state, jnp.asarray(blocks, dtype=jnp.int64), *args
            )
            xs, vs, dxs, steps, v_first, pe = (np.asarray(a)[:blocks] for a in frames)
            v_look = getattr(v_look, "v", v_look)  # JAX returns the whole next state
            v_next = np.concatenate([v_first[1:], np.asarray(v_look)[None]])
            _check_chunk(xs, dxs, steps, param_names, max_sensitivity, integrator)
            ke = _on_step_kinetic_energy(vs, v_next, masses)
            temp = 2.0 * ke / (3 * n * BOLTZMANN)
            chunk = dict(
                x=xs,
                v=vs,
                dx_dtheta=dxs,
                steps=steps,
                potential_energy=pe,
                kinetic_energy=ke,
                temperature=temp,
            )
            if out_dir is not None:
                path = os.path.join(out_dir, f"chunk_{first_chunk + c:05d}.npz")
                atomic_savez(path, **chunk)
                _save_state(out_dir, state)
            else:
                kept.append(chunk)
            done += blocks
            if bar is not None:
                bar.update(blocks * save_every)
    finally:
        if bar is not None:
            bar.close()

    if out_dir is not None:
        return SensitivityTrajectory.load(out_dir)

    def cat(key):
        return np.concatenate([c[key] for c in kept])

    return SensitivityTrajectory(
        x=cat("x"),
        v=cat("v"),
        dx_dtheta=cat("dx_dtheta"),
        steps=cat("steps"),
        potential_energy=cat("potential_energy"),
        kinetic_energy=cat("kinetic_energy"),
        temperature=cat("temperature"),
        param_names=param_names,
        wrt=wrt,
        final_state=state,
        memory_bytes=memory,
        method=method,
        window=k,
    )


def _meta(system, method, k, param_names, wrt, save_every, memory, integrator, replica):
    return {
        "format": _FORMAT,
        "version": 1,
        "n_atoms": system.n_atoms,
        "param_names": list(param_names),
        "wrt": [int(i) for i in wrt],
        "method": method,
        "window": k,
        "save_every": save_every,
        "memory_bytes": memory,
        "integrator": {
            "temperature": integrator.temperature,
            "friction": integrator.friction,
            "dt": integrator.dt,
            "seed": integrator.seed,
        },
        "replica": replica,
    }


def _prepare_out_dir(out_dir, state, method, k, param_names, wrt, n_atoms) -> int:
    """Create out_dir, or check that it holds the run ``state`` continues; first chunk no."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"out_dir {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    files = _chunk_files(out_dir)
    if not files:
        return 0
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise InputError(
            f"out_dir {out_dir!r} holds chunk files but no meta.json: not a trajectory this "
            f"run can continue; choose an empty directory"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    with np.load(files[-1]) as data:
        last_step = int(data["steps"][-1])
    start = int(np.asarray(state.step))
    same = (
        meta.get("method") == method
        and meta.get("window") == k
        and meta.get("wrt") == [int(i) for i in wrt]
        and meta.get("n_atoms") == n_atoms
        and tuple(meta.get("param_names", ())) == tuple(param_names)
    )
    if start != last_step or not same:
        raise InputError(
            f"out_dir {out_dir!r} already holds a trajectory ({len(files)} chunk files, up to "
            f"step {last_step}, method {meta.get('method')!r}); continue it with "
            f"x0=SensitivityTrajectory.load(out_dir).final_state and the same wrt and method "
            f"(this run starts at step {start}), or choose an empty directory"
        )
    return int(os.path.basename(files[-1])[len("chunk_") : -len(".npz")]) + 1
