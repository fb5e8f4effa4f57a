"""Checkpoints you can trust (issue 18): SHA-256 records, the previous good checkpoint kept
and used when the last one is truncated, bit-flipped or hand-edited, and a checkpoint of
another run refused naming what differs, for every checkpoint the package writes: the
sensitivity trajectory's ``state.npz`` (with its chunks and ``meta.json``), the pathwise
fit's and the equilibrium fit's ``checkpoint.npz``."""

import json
import os
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
import timemachine.checkpoints as checkpoints
from timemachine.checkpoints import (
    check_settings,
    read_checkpoint,
    settings_differences,
    write_checkpoint,
)
from timemachine.errors import (
    CheckpointError,
    CheckpointFallbackWarning,
    CorruptCheckpointError,
    InputError,
    TimemachineError,
)
from timemachine.fitting import Dihedral, ObservableFunction, RadiusOfGyration, make_target
from timemachine.fitting.equilibrium import fit_equilibrium
from timemachine.sensitivity.frames import SensitivityTrajectory
from timemachine.system import HarmonicAngles, HarmonicBonds, PeriodicTorsions, System

FMT = "test.checkpoint"


def corrupt(path, how):
    """Damage ``path`` on disk: cut it in half, flip one bit in its middle, or edit it by
    hand (a JSON value changed, or an npz rewritten with one number changed: both still
    well-formed files)."""
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":
        data[len(data) // 2] ^= 0x10
    elif path.endswith(".json"):
        record = json.loads(data)
        meta = record.get("meta", record)
        key = next(k for k in ("epoch", "step", "save_every") if k in meta)
        meta[key] = meta[key] + 1
        data = json.dumps(record, indent=1).encode()
    else:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.array(z[k]) for k in z.files}
        key = sorted(k for k, a in arrays.items() if a.dtype.kind == "f" and a.size)[0]
        arrays[key].flat[0] += 1.0
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return
    with open(path, "wb") as fh:
        fh.write(bytes(data))


DAMAGE = [(f, h) for f in ("npz", "json") for h in ("truncate", "flip", "edit")]


# --------------------------------------------------------------------------- the module


def test_a_checkpoint_round_trips_with_checksums_and_keeps_the_previous(tmp_path):
    base = tmp_path / "ck"
    arrays = {"u": np.arange(3.0), "step": np.array(7, np.int64), "x": np.ones((2, 3))}
    write_checkpoint(base, arrays, {"epoch": 1}, FMT)
    write_checkpoint(base, dict(arrays, u=np.arange(3.0) + 1), {"epoch": 2}, FMT)
    names = sorted(os.listdir(tmp_path))
    assert names == ["ck.json", "ck.npz", "ck.prev.json", "ck.prev.npz"]
    record = json.loads((tmp_path / "ck.json").read_text())
    assert set(record["arrays"]) == {"u", "step", "x"} and len(record["npz"]["sha256"]) == 64
    assert record["arrays"]["step"]["shape"] == []  # a 0-d array stays 0-d
    checkpoints._KNOWN.clear()  # as a new process would read it
    got = read_checkpoint(base, FMT)
    assert got.meta == {"epoch": 2} and not got.previous and got.path == str(base) + ".npz"
    np.testing.assert_array_equal(got["u"], np.arange(3.0) + 1)
    assert got["step"].shape == () and got["step"].dtype == np.int64
    with pytest.raises(CheckpointError, match="not a 'other'"):
        read_checkpoint(base, "other")
    assert read_checkpoint(tmp_path / "none", FMT) is None
    with pytest.raises(CheckpointError, match="holds objects"):
        write_checkpoint(base, {"o": np.array([{}], dtype=object)}, {}, FMT)


@pytest.mark.parametrize("which,how", DAMAGE)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, which, how):
    base = tmp_path / "ck"
    write_checkpoint(base, {"u": np.zeros(4)}, {"epoch": 1}, FMT)
    write_checkpoint(base, {"u": np.ones(4)}, {"epoch": 2}, FMT)
    checkpoints._KNOWN.clear()
    corrupt(str(base) + f".{which}", how)
    with pytest.warns(CheckpointFallbackWarning) as caught:
        got = read_checkpoint(base, FMT)
    message = str(caught[0].message)
    assert f"{base}.npz" in message and f"{base}.prev.npz" in message
    assert got.previous and got.meta == {"epoch": 1}
    np.testing.assert_array_equal(got["u"], np.zeros(4))
    # with no good copy left the error names the damaged file
    corrupt(str(base) + f".prev.{which}", how)
    with pytest.raises(CorruptCheckpointError, match=f"ck(.prev)?.{which}") as err:
        read_checkpoint(base, FMT)
    assert isinstance(err.value, TimemachineError) and isinstance(err.value, ValueError)
    assert f"ck.{which}" in str(err.value) and f"ck.prev.{which}" in str(err.value)


