"""Configuration files (timemachine.config) and the simulate / fdcheck jobs that read them.

Each malformed configuration must give one ConfigError line that names the file and the
offending key; the jobs are run at a tiny size and their outputs checked: the DCD read
back by mdtraj against the saved frames, the sensitivity norms against the npz chunks,
and fdcheck's table against its own pass threshold.
"""

import json
import os

import mdtraj
import numpy as np
import pytest

from timemachine.config import ConfigError, load_config, parse_override

GOOD = """
[system]
sequence = "AAA"
forcefield = ["amber99sbildn.xml"]

[integrator]
temperature = 300.0
dt = 0.001
seed = 3

[parameters]
wrt = ["torsion/*/k*"]

[simulate]
steps = 40
save_every = 10
"""


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_good_configuration_gets_its_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), "simulate")
    assert cfg["simulate"] == {
        "steps": 40, "save_every": 10, "method": "exact", "backend": "jax", "precision": "float64",
    }  # fmt: skip
    assert cfg["integrator"]["friction"] == 1.0 and cfg["integrator"]["seed"] == 3
    assert cfg["system"]["implicit_solvent"] == "none" and cfg["system"]["minimize"] is True
    assert cfg["parameters"]["wrt"] == ["torsion/*/k*"]


def test_a_cutoff_method_reaches_the_system(tmp_path):
    """``[system].nonbonded_method = "CutoffNonPeriodic"`` without a cutoff takes OpenMM's
    1 nm; ``build_system`` gives the GB and reaction-field terms that cutoff (on Verlet
    lists), and ``--set system.cutoff=0.9`` changes it."""
    from timemachine.config import build_system

    text = _replace('sequence = "AAA"', 'sequence = "AAA"\nimplicit_solvent = "obc2"\n'
                    'nonbonded_method = "CutoffNonPeriodic"\nminimize = false')  # fmt: skip
    cfg = load_config(_write(tmp_path, text), "simulate")
    assert cfg["system"]["cutoff"] == 1.0
    cfg = load_config(_write(tmp_path, text), "simulate", [parse_override("system.cutoff=0.9")])
    system = build_system(cfg)[0]
    cut = {t.kind: t.cutoff for t in system.terms if getattr(t, "cutoff", None) is not None}
    assert cut == {"gb": 0.9, "nonbonded-cutoff": 0.9}
    assert all(t.uses_neighbours for t in system.terms if t.kind in cut)


def test_overrides_replace_single_keys(tmp_path):
    over = [parse_override("simulate.steps=80"), parse_override("simulate.method=window")]
    cfg = load_config(_write(tmp_path, GOOD), "simulate", over)
    assert cfg["simulate"]["steps"] == 80 and cfg["simulate"]["method"] == "window"
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("steps=80")


def _replace(old, new):
    assert old in GOOD
    return GOOD.replace(old, new)


