"""A catalogue of bad input (issue 18, part 3): one table, one row per distinct mistake.

Each row is an id, the area it belongs to, the call, the error it must raise (one of the
project's own types, which derive from TimemachineError and the matching builtin) or,
for the command line, the exit code, and substrings the message must contain: the
offending value and where it came from. Every row also checks that the call leaves no
partial output: the test's folder (inputs written first) is byte for byte the same
afterwards, with no ``.tmp-`` files.

The malformed configuration files of tests/test_config.py (``BAD``, one-line messages
naming the key) and tests/test_fit_config.py are not repeated here; the rows below add
the ways a configuration file itself can be unreadable.
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Any, NamedTuple

import numpy as np
import pytest

import timemachine as tm
from timemachine.cli import main
from timemachine.config import ConfigError, load_config
from timemachine.fitting import RadiusOfGyration
from timemachine.fitting.targets import load_targets, make_target
from timemachine.sensitivity.frames import SensitivityTrajectory
from timemachine.system import System

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # chmod 000 does not stop root's reads
FIT_WRT = "torsion/C-N-CT-C/k*"
TINY_FIT = dict(
    epochs=1,
    n_chains=2,
    sample_steps=400,
    decorrelation_steps=40,
    save_every=20,
    blocks=4,
    min_ess=1.0,
    progress=False,
)
SIM_WRT = "bond/*/k"


class Case(NamedTuple):
    id: str
    area: str  # api | structure+forcefield | targets | config | cli | checkpoint
    call: Any  # call(c): c is the _Context of the row
    error: Any  # an exception type, or an int: the command line's exit code
    contains: tuple = ()
    files: dict | None = None  # inputs written before the call: name -> str | bytes
    copy: tuple = ()  # prepared folders copied in: "fit" (a checkpoint), "sim" (chunks)
    unreadable: tuple = ()  # of files: chmod 000 (skipped as root)


class _Context:
    def __init__(self, world, tmp):
        self.__dict__.update(world)
        self.tmp = tmp

    def p(self, name):
        return str(self.tmp / name)


def _params_with(c, pattern, value):
    p = np.array(c.system.params)
    p[c.system.select(pattern)[0]] = value
    return p


def _x_with(c, atom, coord, value):
    x = np.array(c.x)
    x[atom, coord] = value
    return x


def _sim(c, **kw):
    args = dict(n_steps=2, save_every=1, wrt=SIM_WRT, out_dir=c.p("out"), progress=False)
    args.update(kw)
    x0 = args.pop("x0", c.x)
    system = args.pop("system", c.system)
    integrator = args.pop("integrator", c.integrator)
    return tm.simulate(system, x0, integrator, **args)


def _fit(c, **kw):
    args = dict(TINY_FIT, wrt=FIT_WRT)
    args.update(kw)
    targets = args.pop("targets", c.targets)
    return tm.fit(c.system, c.x, c.integrator, targets, **args)


def _masses_with(c, atom, value):
    m = np.array(c.system.masses)
    m[atom] = value
    return System(m, c.system.terms, c.system.param_names, c.system.params)


def _continue(c, **kw):
    state = SensitivityTrajectory.load(c.p("sim")).final_state
    return _sim(c, x0=state, out_dir=c.p("sim"), resume=True, **kw)


SIMULATE_TOML = """
[system]
sequence = "AAA"
implicit_solvent = "none"

[integrator]
dt = 0.001

[parameters]
wrt = ["bond/*/k"]

