"""Replicas on Dask and over JAX devices (issue 19): the same numbers in-process, on a
2-worker local cluster (``dask.distributed.LocalCluster``) and sharded over 2 devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, in a subprocess); a worker killed
in the middle of a run has its tasks re-run, and nothing is lost or counted twice. The
same for the equilibrium fit's epochs: its chains (and the hybrid estimator's replicas)
as tasks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import InputError
from timemachine.fitting import run_replicas
from timemachine.fitting.executor import Executor, open_executor
from timemachine.fitting.sampling import EquilibriumChains

pytest.importorskip("distributed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRT = "torsion/*/k*"
FIELDS = ("x", "v", "dx_dtheta", "potential_energy", "frames_x", "frames_dx_dtheta")


def _problem():
    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x))
    x = np.asarray(tm.minimize_system(system, x))
    return top, system, x, tm.LangevinIntegrator(300.0, 1.0, 0.002, seed=5)


@pytest.fixture(scope="module")
def problem():
    return _problem()


def _run(problem, n_steps=60, **kw):
    _, system, x, integ = problem
    return run_replicas(system, x, integ, n_steps, wrt=WRT, n_replicas=4, save_every=20, **kw)


@pytest.fixture(scope="module")
def in_process(problem):
    return _run(problem)


def _epoch(problem, **kw):
    """One pathwise fit epoch (4 replicas × 60 steps, the 3J(HN,HA) couplings): (loss,
    gradient, θ after the step)."""
    from timemachine.fitting import JCoupling3HNHA, make_target

    top, system, x, integ = problem
    targets = [make_target(JCoupling3HNHA(top), [5.68, 6.52], 0.36, name="3J(HN,HA)")]
    r = tm.fit(system, x, integ, targets, "torsion/C-N-CT-C/k*", estimator="pathwise",
               epochs=1, n_replicas=4, n_steps=60, progress=False, **kw)  # fmt: skip
    rec = r.history[0]
    return np.array([rec["loss"]]), np.asarray(rec["gradient"]), np.asarray(r.params)


@pytest.fixture(scope="module")
def epoch_in_process(problem):
    return _epoch(problem)


def _equilibrium_epochs(problem, estimator, **kw):
    """Two equilibrium fit epochs (2 chains × 400 steps each, both sampled; the hybrid
    estimator's 4 replicas × 20 steps): (loss, gradient, θ) of the last."""
    from timemachine.fitting import JCoupling3HNHA, make_target

    top, system, x, integ = problem
    targets = [make_target(JCoupling3HNHA(top), [5.68, 6.52], 0.36, name="3J(HN,HA)")]
    r = tm.fit(system, x, integ, targets, "torsion/C-N-CT-C/k*", estimator=estimator,
               epochs=2, n_chains=2, sample_steps=400, decorrelation_steps=100,
               save_every=20, blocks=4, min_ess=1.0, reservoir_size=40,
               reweight_threshold=2.0, n_replicas=4, horizon=20, progress=False,
               **kw)  # fmt: skip
    assert all(rec["sampled"] for rec in r.history)  # the chains ran in both epochs
    rec = r.history[-1]
    return np.array([rec["loss"]]), np.asarray(rec["gradient"]), np.asarray(r.params)


def _two_systems(problem):
    from timemachine.fitting import FitSystem, JCoupling3HNHA, make_target

    top, system, x, _ = problem
    top4, x4 = tm.build_peptide("AAAA")
    system4, x4 = tm.load_system((top4, x4))
    x4 = np.asarray(tm.minimize_system(system4, x4))
    return [
        FitSystem(system, x, [make_target(JCoupling3HNHA(top), [5.68, 6.52], 0.36)], "AAA"),
        FitSystem(system4, x4, [make_target(JCoupling3HNHA(top4), [5.9, 6.1, 6.6], 0.36)]),
    ]


def _two_system_epoch(two, **kw):
    r = tm.fit(two, None, tm.LangevinIntegrator(300.0, 1.0, 0.002, seed=5), None,
               "torsion/C-N-CT-C/k*", epochs=1, n_chains=2, sample_steps=400,
               decorrelation_steps=100, save_every=20, blocks=4, min_ess=1.0,
               reservoir_size=40, progress=False, **kw)  # fmt: skip
    rec = r.history[-1]
    return np.array([rec["loss"]]), np.asarray(rec["gradient"]), np.asarray(r.theta)


@pytest.fixture(scope="module")
def equilibrium_in_process(problem):
    return {e: _equilibrium_epochs(problem, e) for e in ("fluctuation", "hybrid")}


def _assert_epoch(got, ref, what):
    for name, a, b in zip(("loss", "gradient", "params"), got, ref, strict=True):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= 1e-12, f"{what}: the epoch's {name} differs by {err:.2g}"


def _assert_close(got, ref, what, tol=1e-12):
    np.testing.assert_array_equal(got.replicas, ref.replicas)
    for name in FIELDS:
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))
        assert a.shape == b.shape, (what, name)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= tol, f"{what}: {name} differs by {err:.2g}"


