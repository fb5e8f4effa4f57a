"""The kernel bodies built for the CPU: the executor the test suite checks the GPU program with.

``load_host_library()`` compiles ``cuda/kernels/host/tm_host.cpp`` (which includes the
very headers the CUDA kernels are made of) with the host C++ compiler into a cache
directory keyed by a hash of the sources, and loads it with ctypes. ``HostExecutor``
runs a :class:`~timemachine.backends.pipeline.Pipeline` with it: every kernel launch becomes
a serial loop over the same thread indices, in the same order of launches. It is slow
(one core, no vectorisation across atoms) and meant for verification on small systems.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

from timemachine.backends import kernel_dir, kernel_sources
from timemachine.backends.abi import DTYPES, KERNELS, STRUCTS, struct_bytes
from timemachine.errors import InputError, SimulationError

_LIB = None


def _cache_dir() -> str:
    base = os.environ.get("TIMEMACHINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "timemachine",
    )
    os.makedirs(base, exist_ok=True)
    return base


def host_compiler() -> str | None:
    """The C++ compiler used for the host build ($CXX, else g++, else clang++), or None."""
    for cand in (os.environ.get("CXX"), "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def build_shared_library(src, prefix, flags, include_dirs=(), key_extra="") -> str:
    """Compile ``src`` (with the kernel headers) into a shared library, once per hash of
    the sources, compiler, flags and ``key_extra``; return its path in the cache directory.

    Raises:
        SimulationError: no C++ compiler, or the sources do not compile (compiler output
            in the message).
    """
    cxx = host_compiler()
    if cxx is None:
        raise SimulationError(
            f"no host C++ compiler (set $CXX, or install g++) to build {os.path.basename(src)}"
        )
    digest = hashlib.sha256()
    for path in kernel_sources() + [src]:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + f.read())
    digest.update(" ".join((cxx,) + tuple(flags) + tuple(include_dirs) + (key_extra,)).encode())
    out = os.path.join(_cache_dir(), f"{prefix}_{digest.hexdigest()[:16]}.so")
    if os.path.exists(out):
        return out
    # one build at a time per library: a second process (a test worker, a Dask worker)
    # waits for the first one's build instead of compiling the same sources beside it
    with open(out + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(out):
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
            os.close(fd)
            includes = [f"-I{d}" for d in include_dirs]
            cmd = [cxx, "-std=c++17", *flags, *includes, "-fPIC", "-shared", "-o", tmp, src]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                os.remove(tmp)
                raise SimulationError(
                    f"host build of {os.path.basename(src)} failed ({' '.join(cmd)}):\n"
                    f"{proc.stderr}"
                )
            os.replace(tmp, out)  # atomic: a reader never loads a half-written file
    return out


def load_host_library(flags=("-O2",)) -> ctypes.CDLL:
    """Compile (once per source hash) and load the host build of the kernels.

    Raises:
        SimulationError: no C++ compiler, or the sources do not compile (compiler output
            in the message).
    """
    global _LIB
    if _LIB is not None and flags == ("-O2",):
        return _LIB
    src = os.path.join(kernel_dir(), "host", "tm_host.cpp")
    out = build_shared_library(src, "tm_host", flags)
    lib = ctypes.CDLL(out)
    for name in KERNELS:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p]
        fn.restype = None
    lib.tm_set_launch_order.argtypes = [ctypes.c_int]
    lib.tm_pchunk.restype = ctypes.c_longlong
    lib.tm_sizeof.restype = ctypes.c_longlong
    lib.tm_sizeof.argtypes = [ctypes.c_char_p]
    lib.tm_philox4x32_10.argtypes = [ctypes.c_void_p] * 3
    lib.tm_normals.argtypes = [
        ctypes.c_ulonglong,
        ctypes.c_longlong,
        ctypes.c_ulonglong,
        ctypes.c_longlong,
        ctypes.c_void_p,
    ]
    for name in STRUCTS:
        size = lib.tm_sizeof(name.encode())
        if size != DTYPES[name].itemsize:
            raise SimulationError(
                f"struct {name}: the kernels' sizeof is {size} bytes but abi.STRUCTS describes "
                f"{DTYPES[name].itemsize}: the Python and C++ layouts disagree"
            )
    if flags == ("-O2",):
        _LIB = lib
    return lib


class HostGraph:
    """A recorded sequence of host launches; ``launch()`` runs it again, in order."""

    def __init__(self, ops):
        self.ops = tuple(ops)

    def launch(self):
        for op in self.ops:
            op()


#: the orders a host launch can run its threads in (tm_host.cpp, LaunchOrder)
LAUNCH_ORDERS = ("index", "reversed", "strided")


class HostExecutor:
    """Runs Pipeline launches on the CPU with the host build (numpy arrays).

    ``order`` is the order each launch runs its threads in (``LAUNCH_ORDERS``): a GPU
    runs them in none, so results that change with it would be a race there.
    """

    xp = np
    name = "host"

    def __init__(self, lib=None, order="index"):
        if order not in LAUNCH_ORDERS:
            raise InputError(f"order must be one of {LAUNCH_ORDERS}, got {order!r}")
        self.lib = lib if lib is not None else load_host_library()
        self.order = LAUNCH_ORDERS.index(order)
        self._blocks = {}
        self._recording = None  # the ops of a capture in progress

    def alloc(self, name, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def upload(self, key, array):
        return np.array(array, copy=True)

    def ptr(self, array) -> int:
        if not array.flags["C_CONTIGUOUS"]:
            raise InputError("host executor: arrays handed to kernels must be C-contiguous")
        return int(array.ctypes.data)

    def struct(self, key, name, fields):
        """The argument block ``key``: new, or the one made before with new contents (its
        address stays, so recorded launches see the new values)."""
        block = struct_bytes(name, fields)
        old = self._blocks.get(key)
        if old is not None and old.dtype == block.dtype:
            old[...] = block
            return old
        self._blocks[key] = block
        return block

    def launch(self, kernel, nx, ny, block):
        want = KERNELS.get(kernel)
        if want is None:
            raise InputError(f"unknown kernel {kernel!r}")
        if block.dtype != DTYPES[want]:
            raise InputError(f"{kernel}: argument block is not a {want}")
        if nx < 0 or ny < 1:
            raise InputError(f"{kernel}: bad launch extent ({nx}, {ny})")
        fn, order = getattr(self.lib, kernel), self.order

        def run():  # holds the block, as a CUDA graph holds its address
            self.lib.tm_set_launch_order(order)
            fn(int(nx), int(ny), int(block.ctypes.data))

        self._issue(run)

    def zero(self, array):
        """Set ``array`` to 0 (a memset on the GPU)."""
        self._issue(lambda: array.fill(0))

    def _issue(self, op):
        if self._recording is None:
            op()
        else:
            self._recording.append(op)

    def capture(self, fn) -> HostGraph:
        """Record the launches and zeroings ``fn()`` issues, without running them: the
        host counterpart of a CUDA graph capture (``CupyExecutor.capture``)."""
        if self._recording is not None:
            raise SimulationError("host executor: capture() is already recording")
        self._recording = []
        try:
            fn()
            return HostGraph(self._recording)
        finally:
            self._recording = None

    def to_host(self, array):
        return np.array(array, copy=True)
