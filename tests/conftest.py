import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

# JAX's persistent compilation cache, one fresh folder per pytest session: shared by the
# xdist workers and, through the environment, by every subprocess a test starts (the
# kill/resume workers, the command-line jobs, Dask workers), which otherwise compile the
# same programs again each time. Every program is cached, however small or quick to
# compile. A cached executable is the code XLA compiled for the same HLO, options and
# XLA_FLAGS (the cache key); FFI custom calls in it are looked up by name in the process
# that loads it, so a library rebuilt with other flags (the sanitizer builds) is the one
# that runs. The key holds nothing of the CPUs a process may use, so the tests whose point
# is that a process with another thread count (its own compile, under its own affinity)
# gives the same bits run those subprocesses with ``fresh_compile_env``.
CACHE_OWNER = "TIMEMACHINE_TEST_JAX_CACHE"  # the session's cache folder, set by the controller
CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        os.environ[CACHE_OWNER] = tempfile.mkdtemp(prefix="tm-jax-cache-")
        config._tm_jax_cache = os.environ[CACHE_OWNER]
    folder = os.environ.get(CACHE_OWNER)
    if not folder:  # an xdist worker started by something other than this conftest
        return
    os.environ.update(CACHE_ENV, JAX_COMPILATION_CACHE_DIR=folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    folder = getattr(config, "_tm_jax_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def fresh_compile_env(env):
    """``env`` for a subprocess that must compile every program itself: without the
    session's persistent compilation cache."""
    env = dict(env)
    for name in ("JAX_COMPILATION_CACHE_DIR", CACHE_OWNER, *CACHE_ENV):
        env.pop(name, None)
    return env


def rel(a, b):
    """max |a - b| / max |b| (1 where b is all zero): the worst element, relative."""
    a, b = np.asarray(a), np.asarray(b)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / (scale if scale > 0 else 1.0))


def rel_err(a, b):
    """‖a - b‖ / ‖b‖ over all elements (Frobenius norms)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


VILLIN_PDB = os.path.join(
    os.path.dirname(__import__("openmm.app").app.__file__), "data", "test.pdb"
)


def pytest_collection_modifyitems(config, items):
    try:
        import cupy

        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def trialanine():
    """(topology, positions nm) of zwitterionic Ala-Ala-Ala, 33 atoms, built by PeptideBuilder."""
    import timemachine as tm

    return tm.build_peptide("AAA")


@pytest.fixture(scope="session")
def villin():
    """(topology, positions nm) of the villin headpiece in OpenMM's test.pdb, solvent removed."""
    import openmm.app as app

    import timemachine as tm

    pdb = app.PDBFile(VILLIN_PDB)
    top, x = tm.strip_solvent(pdb.topology, pdb.positions)
    assert np.isfinite(x).all()
    return top, x


SANITIZER_FLAGS = (
    "-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
)


@pytest.fixture()
def sanitizer_env(tmp_path):
    """Environment for a subprocess that loads libraries built with SANITIZER_FLAGS: g++'s
    ASan runtime (and libstdc++, for its interceptors) preloaded, leak checks off, and a
    fresh build cache. Skips where g++ lacks the runtimes."""
    import shutil
    import subprocess

    if shutil.which("g++") is None:
        pytest.skip("the sanitizer runtimes are g++'s, and there is no g++")
    runtimes = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run(
            ["g++", f"-print-file-name={name}"], capture_output=True, text=True
        ).stdout.strip()
        if not os.path.isabs(path):
            pytest.skip(f"g++ has no {name}")
        runtimes.append(path)
    return dict(
        os.environ,
        LD_PRELOAD=" ".join(runtimes),
        ASAN_OPTIONS="detect_leaks=0",
        TIMEMACHINE_CACHE=str(tmp_path / "cache"),
    )


@pytest.fixture()
def host_cuda_backend():
    """backend="cuda" (simulate, run_replicas, fit, cuda_bench) running the host build of
    the kernels instead of CuPy, on the CPU."""
    from backends import host_build_as_cuda

    with host_build_as_cuda():
        yield