# (configuration text, command, what the one-line message must contain)
BAD = {
    "unknown key": (_replace("seed = 3", "sed = 3"), r"\[integrator\]\.sed: unknown key.*'seed'"),
    "unknown section": (GOOD + "\n[integrater]\nx = 1\n", r"\[integrater\].*'integrator'"),
    "misspelt forcefield key": (
        _replace("forcefield =", "forcefeld ="),
        r"\[system\]\.forcefeld: unknown key \(did you mean 'forcefield'\?\)",
    ),
    "wrong type": (_replace("steps = 40", 'steps = "40"'), r"\[simulate\]\.steps = '40'.*integer"),
    "bool for a number": (
        _replace("temperature = 300.0", "temperature = true"),
        r"\[integrator\]\.temperature = True: must be a number",
    ),
    "float for an integer": (
        _replace("steps = 40", "steps = 40.5"),
        r"\[simulate\]\.steps = 40\.5: must be an integer",
    ),
    "negative steps": (
        _replace("steps = 40", "steps = -5"),
        r"\[simulate\]\.steps = -5: must be > 0",
    ),
    "zero time step": (
        _replace("dt = 0.001", "dt = 0.0"),
        r"\[integrator\]\.dt = 0\.0: must be in",
    ),
    "time step too long": (_replace("dt = 0.001", "dt = 0.5"), r"\[integrator\]\.dt = 0\.5"),
    "negative temperature": (
        _replace("temperature = 300.0", "temperature = -1.0"),
        r"\[integrator\]\.temperature = -1\.0: must be > 0 \(K\)",
    ),
    "negative friction": (GOOD.replace("dt = 0.001", "dt = 0.001\nfriction = -2.0"), r"friction"),
    "save interval longer than the run": (
        _replace("save_every = 10", "save_every = 100"),
        r"\[simulate\]\.save_every = 100: longer than the run \(\[simulate\]\.steps = 40\)",
    ),
    "missing required key": (_replace("steps = 40\n", ""), r"\[simulate\]\.steps: missing"),
    "missing parameters": (
        _replace('[parameters]\nwrt = ["torsion/*/k*"]\n', ""),
        r"\[parameters\]\.wrt: missing",
    ),
    "empty parameter list": (_replace('wrt = ["torsion/*/k*"]', "wrt = []"), r"wrt = \[\]"),
    "parameters not strings": (_replace('wrt = ["torsion/*/k*"]', "wrt = [1, 2]"), r"strings"),
    "bad choice": (
        _replace("save_every = 10", 'save_every = 10\nmethod = "windowed"'),
        r"\[simulate\]\.method = 'windowed': must be one of exact, window",
    ),
    "unknown force field": (
        _replace('["amber99sbildn.xml"]', '["nosuch.xml"]'),
        r"\[system\]\.forcefield = 'nosuch\.xml': unknown force field",
    ),
    "missing structure file": (
        _replace('sequence = "AAA"', 'pdb = "missing.pdb"'),
        r"\[system\]\.pdb = 'missing\.pdb': file not found",
    ),
    "pdb and sequence": (
        _replace('sequence = "AAA"', 'sequence = "AAA"\npdb = "x.pdb"'),
        r"\[system\]: give one of pdb and sequence \(both given\)",
    ),
    "not an amino acid": (_replace('"AAA"', '"AXZ"'), r"\[system\]\.sequence = 'AXZ'"),
    "bad solvent": (
        _replace('sequence = "AAA"', 'sequence = "AAA"\nimplicit_solvent = "gbn2"'),
        r"implicit_solvent = 'gbn2': must be one of obc2, none",
    ),
    "cutoff without a cutoff method": (
        _replace('sequence = "AAA"', 'sequence = "AAA"\ncutoff = 1.2'),
        r"\[system\]\.cutoff = 1\.2: NoCutoff takes every pair.*CutoffNonPeriodic",
    ),
    "periodic method": (
        _replace('sequence = "AAA"', 'sequence = "AAA"\nnonbonded_method = "PME"'),
        r"\[system\]\.nonbonded_method = 'PME': must be one of NoCutoff, CutoffNonPeriodic",
    ),
    "negative cutoff": (
        _replace(
            'sequence = "AAA"',
            'sequence = "AAA"\nnonbonded_method = "CutoffNonPeriodic"\ncutoff = -1.0',
        ),
        r"\[system\]\.cutoff = -1\.0: must be > 0 \(nm\)",
    ),  # fmt: skip
    "section given a value": (GOOD.replace("[system]", 'output = "x"\n[system]'), r"output"),
    "not TOML": (GOOD + "\nsteps = = 3\n", r"run\.toml: not valid TOML"),
    "section of another command": (GOOD + "\n[fdcheck]\nsteps = 3\n", r"\[fdcheck\].*unknown"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_configurations_name_the_key_in_one_line(tmp_path, case):
    text, pattern = BAD[case]
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(_write(tmp_path, text), "simulate")
    message = str(info.value)
    assert message.startswith("run.toml: ") or "run.toml" in message, message
    assert "\n" not in message, message


def test_a_missing_configuration_file(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(str(tmp_path / "nope.toml"), "simulate")


def test_simulate_writes_dcd_npz_and_norms(tmp_path):
    from timemachine.sensitivity.frames import SensitivityTrajectory
    from timemachine.sensitivity_jobs import run_simulate

    out = tmp_path / "out"
    cfg = load_config(
        _write(tmp_path, GOOD + f'\n[output]\ndir = "{out}"\n'),
        "simulate",
        [parse_override('parameters.wrt=["torsion/C-N-CT-C/k*"]')],
    )
    summary = run_simulate(cfg, quiet=True)
    traj = SensitivityTrajectory.load(out / "sensitivity")
    assert list(traj.steps) == [10, 20, 30, 40] and summary["frames"] == 4
    dcd = mdtraj.load_dcd(str(out / "trajectory.dcd"), top=str(out / "topology.pdb"))
    assert dcd.n_frames == 4
    np.testing.assert_allclose(dcd.xyz, np.asarray(traj.x), atol=1e-6)  # float32 in DCD
    dx = np.asarray(traj.dx_dtheta)
    for p, row in enumerate(summary["parameters"]):
        assert row["name"] == traj.param_names[p]
        assert row["final_norm"] == pytest.approx(float(np.linalg.norm(dx[-1, p])), rel=1e-12)
        assert row["final_norm"] > 0
    assert os.path.getsize(out / "sensitivity_norms.png") > 1000
    assert json.loads((out / "summary.json").read_text())["steps"] == 40
    # a second run into the same folder refuses; --resume continues to a longer run
    with pytest.raises(ConfigError, match="use --resume"):
        run_simulate(cfg, quiet=True)
    longer = load_config(
        _write(tmp_path, GOOD + f'\n[output]\ndir = "{out}"\n'),
        "simulate",
        [parse_override('parameters.wrt=["torsion/C-N-CT-C/k*"]'), ("simulate", "steps", 60)],
    )
    assert run_simulate(longer, resume=True, quiet=True)["steps"] == 60


def test_simulate_refuses_a_glob_that_matches_nothing(tmp_path):
    from timemachine.sensitivity_jobs import run_simulate

    cfg = load_config(
        _write(tmp_path, _replace('"torsion/*/k*"', '"torsion/NO-SUCH/k*"')), "simulate"
    )
    where = r"\[parameters\]\.wrt: parameter glob 'torsion/NO-SUCH/k\*' matches"
    with pytest.raises(ConfigError, match=where):
        run_simulate(cfg, quiet=True)


FD = """
[system]
sequence = "AAA"

[integrator]
dt = 0.001
seed = 1

[parameters]
wrt = ["torsion/C-N-CT-C/k*"]

[fdcheck]
steps = 20
max_rel_error = 1e-4
"""


def test_fdcheck_agrees_with_finite_differences_and_fails_when_told_to(tmp_path):
    from timemachine.errors import SimulationError
    from timemachine.sensitivity_jobs import run_fdcheck

    out = tmp_path / "fd"
    cfg = load_config(_write(tmp_path, FD + f'\n[output]\ndir = "{out}"\n'), "fdcheck")
    result = run_fdcheck(cfg, quiet=True)
    assert result["passed"] and 0 < result["worst_rel_error"] < 1e-4
    assert len(result["parameters"]) >= 2
    lines = (out / "fdcheck.csv").read_text().splitlines()
    assert lines[0] == "name,rel_error,fd_norm,analytic_norm" and len(lines) == 1 + len(
        result["parameters"]
    )
    assert os.path.getsize(out / "fdcheck.png") > 1000
    strict = load_config(
        _write(tmp_path, FD + f'\n[output]\ndir = "{out}"\n'),
        "fdcheck",
        [("fdcheck", "max_rel_error", 1e-300)],
    )
    with pytest.raises(SimulationError, match="exceeds \\[fdcheck\\].max_rel_error"):
        run_fdcheck(strict, quiet=True)


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.mark.parametrize(
    "path, command",
    [("sensitivity_trajectory/simulate.toml", "simulate"), ("fdcheck/fdcheck.toml", "fdcheck")],
)
def test_the_examples_run_at_a_reduced_size(tmp_path, path, command):
    """Each example configuration loads and runs (20 steps), so the files cannot rot."""
    from timemachine.sensitivity_jobs import run_fdcheck, run_simulate

    over = [(command, "steps", 20), ("output", "dir", str(tmp_path / "out"))]
    if command == "simulate":
        over.append(("simulate", "save_every", 10))
        over.append(("parameters", "wrt", ["torsion/C-N-CT-C/k*"]))
    cfg = load_config(os.path.join(EXAMPLES, path), command, over)
    if command == "simulate":
        assert run_simulate(cfg, quiet=True)["frames"] == 2
    else:
        assert run_fdcheck(cfg, quiet=True)["passed"]


def test_command_line_malformed_configuration_is_one_line_exit_2(tmp_path, capsys):
    from timemachine.cli import main

    path = _write(tmp_path, _replace("seed = 3", "sed = 3"))
    assert main(["simulate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[integrator].sed: unknown key (did you mean 'seed'?)" in err[0]
    assert main(["simulate", path, "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("timemachine: error:")
    assert main(["fdcheck", str(tmp_path / "none.toml")]) == 2
    assert "configuration file not found" in capsys.readouterr().err


def test_command_line_simulate_and_fdcheck(tmp_path, capsys):
    from timemachine.cli import main

    path = _write(tmp_path, GOOD)
    out = tmp_path / "cli"
    argv = ["simulate", path, "--out", str(out), "--set", "simulate.steps=20", "-q"]
    assert main(argv + ["--set", 'parameters.wrt="torsion/C-N-CT-C/k*"']) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 20
    fd = _write(tmp_path, FD, "fd.toml")
    assert main(["fdcheck", fd, "--out", str(tmp_path / "fd"), "-q"]) == 0
    strict = ["--set", "fdcheck.max_rel_error=1e-300"]
    assert main(["fdcheck", fd, "--out", str(tmp_path / "fd2"), "-q"] + strict) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_rel_error" in err[0]


RUN = """
[system]
sequence = "AAA"
implicit_solvent = "none"

[integrator]
dt = 0.001
seed = 2

[run]
time = 0.02
save_interval = 0.01
"""


def test_run_from_a_configuration_flags_override_keys(tmp_path, capsys):
    from timemachine.cli import main

    path = _write(tmp_path, RUN, "md.toml")
    out = tmp_path / "md"
    assert main(["run", path, "--out", str(out), "--time", "0.04", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["simulated_ps"] == pytest.approx(0.04)  # the flag wins over [run].time
    bad = _write(tmp_path, RUN.replace("save_interval = 0.01", "save_interval = 1.0"), "b.toml")
    assert main(["run", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[run].save_interval = 1.0: longer than the run" in err[0]
    assert main(["run", "--set", "run.time=1"]) == 2
    assert "--set needs a configuration file" in capsys.readouterr().err
