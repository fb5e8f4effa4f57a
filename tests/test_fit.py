"""The fitting loop on a small torsional chain: recovery, exact resume, diagnoses, plots."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import InputError, SimulationError
from timemachine.fitting import Dihedral, ObservableFunction, RadiusOfGyration, make_target
from timemachine.fitting.loss import observable_samples, target_vector
from timemachine.fitting.plots import plot_fit
from timemachine.fitting.replicas import run_replicas
from timemachine.system import HarmonicAngles, HarmonicBonds, PeriodicTorsions, System


def _chain():
    """Five united atoms in a chain: bonds, angles and two typed torsions (k1, k3)."""
    names = ["bond/C-C/length", "bond/C-C/k", "angle/C-C-C/theta0", "angle/C-C-C/k"]
    names += ["torsion/C-C-C-C/phase1", "torsion/C-C-C-C/k1"]
    names += ["torsion/C-C-C-C/phase3", "torsion/C-C-C-C/k3"]
    params = [0.15, 2.0e5, 1.9, 400.0, 0.0, 3.0, 0.0, 6.0]
    bonds = HarmonicBonds(
        np.array([[0, 1], [1, 2], [2, 3], [3, 4]]), np.zeros(4, int), np.ones(4, int)
    )
    angles = HarmonicAngles(
        np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4]]), np.full(3, 2), np.full(3, 3)
    )
    quads = np.array([[0, 1, 2, 3], [1, 2, 3, 4]] * 2)
    torsions = PeriodicTorsions(
        quads,
        np.array([1.0, 1.0, 3.0, 3.0]),
        np.array([4, 4, 6, 6]),
        np.array([5, 5, 7, 7]),
    )
    system = System(np.full(5, 14.0), [bonds, angles, torsions], names, params)
    x0 = np.array(
        [[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.14, 0.0], [0.35, 0.15, 0.02], [0.4, 0.28, 0.1]]
    )
    return system, x0


@pytest.fixture(scope="module")
def problem():
    system, x0 = _chain()
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=10.0, dt=0.002, seed=5)
    # one barrier: a single identifiable direction (two barriers of one dihedral trade off
    # along a valley of the short-run loss)
    wrt = system.select("torsion/*/k3")
    dihedral = Dihedral([[0, 1, 2, 3], [1, 2, 3, 4]])
    # cos φ, not φ: an average of angles near ±π would jump across the branch cut
    cos_dihedral = ObservableFunction(lambda x: jnp.cos(dihedral(x)), ["cos phi1", "cos phi2"])
    observables = [cos_dihedral, RadiusOfGyration()]
    tv = target_vector([make_target(o, np.zeros(len(o.labels)), 1.0) for o in observables])
    settings = dict(n_replicas=8, n_steps=100, estimator="pathwise")
    ref = run_replicas(system, x0, integrator, settings["n_steps"], wrt=wrt, n_replicas=8)
    values = observable_samples(tv.observable, ref.x, ref.dx_dtheta).mean
    targets = [
        make_target(observables[0], values[:2], 0.05, name="cos_dihedral"),
        make_target(observables[1], values[2:], 0.002, name="Rg"),
    ]
    start = np.array(system.params)
    start[wrt] *= 1.3
    return system, x0, integrator, targets, wrt, start, settings


def test_fit_recovers_torsion_barriers_with_common_random_numbers(problem, tmp_path):
    system, x0, integrator, targets, wrt, start, settings = problem
    result = tm.fit(
        system,
        x0,
        integrator,
        targets,
        wrt,
        params=start,
        epochs=40,
        learning_rate=0.05,
        fresh_noise=False,
        progress=False,
        **settings,
    )
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.1 * losses[0]
    np.testing.assert_allclose(result.theta, system.params[wrt], rtol=0.1)
    paths = plot_fit(result, tmp_path, reference_params=system.params[wrt])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["loss.png", "observables.png", "parameters.png"]
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 5_000 for p in paths)


@pytest.mark.slow
def test_fit_recovers_torsion_barriers_with_fresh_noise_every_epoch(problem):
    """The same recovery with new noise and velocities every epoch: the loss is no longer a
    deterministic function of θ, so the targets come from many replicas (their own noise
    small) and the fitted barrier is the mean over the last epochs."""
    system, x0, integrator, _, wrt, start, settings = problem
    dihedral = Dihedral([[0, 1, 2, 3], [1, 2, 3, 4]])
    cos_dihedral = ObservableFunction(lambda x: jnp.cos(dihedral(x)), ["cos phi1", "cos phi2"])
    tv = target_vector([make_target(cos_dihedral, np.zeros(2), 1.0)])
    ref = run_replicas(
        system, x0, integrator, settings["n_steps"], wrt=wrt, n_replicas=256, first_replica=10**6
    )
    values = observable_samples(tv.observable, ref.x, ref.dx_dtheta).mean
    targets = [make_target(cos_dihedral, values, 0.05, name="cos_dihedral")]
    result = tm.fit(
        system,
        x0,
        integrator,
        targets,
        wrt,
        params=start,
        epochs=30,
        learning_rate=0.05,
        fresh_noise=True,
        progress=False,
        # fresh noise makes each epoch's gradient noisy (the pathwise gradient of 64
        # replicas at the start has the wrong sign): 256 replicas give a usable one
        **dict(settings, n_replicas=256),
    )
    late = np.mean([r["params"] for r in result.history[-15:]], axis=0)
    first = abs(start[wrt] / system.params[wrt] - 1)
    np.testing.assert_allclose(late, system.params[wrt], rtol=0.1)
    assert np.all(abs(late / system.params[wrt] - 1) < 0.5 * first)


def _strip(history):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in history]


def test_killed_fit_resumes_exactly(problem, tmp_path):
    system, x0, integrator, targets, wrt, start, settings = problem
    common = dict(
        params=start,
        learning_rate=0.05,
        time_samples=6,
        save_every=20,
        ergodicity_weight=0.5,
        prior_sigma=1.0,
        progress=False,
        **settings,
    )
    straight = tm.fit(
        system, x0, integrator, targets, wrt, epochs=4, out_dir=tmp_path / "a", **common
    )
    tm.fit(system, x0, integrator, targets, wrt, epochs=2, out_dir=tmp_path / "b", **common)
    resumed = tm.fit(
        system,
        x0,
        integrator,
        targets,
        wrt,
        epochs=4,
        out_dir=tmp_path / "b",
        resume=True,
        **common,
    )
    assert len(resumed.history) == 4
    assert _strip(resumed.history) == _strip(straight.history)
    np.testing.assert_array_equal(resumed.params, straight.params)
    saved = json.loads((tmp_path / "b" / "history.json").read_text())
    assert _strip(saved["epochs"]) == _strip(straight.history)
    assert saved["theta_final"] == straight.theta.tolist()
    # killed after the last checkpoint, before history.json: the finished fit, resumed,
    # runs no epoch and writes the whole history again
    path = tmp_path / "a" / "history.json"
    whole = path.read_text()
    path.write_text(json.dumps({"epochs": json.loads(whole)["epochs"][:1]}))
    again = tm.fit(
        system, x0, integrator, targets, wrt, epochs=4, out_dir=tmp_path / "a", resume=True,
        **common,
    )  # fmt: skip
    np.testing.assert_array_equal(again.params, straight.params)
    assert json.loads(path.read_text()) == json.loads(whole)
    # a checkpoint from other settings is refused, not silently mixed in
    with pytest.raises(InputError, match=r"other settings.*n_steps 100 != 120"):
        tm.fit(
            system,
            x0,
            integrator,
            targets,
            wrt,
            epochs=5,
            out_dir=tmp_path / "b",
            resume=True,
            **dict(common, learning_rate=0.05, n_steps=120),
        )


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (fit has no except/finally that writes)."""