def test_a_write_killed_between_its_renames_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    base = tmp_path / "ck"

    class Killed(BaseException):
        pass

    real = checkpoints.commit

    def dying(tmp, path):
        if str(path).endswith(".json"):
            raise Killed
        return real(tmp, path)

    # the very first write killed: nothing trustworthy, a warning, a fresh start
    monkeypatch.setattr(checkpoints, "commit", dying)
    with pytest.raises(Killed):
        write_checkpoint(base, {"u": np.zeros(2)}, {"epoch": 1}, FMT)
    with pytest.warns(CheckpointFallbackWarning, match="starting afresh"):
        assert read_checkpoint(base, FMT) is None
    monkeypatch.setattr(checkpoints, "commit", real)
    write_checkpoint(base, {"u": np.zeros(2)}, {"epoch": 1}, FMT)
    # a later write killed: the previous one is used
    monkeypatch.setattr(checkpoints, "commit", dying)
    with pytest.raises(Killed):
        write_checkpoint(base, {"u": np.ones(2)}, {"epoch": 2}, FMT)
    monkeypatch.setattr(checkpoints, "commit", real)
    checkpoints._KNOWN.clear()
    with pytest.warns(CheckpointFallbackWarning, match="previous checkpoint"):
        assert read_checkpoint(base, FMT).meta == {"epoch": 1}
    # the next write does not rotate the torn checkpoint over the good one
    write_checkpoint(base, {"u": np.ones(2)}, {"epoch": 2}, FMT)
    checkpoints._KNOWN.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_checkpoint(base, FMT).meta == {"epoch": 2}
    assert read_checkpoint(str(base) + ".prev", FMT).meta == {"epoch": 1}


def test_settings_differences_name_each_field():
    found = {"n_chains": 4, "parameters": {"k1": 1.0, "k3": 2.0}, "wrt": ["a", "b"]}
    expected = {"n_chains": 2, "parameters": {"k1": 1.0, "k3": 2.5}, "wrt": ["a", "c"]}
    assert settings_differences(found, expected) == [
        "n_chains 4 != 2",
        "parameters.k3 2.0 != 2.5",
        'wrt[1] "b" != "c"',
    ]
    with pytest.raises(CheckpointError, match=r"ck.npz comes from a run.*n_chains 4 != 2"):
        check_settings("ck.npz", found, expected)
    check_settings("ck.npz", (1, [2]), [1, (2,)])  # tuples and lists are the same JSON


# --------------------------------------------------------------------------- the runs


def _chain():
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
        quads, np.array([1.0, 1.0, 3.0, 3.0]), np.array([4, 4, 6, 6]), np.array([5, 5, 7, 7])
    )
    system = System(np.full(5, 14.0), [bonds, angles, torsions], names, params)
    x0 = np.array(
        [[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.14, 0.0], [0.35, 0.15, 0.02], [0.4, 0.28, 0.1]]
    )
    return system, x0


@pytest.fixture(scope="module")
def chain():
    system, x0 = _chain()
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=10.0, dt=0.002, seed=5)
    dihedral = Dihedral([[0, 1, 2, 3], [1, 2, 3, 4]])
    cos_dihedral = ObservableFunction(lambda x: jnp.cos(dihedral(x)), ["cos phi1", "cos phi2"])
    targets = [
        make_target(cos_dihedral, [0.3, 0.3], 0.05, name="cos_dihedral"),
        make_target(RadiusOfGyration(), [0.16], 0.01, name="rg"),
    ]
    return system, x0, integrator, targets


def _simulate(chain, out, **kw):
    system, x0, integrator, _ = chain
    options = dict(wrt="torsion/*/k*", save_every=10, chunk_steps=20, progress=False)
    return tm.simulate(system, x0, integrator, kw.pop("n_steps", 100), out_dir=out, **options, **kw)


def _pathwise(chain, out, **kw):
    system, x0, integrator, targets = chain
    options = dict(estimator="pathwise", epochs=3, n_replicas=2, n_steps=20, progress=False)
    options.update(kw)
    return tm.fit(system, x0, integrator, targets, "torsion/*/k3", out_dir=out, **options)


def _equilibrium(chain, out, **kw):
    system, x0, integrator, targets = chain
    options = dict(
        epochs=3, n_chains=2, sample_steps=1_000, decorrelation_steps=100, save_every=10,
        blocks=5, min_ess=1.0, reweight_threshold=2.0, progress=False,
    )  # fmt: skip
    options.update(kw)
    return fit_equilibrium(system, x0, integrator, targets, "torsion/*/k3", out_dir=out, **options)


def _trajectory_arrays(traj):
    return [np.asarray(traj.x), np.asarray(traj.dx_dtheta), traj.steps, traj.kinetic_energy]


def _fit_arrays(result):
    history = [{k: v for k, v in r.items() if k != "wall_s"} for r in result.history]
    return [result.params, json.dumps(history, sort_keys=True)]


