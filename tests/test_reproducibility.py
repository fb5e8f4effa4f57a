"""Reproducibility (issue 18, part 5): the same seed and inputs give the same bits, on
trialanine in OBC2 implicit solvent on the JAX CPU backend, whatever

(a) the run: twice in one process, and once in a fresh process;
(b) the chunking: ``chunk_steps`` of one block, three blocks and the whole run, frames
    streamed to ``out_dir`` or kept in memory, for method "exact" and "window";
(c) the threads: XLA's intra-op pool sized by the CPU affinity (one CPU: one thread,
    against one per core, and two where there are more than two),
    ``--xla_cpu_multi_thread_eigen=false`` (single-threaded Eigen dots), and
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` (which XLA does
    not read: checked here, so that nobody relies on them); with the CPU custom call of ζ
    on, and (slow) off;
(d) the fitting layer: ``run_replicas``, one epoch of ``tm.fit`` (pathwise) and of
    ``fit_equilibrium`` (fluctuation) give the same gradients twice.

What the knobs do, measured with jax 0.10 (``_worker_threads``): XLA's CPU client sizes its
intra-op pool (threads named ``tf_XLAEigen``) from the process's CPU affinity, so the
affinity (``taskset``, ``os.sched_setaffinity``) is the knob that changes the thread count;
the CPU custom call shares its chunks of 8 tangents among that pool (each chunk summed in
one fixed order). ``intra_op_parallelism_threads=1`` in ``XLA_FLAGS``, which old JAX issues
suggest, is silently ignored (the pool keeps one thread per CPU), and the BLAS/OpenMP
variables do not touch XLA.

The workers are subprocesses of this file (``python tests/test_reproducibility.py OUT``,
pinned to the CPUs in ``$TM_REPRO_CPUS`` if set): each builds and minimises the structure
itself (the minimised x0 is compared too), runs the exact run of ``_runs``
and saves every array with the threads it saw and whether ζ ran in the CPU custom call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import fresh_compile_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_STEPS, SAVE_EVERY, SEED = 200, 10, 11
AFFINITY = "TM_REPRO_CPUS"  # the CPUs a worker pins itself to, "0,1"
WRT = "torsion/*/k*"  # 18 parameters: three chunks of 8 tangents in the CPU custom call


def _system():
    import timemachine as tm

    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x), implicit_solvent="obc2")
    return tm, top, system, np.asarray(tm.minimize_system(system, x))


def _integrator(tm):
    return tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=SEED)


def _arrays(traj, prefix=""):
    """Every array of a ``SensitivityTrajectory``, its final state included."""
    s = traj.final_state
    out = dict(
        x=traj.x, v=traj.v, dx_dtheta=traj.dx_dtheta, steps=traj.steps,
        potential_energy=traj.potential_energy, kinetic_energy=traj.kinetic_energy,
        temperature=traj.temperature, final_x=s.x, final_v=s.v, final_dx=s.dx_dtheta,
        final_dv=s.dv_dtheta,
    )  # fmt: skip
    return {prefix + k: np.asarray(v) for k, v in out.items()}


def _runs(tm, system, x0, methods=("exact", "window"), **kwargs):
    """The exact and the window run the checks compare, as one dict of arrays."""
    integrator = _integrator(tm)
    out = {}
    for method in methods:
        traj = tm.simulate(
            system, x0, integrator, N_STEPS, wrt=WRT, save_every=SAVE_EVERY, method=method,
            progress=False, **kwargs,
        )  # fmt: skip
        out.update(_arrays(traj, method + "_"))
    return out


def _assert_same(got, ref, what):
    assert sorted(got) == sorted(ref), what
    differ = [k for k in ref if not np.array_equal(got[k], ref[k])]
    assert not differ, f"{what}: {differ} differ in their bits"


def _worker_threads():
    """(CPUs in the affinity mask, threads of XLA's intra-op pool, how many of those threads
    did any work: at least one clock tick of CPU time) of this process."""
    pool = worked = 0
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as fh:
                name = fh.read().strip()
            with open(f"/proc/self/task/{t}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if name == "tf_XLAEigen":
            pool += 1
            worked += int(fields[11]) + int(fields[12]) > 0  # utime + stime, in ticks
    return len(os.sched_getaffinity(0)), pool, worked


def worker(out):
    tm, _, system, x0 = _system()
    from timemachine.backends import xla_cpu

    arrays = _runs(tm, system, x0, methods=("exact",))  # (window: test (b), in-process)
    cpus, pool, worked = _worker_threads()
    host = xla_cpu.available()[0]  # whether ζ ran in the CPU custom call
    np.savez(out, x0=x0, cpus=cpus, pool=pool, worked=worked, host=host, **arrays)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup():
    return _system()


@pytest.fixture(scope="module")
def reference(setup):
    tm, _, system, x0 = setup
    return _runs(tm, system, x0)


def _env(extra=None, host_kernels=True):
    # each worker compiles its programs itself, under its own affinity and flags, as a
    # fresh process would: not from the session's compilation cache (conftest.py)
    env = fresh_compile_env(dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    for name in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(name, None)
    env["TIMEMACHINE_HOST_KERNELS"] = "1" if host_kernels else "0"
    env.update(extra or {})
    return env


def _workers(tmp_path, variants):
    """Run the workers of ``{name: env}``, two at a time; {name: arrays}."""
    results, names = {}, list(variants)
    for i in range(0, len(names), 2):
        procs = {}
        for name in names[i : i + 2]:
            out = tmp_path / f"{name}.npz"
            cmd = [sys.executable, os.path.abspath(__file__), str(out)]
            proc = subprocess.Popen(cmd, env=variants[name], cwd=ROOT, stderr=subprocess.PIPE)
            procs[name] = (out, proc)
        for name, (out, proc) in procs.items():
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"worker {name} failed:\n{err.decode()[-4000:]}"
            with np.load(out) as z:
                results[name] = {k: z[k] for k in z.files}
    return results


def _thread_variants(host_kernels=True, only_affinity=False):
    """The thread settings, each one knob away from the default (``only_affinity``: the
    default and the pinned ones, the knob that changes XLA's pool)."""
    eigen = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
    blas = dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), "1")
    variants = {
        "default": _env(host_kernels=host_kernels),
        "eigen-single-threaded": _env(eigen, host_kernels),
        "blas-openmp-one-thread": _env(blas, host_kernels),
    }
    if only_affinity:
        variants = {"default": variants["default"]}
    cpus = sorted(os.sched_getaffinity(0))
    for name, n in (("one-core", 1), ("two-cores", 2)):
        if len(cpus) > n:  # the worker pins itself to these CPUs before JAX starts
            variants[name] = _env({AFFINITY: ",".join(map(str, cpus[:n]))}, host_kernels)
    return variants