def _rel_scale_check(ref):
    # the fields compared are live: they are not all zeros
    assert all(np.abs(np.asarray(getattr(ref, f))).max() > 0 for f in FIELDS)


@pytest.fixture(scope="module")
def cluster():
    """A 2-worker local cluster shared by the tests that do not kill its workers."""
    with open_executor("dask", n_workers=2) as ex:
        yield ex


def test_a_local_cluster_gives_the_in_process_replicas_and_epochs(
    problem, in_process, epoch_in_process, equilibrium_in_process, cluster
):
    _rel_scale_check(in_process)
    got = _run(problem, executor="dask", n_workers=2, replicas_per_task=1)  # started, stopped
    _assert_close(got, in_process, "2-worker local cluster")
    ex = cluster
    # three replicas a task: the same rows, in replica order
    _assert_close(_run(problem, executor=ex, replicas_per_task=3), in_process, "3 a task")
    # a fit's epoch: the same loss, gradient and step
    _assert_epoch(_epoch(problem, executor=ex), epoch_in_process, "2-worker cluster")
    # the equilibrium fit: its chains (one a task) and the hybrid replicas on Dask
    for estimator, ref in equilibrium_in_process.items():
        got = _equilibrium_epochs(problem, estimator, executor=ex)
        _assert_epoch(got, ref, f"{estimator} epochs on a 2-worker cluster")
    # two systems in one fit (their chains at once, from threads): the same epoch
    two = _two_systems(problem)
    _assert_epoch(_two_system_epoch(two, executor=ex), _two_system_epoch(two),
                  "a two-system epoch on a 2-worker cluster")  # fmt: skip
    workers = ex.client.run(os.sched_getaffinity, 0)
    # each worker pinned to one CPU (XLA's pool sized by it), different ones on >1 CPU
    cpus = [sorted(c) for c in workers.values()]
    assert all(len(c) == 1 for c in cpus), cpus
    if len(os.sched_getaffinity(0)) > 1:
        assert cpus[0] != cpus[1], cpus


# trialanine in vacuum against the Graf 2007 couplings: one short epoch of 2 chains
FIT_TOML = """
[system]
sequence = "AAA"

[integrator]
dt = 0.002
seed = 5

[parameters]
wrt = ["torsion/C-N-CT-C/k*"]

[targets]
builtin = "graf2007"

[sampling]
chains = 2
sample_steps = 400
decorrelation_steps = 100
save_every = 20
min_ess = 1.0
reservoir_size = 40

[optimizer]
epochs = 1

[validation]
ns = 0.0
"""


def test_the_command_line_fit_on_an_existing_cluster_gives_the_in_process_fit(tmp_path, cluster):
    """``timemachine fit CONFIG --executor tcp://...``: the configured fit on the cluster's
    scheduler gives the in-process fit's χ², gradient and parameters."""
    import json

    from timemachine.cli import main

    path = tmp_path / "fit.toml"
    path.write_text(FIT_TOML)
    address = cluster.client.scheduler.address
    runs = {}
    for name, flags in (("in-process", []), ("cluster", ["--executor", address])):
        out = tmp_path / name
        assert main(["fit", str(path), "--out", str(out), "--quiet", *flags]) == 0
        summary = json.loads((out / "summary.json").read_text())
        (epoch,) = json.loads((out / "history.json").read_text())["epochs"]
        runs[name] = summary, epoch
    got, ref = runs["cluster"][0], runs["in-process"][0]
    assert ref["executor"] == "in-process" and got["executor"] == f"dask ({address})"
    assert np.any(np.asarray(runs["in-process"][1]["gradient"]) != 0)  # a live comparison
    parts = [
        [np.array([s["engine_chi2_per_n"]["before"]]), np.array(e["gradient"]),
         np.array(s["fitted"])]
        for s, e in (runs["cluster"], runs["in-process"])
    ]  # fmt: skip
    _assert_epoch(*parts, "timemachine fit --executor ADDRESS")


_SHARDED = """
import sys
import numpy as np
import jax
sys.path.insert(0, "tests")
from test_executor import _epoch, _equilibrium_epochs, _problem, _run, FIELDS
from timemachine.fitting.executor import device_sharding
problem = _problem()
assert len(jax.local_devices()) == 2, jax.local_devices()
assert device_sharding(3)[1] == 4  # rounded up to a multiple of the devices
r = _run(problem)
loss, gradient, params = _epoch(problem)
eq = {f"{e}_{k}": v for e in ("fluctuation", "hybrid")
      for k, v in zip(("loss", "gradient", "params"), _equilibrium_epochs(problem, e))}
np.savez(sys.argv[1], replicas=r.replicas, loss=loss, gradient=gradient, params=params,
         **eq, **{f: getattr(r, f) for f in FIELDS})
"""