[simulate]
steps = 4
save_every = 2
"""
RG = '{"type": "Rg", "atoms": "all", "value": 0.5, "uncertainty": 0.05}'
NOT_UTF8 = b"\xff\xfe\x00 not text \x80"

CASES = [
    # ------------------------------------------------------------ the Python API
    Case("select-no-match", "api", lambda c: c.system.select("nosuch/*"),
         tm.InputError, ("'nosuch/*'", "matches none")),
    Case("select-empty-list", "api", lambda c: c.system.select([]),
         tm.InputError, ("at least one glob",)),
    Case("wrt-index-out-of-range", "api", lambda c: c.system.resolve_wrt([3, 10**6]),
         tm.InputError, ("wrt[1] = 1000000", "parameters")),
    Case("wrt-float-indices", "api", lambda c: c.system.resolve_wrt([0.5]),
         tm.InputError, ("wrt must be", "[0.5]")),
    Case("wrt-repeated", "api", lambda c: c.system.resolve_wrt([2, 2]),
         tm.InputError, ("repeated", "[2, 2]")),
    Case("integrator-negative-temperature", "api",
         lambda c: tm.LangevinIntegrator(temperature=-1.0),
         tm.InputError, ("temperature", "-1.0")),
    Case("integrator-nan-friction", "api", lambda c: tm.LangevinIntegrator(friction=np.nan),
         tm.InputError, ("friction", "nan")),
    Case("integrator-zero-dt", "api", lambda c: tm.LangevinIntegrator(dt=0.0),
         tm.InputError, ("dt", "0.0")),
    Case("integrator-float-seed", "api", lambda c: tm.LangevinIntegrator(seed=1.5),
         tm.InputError, ("seed", "1.5")),
    Case("simulate-x0-wrong-shape", "api", lambda c: _sim(c, x0=c.x[:, :2]),
         tm.InputError, ("x0", "(33, 3)", "(33, 2)")),
    Case("simulate-x0-nan", "api", lambda c: _sim(c, x0=_x_with(c, 4, 1, np.nan)),
         tm.InputError, ("x0", "atom 4", "nan")),
    Case("simulate-x0-inf", "api", lambda c: _sim(c, x0=_x_with(c, 7, 2, -np.inf)),
         tm.InputError, ("x0", "atom 7", "-inf")),
    Case("simulate-x0-text", "api", lambda c: _sim(c, x0="positions.pdb"),
         tm.InputError, ("x0", "'positions.pdb'")),
    Case("simulate-x0-complex", "api", lambda c: _sim(c, x0=c.x + 0j),
         tm.InputError, ("x0", "complex")),
    Case("simulate-v0-wrong-shape", "api", lambda c: _sim(c, v0=np.zeros((2, 3))),
         tm.InputError, ("v0", "(33, 3)", "(2, 3)")),
    Case("simulate-zero-steps", "api", lambda c: _sim(c, n_steps=0),
         tm.InputError, ("n_steps", "0")),
    Case("simulate-float-steps", "api", lambda c: _sim(c, n_steps=2.5),
         tm.InputError, ("n_steps", "2.5")),
    Case("simulate-unknown-method", "api", lambda c: _sim(c, method="leapfrog"),
         tm.InputError, ("method", "'leapfrog'")),
    Case("simulate-unknown-backend", "api", lambda c: _sim(c, backend="tpu"),
         tm.InputError, ("backend", "'tpu'")),
    Case("simulate-wrt-no-match", "api", lambda c: _sim(c, wrt="dihedral*"),
         tm.InputError, ("'dihedral*'", "matches none")),
    Case("simulate-params-wrong-shape", "api", lambda c: _sim(c, params=c.system.params[:5]),
         tm.InputError, ("params must have shape", "(5,)")),
    Case("simulate-params-nan", "api", lambda c: _sim(c, params=_params_with(c, "angle/*", np.nan)),
         tm.InputError, ("params[", "angle/", "nan")),
    Case("simulate-params-text", "api", lambda c: _sim(c, params="amber"),
         tm.InputError, ("params must be", "'amber'")),
    Case("simulate-negative-bond-k", "api",
         lambda c: _sim(c, params=_params_with(c, "bond/*/k", -100.0)),
         tm.InputError, ("bond/", "/k) = -100.0", "physical range", ">= 0")),
    Case("simulate-negative-angle-k", "api",
         lambda c: _sim(c, params=_params_with(c, "angle/*/k", -1.0)),
         tm.InputError, ("angle/", "/k) = -1.0", "physical range")),
    Case("simulate-zero-bond-length", "api",
         lambda c: _sim(c, params=_params_with(c, "bond/*/length", 0.0)),
         tm.InputError, ("/length) = 0.0", "> 0")),
    Case("simulate-negative-sigma", "api",
         lambda c: _sim(c, params=_params_with(c, "sigma/*", -0.3)),
         tm.InputError, ("sigma/", "= -0.3", "physical range")),
    Case("simulate-negative-epsilon", "api",
         lambda c: _sim(c, params=_params_with(c, "epsilon/*", -0.2)),
         tm.InputError, ("epsilon/", "= -0.2", "physical range")),
    Case("system-zero-mass", "api", lambda c: _masses_with(c, 3, 0.0),
         tm.InputError, ("atom 3", "0.0")),
    Case("system-negative-mass", "api", lambda c: _masses_with(c, 5, -12.0),
         tm.InputError, ("atom 5", "-12.0")),
    Case("energy-nan-params", "api",
         lambda c: c.system.energy(c.x, np.full(c.system.n_params, np.nan)),
         tm.InputError, ("params[0]", "nan")),
    Case("finite-difference-zero-h", "api",
         lambda c: tm.finite_difference(c.system, c.x, c.integrator, 2, wrt=SIM_WRT, h=0.0),
         tm.InputError, ("h must be", "0.0")),
    Case("minimize-nan-positions", "api",
         lambda c: tm.minimize_system(c.system, _x_with(c, 2, 0, np.nan)),
         tm.InputError, ("x0", "atom 2")),
    Case("replicas-zero", "api",
         lambda c: tm.fitting.run_replicas(c.system, c.x, c.integrator, 2, n_replicas=0),
         tm.InputError, ("n_replicas", "0")),
    Case("export-nan-params", "api",
         lambda c: tm.export_forcefield(
             c.system, np.full(c.system.n_params, np.nan), c.p("out/fitted.xml")),
         tm.InputError, ("params[0]", "nan", "cannot export")),
    Case("export-negative-epsilon", "api",
         lambda c: tm.export_forcefield(
             c.system, _params_with(c, "epsilon/*", -0.5), c.p("out/fitted.xml")),
         tm.InputError, ("epsilon/", "= -0.5", "physical range")),
    Case("export-params-text", "api",
         lambda c: tm.export_forcefield(c.system, "theta.npy", c.p("out/fitted.xml")),
         tm.InputError, ("params must be", "'theta.npy'")),
    Case("build-peptide-unknown-letter", "api", lambda c: tm.build_peptide("AXA"),
         tm.InputError, ("'AXA'", "'X'")),
    Case("build-peptide-empty", "api", lambda c: tm.build_peptide(""),
         tm.InputError, ("sequence ''",)),
    Case("build-peptide-not-text", "api", lambda c: tm.build_peptide(123),
         tm.InputError, ("123", "int")),
    Case("build-peptide-nan-phi", "api", lambda c: tm.build_peptide("AAA", phi=np.nan),
         tm.InputError, ("phi", "nan")),
    Case("build-peptide-force-field-cannot-template", "api",
         lambda c: tm.build_peptide("AAA", forcefield=("tip3p.xml",)),
         tm.ForceFieldError, ("'AAA'", "tip3p.xml", "No template")),
    # amber99sbildn has N- and C-terminal variants but no template for a free amino acid
    Case("build-peptide-single-residue", "api", lambda c: tm.build_peptide("A"),
         tm.ForceFieldError, ("'A'", "amber99sbildn.xml", "cannot template", "ALA")),
    Case("make-target-nan-value", "api", lambda c: make_target(RadiusOfGyration(), np.nan, 0.1),
         tm.InputError, ("value[0] is nan",)),
    Case("make-target-negative-uncertainty", "api",
         lambda c: make_target(RadiusOfGyration(), 0.5, -0.1, name="Rg"),
         tm.InputError, ("'Rg'", "uncertainty[0] = -0.1")),
    Case("make-target-zero-weight", "api",
         lambda c: make_target(RadiusOfGyration(), 0.5, 0.1, weight=0.0),
         tm.InputError, ("weight", "0.0")),
    Case("fit-targets-not-targets", "api", lambda c: _fit(c, targets=["Rg"]),
         tm.InputError, ("targets[0] = 'Rg'", "make_target")),
    Case("fit-no-targets", "api", lambda c: _fit(c, targets=[]),
         tm.InputError, ("at least one target",)),
    Case("fit-negative-prior-width", "api", lambda c: _fit(c, prior_sigma=-1.0),
         tm.InputError, ("prior_sigma[0]", "torsion/C-N-CT-C/k", "-1.0")),
    Case("fit-prior-widths-wrong-count", "api", lambda c: _fit(c, prior_sigma=[1.0, 2.0, 3.0]),
         tm.InputError, ("prior_sigma", "[1.0, 2.0, 3.0]")),
    Case("fit-unknown-estimator", "api", lambda c: _fit(c, estimator="bayes"),
         tm.InputError, ("'bayes'",)),
    # ----------------------------------------------------- structure and force-field files
    Case("pdb-missing", "structure+forcefield", lambda c: tm.load_system(c.p("nope.pdb")),
         tm.MissingFileError, ("nope.pdb", "does not exist")),
    Case("pdb-empty", "structure+forcefield", lambda c: tm.load_system(c.p("empty.pdb")),
         tm.InputError, ("empty.pdb", "is empty"), {"empty.pdb": ""}),
    Case("pdb-no-atoms", "structure+forcefield", lambda c: tm.load_system(c.p("remark.pdb")),
         tm.InputError, ("remark.pdb", "no atoms"), {"remark.pdb": "REMARK nothing\nEND\n"}),
    Case("pdb-directory", "structure+forcefield", lambda c: tm.load_system(c.p("")),
         tm.ForceFieldError, ("could not read structure file", "directory")),
    Case("pdb-unreadable", "structure+forcefield", lambda c: tm.load_system(c.p("ala3.pdb")),
         tm.ForceFieldError, ("ala3.pdb", "ermission"), {"ala3.pdb": "@ALA3"},
         unreadable=("ala3.pdb",)),
    Case("pdb-nonstandard-residue", "structure+forcefield",
         lambda c: tm.load_system(c.p("xyz.pdb")),
         tm.ForceFieldError, ("xyz.pdb", "No template", "XYZ2"), {"xyz.pdb": "@XYZ"}),
    Case("pdb-not-a-path", "structure+forcefield", lambda c: tm.load_system(3.5),
         tm.InputError, ("pdb must be", "3.5")),
    Case("positions-nan", "structure+forcefield",
         lambda c: tm.load_system((c.top, np.full_like(c.x, np.nan))),
         tm.InputError, ("positions of the given topology", "nan", "atom 0")),
    Case("forcefield-missing", "structure+forcefield",
         lambda c: tm.load_system((c.top, c.x), forcefield=("nosuch.xml",)),
         tm.MissingFileError, ("'nosuch.xml'", "not found")),
    Case("forcefield-empty-file", "structure+forcefield",
         lambda c: tm.load_system((c.top, c.x), forcefield=(c.p("empty.xml"),)),
         tm.ForceFieldError, ("empty.xml", "could not be read"), {"empty.xml": ""}),
    Case("forcefield-not-xml", "structure+forcefield",
         lambda c: tm.load_system((c.top, c.x), forcefield=(c.p("ff.xml"),)),
         tm.ForceFieldError, ("ff.xml", "could not be read"), {"ff.xml": "<ForceField><Atom"}),
    Case("forcefield-not-a-name", "structure+forcefield",
         lambda c: tm.load_system((c.top, c.x), forcefield=(5,)),
         tm.InputError, ("forcefield entries", "5")),
    Case("forcefield-empty-list", "structure+forcefield",
         lambda c: tm.load_system((c.top, c.x), forcefield=()),
         tm.InputError, ("forcefield is empty",)),
    Case("forcefield-cannot-template", "structure+forcefield",
         lambda c: tm.load_system((c.top, c.x), forcefield=("tip3p.xml",)),
         tm.ForceFieldError, ("the given topology", "No template", "ALA")),
    Case("unknown-implicit-solvent", "structure+forcefield",
         lambda c: tm.load_system((c.top, c.x), implicit_solvent="gbn2"),
         tm.InputError, ("'gbn2'", "obc2")),
    # ------------------------------------------------------------ target files
    Case("targets-missing", "targets", lambda c: load_targets(c.p("nope.json")),
         tm.MissingFileError, ("nope.json", "does not exist")),
    Case("targets-empty-file", "targets", lambda c: load_targets(c.p("t.json")),
         tm.InputError, ("t.json", "not valid JSON"), {"t.json": ""}),
    Case("targets-directory", "targets", lambda c: load_targets(c.p("")),
         tm.InputError, ("target file", "not a file")),
    Case("targets-not-utf8", "targets", lambda c: load_targets(c.p("t.json")),
         tm.InputError, ("t.json", "UTF-8"), {"t.json": NOT_UTF8}),
    Case("targets-unreadable", "targets", lambda c: load_targets(c.p("t.json")),
         tm.InputError, ("t.json", "cannot be read"), {"t.json": f"[{RG}]"},
         unreadable=("t.json",)),
    Case("targets-nan-value", "targets", lambda c: load_targets(c.p("t.json"), c.top),
         tm.InputError, ("t.json", "target 0", "value[0] is nan"),
         {"t.json": '[{"type": "Rg", "atoms": "all", "value": NaN, "uncertainty": 0.1}]'}),
    Case("targets-infinite-uncertainty", "targets", lambda c: load_targets(c.p("t.json"), c.top),
         tm.InputError, ("t.json", "uncertainty[0] is inf"),
         {"t.json": '[{"type": "Rg", "atoms": "all", "value": 0.5, "uncertainty": Infinity}]'}),
    Case("targets-unknown-type", "targets", lambda c: load_targets(c.p("t.json"), c.top),
         tm.InputError, ("t.json", "unknown observable type 'Foo'"),
         {"t.json": '[{"type": "Foo", "value": 1, "uncertainty": 0.1}]'}),
    Case("targets-empty-selection", "targets", lambda c: load_targets(c.p("t.json"), c.top),
         tm.InputError, ("t.json", "'name ZZZ'", "matches no atom"),
         {"t.json": '[{"type": "Rg", "atoms": "name ZZZ", "value": 1, "uncertainty": 0.1}]'}),
    Case("targets-no-uncertainty", "targets", lambda c: load_targets(c.p("t.json"), c.top),
         tm.InputError, ("t.json", "no 'uncertainty'"),
         {"t.json": '[{"type": "Rg", "atoms": "all", "value": 0.5}]'}),
    Case("targets-wrong-count", "targets", lambda c: load_targets(c.p("t.json"), c.top),
         tm.InputError, ("t.json", "3 numbers", "1 values"),
         {"t.json": '[{"type": "Rg", "atoms": "all", "value": [1, 2, 3], "uncertainty": 0.1}]'}),
    Case("targets-not-a-list", "targets", lambda c: load_targets(c.p("t.json"), c.top),
         tm.InputError, ("t.json", "non-empty list", "5"), {"t.json": "5"}),
    Case("fit-target-file-missing", "targets", lambda c: _fit(c, targets=c.p("nope.json")),
         tm.MissingFileError, ("nope.json",)),
    # --------------------------------------- configuration files (the file itself)
    Case("config-directory", "config", lambda c: load_config(c.p(""), "simulate"),
         ConfigError, ("configuration file cannot be read",)),
    Case("config-not-utf8", "config", lambda c: load_config(c.p("c.toml"), "simulate"),
         ConfigError, ("c.toml", "UTF-8"), {"c.toml": NOT_UTF8}),
    Case("config-unreadable", "config", lambda c: load_config(c.p("c.toml"), "simulate"),
         ConfigError, ("c.toml", "cannot be read"), {"c.toml": SIMULATE_TOML},
         unreadable=("c.toml",)),
    Case("config-empty", "config", lambda c: load_config(c.p("c.toml"), "simulate"),
         ConfigError, ("c.toml", "[parameters].wrt: missing"), {"c.toml": ""}),
    Case("config-unknown-command", "config", lambda c: load_config(c.p("c.toml"), "simulat"),
         ConfigError, ("'simulat'", "simulate"), {"c.toml": SIMULATE_TOML}),
    # ------------------------------------------------------------ the command line
    Case("cli-run-unknown-letter", "cli",
         lambda c: main(["run", "-q", "--sequence", "AZA", "--out", c.p("out")]),
         1, ("'AZA'", "'Z'")),
    Case("cli-run-nonstandard-residue", "cli",
         lambda c: main(["run", "-q", "--pdb", c.p("xyz.pdb"), "--out", c.p("out")]),
         1, ("xyz.pdb", "XYZ2"), {"xyz.pdb": "@XYZ"}),
    Case("cli-run-empty-pdb", "cli",
         lambda c: main(["run", "-q", "--pdb", c.p("e.pdb"), "--out", c.p("out")]),
         1, ("e.pdb", "is empty"), {"e.pdb": ""}),
    Case("cli-run-nan-dt", "cli", lambda c: main(["run", "--dt", "nan", "--out", c.p("out")]),
         2, ("--dt", "nan")),
    Case("cli-run-negative-seed", "cli",
         lambda c: main(["run", "--seed", "-3", "--out", c.p("out")]), 2, ("--seed", "-3")),
    Case("cli-simulate-missing-config", "cli", lambda c: main(["simulate", c.p("none.toml")]),
         2, ("none.toml", "not found")),
    Case("cli-simulate-config-directory", "cli", lambda c: main(["simulate", c.p("")]),
         2, ("cannot be read",)),
    Case("cli-set-without-equals", "cli",
         lambda c: main(["simulate", c.p("c.toml"), "--set", "integrator.dt"]),
         2, ("--set", "'integrator.dt'", "section.key=value"), {"c.toml": SIMULATE_TOML}),
    # ------------------------------------------------------------ checkpoints
    # (an empty folder to resume starts afresh, an npz without its checksum record is
    # ignored with a warning, a damaged state falls back to the previous one:
    # tests/test_checkpoints.py)
    Case("fit-resume-other-settings", "checkpoint",
         lambda c: _fit(c, wrt="torsion/N-CT-C-N/k*", out_dir=c.p("fit"), resume=True),
         tm.InputError, ("checkpoint.npz", "other settings"), copy=("fit",)),
    Case("fit-resume-without-out-dir", "checkpoint", lambda c: _fit(c, resume=True),
         tm.InputError, ("resume=True needs out_dir",)),
    Case("simulate-continue-other-integrator", "checkpoint",
         lambda c: _continue(c, integrator=tm.LangevinIntegrator(dt=0.002, seed=0)),
         tm.InputError, ("sim", "dt"), copy=("sim",)),
    Case("simulate-continue-other-save-every", "checkpoint",
         lambda c: _continue(c, n_steps=4, save_every=2),
         tm.InputError, ("sim", "save_every"), copy=("sim",)),
    Case("simulate-continue-other-wrt", "checkpoint", lambda c: _continue(c, wrt="angle/*/k"),
         tm.InputError, ("x0.dx_dtheta", "wrt selects"), copy=("sim",)),
    Case("simulate-continue-from-scratch", "checkpoint", lambda c: _sim(c, out_dir=c.p("sim")),
         tm.InputError, ("already holds a trajectory", "resume=True"), copy=("sim",)),
    Case("trajectory-empty-meta", "checkpoint",
         lambda c: SensitivityTrajectory.load(c.p("sim")),
         tm.InputError, ("meta.json", "not valid JSON"), {"sim/meta.json": ""}, copy=("sim",)),
    Case("trajectory-missing", "checkpoint", lambda c: SensitivityTrajectory.load(c.p("none")),
         tm.MissingFileError, ("meta.json", "no streamed trajectory")),
]  # fmt: skip


def test_the_catalogue_holds_at_least_40_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids), "case ids must be distinct"
    assert len(CASES) >= 40
    # every area the issue names is covered
    areas = {c.area for c in CASES}
    assert areas == {"api", "structure+forcefield", "targets", "config", "cli", "checkpoint"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Trialanine in vacuum, its PDB text (and one with a nonstandard residue), a target,
    and two prepared folders: a fit checkpoint ("fit") and a streamed trajectory ("sim")."""
    import openmm.app as app

    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x))
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    buf = io.StringIO()
    app.PDBFile.writeFile(top, x * 10.0, buf)
    pdb = buf.getvalue()
    assert "ALA A   2" in pdb
    base = tmp_path_factory.mktemp("prepared")
    w = dict(
        top=top,
        x=x,
        system=system,
        integrator=integrator,
        targets=[make_target(RadiusOfGyration(), 0.5, 0.05, name="Rg")],
        texts={"@ALA3": pdb, "@XYZ": pdb.replace("ALA A   2", "XYZ A   2")},
        prepared=base,
    )
    c = _Context(w, base)
    _fit(c, out_dir=c.p("fit"))
    _sim(c, out_dir=c.p("sim"))
    assert os.path.isfile(c.p("fit/checkpoint.npz")) and os.path.isfile(c.p("sim/state.npz"))
    return w


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_our_error_naming_the_value_and_leaves_no_output(
    case, world, tmp_path, capsys
):
    if case.unreadable and ROOT:
        pytest.skip("runs as root: chmod 000 does not stop reads")
    c = _Context(world, tmp_path)
    for name in case.copy:
        shutil.copytree(world["prepared"] / name, tmp_path / name)
    for name, content in (case.files or {}).items():
        content = world["texts"].get(content, content)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    for name in case.unreadable:
        os.chmod(tmp_path / name, 0)
    before = _snapshot(tmp_path) if not case.unreadable else None
    try:
        if isinstance(case.error, int):
            rc = case.call(c)
            err = capsys.readouterr().err.strip()
            assert rc == case.error, err
            assert "\n" not in err and err.startswith("timemachine: error: "), err
            assert "unexpected" not in err and "Traceback" not in err, err
            message = err
        else:
            with pytest.raises(tm.TimemachineError) as info:
                case.call(c)
            assert isinstance(info.value, case.error), repr(info.value)
            message = str(info.value)
    finally:
        for name in case.unreadable:
            os.chmod(tmp_path / name, 0o644)
    for fragment in case.contains:
        assert fragment in message, f"{fragment!r} not in: {message}"
    if before is not None:
        assert _snapshot(tmp_path) == before, "the failed call changed or left files"
    leftovers = [n for n in _snapshot(tmp_path) if ".tmp-" in os.path.basename(n)]
    assert not leftovers, leftovers
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