INFO = ("cpus", "pool", "worked", "host")  # what a worker saw, beside its arrays


def _check_threads(results, host_kernels=True):
    from timemachine.backends.host import host_compiler

    summary = {n: {k: int(r[k]) for k in INFO} for n, r in results.items()}
    print(json.dumps(summary))
    host = host_kernels and host_compiler() is not None
    assert all(s["host"] == host for s in summary.values()), f"CPU custom call not {host}"
    ref = summary["default"]
    assert ref["pool"] == ref["cpus"], "XLA's intra-op pool is no longer sized by the affinity"
    if ref["cpus"] > 1:  # the default really splits the work among threads
        assert ref["worked"] >= 2, "only one thread of XLA's pool did any work"
    for name, n in (("one-core", 1), ("two-cores", 2)):
        if name in summary:
            assert (summary[name]["cpus"], summary[name]["pool"]) == (n, n), name
    strip = {k: v for k, v in results["default"].items() if k not in INFO}
    for name, got in results.items():
        _assert_same({k: v for k, v in got.items() if k not in INFO}, strip, name)


# --------------------------------------------------------------------------- (a), (c)


def test_runs_and_thread_counts_give_the_same_bits(setup, reference, tmp_path):
    """(a) a second run in this process, and fresh processes; (c) with one thread against
    one per core, single-threaded Eigen, and the BLAS/OpenMP thread variables."""
    tm, _, system, x0 = setup
    _assert_same(_runs(tm, system, x0), reference, "a second run in one process")
    # the arrays compared are live: another seed moves every one of them
    other = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=SEED + 1)
    traj = tm.simulate(system, x0, other, N_STEPS, wrt=WRT, save_every=SAVE_EVERY,
                       progress=False)  # fmt: skip
    for k, v in _arrays(traj).items():
        if k != "steps":
            assert not np.array_equal(v, reference["exact_" + k]), f"{k} ignores the seed"
    results = _workers(tmp_path, _thread_variants())
    assert np.array_equal(results["default"]["x0"], x0), "the minimised x0 differs"
    ref_proc = {k: v for k, v in results["default"].items() if k not in ("x0", *INFO)}
    exact = {k: v for k, v in reference.items() if k.startswith("exact_")}
    _assert_same(ref_proc, exact, "a fresh process")
    _check_threads(results)


