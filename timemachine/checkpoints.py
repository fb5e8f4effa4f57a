"""Checkpoints you can trust: arrays in an npz, metadata in JSON, SHA-256 over both.

A checkpoint called ``BASE`` (for example ``OUT/checkpoint``) is two files:

* ``BASE.npz``: the arrays, uncompressed, numeric only (read with ``allow_pickle=False``);
* ``BASE.json``: ``format``, ``version``, the caller's JSON ``meta``, the npz's size and
  SHA-256 (``npz``), the SHA-256, dtype and shape of every array (``arrays``), and
  ``sha256``, the SHA-256 of this record itself (sorted-key JSON without that field), so
  that a hand edit is caught as surely as a flipped bit.

Each file is staged (temporary file, flush, ``os.fsync``) and renamed over its name
(``os.replace``, then an ``fsync`` of the folder): ``timemachine.files``. Before a new
checkpoint replaces a good one, the good one is kept as ``BASE.prev.npz`` and
``BASE.prev.json`` (hard links where the file system allows them, else copies). A kill at
any moment therefore leaves at least one complete pair, and :func:`read_checkpoint` falls
back to the previous pair, with a :class:`~timemachine.errors.CheckpointFallbackWarning`
naming both files, when the last one is incomplete or fails its checksums. A checkpoint
whose every copy is bad raises :class:`~timemachine.errors.CorruptCheckpointError` naming
the file and what failed.

The same SHA-256 records protect other files a run relies on (the trajectory chunks of
``timemachine.sensitivity.frames``): :func:`file_record` and :func:`read_verified`.
:func:`check_settings` compares a checkpoint's settings with a run's and names every
field that differs. docs/design.md, "File formats", lists what each checkpoint holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings

import numpy as np

from timemachine.errors import (
    CheckpointError,
    CheckpointFallbackWarning,
    CorruptCheckpointError,
)
from timemachine.files import commit, fsync_dir, stage_write

__all__ = [
    "Checkpoint",
    "array_sha256",
    "check_settings",
    "checkpoint_files",
    "file_record",
    "jsonable",
    "read_checkpoint",
    "read_verified",
    "remove_checkpoint",
    "settings_differences",
    "system_record",
    "verify_record",
    "write_checkpoint",
]

VERSION = 1
# files this process wrote or verified, by (path) → (size, mtime_ns, inode, sha256): a
# file still matching its entry is not hashed again
_KNOWN: dict[str, tuple] = {}


# --------------------------------------------------------------------------- hashes


def array_sha256(a) -> str:
    """SHA-256 (hex) of an array's dtype, shape and C-order bytes."""
    a = _c_order(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _c_order(a):
    """``a`` as a C-ordered ndarray of its own shape (``np.ascontiguousarray`` would turn
    a 0-d array into a 1-d one)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _record_sha256(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _stat_key(path):
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _remember(path, sha):
    _KNOWN[os.path.abspath(path)] = (*_stat_key(path), sha)


def _known_sha(path):
    entry = _KNOWN.get(os.path.abspath(path))
    try:
        if entry is not None and entry[:3] == _stat_key(path):
            return entry[3]
    except OSError:
        pass
    return None


def jsonable(obj):
    """``obj`` as JSON gives it back: tuples become lists, numpy scalars and arrays plain
    numbers and lists (so a run's settings compare equal to the ones read from disk)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


# --------------------------------------------------------------------------- plain files


def file_record(path, data: bytes | None = None) -> dict:
    """``{"file": name, "bytes": size, "sha256": hex}`` of a file (of ``data``, its bytes,
    when the caller has them); the file is remembered as verified by this process."""
    if data is None:
        with open(path, "rb") as fh:
            data = fh.read()
    sha = hashlib.sha256(data).hexdigest()
    _remember(path, sha)
    return {"file": os.path.basename(path), "bytes": len(data), "sha256": sha}


def read_verified(path, record: dict, what: str = "file") -> bytes | None:
    """The bytes of ``path`` after checking them against ``record`` (:func:`file_record`);
    None when the file is one this process wrote or verified and is unchanged (the caller
    may then read it directly).

    Raises:
        CorruptCheckpointError: the file is missing, or its size or SHA-256 differ from the
            record's (the message names the file).
    """
    if _known_sha(path) == record["sha256"]:
        return None
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{path}: the {what} is missing")
    with open(path, "rb") as fh:
        data = fh.read()
    _check_bytes(path, data, record, what)
    _remember(path, record["sha256"])
    return data


def verify_record(path, record: dict, what: str = "file") -> None:
    """Check ``path`` against ``record`` (:func:`file_record`); CorruptCheckpointError if
    it differs."""
    read_verified(path, record, what)


def _check_bytes(path, data, record, what):
    if len(data) != record["bytes"]:
        raise CorruptCheckpointError(
            f"{path}: the {what} has {len(data)} bytes, its checksum record says "
            f"{record['bytes']} (truncated or overwritten)"
        )
    sha = hashlib.sha256(data).hexdigest()
    if sha != record["sha256"]:
        raise CorruptCheckpointError(
            f"{path}: the {what}'s SHA-256 is {sha[:16]}…, its checksum record says "
            f"{record['sha256'][:16]}… (the file was changed on disk)"
        )


# --------------------------------------------------------------------------- checkpoints


class Checkpoint(dict):
    """The arrays of a checkpoint (a dict: name → ndarray) with ``meta`` (the caller's
    JSON metadata), ``path`` (the npz it came from) and ``previous`` (True when it is the
    kept previous checkpoint because the last one was unusable)."""

    def __init__(self, arrays, meta, path, previous):
        super().__init__(arrays)
        self.meta, self.path, self.previous = meta, path, previous


def checkpoint_files(base) -> dict:
    """The four file names of checkpoint ``base``: ``npz``, ``json``, ``prev_npz``,
    ``prev_json``."""
    base = os.fspath(base)
    return {
        "npz": base + ".npz",
        "json": base + ".json",
        "prev_npz": base + ".prev.npz",
        "prev_json": base + ".prev.json",
    }


def write_checkpoint(base, arrays: dict, meta: dict, fmt: str, keep_previous: bool = True):
    """Write checkpoint ``base`` (``BASE.npz`` and ``BASE.json``) crash-safely.

    Args:
        base: the path without extension, e.g. ``OUT/checkpoint``.
        arrays: name → numeric array (no object arrays; shapes and dtypes are kept).
        meta: JSON-serialisable metadata (tuples come back as lists).
        fmt: the format name a reader will insist on.
        keep_previous: keep the current checkpoint, if it is complete and passes its
            checksums, as ``BASE.prev.*``; False removes any previous pair (a fresh run).

    Returns:
        The path of ``BASE.npz``.
    """
    names = checkpoint_files(base)
    arrays = {k: _c_order(v) for k, v in arrays.items()}
    for k, a in arrays.items():
        if a.dtype.hasobject:
            raise CheckpointError(f"checkpoint array {k!r} of {names['npz']} holds objects")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    record = {
        "format": fmt,
        "version": VERSION,
        "meta": meta,
        "npz": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "arrays": {
            k: {"sha256": array_sha256(a), "dtype": a.dtype.str, "shape": list(a.shape)}
            for k, a in arrays.items()
        },
    }
    record = jsonable(record)
    record["sha256"] = _record_sha256(record)
    text = json.dumps(record, indent=1, sort_keys=True).encode()
    _remove_stale_temporaries(names)
    tmp_npz = stage_write(names["npz"], lambda fh: fh.write(data))
    try:
        tmp_json = stage_write(names["json"], lambda fh: fh.write(text))
    except BaseException:
        os.remove(tmp_npz)
        raise
    try:
        if keep_previous:
            if _pair_is_good(names["npz"], names["json"]):
                _keep(names["npz"], names["prev_npz"])
                _keep(names["json"], names["prev_json"])
        else:
            for key in ("prev_json", "prev_npz"):
                if os.path.lexists(names[key]):
                    os.remove(names[key])
        # between these two renames the pair is inconsistent: readers take the previous one
        commit(tmp_npz, names["npz"])
        commit(tmp_json, names["json"])
    except BaseException:
        for tmp in (tmp_npz, tmp_json):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    _remember(names["npz"], record["npz"]["sha256"])
    _remember(names["json"], hashlib.sha256(text).hexdigest())
    return names["npz"]


def _remove_stale_temporaries(names):
    """Remove the temporary files a killed writer of this checkpoint left behind
    (``.tmp-*BASE.npz`` and the like: ``files.stage_write``'s names, and ``_keep``'s)."""
    folder = os.path.dirname(os.path.abspath(names["npz"]))
    ends = tuple(os.path.basename(p) for p in names.values())
    for name in os.listdir(folder):
        if name.startswith(".tmp-") and name.endswith(ends):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def _keep(src, dst):
    """``dst`` becomes a copy of ``src`` atomically (a hard link where possible)."""
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, f".tmp-link-{os.getpid()}-{os.path.basename(dst)}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, dst)
    fsync_dir(folder)
    entry = _KNOWN.get(os.path.abspath(src))
    if entry is not None:
        _remember(dst, entry[3])


def _pair_is_good(npz, js) -> bool:
    """Whether ``npz`` with its ``js`` is a complete checkpoint (cheap when this process
    wrote or verified both and they are unchanged)."""
    if not (os.path.isfile(npz) and os.path.isfile(js)):
        return False
    if _known_sha(npz) is not None and _known_sha(js) is not None:
        return True  # written or verified as a pair by this process, and unchanged since
    try:
        _read_pair(npz, js, fmt=None)
    except (CheckpointError, OSError):
        return False
    return True


def _read_pair(npz, js, fmt):
    """(arrays, meta) of one pair after every check; CorruptCheckpointError naming the
    file that fails, CheckpointError for another format."""
    if not os.path.isfile(js):
        raise CorruptCheckpointError(f"{npz} has no checksum file {js} (an interrupted write?)")
    if not os.path.isfile(npz):
        raise CorruptCheckpointError(f"{js} has no array file {npz} (an interrupted write?)")
    with open(js, "rb") as fh:
        text = fh.read()
    try:
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{js} is not valid JSON ({exc}): truncated or edited"
        ) from None
    if not isinstance(record, dict) or not {"format", "meta", "npz", "arrays", "sha256"} <= set(
        record
    ):
        raise CorruptCheckpointError(f"{js} is not a timemachine checkpoint record")
    if _record_sha256(record) != record["sha256"]:
        raise CorruptCheckpointError(
            f"{js}: its contents do not match their SHA-256 (the file was edited by hand or "
            "damaged)"
        )
    if fmt is not None and record["format"] != fmt:
        raise CheckpointError(f"{js} is a {record['format']!r} checkpoint, not a {fmt!r} one")
    data = read_verified(npz, record["npz"], "checkpoint array file")
    source = npz if data is None else io.BytesIO(data)
    arrays = {}
    try:
        with np.load(source, allow_pickle=False) as z:
            keys = set(z.files)
            want = set(record["arrays"])
            if keys != want:
                raise CorruptCheckpointError(
                    f"{npz} holds arrays {sorted(keys)}, its record {js} lists {sorted(want)}"
                )
            for k in sorted(want):
                arrays[k] = np.array(z[k])
    except CorruptCheckpointError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise CorruptCheckpointError(f"{npz} cannot be read as an npz: {exc}") from None
    for k, a in arrays.items():
        if array_sha256(a) != record["arrays"][k]["sha256"]:
            raise CorruptCheckpointError(f"{npz}: array {k!r} does not match its SHA-256 in {js}")
    _remember(js, hashlib.sha256(text).hexdigest())
    return arrays, record["meta"]


def read_checkpoint(base, fmt: str, fallback: bool = True) -> Checkpoint | None:
    """Read checkpoint ``base``, verified; None when none of its files exist.

    When the last checkpoint is incomplete or fails a checksum and ``fallback`` is True,
    the kept previous one is returned instead (``Checkpoint.previous`` True) with a
    ``CheckpointFallbackWarning`` that names both files and what was wrong.

    Raises:
        CorruptCheckpointError: no usable copy (the message names the bad file).
        CheckpointError: the files hold another format's checkpoint.
    """
    names = checkpoint_files(base)
    present = {k for k, p in names.items() if os.path.lexists(p)}
    if not present:
        return None
    if present <= {"npz"}:
        # an npz alone: the very first write was killed between its two renames (or
        # a checkpoint of an older timemachine, which had no checksums); nothing to trust
        warnings.warn(
            f"{names['npz']} has no checksum file {names['json']} (a first checkpoint "
            "write that was interrupted, or an old format): ignoring it and starting afresh",
            CheckpointFallbackWarning,
            stacklevel=2,
        )
        return None
    try:
        arrays, meta = _read_pair(names["npz"], names["json"], fmt)
        return Checkpoint(arrays, meta, names["npz"], previous=False)
    except CorruptCheckpointError as exc:
        if not fallback or not ({"prev_npz", "prev_json"} & present):
            raise
        error = exc
    try:
        arrays, meta = _read_pair(names["prev_npz"], names["prev_json"], fmt)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(
            f"{error}; the previous checkpoint is unusable too: {exc}"
        ) from None
    warnings.warn(
        f"checkpoint {names['npz']} is unusable ({error}); resuming from the previous "
        f"checkpoint {names['prev_npz']}",
        CheckpointFallbackWarning,
        stacklevel=2,
    )
    return Checkpoint(arrays, meta, names["prev_npz"], previous=True)


def remove_checkpoint(base) -> None:
    """Delete every file of checkpoint ``base`` that exists."""
    for path in checkpoint_files(base).values():
        if os.path.lexists(path):
            os.remove(path)
        _KNOWN.pop(os.path.abspath(path), None)


# --------------------------------------------------------------------------- settings


def settings_differences(found, expected, prefix: str = "") -> list[str]:
    """Each difference between a checkpoint's settings ``found`` and a run's ``expected``
    (JSON-like values, compared after :func:`jsonable`), as ``"name found != expected"``
    with dotted names for nested dicts, ``name[i]`` for list entries."""
    found, expected = jsonable(found), jsonable(expected)
    out = []
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in sorted(set(found) | set(expected), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in found:
                out.append(
                    f"{name} missing from the checkpoint (this run: {_short(expected[key])})"
                )
            elif key not in expected:
                out.append(f"{name} {_short(found[key])} in the checkpoint, not set in this run")
            else:
                out += settings_differences(found[key], expected[key], name)
        return out
    if (
        isinstance(found, list)
        and isinstance(expected, list)
        and len(found) == len(expected)
        and found != expected
    ):
        for i, (a, b) in enumerate(zip(found, expected, strict=True)):
            out += settings_differences(a, b, f"{prefix}[{i}]")
        return out
    if found != expected:
        out.append(f"{prefix or 'settings'} {_short(found)} != {_short(expected)}")
    return out


def _short(value, limit=80):
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def system_record(system) -> dict:
    """What identifies a System in a checkpoint's settings: its atom count, a SHA-256 of
    its masses (amu) and of its parameter names, and its terms' kinds (θ's values are
    recorded by name by each writer)."""
    return {
        "n_atoms": int(system.n_atoms),
        "masses_sha256": array_sha256(np.asarray(system.masses, dtype=np.float64)),
        "param_names_sha256": hashlib.sha256("\n".join(system.param_names).encode()).hexdigest(),
        "terms": [t.kind for t in system.terms],
    }


def check_settings(path, found, expected, advice: str = "") -> None:
    """CheckpointError unless a checkpoint's settings ``found`` equal the run's
    ``expected``; the message names the checkpoint ``path`` and lists what differs
    (checkpoint value first, then this run's), e.g. ``n_chains 4 != 2``."""
    diffs = settings_differences(found, expected)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise CheckpointError(
            f"{path} comes from a run with other settings (checkpoint != this run): {shown}"
            + (f". {advice}" if advice else "")
        )
