"""The main job runs end to end and leaves complete output files."""

import json
import os

import numpy as np
import pytest

from timemachine.cli import main


def test_run_writes_trajectory_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    # 45 frames: 22 chunks of 40 steps and one of 20 (none dropped)
    rc = main(["run", "--time", "0.9", "--save-interval", "0.02", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "minimised" in captured.out  # progress messages without --quiet...
    assert "Langevin" not in captured.err  # ...but no bar: stderr is not a terminal here
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_atoms"] == 33 and summary["n_steps"] == 900
    assert 100.0 < summary["mean_temperature_K_second_half"] < 600.0
    models = (out / "trajectory.pdb").read_text().count("\nMODEL")
    assert models == 45
    assert (out / "energy_temperature.png").stat().st_size > 10_000
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_run_takes_a_cutoff_method(tmp_path):
    out = tmp_path / "out"
    argv = ["run", "--nonbonded-method", "CutoffNonPeriodic", "--cutoff", "0.9", "--time",
            "0.04", "--save-interval", "0.02", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonbonded_method"] == "CutoffNonPeriodic" and summary["cutoff_nm"] == 0.9
    assert summary["n_steps"] == 40 and np.isfinite(summary["final_potential_energy_kJ_mol"])


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
    # the main job's HTML report embeds the three plots and names the validation's χ²/N
    html = (out / "report.html").read_text()
    assert summary["report"] == "report.html" and html.count("data:image/png;base64,") == 3
    assert f"{summary['openmm_validation']['fitted']['chi2_per_n']:.4g}" in html
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_nmr_fit_bad_holdout_names_the_type(tmp_path, capsys):
    rc = main(["fit", "--size", "tiny", "--holdout", "J3_XX", "--out", str(tmp_path), "--quiet"])
    assert rc == 2  # a setting that names nothing: a ConfigError, as from a file
    err = capsys.readouterr().err
    assert "J3_XX" in err and "J3_HN_HA" in err


class _Built(BaseException):
    """Raised by the fixture below: not an Exception, so the CLI cannot turn it into rc 1."""


@pytest.fixture
def nothing_built(monkeypatch):
    """Argument checks must fail before a peptide, a System or a recovery problem is built."""
    import timemachine as tm
    import timemachine.fitting.recovery as recovery

    def refuse(*args, **kwargs):
        raise _Built("built something before the arguments were checked")

    for module, name in (
        (tm, "build_peptide"),
        (tm, "load_system"),
        (recovery, "recovery_problem"),
    ):
        monkeypatch.setattr(module, name, refuse)


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("timemachine: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("experiment", ["nmr", "recovery"])
@pytest.mark.parametrize("count", ["0", "-3"])
@pytest.mark.parametrize("flag", ["--replicas", "--steps", "--epochs"])
def test_fit_refuses_zero_and_negative_counts(flag, count, experiment, nothing_built, capsys):
    # (--replicas and --steps with nmr are refused as counts before they are refused for nmr)
    rc = main(["fit", "--experiment", experiment, flag, count, "--quiet"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert flag in line and count in line and ">= 1" in line


def test_run_recovery_refuses_a_zero_count_instead_of_the_preset(tmp_path, nothing_built):
    from timemachine.errors import InputError
    from timemachine.fitting.recovery import run_recovery

    for key in ("replicas", "steps", "epochs"):
        with pytest.raises(InputError, match=f"{key} must be an integer >= 1, got 0"):
            run_recovery(tmp_path, size="tiny", quiet=True, **{key: 0})


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["run", "--dt", "0"], ["--dt", "> 0"]),
        (["run", "--time", "-1"], ["--time", "> 0"]),
        (["run", "--save-interval", "nan"], ["--save-interval"]),
        (["run", "--temperature", "-5"], ["--temperature", ">= 0"]),
        (["run", "--friction", "-1"], ["--friction"]),
        (["run", "--seed", "-1"], ["--seed"]),
        (["fit", "--sample-steps", "0"], ["--sample-steps"]),
        (["fit", "--prior-sigma", "0"], ["--prior-sigma", "> 0"]),
        (["fit", "--stop-chi2", "-1"], ["--stop-chi2", ">= 0"]),
        (["fit", "--validate-ns", "-0.5"], ["--validate-ns"]),
        (["fit", "--learning-rate", "0"], ["--learning-rate"]),
        (["fit", "--experiment", "recovery", "--perturbation", "1"], ["--perturbation", "< 1"]),
        (["fit", "--replicas", "two"], ["--replicas", "'two'"]),
        (["fit", "--n-workers", "0"], ["--n-workers", ">= 1"]),
        (["fit", "--executor", "ray"], ["--executor", "in-process, dask or a scheduler", "'ray'"]),
    ],
)
def test_numeric_flags_out_of_range_are_usage_errors(argv, fragments, nothing_built, capsys):
    assert main(argv + ["--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert all(f in line for f in fragments), line


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["fit", "--replicas", "4"], ["--replicas", "--experiment recovery"]),
        (["fit", "--steps", "4"], ["--steps", "--experiment recovery"]),
        (["fit", "--experiment", "recovery", "--sample-steps", "500"], ["--sample-steps"]),
        (["fit", "--experiment", "recovery", "--holdout", "J3_HN_HA"], ["--holdout"]),
        (["fit", "--sample-steps", "300"], ["--sample-steps 300", "multiple of 250"]),
        (["fit", "--compare", "nosuch.xml"], ["--compare", "nosuch.xml"]),
        (["fit", "--compare", "amber99sbnmr.xml", "--validate-ns", "0"], ["--validate-ns 0"]),
        (["run", "--pdb", "nosuch.pdb"], ["--pdb", "nosuch.pdb"]),
        (["run", "--cutoff", "0.9"], ["--cutoff 0.9 nm", "NoCutoff", "CutoffNonPeriodic"]),
        (["fit", "--n-workers", "3"], ["--n-workers 3", "applies to --executor dask"]),
        (
            ["fit", "--experiment", "recovery", "--executor", "tcp://h:8786", "--n-workers", "2"],
            ["--n-workers 2", "not --executor tcp://h:8786"],
        ),
    ],
)
def test_flags_a_job_cannot_honour_fail_before_the_set_up(argv, fragments, nothing_built, capsys):
    assert main(argv + ["--quiet"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert all(f in line for f in fragments), line


def test_run_missing_forcefield_is_one_line_naming_file_and_flag(tmp_path, nothing_built, capsys):
    rc = main(["run", "--forcefield", "nosuch.xml", "--out", str(tmp_path), "--quiet"])
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "--forcefield" in line and "'nosuch.xml'" in line and "not found" in line


def test_run_save_interval_longer_than_the_run_is_refused(tmp_path, nothing_built, capsys):
    argv = ["run", "--time", "0.001", "--save-interval", "1", "--out", str(tmp_path)]
    assert main(argv + ["--quiet"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "--save-interval 1 ps" in line and "--time 0.001 ps" in line
    assert not os.listdir(tmp_path)
    # and the other way round: frames closer than the time step
    assert main(["run", "--dt", "0.002", "--save-interval", "0.001", "--quiet"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "--save-interval 0.001 ps" in line and "--dt 0.002 ps" in line


def test_verbose_adds_the_traceback_to_the_one_line(tmp_path, nothing_built, capsys):
    argv = ["run", "--forcefield", "nosuch.xml", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 1
    quiet_line = _one_error_line(capsys.readouterr().err)
    assert main(argv + ["--verbose"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "MissingFileError" in err
    assert err.strip().splitlines()[-1] == quiet_line  # the same line closes it


def test_an_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys):
    import timemachine.cli as cli

    def broken(args):
        raise RuntimeError("something broke\non two lines")

    monkeypatch.setattr(cli, "run_simulation", broken)
    assert cli.main(["run", "--quiet"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        "timemachine: error: unexpected RuntimeError: something broke on two lines "
        "(rerun with --verbose for the traceback)"
    )
    assert cli.main(["run", "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err and "rerun with --verbose" not in err


def test_exit_codes(monkeypatch, capsys):
    import timemachine.cli as cli

    assert cli.main(["--help"]) == 0
    assert cli.main(["run", "--help"]) == 0
    assert "--verbose" in capsys.readouterr().out
    assert cli.main(["run", "--no-such-flag"]) == 2
    assert "--no-such-flag" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["fit", "--size", "huge"]) == 2
    assert "'huge'" in _one_error_line(capsys.readouterr().err)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_fit", interrupted)
    assert cli.main(["fit"]) == 130
    assert capsys.readouterr().err.strip() == "timemachine: interrupted"