def test_replicas_and_chains_sharded_over_two_devices_give_the_in_process_ones(
    tmp_path, in_process, epoch_in_process, equilibrium_in_process
):
    out = tmp_path / "sharded.npz"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _SHARDED, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    epoch = tuple(arrays.pop(k) for k in ("loss", "gradient", "params"))
    for estimator, ref in equilibrium_in_process.items():
        got = tuple(arrays.pop(f"{estimator}_{k}") for k in ("loss", "gradient", "params"))
        _assert_epoch(got, ref, f"{estimator} epochs, chains sharded over 2 devices")
    got = type(in_process)(**{**in_process._asdict(), **arrays})
    _assert_close(got, in_process, "sharded over 2 devices")
    _assert_epoch(epoch, epoch_in_process, "sharded over 2 devices")


def _kill_busy_workers(ex, work, n_victims=1):
    """Run ``work()`` in a thread, SIGKILL the processes of the first ``n_victims``
    workers seen busy with a task, and return what ``work`` returned (its exception
    re-raised here; a thread still running after 600 s fails with its stack)."""
    result, errors = {}, []

    def run():
        try:
            result["r"] = work()
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    # wait until the workers are busy with a task, then SIGKILL their processes
    deadline, victims = time.time() + 120, []
    while time.time() < deadline and len(victims) < n_victims:
        victims = [w for w, tasks in ex.client.processing().items() if tasks][:n_victims]
        time.sleep(0.05)
    assert len(victims) == n_victims, f"{n_victims} tasks never ran at once"
    time.sleep(0.5)  # inside the task: compiling or stepping
    pids = ex.client.run(os.getpid, workers=victims)
    for victim in victims:
        os.kill(pids[victim], signal.SIGKILL)
    thread.join(timeout=600)
    if thread.is_alive():
        stack = "".join(traceback.format_stack(sys._current_frames()[thread.ident]))
        pytest.fail(
            f"still running 600 s after the kill of {victims}; its stack:\n{stack}\n"
            f"processing: {ex.client.processing()}\nwho_has: {ex.client.who_has()}"
        )
    assert not errors, errors
    workers = ex.client.scheduler_info()["workers"]
    assert not set(victims) & set(workers), "a worker lived on"
    return result["r"]


def test_a_worker_killed_mid_run_has_its_tasks_rerun(problem, in_process, equilibrium_in_process):
    # a fresh cluster's workers compile on their first task: the kill lands in one
    with open_executor("dask", n_workers=2) as ex:
        got = _kill_busy_workers(ex, lambda: _run(problem, executor=ex))
    _assert_close(got, in_process, "after a worker was killed")
    assert got.replicas.tolist() == [0, 1, 2, 3]  # each once, in order
    # in the middle of an equilibrium epoch (chain tasks first, then hybrid replicas):
    # the fit completes with the uninterrupted numbers
    with open_executor("dask", n_workers=2) as ex:
        got = _kill_busy_workers(ex, lambda: _equilibrium_epochs(problem, "hybrid", executor=ex))
    _assert_epoch(got, equilibrium_in_process["hybrid"], "hybrid epochs after a worker was killed")


def test_tasks_whose_shared_data_died_with_every_worker_are_submitted_again():
    # both workers killed: the scattered shared value has no copy left, so Dask cancels
    # the tasks that need it ("lost dependencies"); map scatters it again and resubmits
    def slow_add(item, shared):  # pickled by value to the workers
        time.sleep(2.0)
        return item + shared

    with open_executor("dask", n_workers=2) as ex:
        got = _kill_busy_workers(ex, lambda: ex.map(slow_add, range(4), 10), n_victims=2)
    assert got == [10, 11, 12, 13]


def test_a_bad_executor_is_named(problem):
    with pytest.raises(InputError, match=r"executor must be one of .*got 'dusk'"):
        _run(problem, executor="dusk")
    with pytest.raises(InputError, match=r"n_workers must be an int >= 1, got 0"):
        Executor("dask", n_workers=0)
    with pytest.raises(InputError, match=r"replicas_per_task must be"):
        _run(problem, executor="dask", replicas_per_task=0)
    # the equilibrium fit names a bad executor before any chain runs
    top, system, x, integ = problem
    targets = tm.fitting.graf2007_targets(system.topology)
    with pytest.raises(InputError, match=r"executor must be one of .*got 'dusk'"):
        tm.fit(system, x, integ, targets, "torsion/C-N-CT-C/k*", executor="dusk")
    with pytest.raises(InputError, match=r"executor must be an open .*Executor"):
        EquilibriumChains(system, x, integ, executor="dask")
    with pytest.raises(InputError, match=r"chains_per_task must be"):
        EquilibriumChains(system, x, integ, chains_per_task=0)
