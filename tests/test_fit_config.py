"""``timemachine fit CONFIG``: the schema's fit sections, malformed fit configurations,
the main job's configuration file, the Rg example, and resuming a fit from its folder."""

import argparse
import csv
import json
import os
import pathlib
import textwrap

import numpy as np
import pytest

from timemachine.cli import FIT_DEFAULTS, main
from timemachine.config import ConfigError, load_config

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

# trialanine in vacuum against one inline Rg: loads without building anything
GOOD = """
[system]
sequence = "AAA"

[parameters]
wrt = ["torsion/C-N-CT-C/k*"]

[[targets.entry]]
name = "Rg"
type = "Rg"
atoms = "name CA"
value = 0.35
uncertainty = 0.02

[sampling]
chains = 2
sample_steps = 1000
decorrelation_steps = 200
save_every = 50
min_ess = 2.0

[optimizer]
epochs = 1

[validation]
ns = 0.0
"""


def _write(tmp_path, text, name="fit.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _replace(old, new):
    assert old in GOOD, old
    return GOOD.replace(old, new)


def test_a_good_fit_configuration_gets_its_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), "fit")
    assert cfg["estimator"] == {"kind": "fluctuation", "replicas": 32, "horizon": "auto",
                                "max_horizon": 500}  # fmt: skip
    assert cfg["optimizer"]["kind"] == "gauss-newton" and cfg["optimizer"]["epochs"] == 1
    assert cfg["sampling"]["reservoir_size"] == 2000 and cfg["sampling"]["backend"] == "jax"
    assert cfg["targets"]["entry"][0]["value"] == 0.35 and cfg["targets"]["holdout"] == []
    assert cfg["integrator"]["dt"] == 0.001 and cfg["validation"]["compare"] == []
    assert cfg["executor"] == {"kind": "in-process", "n_workers": None, "address": None}
    # the schema's choices are the executors the fit takes (kept apart: config imports no jax)
    from timemachine.config import EXECUTORS
    from timemachine.fitting.executor import EXECUTORS as FIT_EXECUTORS

    assert EXECUTORS == FIT_EXECUTORS


TARGETS_FILE = {"targets": [{"name": "Rg", "type": "Rg", "value": 0.35}]}  # no uncertainty

