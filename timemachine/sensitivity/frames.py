"""The sensitivity-trajectory file format and its lazily loaded frames.

``SensitivityTrajectory`` holds the saved frames of a ``simulate`` run, in memory or
streamed to a directory; ``ChunkedFrames`` reads streamed frames chunk by chunk. The
directory layout (``meta.json``, ``chunk_XXXXX.npz``, the checkpoint ``state.npz`` with
``state.json``) is specified in docs/design.md, "File formats"; this module is its one
reader and writer.

Every file is checksummed (``timemachine.checkpoints``): ``meta.json`` carries the SHA-256
of its own contents, and the checkpoint's record ``state.json`` carries the SHA-256 of the
state's arrays, of ``state.npz``, and of every chunk written before it. A chunk is
written before the checkpoint that lists it, so a run killed at any moment leaves a
checkpoint whose chunks are all complete; a chunk the checkpoint does not list is the
output of an unfinished chunk, removed and recomputed on resume (bit for bit the same).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import numbers
import os

import jax.numpy as jnp
import numpy as np

from timemachine.checkpoints import (
    array_sha256,
    check_settings,
    checkpoint_files,
    file_record,
    jsonable,
    read_checkpoint,
    read_verified,
    remove_checkpoint,
    system_record,
    write_checkpoint,
)
from timemachine.errors import CorruptCheckpointError, InputError, MissingFileError
from timemachine.files import atomic_write_bytes, atomic_write_text
from timemachine.sensitivity.propagation import ExactState, WindowState

__all__ = ["ChunkedFrames", "SensitivityTrajectory"]

FORMAT = "timemachine.SensitivityTrajectory"
STATE_FORMAT = "timemachine.SensitivityTrajectory.state"
STATE = "state"  # the checkpoint state.npz + state.json (and state.prev.*)
META = "meta.json"
# the per-frame arrays of one chunk file, frame axis first
FRAME_KEYS = ("x", "v", "dx_dtheta", "steps", "potential_energy", "kinetic_energy", "temperature")


class ChunkedFrames:
    """A read-only (F, ...) array of frames stored across ``chunk_XXXXX.npz`` files.

    Indexing loads only the chunks it touches (the last one is cached); ``np.asarray``
    loads everything; ``chunks()`` iterates chunk by chunk in bounded memory.
    """

    def __init__(self, files, key, counts, frame_shape, records=None):
        self.files = list(files)
        # the SHA-256 records (``checkpoints.file_record``) every file is checked against
        self.records = list(records) if records is not None else [None] * len(self.files)
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
            self._cache = (c, read_chunk(self.files[c], self.records[c], (self.key,))[self.key])
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
        """The trajectory streamed to ``out_dir``; frames are read lazily, per chunk, each
        chunk checked against its SHA-256 when first read.

        The frames are those of the last good checkpoint (``state.npz`` with
        ``state.json``): the previous one, with a ``CheckpointFallbackWarning``, when the
        last fails its checksums; a chunk written after it is not part of the trajectory.

        Raises:
            MissingFileError / InputError: no ``meta.json`` there, or not a trajectory.
            CorruptCheckpointError: ``meta.json``, the checkpoint or a chunk it lists fails
                its checksum (the message names the file).
        """
        out_dir = os.fspath(out_dir)
        meta = read_meta(out_dir)
        ckpt = read_checkpoint(os.path.join(out_dir, STATE), STATE_FORMAT)
        records = [] if ckpt is None else ckpt.meta["chunks"]
        files = [os.path.join(out_dir, r["file"]) for r in records]
        n, p = int(meta["n_atoms"]), len(meta["param_names"])
        small = {k: [] for k in ("steps", "potential_energy", "kinetic_energy", "temperature")}
        for path, record in zip(files, records, strict=True):
            data = read_chunk(path, record, tuple(small))
            for key in small:
                small[key].append(data[key])
        counts = [r["frames"] for r in records]

        def cat(key, dtype=np.float64):
            return np.concatenate(small[key]) if files else np.zeros(0, dtype)

        state = None if ckpt is None else state_from_arrays(ckpt, meta["method"])
        return cls(
            x=ChunkedFrames(files, "x", counts, (n, 3), records),
            v=ChunkedFrames(files, "v", counts, (n, 3), records),
            dx_dtheta=ChunkedFrames(files, "dx_dtheta", counts, (p, n, 3), records),
            steps=cat("steps", np.int64),
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
    """The ``chunk_XXXXX.npz`` paths in ``out_dir``, in chunk order (listed or not)."""
    return sorted(glob.glob(os.path.join(glob.escape(str(out_dir)), "chunk_[0-9]*.npz")))


def read_chunk(path, record, keys) -> dict:
    """The arrays ``keys`` of chunk file ``path``, after checking the file against its
    SHA-256 ``record`` (None: unchecked). CorruptCheckpointError names a bad file."""
    data = None if record is None else read_verified(path, record, "trajectory chunk")
    try:
        with np.load(path if data is None else io.BytesIO(data), allow_pickle=False) as z:
            return {k: np.array(z[k]) for k in keys}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise CorruptCheckpointError(
            f"{path} cannot be read as a trajectory chunk: {exc}"
        ) from None


def write_chunk(out_dir, number, chunk, log: RunLog) -> None:
    """Write one chunk's frames (a dict of ``FRAME_KEYS``) as ``chunk_{number:05d}.npz``,
    atomically, and add its SHA-256 record to ``log`` (the next checkpoint lists it)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(chunk[k]) for k in FRAME_KEYS})
    data = buf.getvalue()
    path = os.path.join(out_dir, f"chunk_{number:05d}.npz")
    atomic_write_bytes(path, data)
    record = file_record(path, data)
    steps = np.asarray(chunk["steps"])
    record.update(
        frames=int(steps.shape[0]),
        first_step=int(steps[0]),
        last_step=int(steps[-1]),
        arrays={k: array_sha256(chunk[k]) for k in FRAME_KEYS},
    )
    log.chunks.append(record)