@pytest.mark.slow
def test_the_pure_jax_zeta_does_not_depend_on_the_thread_count(tmp_path):
    """(c) the same with the CPU custom call off (``TIMEMACHINE_HOST_KERNELS=0``): the
    structured ζ's dense products run in XLA's own dots; one thread against one per core
    (the Eigen and BLAS knobs, which do not change the pool, are checked above)."""
    variants = _thread_variants(host_kernels=False, only_affinity=True)
    _check_threads(_workers(tmp_path, variants), host_kernels=False)


# --------------------------------------------------------------------------- (b)


@pytest.mark.parametrize("method", ["exact", "window"])
def test_chunkings_and_streaming_give_the_same_bits(setup, reference, method, tmp_path):
    tm, _, system, x0 = setup
    integrator = _integrator(tm)
    ref = {k[len(method) + 1 :]: v for k, v in reference.items() if k.startswith(method + "_")}
    for chunk in (SAVE_EVERY, 3 * SAVE_EVERY, N_STEPS):
        for out_dir in (None, tmp_path / f"{method}-{chunk}"):
            traj = tm.simulate(
                system, x0, integrator, N_STEPS, wrt=WRT, save_every=SAVE_EVERY,
                method=method, chunk_steps=chunk, out_dir=out_dir, progress=False,
            )  # fmt: skip
            how = "streamed" if out_dir else "in memory"
            _assert_same(_arrays(traj), ref, f"{method}, chunk_steps={chunk}, {how}")


# --------------------------------------------------------------------------- (d)


def test_the_fitting_layer_gives_the_same_gradients_twice(setup):
    tm, top, system, x0 = setup
    from timemachine.fitting import JCoupling3HNHA, make_target, run_replicas
    from timemachine.fitting.equilibrium import fit_equilibrium

    integrator = _integrator(tm)

    def replicas():
        r = run_replicas(system, x0, integrator, 100, wrt=WRT, n_replicas=3, save_every=20)
        return {k: np.asarray(getattr(r, k)) for k in ("x", "v", "dx_dtheta",
                "potential_energy", "frames_x", "frames_dx_dtheta")}  # fmt: skip

    _assert_same(replicas(), replicas(), "run_replicas")

    targets = [make_target(JCoupling3HNHA(top), [5.68, 6.52], 0.36, name="3J(HN,HA)")]
    wrt = "torsion/C-N-CT-C/k*"

    def history(r):
        # every number an epoch records, its wall time aside
        keep = [{k: v for k, v in e.items() if k != "wall_s"} for e in r.history]
        # (json writes a float's shortest round-trip repr: equal strings, equal bits)
        text = json.dumps(keep, sort_keys=True, default=lambda o: np.asarray(o).tolist())
        return {"history": np.array(text), "theta": np.asarray(r.theta),
                "params": np.asarray(r.params),
                "gradient": np.array([e["gradient"] for e in r.history])}  # fmt: skip

    def pathwise():
        return history(tm.fit(
            system, x0, integrator, targets, wrt, estimator="pathwise", epochs=1,
            n_replicas=2, n_steps=50, learning_rate=0.05, progress=False,
        ))  # fmt: skip

    first = pathwise()
    assert first["gradient"].ndim == 2 and np.abs(first["gradient"]).max() > 0
    _assert_same(pathwise(), first, "tm.fit (pathwise)")

    def equilibrium():
        return history(fit_equilibrium(
            system, x0, integrator, targets, wrt, epochs=1, n_chains=2, sample_steps=400,
            decorrelation_steps=100, save_every=20, blocks=5, min_ess=1.0, progress=False,
        ))  # fmt: skip

    first = equilibrium()
    assert first["gradient"].ndim == 2 and np.abs(first["gradient"]).max() > 0
    _assert_same(equilibrium(), first, "fit_equilibrium")


if __name__ == "__main__":
    if os.environ.get(AFFINITY):
        os.sched_setaffinity(0, {int(c) for c in os.environ[AFFINITY].split(",")})
    worker(sys.argv[1])