MALFORMED = [
    # (configuration text, extra files {name: text}, substrings of the one-line error)
    (_replace("[optimizer]\nepochs = 1", "[optimizer]\nepoch = 1"), {},
     ["[optimizer].epoch", "unknown key", "did you mean 'epochs'"]),
    (GOOD + "\n[sampler]\nchains = 2\n", {}, ["[sampler]", "did you mean 'sampling'"]),
    (_replace("chains = 2", 'chains = "two"'), {}, ["[sampling].chains", "must be an integer"]),
    (_replace("uncertainty = 0.02\n", ""), {},
     ["[[targets.entry]] 1 ('Rg')", "'uncertainty' missing"]),
    (_replace("value = 0.35\n", ""), {}, ["[[targets.entry]] 1", "'value' missing"]),
    (_replace("uncertainty = 0.02", "uncertainty = -0.02"), {}, ["uncertainty = -0.02", "> 0"]),
    (_replace("value = 0.35", "value = nan"), {}, ["value = nan", "finite number"]),
    (_replace('type = "Rg"', 'type = "Rgg"'), {},
     ["type = 'Rgg'", "unknown observable", "did you mean 'Rg'"]),
    (_replace('atoms = "name CA"', 'atom = "name CA"'), {},
     ["'atom'", "unknown key for a Rg target", "did you mean 'atoms'"]),
    (_replace("[[targets.entry]]", '[targets]\nfile = "nosuch.json"\n[[targets.entry]]'), {},
     ["[targets].file = 'nosuch.json'", "file not found"]),
    (_replace("[[targets.entry]]", '[targets]\nfile = "t.json"\n[[targets.entry]]'),
     {"t.json": "{not json"}, ["[targets].file = 't.json'", "not a readable JSON"]),
    (_replace("[[targets.entry]]", '[targets]\nfile = "t.json"\n[[targets.entry]]'),
     {"t.json": json.dumps(TARGETS_FILE)}, ["t.json', target 0 ('Rg')", "'uncertainty' missing"]),
    (_replace('sequence = "AAA"', 'sequence = "AAA"\nforcefield = ["nosuch99.xml"]'), {},
     ["[system].forcefield = 'nosuch99.xml'", "unknown force field"]),
    (_replace("sample_steps = 1000", "sample_steps = -5"), {},
     ["[sampling].sample_steps = -5", "must be > 0"]),
    (_replace("sample_steps = 1000", "sample_steps = 20"), {},
     ["[sampling].sample_steps = 20", "multiple of [sampling].save_every = 50"]),
    (_replace("decorrelation_steps = 200", "decorrelation_steps = 210"), {},
     ["[sampling].decorrelation_steps = 210", "multiple"]),
    (_replace("[[targets.entry]]", '[targets]\nbuiltin = "graf2008"\n[[targets.entry]]'), {},
     ["[targets].builtin = 'graf2008'", "one of graf2007"]),
    (GOOD.split("[[targets.entry]]")[0] + "[sampling]\nchains = 2\nsample_steps = 1000\n", {},
     ["[targets]", "give the data"]),
    (GOOD + '\n[estimator]\nkind = "bootstrap"\n', {},
     ["[estimator].kind = 'bootstrap'", "one of fluctuation, hybrid"]),
    (GOOD + '\n[estimator]\nhorizon = "soon"\n', {}, ["[estimator].horizon = 'soon'", "auto"]),
    (_replace("epochs = 1", "epochs = 1\nlearning_rate = 0"), {},
     ["[optimizer].learning_rate = 0", "must be > 0"]),
    (_replace("ns = 0.0", 'ns = 0.0\ncompare = ["amber14-all.xml"]'), {},
     ["[validation].compare", "[validation].ns = 0 skips"]),
    (_replace("ns = 0.0", 'ns = 1.0\ncompare = ["nosuch.xml"]'), {},
     ["[validation].compare = 'nosuch.xml'", "unknown force field"]),
    (GOOD + "\n[integrator]\ndt = 0.05\n", {}, ["[integrator].dt = 0.05", "(0.0, 0.01]"]),
    (_replace('wrt = ["torsion/C-N-CT-C/k*"]', ""), {}, ["[parameters].wrt: missing"]),
    (_replace('sequence = "AAA"', 'sequence = "AAA"\npdb = "x.pdb"'), {"x.pdb": ""},
     ["give one of pdb and sequence", "both"]),
    (_replace("[[targets.entry]]", '[targets]\nholdout = "Rg"\n[[targets.entry]]'), {},
     ["[targets].holdout = 'Rg'", "must be a list"]),
    (_replace("[sampling]", '[sampling]\nbackend = "cuda"'), {},
     ["[sampling].backend = 'cuda'", "must be one of jax"]),
    (GOOD + '\n[executor]\nkind = "ray"\n', {},
     ["[executor].kind = 'ray'", "must be one of in-process, dask"]),
    (GOOD + '\n[executor]\nkind = "dask"\nn_workers = 0\n', {},
     ["[executor].n_workers = 0", "must be > 0"]),
    (GOOD + '\n[executor]\nkind = "dask"\nn_workers = 2.5\n', {},
     ["[executor].n_workers = 2.5", "must be an integer"]),
    (GOOD + "\n[executor]\nn_workers = 4\n", {},
     ["[executor].n_workers = 4", 'applies to kind = "dask"', "not kind = 'in-process'"]),
    (GOOD + '\n[executor]\nkind = "dask"\naddress = "localhost:8786"\n', {},
     ["[executor].address = 'localhost:8786'", "tcp://host:8786"]),
    (GOOD + '\n[executor]\naddress = "tcp://h:8786"\n', {},
     ["[executor].address = 'tcp://h:8786'", 'applies to kind = "dask"']),
    (GOOD + '\n[executor]\nkind = "dask"\naddress = "tcp://h:8786"\nn_workers = 2\n', {},
     ["[executor].n_workers = 2", "has its own workers"]),
    (GOOD + '\n[executor]\nkind = "dask"\nworkers = 2\n', {},
     ["[executor].workers", "did you mean 'n_workers'"]),
]  # fmt: skip


