"""Fast paths that run a System outside JAX: the CUDA kernels, loaded with CuPy.

The JAX implementation is the reference; ``backend="cuda"`` in ``tm.simulate`` runs the
CUDA C++ kernels of ``cuda/kernels/`` (shipped inside the installed package as
``timemachine/backends/_kernels``) through :mod:`timemachine.backends.cupy_backend`.
CuPy is optional: importing this package never imports it.

* :func:`kernel_dir` — where the kernel sources are (installed copy, else the source tree).
* :func:`cuda_available` — (True, "") when CuPy and a GPU are usable, else (False, why).
"""

from __future__ import annotations

import glob
import os

from timemachine.errors import InputError, MissingFileError

_HERE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = (
    os.path.join(_HERE, "_kernels"),  # installed: copied in by setup.py's build_py
    os.path.join(os.path.dirname(os.path.dirname(_HERE)), "cuda", "kernels"),  # source tree
)


def kernel_dir() -> str:
    """Directory holding ``tm_kernels.cu`` and its headers.

    Raises:
        MissingFileError: neither the installed copy nor the source tree is present.
    """
    for path in _CANDIDATES:
        if os.path.isfile(os.path.join(path, "tm_kernels.cu")):
            return path
    raise MissingFileError(
        f"CUDA kernel sources not found in {' or '.join(_CANDIDATES)}: reinstall timemachine "
        f"(the wheel ships them as timemachine/backends/_kernels)"
    )


def kernel_sources() -> list[str]:
    """The .cuh headers and .cu files of the kernels, sorted."""
    d = kernel_dir()
    return sorted(glob.glob(os.path.join(d, "*.cuh")) + glob.glob(os.path.join(d, "*.cu")))


def cuda_available() -> tuple[bool, str]:
    """Whether backend='cuda' can run here, and if not, why."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install 'timemachine[cuda]'; [cuda13]: CUDA 13)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, or a driver/runtime mismatch
        return False, f"CuPy cannot reach a GPU ({type(exc).__name__}: {exc})"
    if count == 0:
        return False, "no CUDA GPU is visible"
    return True, ""


def require_cuda() -> None:
    """Raise InputError saying why backend='cuda' cannot run here, if it cannot."""
    ok, why = cuda_available()
    if not ok:
        raise InputError(
            f"backend='cuda' is not available yet in this environment: {why}; "
            f"use backend='jax', which runs on CPU and, through XLA, on GPUs"
        )


BACKENDS = ("jax", "cuda")


def check_backend(backend) -> None:
    """InputError unless ``backend`` is "jax", or "cuda" on a machine that can run it (the
    error then says why it cannot: no CuPy, no GPU)."""
    if backend == "jax":
        return
    if backend == "cuda":
        require_cuda()
        return
    raise InputError(f"unknown backend {backend!r}; the backends are 'jax' and 'cuda'")


__all__ = [
    "BACKENDS",
    "check_backend",
    "cuda_available",
    "kernel_dir",
    "kernel_sources",
    "require_cuda",
]