KINDS = {
    # the runner, its checkpoint's base name, what to compare, the keyword a resume takes
    "simulate": (_simulate, "state", _trajectory_arrays),
    "pathwise": (_pathwise, "checkpoint", _fit_arrays),
    "equilibrium": (_equilibrium, "checkpoint", _fit_arrays),
}


@pytest.fixture(scope="module")
def finished(chain, tmp_path_factory):
    """Each kind run once, uninterrupted: (folder, what it produced)."""
    out = {}
    for kind, (run, _, arrays) in KINDS.items():
        folder = tmp_path_factory.mktemp(kind) / "run"
        out[kind] = (folder, arrays(run(chain, folder)))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("which,how", DAMAGE)
def test_each_checkpoint_kind_detects_damage_and_resumes_from_the_previous(
    chain, finished, tmp_path, kind, which, how
):
    run, base, arrays = KINDS[kind]
    src, expected = finished[kind]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    checkpoints._KNOWN.clear()  # as a new process would see the folder
    damaged = out / f"{base}.{which}"
    corrupt(str(damaged), how)
    with pytest.warns(CheckpointFallbackWarning) as caught:
        result = run(chain, out, resume=True)
    message = " ".join(str(w.message) for w in caught)
    assert str(out / f"{base}.npz") in message and str(out / f"{base}.prev.npz") in message
    assert "resuming from the previous checkpoint" in message
    _same(arrays(result), expected)  # the previous checkpoint's run, redone to the same bits
    # both copies bad: refused, naming the file
    corrupt(str(damaged), how)
    corrupt(str(out / f"{base}.prev.{which}"), how)
    checkpoints._KNOWN.clear()
    with pytest.raises(CorruptCheckpointError, match=f"{base}.{which}"):
        run(chain, out, resume=True)


def test_a_damaged_chunk_or_meta_json_is_refused_naming_it(chain, finished, tmp_path):
    src, _ = finished["simulate"]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    checkpoints._KNOWN.clear()
    corrupt(str(out / "chunk_00001.npz"), "flip")
    with pytest.raises(CorruptCheckpointError, match="chunk_00001.npz"):
        _simulate(chain, out, resume=True)
    with pytest.raises(CorruptCheckpointError, match="chunk_00001.npz"):
        np.asarray(SensitivityTrajectory.load(out).x)
    shutil.rmtree(out)
    shutil.copytree(src, out)
    corrupt(str(out / "meta.json"), "edit")
    with pytest.raises(CorruptCheckpointError, match="meta.json"):
        SensitivityTrajectory.load(out)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(
    chain, finished, tmp_path, kind
):
    run, _, _ = KINDS[kind]
    src, _ = finished[kind]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    if kind == "simulate":
        other = dict(params=chain[0].params * np.where(np.arange(8) == 7, 1.5, 1.0))
        what = r"parameters.torsion/C-C-C-C/k3 6.0 != 9.0"
    elif kind == "pathwise":
        other, what = dict(n_replicas=3), "n_replicas 2 != 3"
    else:
        other, what = dict(n_chains=4), "n_chains 2 != 4"
    with pytest.raises(CheckpointError, match=what) as err:
        run(chain, out, resume=True, **other)
    assert isinstance(err.value, InputError) and str(out) in str(err.value)


def test_simulate_into_a_folder_needs_resume(chain, finished, tmp_path):
    src, expected = finished["simulate"]
    with pytest.raises(InputError, match=rf"out_dir '{src}' is not empty.*resume=True"):
        _simulate(chain, src)
    with pytest.raises(InputError, match="resume=True needs out_dir"):
        tm.simulate(chain[0], chain[1], chain[2], 10, save_every=10, resume=True)
    # a resume of a finished run runs nothing and gives it back; a longer one continues
    checkpoints._KNOWN.clear()
    out = tmp_path / "run"
    shutil.copytree(src, out)
    _same(_trajectory_arrays(_simulate(chain, out, resume=True)), expected)
    longer = _simulate(chain, out, resume=True, n_steps=140)
    whole = _simulate(chain, tmp_path / "whole", n_steps=140)
    _same(_trajectory_arrays(longer), _trajectory_arrays(whole))
    with pytest.raises(InputError, match="beyond the step 100"):
        _simulate(chain, out, resume=True)
    # x0 from elsewhere does not continue this run
    system, x0, integrator, _ = chain
    with pytest.raises(InputError, match="x0 .*does not belong to"):
        tm.simulate(
            system, x0 + 0.001, integrator, 100, wrt="torsion/*/k*", save_every=10,
            chunk_steps=20, progress=False, out_dir=out, resume=True,
        )  # fmt: skip
    # chunk files that no checkpoint or meta.json vouches for are not ours to replace
    alien = tmp_path / "alien"
    alien.mkdir()
    shutil.copy(out / "chunk_00000.npz", alien / "chunk_00000.npz")
    with pytest.raises(InputError, match="neither meta.json nor a checkpoint"):
        _simulate(chain, alien, resume=True)
    assert os.listdir(alien) == ["chunk_00000.npz"]