def save_state(out_dir, state, log: RunLog) -> None:
    """Write the checkpoint after the chunks in ``log``: the propagation ``state``'s arrays
    in ``state.npz``, and in ``state.json`` the run's settings, its step, the records of
    every chunk so far and the states it may be resumed from (``log.starts``)."""
    arrays = {k: np.asarray(v) for k, v in state._asdict().items()}
    meta = {
        "settings": log.settings,
        "step": int(np.asarray(state.step)),
        "chunks": log.chunks,
        "starts": log.starts,
    }
    write_checkpoint(os.path.join(out_dir, STATE), arrays, meta, STATE_FORMAT)


def state_from_arrays(arrays, method):
    """An ``ExactState`` or ``WindowState`` (by ``method``) of a checkpoint's arrays."""
    cls = ExactState if method == "exact" else WindowState
    try:
        return cls(**{k: jnp.asarray(arrays[k]) for k in cls._fields})
    except KeyError as exc:
        raise CorruptCheckpointError(
            f"{getattr(arrays, 'path', 'the checkpoint')} lacks the {method} state's {exc}"
        ) from None


def state_sha256(state) -> str:
    """SHA-256 of a propagation state's arrays (field by field): identifies a state a
    trajectory may be resumed from."""
    h = hashlib.sha256()
    for name, value in zip(state._fields, state, strict=True):
        h.update(name.encode())
        h.update(array_sha256(np.asarray(value)).encode())
    return h.hexdigest()


def run_settings(system, theta, integrator, method, k, wrt, param_names, save_every, replica,
                 backend, zeta, precision="float64") -> dict:  # fmt: skip
    """What a resumed trajectory must share with the run in its folder (every field a
    difference is named by): the system (atoms, masses, terms), θ by name, the integrator,
    the parameters carried, the method and window, the save interval, the replica, the
    backend, the ζ method and the precision."""
    return jsonable(
        {
            "system": system_record(system),
            "parameters": dict(
                zip(system.param_names, np.asarray(theta, dtype=np.float64).tolist(), strict=True)
            ),
            "integrator": {
                "temperature": integrator.temperature,
                "friction": integrator.friction,
                "dt": integrator.dt,
                "seed": integrator.seed,
            },
            "wrt": list(param_names),
            "method": method,
            "window": k,
            "save_every": int(save_every),
            "replica": int(replica),
            "backend": backend,
            "zeta": zeta,
            "precision": str(precision),
        }
    )


def write_meta(out_dir, system, method, k, param_names, wrt, save_every, memory, integrator,
               replica, settings) -> None:  # fmt: skip
    """Write ``out_dir/meta.json`` (docs/design.md, "File formats") atomically, with the
    SHA-256 of its contents in ``sha256``."""
    meta = {
        "format": FORMAT,
        "version": 2,
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
        "settings": settings,
    }
    meta = jsonable(meta)
    meta["sha256"] = _meta_sha256(meta)
    atomic_write_text(os.path.join(out_dir, META), json.dumps(meta, indent=1))


def _meta_sha256(meta):
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_meta(out_dir) -> dict:
    """``out_dir/meta.json``, checked against its SHA-256.

    Raises:
        MissingFileError: there is none; InputError: not a trajectory's;
        CorruptCheckpointError: not valid JSON or its checksum fails (names the file).
    """
    path = os.path.join(out_dir, META)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} does not exist: {out_dir!r} holds no streamed trajectory")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path} is not valid JSON ({exc}): truncated or edited"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(f"{path} is not a {FORMAT} (format {got!r})")
    if meta.get("sha256") != _meta_sha256(meta):
        raise CorruptCheckpointError(
            f"{path}: its contents do not match their SHA-256 (edited by hand, damaged, or "
            "written by a timemachine without checksums)"
        )
    return meta


class RunLog:
    """What the checkpoints of a streamed run record besides the state: ``settings``
    (``run_settings``), ``chunks`` (the SHA-256 record of every chunk file, in order) and
    ``starts`` (``{"step", "sha256"}`` of each state a ``simulate`` call into the folder
    started from: a resume names its x0 by them)."""

    def __init__(self, settings, chunks=(), starts=()):
        self.settings = settings
        self.chunks = list(chunks)
        self.starts = list(starts)


