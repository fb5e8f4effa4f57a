"""The main job runs end to end and leaves complete output files."""

import json
import os

import pytest

from timemachine.cli import main


def test_run_writes_trajectory_summary_and_plot(tmp_path):
    out = tmp_path / "out"
    rc = main(["run", "--time", "0.4", "--save-interval", "0.02", "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_atoms"] == 33 and summary["n_steps"] == 400
    assert 100.0 < summary["mean_temperature_K_second_half"] < 600.0
    models = (out / "trajectory.pdb").read_text().count("\nMODEL")
    assert models == 20
    assert (out / "energy_temperature.png").stat().st_size > 10_000
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    rc = main(["run", "--pdb", str(tmp_path / "missing.pdb"), "--out", str(tmp_path)])
    assert rc == 1
    assert "missing.pdb" in capsys.readouterr().err


def test_recovery_fit_writes_history_xml_plots_and_resumes(tmp_path):
    out = tmp_path / "fit"
    rc = main(["fit", "--experiment", "recovery", "--size", "tiny", "--out", str(out), "--quiet"])
    assert rc == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history["epochs"]) == 2
    assert history["param_names"] == ["torsion/C-N-CT-C/k3", "torsion/C-N-CT-C/k2"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["original"] == [1.75728, 1.12968]
    assert summary["perturbed_start"] == pytest.approx([1.75728 * 1.3, 1.12968 * 0.7], rel=1e-14)
    assert len(summary["loss_per_epoch"]) == 2 and isinstance(summary["recovered"], bool)
    import openmm.app as app

    app.ForceField(str(out / "fitted.xml"))  # OpenMM reads what was written
    for name in ("loss.png", "observables.png", "parameters.png"):
        assert (out / name).stat().st_size > 5000
    assert len(json.loads((out / "targets.json").read_text())["targets"]) == 5
    # one more epoch continues from the checkpoint instead of starting over
    rc = main(
        ["fit", "--experiment", "recovery", "--smoke", "--epochs", "3", "--resume"]
        + ["--out", str(out), "--quiet"]
    )
    assert rc == 0
    again = json.loads((out / "history.json").read_text())
    assert again["epochs"][:2] == history["epochs"] and len(again["epochs"]) == 3
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_no_command_runs_the_main_job_fit(monkeypatch, capsys):
    import timemachine.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run_fit", lambda args: seen.append(args))
    assert cli.main([]) == 0
    (args,) = seen
    assert args.command == "fit" and args.size == "quick" and args.out == "timemachine-out"
    assert "timemachine fit" in capsys.readouterr().out


def test_fit_on_cuda_without_a_gpu_says_why(tmp_path, capsys):
    from timemachine.backends import cuda_available

    if cuda_available()[0]:
        pytest.skip("CuPy and a GPU are available here")
    rc = main(["fit", "--size", "tiny", "--backend", "cuda", "--out", str(tmp_path), "--quiet"])
    assert rc == 1
    assert "backend='cuda' is not available" in capsys.readouterr().err


def test_nmr_fit_writes_validation_and_an_xml_openmm_simulates(tmp_path):
    import numpy as np
    import openmm
    import openmm.app as app

    import timemachine as tm

    out = tmp_path / "nmr"
    rc = main(["fit", "--size", "tiny", "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimator"] == "fluctuation" and len(summary["parameters"]) == 11
    assert len(summary["targets"]) == 7  # the Graf 2007 couplings shipped
    engine = summary["engine_chi2_per_n"]
    # amber99sbildn + OBC2 is several σ off these couplings before the fit
    assert engine["before"] > 2.0 and engine["before_stderr"] > 0
    for name in ("fitted", "original"):
        v = summary["openmm_validation"][name]
        assert len(v["labels"]) == 7 and np.isfinite(v["chi2_per_n"])
        assert v["chi2_per_n_stderr"] > 0
    assert summary["openmm_forcefield_files"]["fitted"] == ["fitted.xml"]
    # the fitted XML alone is the model: OpenMM builds it and runs a few steps
    top, x = tm.build_peptide("AAA")
    ff = app.ForceField(str(out / "fitted.xml"))
    omm = ff.createSystem(top, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    assert any(isinstance(f, openmm.GBSAOBCForce) for f in omm.getForces())
    sim = app.Simulation(
        top,
        omm,
        openmm.LangevinMiddleIntegrator(300, 1, 0.002),
        openmm.Platform.getPlatformByName("Reference"),
    )
    sim.context.setPositions(x)
    sim.minimizeEnergy()
    sim.step(50)
    e = sim.context.getState(getEnergy=True).getPotentialEnergy()._value
    assert np.isfinite(e)
    for name in ("loss.png", "observables.png", "parameters.png"):
        assert (out / name).stat().st_size > 5000
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_nmr_fit_bad_holdout_names_the_type(tmp_path, capsys):
    rc = main(["fit", "--size", "tiny", "--holdout", "J3_XX", "--out", str(tmp_path), "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "J3_XX" in err and "J3_HN_HA" in err
