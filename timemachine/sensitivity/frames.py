"""The sensitivity-trajectory file format and its lazily loaded frames.

``SensitivityTrajectory`` holds the saved frames of a ``simulate`` run, in memory or
streamed to a directory; ``ChunkedFrames`` reads streamed frames chunk by chunk. The
directory layout (``meta.json``, ``chunk_XXXXX.npz``, ``state.npz``) is specified in
docs/design.md, "File formats"; this module is its one reader and writer.
"""

from __future__ import annotations

import glob
import json
import numbers
import os
import zipfile

import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError, MissingFileError
from timemachine.files import atomic_json, atomic_savez
from timemachine.sensitivity.propagation import ExactState, WindowState

__all__ = ["ChunkedFrames", "SensitivityTrajectory"]

FORMAT = "timemachine.SensitivityTrajectory"
# the per-frame arrays of one chunk file, frame axis first
FRAME_KEYS = ("x", "v", "dx_dtheta", "steps", "potential_energy", "kinetic_energy", "temperature")


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
    def from_chunks(cls, chunks, **fields) -> SensitivityTrajectory:
        """The in-memory trajectory of a run's chunks (dicts of ``FRAME_KEYS`` arrays, in
        order) with the run's other attributes ``fields`` (keywords of ``__init__``)."""
        frames = {key: np.concatenate([c[key] for c in chunks]) for key in FRAME_KEYS}
        return cls(**frames, **fields)

    @classmethod
    def load(cls, out_dir) -> SensitivityTrajectory:
        """The trajectory streamed to ``out_dir``; frames are read lazily, per chunk.

        Raises:
            MissingFileError / InputError: no ``meta.json`` there, or not a trajectory.
        """
        meta_path = os.path.join(out_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise MissingFileError(
                f"{meta_path} does not exist: {out_dir!r} holds no streamed trajectory"
            )
        meta = read_meta(meta_path)
        files = chunk_files(out_dir)
        n, p = int(meta["n_atoms"]), len(meta["param_names"])
        small = {k: [] for k in ("steps", "potential_energy", "kinetic_energy", "temperature")}
        counts = []
        for path in files:
            with _open_npz(path, "chunk file") as data:
                for key in small:
                    small[key].append(data[key])
                counts.append(data["steps"].shape[0])

        def cat(key, dtype=np.float64):
            return np.concatenate(small[key]) if files else np.zeros(0, dtype)

        state = load_state(out_dir, meta)
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


def chunk_files(out_dir):
    """The ``chunk_XXXXX.npz`` paths in ``out_dir``, in chunk order."""
    return sorted(glob.glob(os.path.join(glob.escape(str(out_dir)), "chunk_[0-9]*.npz")))


def write_chunk(out_dir, number, chunk, state):
    """Write one chunk's frames (a dict of ``FRAME_KEYS``) as ``chunk_{number:05d}.npz``,
    then the propagation ``state`` after it as ``state.npz``, each atomically."""
    atomic_savez(os.path.join(out_dir, f"chunk_{number:05d}.npz"), **chunk)
    save_state(out_dir, state)


def save_state(out_dir, state):
    atomic_savez(
        os.path.join(out_dir, "state.npz"), **{k: np.asarray(v) for k, v in state._asdict().items()}
    )


class _open_npz:  # noqa: N801 (a context manager used like np.load)
    """``np.load(path, allow_pickle=False)`` as a context manager whose failures (an
    empty, truncated or foreign file, a missing array) are InputErrors naming the file."""

    def __init__(self, path, what):
        self.path, self.what = path, what

    def __enter__(self):
        try:
            self.data = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"{self.what} {self.path!r} cannot be read: {exc}") from None
        return _Checked(self.data, self.path, self.what)

    def __exit__(self, *exc):
        self.data.close()
        return False


class _Checked:
    def __init__(self, data, path, what):
        self.data, self.path, self.what = data, path, what

    def __getitem__(self, key):
        try:
            return self.data[key]
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(
                f"{self.what} {self.path!r} has no readable array {key!r}: {exc}"
            ) from None


def read_meta(meta_path) -> dict:
    """``meta.json`` of a streamed trajectory; InputError if it is empty, not JSON or
    not a trajectory's."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_path} cannot be read as a trajectory's meta.json: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{meta_path} is not a {FORMAT} (format {got!r})")
    return meta


def load_state(out_dir, meta):
    path = os.path.join(out_dir, "state.npz")
    if not os.path.isfile(path):
        return None
    cls = ExactState if meta["method"] == "exact" else WindowState
    with _open_npz(path, "state file") as data:
        return cls(**{k: jnp.asarray(data[k]) for k in cls._fields})


def write_meta(out_dir, system, method, k, param_names, wrt, save_every, memory, integrator,
               replica):  # fmt: skip
    """Write ``out_dir/meta.json`` (docs/design.md, "File formats") atomically."""
    meta = {
        "format": FORMAT,
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
    atomic_json(os.path.join(out_dir, "meta.json"), meta)


def prepare_out_dir(out_dir, state, method, k, param_names, wrt, n_atoms, settings=None) -> int:
    """Create out_dir, or check that it holds the run ``state`` continues; first chunk no.

    ``settings``: {"save_every", "integrator" {temperature, friction, dt, seed},
    "replica"} of this run; a trajectory written with others is refused, naming them."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"out_dir {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    files = chunk_files(out_dir)
    if not files:
        return 0
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise InputError(
            f"out_dir {out_dir!r} holds chunk files but no meta.json: not a trajectory this "
            f"run can continue; choose an empty directory"
        )
    meta = read_meta(meta_path)
    with _open_npz(files[-1], "chunk file") as data:
        last_step = int(data["steps"][-1])
    for key, value in (settings or {}).items():
        if key in meta and meta[key] != value:
            raise InputError(
                f"out_dir {out_dir!r} holds a trajectory run with {key} = {meta[key]!r}, "
                f"this run has {key} = {value!r}: continue it with the same settings, or "
                f"choose an empty directory"
            )
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