class OutDirPlan:
    """How a ``simulate`` call into a folder proceeds: from ``state`` (the caller's, or the
    checkpoint's), ``n_steps`` more steps, the first chunk file number, and the ``log``."""

    def __init__(self, state, n_steps, first_chunk, log):
        self.state, self.n_steps, self.first_chunk, self.log = state, n_steps, first_chunk, log


_OURS = ("meta.json",) + tuple(checkpoint_files("state")[k] for k in checkpoint_files("state"))


def prepare_out_dir(out_dir, state, n_steps, settings, resume, method) -> OutDirPlan:
    """Create ``out_dir`` for a run from ``state`` of ``n_steps`` steps, or, with
    ``resume``, pick up the run it holds.

    Without ``resume`` the folder must be empty or absent. With it, the folder's last good
    checkpoint must have the same ``settings`` (a ``CheckpointError`` names each that
    differs), and ``state`` must be either a state its run started from (then the run
    ends ``n_steps`` after it) or its checkpoint's state itself (then ``n_steps`` more
    are run, as a continuation from ``final_state`` does). A folder with no checkpoint yet
    (killed before its first chunk) starts afresh. Chunk files the checkpoint does not
    list, and stale temporary files, are removed; the listed ones are checked against
    their SHA-256.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"out_dir {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    start = {"step": int(np.asarray(state.step)), "sha256": state_sha256(state)}
    entries = sorted(os.listdir(out_dir))
    if not resume:
        if entries:
            held = _describe_folder(out_dir, entries)
            raise InputError(
                f"out_dir {out_dir!r} is not empty ({held}): pass resume=True to continue the "
                f"run it holds, or choose an empty directory"
            )
        return OutDirPlan(state, n_steps, 0, RunLog(settings, starts=[start]))
    stray = [
        e for e in entries if e not in _OURS and not e.startswith(".tmp-") and not _is_chunk_name(e)
    ]
    if stray:
        raise InputError(
            f"out_dir {out_dir!r} holds files that are not a timemachine trajectory "
            f"({', '.join(stray[:5])}): resume=True continues only a folder simulate wrote"
        )
    base = os.path.join(out_dir, STATE)
    ckpt = read_checkpoint(base, STATE_FORMAT)
    if ckpt is None:
        if META not in entries and any(_is_chunk_name(e) for e in entries):
            raise InputError(
                f"out_dir {out_dir!r} holds chunk files but neither meta.json nor a "
                "checkpoint: not a trajectory this run can continue; choose an empty directory"
            )
        if META in entries:  # a run killed before its first checkpoint: it must be ours
            meta = read_meta(out_dir)
            check_settings(os.path.join(out_dir, META), meta.get("settings"), settings, _ADVICE)
        _clean(out_dir, keep=())
        remove_checkpoint(base)
        return OutDirPlan(state, n_steps, 0, RunLog(settings, starts=[start]))
    check_settings(ckpt.path, ckpt.meta["settings"], settings, _ADVICE)
    saved = state_from_arrays(ckpt, method)
    done = int(ckpt.meta["step"])
    starts = list(ckpt.meta["starts"])
    if start in starts:
        end = start["step"] + n_steps
    elif start["sha256"] == state_sha256(saved):
        end = done + n_steps  # x0 is the folder's final state: run n_steps more
        starts.append(start)
    else:
        raise InputError(
            f"out_dir {out_dir!r} already holds a trajectory (up to step {done}) that x0 "
            f"(step {start['step']}) does not belong to: x0 must be the state that run "
            "started from, or its final_state (SensitivityTrajectory.load(out_dir)); "
            "choose an empty directory for a new run"
        )
    if end < done:
        raise InputError(
            f"out_dir {out_dir!r} already holds a trajectory up to step {done}, beyond the "
            f"step {end} this call asks for (x0 at step {start['step']} + n_steps = "
            f"{n_steps}); ask for at least {done - start['step']} steps or choose an empty "
            "directory"
        )
    records = list(ckpt.meta["chunks"])
    for record in records:
        read_verified(os.path.join(out_dir, record["file"]), record, "trajectory chunk")
    _clean(out_dir, keep={r["file"] for r in records})
    log = RunLog(settings, records, starts)
    return OutDirPlan(saved, end - done, len(records), log)


_ADVICE = (
    "Resume it with the same system, parameters, integrator and options, or use another out_dir"
)


def _is_chunk_name(name):
    return name.startswith("chunk_") and name.endswith(".npz")


def _clean(out_dir, keep):
    """Remove the chunk files not in ``keep`` and stale temporary files."""
    for name in os.listdir(out_dir):
        if (_is_chunk_name(name) and name not in keep) or name.startswith(".tmp-"):
            os.remove(os.path.join(out_dir, name))


def _describe_folder(out_dir, entries):
    chunks = [e for e in entries if _is_chunk_name(e)]
    if chunks or META in entries:
        return f"it already holds a trajectory: {len(chunks)} chunk files"
    return f"it holds {', '.join(entries[:3])}{'…' if len(entries) > 3 else ''}"
