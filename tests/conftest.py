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
SESSION_DIR = "TIMEMACHINE_TEST_SESSION_DIR"  # the session's folder, made by the controller
CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        os.environ[SESSION_DIR] = tempfile.mkdtemp(prefix="tm-test-session-")
        config._tm_session_dir = os.environ[SESSION_DIR]
    root = os.environ.get(SESSION_DIR)
    if not root:  # an xdist worker started by something other than this conftest
        return
    folder = os.path.join(root, "jax-cache")
    os.environ.update(CACHE_ENV, JAX_COMPILATION_CACHE_DIR=folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    root = getattr(config, "_tm_session_dir", None)
    if root:
        shutil.rmtree(root, ignore_errors=True)


def fresh_compile_env(env):
    """``env`` for a subprocess that must compile every program itself: without the
    session's persistent compilation cache."""
    env = dict(env)
    for name in ("JAX_COMPILATION_CACHE_DIR", *CACHE_ENV):
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


TIP3P_FILES = ("amber99sbildn.xml", "tip3p.xml")


def tip3p_box(edge):
    """(topology, positions (N, 3) nm) of a cubic box of TIP3P water ``edge`` nm across,
    from OpenMM's ``Modeller.addSolvent``."""
    import openmm as mm
    import openmm.app as app
    import openmm.unit as unit

    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField(*TIP3P_FILES), model="tip3p",
                        boxSize=mm.Vec3(edge, edge, edge) * unit.nanometer)  # fmt: skip
    x = np.asarray(modeller.positions.value_in_unit(unit.nanometer)).reshape(-1, 3)
    return modeller.topology, x


def trialanine_rf_box():
    """(System, x (N, 3) nm): trialanine in 227 flexible TIP3P waters (714 atoms) with
    reaction field and a switch at 0.8 nm, cutoff 0.9 nm, on a Verlet list (skin 0.08)."""
    import timemachine as tm

    top, x = tm.build_peptide("AAA")
    box = tm.solvate((top, x), padding=1.0, cutoff=0.9, constraints=None, rigid_water=False,
                     nonbonded_method="CutoffPeriodic")  # fmt: skip
    system, x = tm.load_system((box.topology, box.positions), forcefield=TIP3P_FILES,
                               nonbonded_method="CutoffPeriodic", cutoff=0.9,
                               switch_distance=0.8, neighbour_skin=0.08)  # fmt: skip
    return system, np.asarray(x)


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
    "-O1 -g1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
)


@pytest.fixture()
def sanitizer_env(tmp_path):
    """Environment for a subprocess that loads libraries built with SANITIZER_FLAGS: g++'s
    ASan runtime (and libstdc++, for its interceptors) preloaded, leak checks off, and a
    build cache of this session's own, not the user's (the sanitizer tests share it: each
    library is built once per session with the sanitizers, the key being its sources,
    compiler and flags). Skips where g++ lacks the runtimes."""
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
        TIMEMACHINE_CACHE=_session_path("sanitizer-builds", tmp_path),
    )


def _session_path(name, fallback):
    """``name`` in this session's folder (``fallback/name`` in a run without one)."""
    root = os.environ.get(SESSION_DIR) or str(fallback)
    return os.path.join(root, name)


@pytest.fixture()
def host_cuda_backend():
    """backend="cuda" (simulate, run_replicas, fit, cuda_bench) running the host build of
    the kernels instead of CuPy, on the CPU."""
    from backends import host_build_as_cuda

    with host_build_as_cuda():
        yield
