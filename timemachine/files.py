"""Result files that are either absent or complete: write to a temporary file in the same
folder, flush it and ``os.fsync`` it, rename it over the target (``os.replace`` is
atomic), then ``fsync`` the folder so that the rename itself survives a power cut.

Every file timemachine writes for a user (trajectory chunks, checkpoints, histories,
plots, force-field XML, benchmark JSON) goes through :func:`atomic_write`, so a killed
run never leaves half a file behind. :func:`stage_write` and :func:`commit` are its two
halves, for writers that must prepare several files before renaming any
(``timemachine.checkpoints``).

``TIMEMACHINE_SLOW_WRITES`` (seconds, a float) makes every rename wait that long after the
temporary file is on disk: the kill tests (tests/test_resume_kill.py) use it to kill a run
inside a checkpoint write. It is read at each rename and is unset in normal use.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import IO

__all__ = [
    "atomic_json",
    "atomic_savefig",
    "atomic_savez",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "commit",
    "fsync_dir",
    "stage_write",
]

SLOW_WRITES = "TIMEMACHINE_SLOW_WRITES"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder) -> None:
    """``fsync`` a folder so that renames and new names in it reach the disk (a no-op where
    folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage_write(path, write: Callable[[IO], None], binary: bool = True) -> str:
    """The first half of :func:`atomic_write`: call ``write(fh)`` on a new temporary file
    next to ``path``, flush and ``fsync`` it, and return its name (``path`` is not touched).

    The caller renames it with :func:`commit`, or removes it. On any exception the
    temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 → what open() would have given
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def commit(tmp, path) -> str:
    """The second half of :func:`atomic_write`: rename the staged file ``tmp`` over
    ``path`` and ``fsync`` the folder. Returns ``path`` as a string."""
    path = os.fspath(path)
    pause = os.environ.get(SLOW_WRITES)
    if pause:
        time.sleep(float(pause))  # a window for the kill tests; see the module docstring
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def atomic_write(path, write: Callable[[IO], None], binary: bool = True) -> str:
    """Call ``write(fh)`` on a temporary file next to ``path``, then rename it to ``path``.

    Args:
        path: the target file; its folder is created if missing.
        write: fills the open file handle (bytes when ``binary``, else UTF-8 text).
        binary: open the temporary file in binary mode.

    Returns:
        ``path`` as a string. On any exception the temporary file is removed and ``path``
        is left as it was. The temporary file is flushed and ``fsync``-ed before the rename,
        and the folder after it.
    """
    return commit(stage_write(path, write, binary), path)


def atomic_write_bytes(path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


def atomic_json(path, obj, indent: int = 1) -> str:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return atomic_write(path, lambda fh: json.dump(obj, fh, indent=indent), binary=False)


def atomic_savez(path, **arrays) -> str:
    """Write the arrays as an uncompressed ``.npz`` to ``path`` atomically (checkpoints,
    which also need checksums, go through ``timemachine.checkpoints``)."""
    import numpy as np

    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def atomic_savefig(fig, path, **savefig_kwargs) -> str:
    """Save a matplotlib figure to ``path`` atomically; the format comes from the file's
    extension (PNG when it has none). ``savefig_kwargs`` go to ``fig.savefig`` (dpi, ...)."""
    fmt = os.path.splitext(os.fspath(path))[1][1:] or "png"
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **savefig_kwargs))