@pytest.mark.parametrize("text, files, expected", MALFORMED)
def test_malformed_fit_configurations_name_the_key_in_one_line(tmp_path, text, files, expected):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), "fit")
    message = str(info.value)
    assert "\n" not in message and message.startswith("fit.toml")
    for part in expected:
        assert part in message, (part, message)


def test_command_line_fit_errors_are_one_line_and_exit_2(tmp_path, capsys):
    """A malformed file, a glob matching nothing and a holdout naming nothing (found once
    the system is built): one line each, exit 2, a traceback only with --verbose."""
    bad = _write(tmp_path, _replace("uncertainty = 0.02\n", ""), "bad.toml")
    glob = _write(tmp_path, _replace("torsion/C-N-CT-C/k*", "torsion/X-X-X-X/k*"), "glob.toml")
    held = _write(tmp_path, _replace("[[targets.entry]]", "[targets]\nholdout = ['J3_HN_HA']\n"
                                     "[[targets.entry]]"), "held.toml")  # fmt: skip
    for path, part in ((bad, "'uncertainty' missing"), (glob, "'torsion/X-X-X-X/k*' matches"),
                       (held, "holdout = 'J3_HN_HA': no target")):  # fmt: skip
        rc = main(["fit", str(path), "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and part in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    rc = main(["fit", str(bad), "--verbose", "--quiet"])
    assert rc == 2 and "Traceback" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_flags_with_a_configuration_set_keys_or_are_refused(tmp_path, capsys, monkeypatch):
    import timemachine.cli as cli

    seen = []
    monkeypatch.setattr("timemachine.fit_job.run_fit_job", lambda cfg, **kw: seen.append(cfg))
    path = _write(tmp_path, GOOD)
    argv = ["fit", str(path), "--epochs", "4", "--seed", "7", "--estimator", "hybrid"]
    assert cli.main(argv + ["--set", "sampling.chains=3", "--out", "o"]) == 0
    (cfg,) = seen
    assert cfg["optimizer"]["epochs"] == 4 and cfg["integrator"]["seed"] == 7
    assert cfg["estimator"]["kind"] == "hybrid" and cfg["sampling"]["chains"] == 3
    assert cfg["output"]["dir"] == "o"
    assert cfg["executor"] == {"kind": "in-process", "n_workers": None, "address": None}
    # --executor and --n-workers set [executor]'s keys: a local cluster, or an address
    for flags, expected in (
        (["--executor", "dask", "--n-workers", "3"], ("dask", 3, None)),
        (["--executor", "tcp://10.0.0.5:8786"], ("dask", None, "tcp://10.0.0.5:8786")),
    ):
        seen.clear()
        assert cli.main(["fit", str(path), *flags]) == 0
        assert tuple(seen[0]["executor"].values()) == expected, flags
    # ... and are checked as the file's keys are
    assert cli.main(["fit", str(path), "--n-workers", "3"]) == 2
    assert '[executor].n_workers = 3: applies to kind = "dask"' in capsys.readouterr().err
    assert cli.main(["fit", str(path), "--executor", "ray"]) == 2
    assert "--executor: must be in-process, dask or a scheduler address" in (
        capsys.readouterr().err
    )
    for flag in (["--size", "tiny"], ["--experiment", "recovery"], ["--replicas", "4"]):
        assert cli.main(["fit", str(path), *flag]) == 1
        err = capsys.readouterr().err
        assert f"{flag[0]} applies to the fit without a configuration" in err
    assert cli.main(["fit", "--set", "optimizer.epochs=2"]) == 2  # --set without a file


def test_the_main_job_configuration_file_is_its_quick_preset():
    """examples/ala3_nmr/fit.toml loads to the settings `timemachine fit` runs by default."""
    from timemachine.nmr_fit import check_nmr_args, nmr_config

    args = argparse.Namespace(**{**FIT_DEFAULTS, "epochs": None, "sample_steps": None,
                                 "validate_ns": None, "learning_rate": 0.1})  # fmt: skip
    preset = nmr_config(args, check_nmr_args(args))
    cfg = load_config(EXAMPLES / "ala3_nmr" / "fit.toml", "fit")
    for section in preset:
        if not section.startswith("_"):
            assert cfg[section] == preset[section], section


@pytest.mark.slow
def test_the_rg_example_runs_at_a_reduced_size(tmp_path):
    """examples/rg_villin/fit.toml, 2 epochs of 2 short chains: every output file, the CSV
    history matching the JSON one, and an OpenMM-readable fitted XML."""
    import openmm.app as app

    out = tmp_path / "rg"
    small = ["sampling.chains=2", "sampling.sample_steps=600", "sampling.save_every=30",
             "sampling.decorrelation_steps=120", "sampling.min_ess=2", "optimizer.epochs=2",
             "validation.ns=0"]  # fmt: skip
    argv = ["fit", str(EXAMPLES / "rg_villin" / "fit.toml"), "--out", str(out), "--quiet"]
    assert main(argv + [a for s in small for a in ("--set", s)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"] == ["Rg(CA):Rg"] and len(summary["parameters"]) == 5
    assert "Skolnick" in summary["data"] and summary["system"].startswith("villin_hp35.pdb")
    before = summary["engine_chi2_per_n"]["before"]
    # the chains start at the snapshot's Cα Rg, 0.897 nm, about 1 σ above the target
    assert 0.05 < before < 10.0
    history = json.loads((out / "history.json").read_text())["epochs"]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == len(history) == 2
    for row, rec in zip(rows, history, strict=True):
        assert float(row["chi2"]) == rec["chi2"] and int(row["epoch"]) == rec["epoch"]
        assert float(row["torsion/N-CT-C-N/k2"]) == rec["params"][3]
        assert 0.6 < float(row["<Rg(CA):Rg>"]) < 1.2  # nm
    # history.json's final θ is the one the summary reports (epoch 1's step was rejected)
    theta_final = json.loads((out / "history.json").read_text())["theta_final"]
    assert theta_final == summary["fitted"]
    app.ForceField(str(out / "fitted.xml"))
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "Skolnick" in html


@pytest.mark.slow
def test_a_configured_fit_resumes_from_its_folder(tmp_path):
    """One epoch, then --resume to two: the first epoch is kept as it was, not rerun."""
    path = _write(tmp_path, GOOD)
    out = tmp_path / "out"
    assert main(["fit", str(path), "--out", str(out), "--quiet"]) == 0
    first = json.loads((out / "history.json").read_text())["epochs"]
    assert len(first) == 1
    argv = ["fit", str(path), "--out", str(out), "--quiet", "--set", "optimizer.epochs=2"]
    assert main(argv + ["--resume"]) == 0
    again = json.loads((out / "history.json").read_text())["epochs"]
    assert len(again) == 2 and again[0] == first[0]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert np.isfinite([float(r["chi2"]) for r in rows]).all()
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


@pytest.mark.slow
def test_the_main_job_configuration_runs_at_a_reduced_size(tmp_path):
    out = tmp_path / "ala3"
    small = ["sampling.chains=2", "sampling.sample_steps=1000", "sampling.save_every=50",
             "sampling.decorrelation_steps=200", "sampling.min_ess=2", "optimizer.epochs=1",
             "validation.ns=0"]  # fmt: skip
    argv = ["fit", str(EXAMPLES / "ala3_nmr" / "fit.toml"), "--out", str(out), "--quiet"]
    assert main(argv + [a for s in small for a in ("--set", s)] + ["--holdout", "J3_HN_HA"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["parameters"]) == 11 and "Graf" in summary["data"]
    assert summary["held_out"] == ["3J(HN,HA)"]
    assert not any(lab.startswith("3J(HN,HA)") for lab in summary["targets"])


def test_the_configuration_reference_is_current():
    from timemachine.config import schema_markdown

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == schema_markdown(), (
        "docs/configuration.md is stale: python -c 'from timemachine.config import "
        'schema_markdown; print(schema_markdown(), end="")\' > docs/configuration.md'
    )