def test_fit_killed_mid_epoch_loses_only_that_epoch(problem, tmp_path, monkeypatch):
    """Kill inside epoch 2's dynamics and again inside epoch 3's checkpoint write; resuming
    gives the uninterrupted fit's history and parameters bit for bit."""
    import timemachine.fitting.train as train

    system, x0, integrator, targets, wrt, start, settings = problem
    common = dict(params=start, learning_rate=0.05, progress=False, epochs=4, **settings)
    straight = tm.fit(system, x0, integrator, targets, wrt, out_dir=tmp_path / "a", **common)
    out = tmp_path / "b"
    import timemachine.checkpoints as checkpoints

    real_run, real_commit = train.run_replicas, checkpoints.commit
    calls = {"run": 0}

    def dying_run(*args, **kwargs):
        calls["run"] += 1
        if calls["run"] == 3:  # epoch 2, mid-simulation: epochs 0 and 1 are checkpointed
            raise _Killed
        return real_run(*args, **kwargs)

    monkeypatch.setattr(train, "run_replicas", dying_run)
    with pytest.raises(_Killed):
        tm.fit(system, x0, integrator, targets, wrt, out_dir=out, **common)
    assert train.load_checkpoint(out)["epoch"] == 2
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 2

    def dying_commit(tmp, path):
        # killed inside epoch 2's checkpoint write: the new npz is in place, its checksum
        # record is not
        if str(path).endswith("checkpoint.json"):
            raise _Killed
        return real_commit(tmp, path)

    monkeypatch.setattr(train, "run_replicas", real_run)
    monkeypatch.setattr(checkpoints, "commit", dying_commit)
    with pytest.raises(_Killed):
        tm.fit(system, x0, integrator, targets, wrt, out_dir=out, resume=True, **common)
    with pytest.warns(tm.CheckpointFallbackWarning, match="checkpoint.prev.npz"):
        assert train.load_checkpoint(out)["epoch"] == 2  # the torn write is not trusted
    monkeypatch.setattr(checkpoints, "commit", real_commit)
    ran = []
    monkeypatch.setattr(train, "run_replicas", lambda *a, **k: ran.append(1) or real_run(*a, **k))
    with pytest.warns(tm.CheckpointFallbackWarning):
        resumed = tm.fit(system, x0, integrator, targets, wrt, out_dir=out, resume=True, **common)
    assert len(ran) == 2  # only epochs 2 and 3 were simulated again
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    assert _strip(resumed.history) == _strip(straight.history)
    np.testing.assert_array_equal(resumed.params, straight.params)
    # the parameters moved: the comparison is not between two unchanged fits
    assert np.all(np.abs(resumed.theta / start[wrt] - 1) > 0.05)


def test_exploding_gradient_stops_with_a_diagnosis(problem):
    system, x0, integrator, targets, wrt, start, settings = problem
    with pytest.raises(SimulationError, match=r"epoch 0: .*exploding.*dx/dθ"):
        tm.fit(
            system,
            x0,
            integrator,
            targets,
            wrt,
            params=start,
            epochs=2,
            max_gradient_norm=1e-9,
            progress=False,
            **settings,
        )
    hot = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.2, seed=0)
    with pytest.raises(SimulationError, match="epoch 0"):
        tm.fit(system, x0, hot, targets, wrt, epochs=1, progress=False, **settings)
