"""Run configurations: TOML files for the command line, read and checked against a schema.

A configuration is a TOML file (read with the standard library's ``tomllib``) of sections;
each key has a type, a range or a set of choices, and a default or is required. Loading
checks everything at once, before any system is built, and a bad file gives one
:class:`ConfigError` line naming the file and the key::

    run.toml: [integrator].dt = -0.001: must be > 0 (ps)
    run.toml: [simulate].steps: missing (required: number of Langevin steps)
    run.toml: [system].forcefeld: unknown key (did you mean 'forcefield'?)

The schema (the sections a command reads; ``SCHEMA`` below, one :class:`Key` each):

``[system]``
    ``pdb`` (path, relative to the file) or ``sequence`` (one-letter amino acids, built
    with PeptideBuilder); ``forcefield`` (list of OpenMM XML files, on disk or in
    OpenMM's data folder; default amber99sbildn.xml); ``implicit_solvent`` ("obc2" or
    "none"); ``minimize`` (L-BFGS-B before dynamics; default true).
``[integrator]``
    ``temperature`` K, ``friction`` 1/ps, ``dt`` ps, ``seed``: the Langevin integrator
    (docs/design.md, "The Langevin step").
``[parameters]``
    ``wrt``: globs over the System's parameter names (``"torsion/*/k*"``), each of which
    must match at least one parameter.
``[simulate]``
    ``steps``, ``save_every`` (at most ``steps``), ``method`` ("exact" | "window"),
    ``backend`` ("jax" | "cuda"), ``precision`` ("float64" | "float32", not with
    "cuda"): a sensitivity trajectory.
``[fdcheck]``
    ``steps``, ``h`` (relative central-difference step), ``save_every``,
    ``max_rel_error``: analytic dx/dθ against central finite differences.
``[run]``
    ``time`` ps (required), ``save_interval`` ps (between ``dt`` and ``time``): a plain
    simulation (``timemachine run CONFIG``).
``[targets]`` (fit)
    the data, with value and uncertainty: ``builtin = "graf2007"`` (the trialanine
    couplings shipped in ``timemachine/data``), ``file`` (a JSON target file,
    ``timemachine.fitting.targets``' format), and/or inline ``[[targets.entry]]`` tables
    (``type``, the observable's keys, ``value``, ``uncertainty``, optional ``name`` and
    ``weight``); ``holdout`` (target names or coupling types scored only in the
    validation); ``citation`` (shown in the report).
``[estimator]`` (fit)
    ``kind`` ("fluctuation" | "hybrid"); the hybrid's ``replicas``, ``horizon`` ("auto" or
    steps), ``max_horizon``.
``[sampling]`` (fit)
    ``chains``, ``sample_steps`` and ``decorrelation_steps`` (multiples of ``save_every``),
    ``save_every``, ``min_ess``, ``max_extend``, ``reservoir_size``, ``backend`` ("jax":
    the chains run on JAX, a GPU through XLA when JAX has one), ``precision`` ("float64"
    | "float32": the chains' dynamics, docs/float32.md).
``[optimizer]`` (fit)
    ``kind`` ("gauss-newton" | "adam"), ``epochs``, ``learning_rate`` (adam),
    ``prior_sigma`` (0: none), ``stop_chi2`` (0: never), ``trust_radius``,
    ``max_trust_radius``, ``parametrization``.
``[validation]`` (fit)
    ``ns`` per model in OpenMM (0 skips it), ``seeds``, ``compare`` (other force fields).
``[executor]`` (fit)
    ``kind`` ("in-process": the chains and replicas vectorised in this process, sharded
    over its JAX devices; "dask": tasks on a Dask cluster, ``timemachine.fitting.executor``),
    ``n_workers`` (the local cluster's worker processes, default 2), ``address`` (an
    existing cluster's scheduler, ``"tcp://host:8786"``, instead of a local one).
``[output]``
    ``dir``: the output folder (relative to the working directory).

``examples/`` holds one configuration per command; ``docs/configuration.md`` lists every
key with its default.

Command-line flags override single keys: ``--set simulate.steps=500``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable

import tomllib

from timemachine.constants import DEFAULT_CUTOFF
from timemachine.errors import InputError

__all__ = [
    "SCHEMA",
    "ConfigError",
    "Key",
    "build_structure",
    "build_system",
    "build_targets",
    "config_label",
    "default_config",
    "executor_keys",
    "executor_of",
    "load_config",
    "parse_override",
]


class ConfigError(InputError):
    """A configuration file that does not match the schema; the message is one line
    naming the file and the key."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of a section: its type(s), whether it is required, its default, and a
    check returning an error text (or None) for a value of the right type."""

    types: tuple
    doc: str
    default: object = None
    required: bool = False
    check: Callable | None = None
    choices: tuple = ()
    items: tuple = (str,)  # the type of a list's elements


def _positive(unit):
    return lambda v: None if v > 0 and math.isfinite(v) else f"must be > 0 ({unit})"


def _nonnegative(unit):
    return lambda v: None if v >= 0 and math.isfinite(v) else f"must be >= 0 ({unit})"


def _between(lo, hi, unit):
    return lambda v: None if lo < v <= hi else f"must be in ({lo}, {hi}] ({unit})"


def _sequence(v):
    bad = sorted(set(v.upper()) - set("ACDEFGHIKLMNPQRSTVWY"))
    if not v:
        return "must be a non-empty one-letter amino-acid sequence"
    return f"holds {''.join(bad)!r}, not one-letter amino acids" if bad else None


def _nonempty(v):
    return None if len(v) else "must not be empty"


def _horizon(v):
    if isinstance(v, str):
        return None if v == "auto" else 'must be "auto" or an integer >= 1 (steps)'
    return None if v >= 1 else 'must be "auto" or an integer >= 1 (steps)'


def _address(v):
    return None if "://" in v else 'must be a scheduler address, "tcp://host:8786"'


_INT, _REAL, _STR, _BOOL = (int,), (int, float), (str,), (bool,)

#: ``[executor].kind``'s choices (``timemachine.fitting.executor.EXECUTORS``)
EXECUTORS = ("in-process", "dask")

#: ``[system].nonbonded_method``'s choices: those of ``load_system`` that need no periodic
#: box (a configuration builds a peptide or reads a PDB without one)
NONBONDED_METHODS = ("NoCutoff", "CutoffNonPeriodic")

#: data sets shipped in ``timemachine/data`` that ``[targets].builtin`` names
BUILTIN_TARGETS = ("graf2007",)

SCHEMA: dict[str, dict[str, Key]] = {
    "system": {
        "pdb": Key(_STR, "a PDB file (path relative to the configuration file)"),
        "sequence": Key(_STR, "a peptide sequence to build", check=_sequence),
        "forcefield": Key(
            (list, str), "OpenMM force-field XML files", default=["amber99sbildn.xml"]
        ),
        "implicit_solvent": Key(_STR, "implicit solvent", default="none", choices=("obc2", "none")),
        "nonbonded_method": Key(
            _STR,
            "OpenMM's nonbonded method: every pair, or reaction field (and with obc2 the GB "
            "pairs) within the cutoff, summed over Verlet lists",
            default="NoCutoff",
            choices=NONBONDED_METHODS,
        ),
        "cutoff": Key(
            _REAL,
            "the cutoff (nm), with CutoffNonPeriodic (default 1.0, as OpenMM's)",
            default=None,
            check=_positive("nm"),
        ),  # fmt: skip
        "minimize": Key(_BOOL, "minimise before dynamics", default=True),
    },
    "integrator": {
        "temperature": Key(_REAL, "bath temperature (K)", default=300.0, check=_positive("K")),
        "friction": Key(_REAL, "Langevin friction (1/ps)", default=1.0, check=_nonnegative("1/ps")),
        "dt": Key(_REAL, "time step (ps)", default=0.001, check=_between(0.0, 0.01, "ps")),
        "seed": Key(_INT, "noise seed", default=0, check=_nonnegative("an integer")),
    },
    "parameters": {
        "wrt": Key((list, str), "parameter globs", required=True, check=_nonempty),
    },
    "simulate": {
        "steps": Key(_INT, "number of Langevin steps", required=True, check=_positive("steps")),
        "save_every": Key(_INT, "steps between saved frames", default=10, check=_positive("steps")),
        "method": Key(
            _STR, "sensitivity propagation", default="exact", choices=("exact", "window")
        ),
        "backend": Key(_STR, "where the steps run", default="jax", choices=("jax", "cuda")),
        "precision": Key(
            _STR,
            "float64, or float32 (docs/float32.md)",
            default="float64",
            choices=("float64", "float32"),
        ),
    },
    "fdcheck": {
        "steps": Key(_INT, "number of Langevin steps", required=True, check=_positive("steps")),
        "h": Key(_REAL, "relative central-difference step", default=1e-4, check=_positive("")),
        "save_every": Key(
            _INT, "steps between compared frames", default=None, check=_positive("steps")
        ),
        "max_rel_error": Key(
            _REAL, "largest accepted relative error", default=1e-4, check=_positive("")
        ),  # fmt: skip
    },
    "run": {
        "time": Key(_REAL, "simulated time (ps)", required=True, check=_positive("ps")),
        "save_interval": Key(
            _REAL, "time between saved frames (ps)", default=0.1, check=_positive("ps")
        ),  # fmt: skip
    },
    "targets": {
        "builtin": Key(_STR, "a data set shipped with the package", choices=BUILTIN_TARGETS),
        "file": Key(_STR, "a JSON target file (path relative to the configuration file)"),
        "entry": Key((list,), "inline targets, one [[targets.entry]] table each", items=(dict,)),
        "holdout": Key(
            (list,),
            "target names or coupling types left out of the fit, scored in the validation",
            default=[],
        ),  # fmt: skip
        "citation": Key(_STR, "where the data come from (shown in the report)", default=None),
    },
    "estimator": {
        "kind": Key(
            _STR,
            "gradient estimator of the equilibrium averages",
            default="fluctuation",
            choices=("fluctuation", "hybrid"),
        ),
        "replicas": Key(
            _INT,
            "hybrid: sensitivity replicas per epoch",
            default=32,
            check=lambda v: None if v >= 2 else "must be >= 2",
        ),
        "horizon": Key(
            (str, int), "hybrid: horizon in steps, or auto", default="auto", check=_horizon
        ),
        "max_horizon": Key(
            _INT, "hybrid: the longest horizon tried", default=500, check=_positive("steps")
        ),
    },  # fmt: skip
    "sampling": {
        "chains": Key(_INT, "persistent equilibrium chains", default=4, check=_positive("chains")),
        "sample_steps": Key(
            _INT,
            "production steps per chain per sampled epoch",
            default=125_000,
            check=_positive("steps"),
        ),
        "decorrelation_steps": Key(
            _INT,
            "steps discarded after each change of θ",
            default=25_000,
            check=_nonnegative("steps"),
        ),
        "save_every": Key(_INT, "steps between kept frames", default=250, check=_positive("steps")),
        "min_ess": Key(
            _REAL,
            "fewest effective samples an epoch accepts",
            default=20.0,
            check=_positive("samples"),
        ),
        "max_extend": Key(
            _INT,
            "extra production segments when the ESS is short",
            default=3,
            check=_nonnegative("segments"),
        ),
        "reservoir_size": Key(
            _INT, "frames kept for reweighting", default=2000, check=_positive("frames")
        ),
        "backend": Key(
            _STR,
            "where the chains run (JAX: CPU, or a GPU through XLA)",
            default="jax",
            choices=("jax",),
        ),
        "precision": Key(
            _STR,
            "the chains' dynamics: float64, or float32 (docs/float32.md)",
            default="float64",
            choices=("float64", "float32"),
        ),
    },  # fmt: skip
    "optimizer": {
        "kind": Key(_STR, "optimiser", default="gauss-newton", choices=("gauss-newton", "adam")),
        "epochs": Key(_INT, "the most fit epochs", default=10, check=_positive("epochs")),
        "learning_rate": Key(_REAL, "adam: step, relative", default=0.1, check=_positive("")),
        "prior_sigma": Key(
            _REAL,
            "width of a Gaussian prior on each fitted parameter, its units; 0 for none",
            default=2.0,
            check=_nonnegative("θ's units"),
        ),
        "stop_chi2": Key(
            _REAL,
            "stop below this χ²/N by 2 standard errors; 0 for never",
            default=1.0,
            check=_nonnegative(""),
        ),
        "trust_radius": Key(
            _REAL, "gauss-newton: first trust radius, relative", default=0.2, check=_positive("")
        ),
        "max_trust_radius": Key(
            _REAL, "gauss-newton: largest trust radius, relative", default=0.5, check=_positive("")
        ),
        "parametrization": Key(
            _STR,
            "coordinates the optimiser steps in",
            default="relative",
            choices=("relative", "log", "absolute"),
        ),
    },  # fmt: skip
    "validation": {
        "ns": Key(
            _REAL,
            "OpenMM validation time per model (ns); 0 skips it",
            default=2.0,
            check=_nonnegative("ns"),
        ),
        "seeds": Key(
            _INT, "independent OpenMM chains per model", default=4, check=_positive("chains")
        ),
        "compare": Key((list,), "other OpenMM force fields validated the same way", default=[]),
    },  # fmt: skip
    "executor": {
        "kind": Key(
            _STR,
            "where the chains and replicas run: this process, or tasks on Dask",
            default="in-process",
            choices=EXECUTORS,
        ),
        "n_workers": Key(
            _INT,
            "dask: worker processes of the local cluster started for the fit; null: 2",
            default=None,
            check=_positive("workers"),
        ),
        "address": Key(
            _STR,
            'dask: an existing cluster\'s scheduler ("tcp://host:8786"); null: a local one',
            default=None,
            check=_address,
        ),
    },
    "output": {
        "dir": Key(_STR, "output folder", default=None),
    },
}

#: the sections each command reads (others in the file are refused: they would be ignored)
COMMANDS = {
    "simulate": ("system", "integrator", "parameters", "simulate", "output"),
    "fdcheck": ("system", "integrator", "parameters", "fdcheck", "output"),
    "run": ("system", "integrator", "run", "output"),
    "fit": ("system", "integrator", "parameters", "targets", "estimator", "sampling",
            "optimizer", "validation", "executor", "output"),
}  # fmt: skip


def _hint(name, options):
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def _type_name(types):
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list"}  # fmt: skip
    if types == _REAL:
        return "a number"
    return " or ".join(names[t] for t in types)


def _check_value(where, key, value):
    ok = isinstance(value, key.types) and not (isinstance(value, bool) and bool not in key.types)
    if not ok:
        raise ConfigError(f"{where} = {value!r}: must be {_type_name(key.types)}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{where} = {value!r}: must be one of {', '.join(key.choices)}")
    if isinstance(value, list) and not all(isinstance(v, key.items) for v in value):
        what = "tables" if key.items == (dict,) else "strings"
        raise ConfigError(f"{where} = {value!r}: must be a list of {what}")
    if key.check is not None:
        why = key.check(value)
        if why:
            raise ConfigError(f"{where} = {value!r}: {why}")


def _forcefield_file(name, base, where):
    """The path of force-field file ``name``: relative to ``base`` (the configuration's
    folder) if it is there, else as OpenMM finds it (on disk or in its data folder), as
    ``timemachine.io`` checks it."""
    from timemachine.errors import MissingFileError, TimemachineError
    from timemachine.io.forcefield_xml import check_forcefield_files

    here = os.path.join(base, name)
    path = here if os.path.isfile(here) else name
    try:
        check_forcefield_files((path,))
    except MissingFileError:
        raise ConfigError(
            f"{where} = {name!r}: unknown force field (not a file beside the configuration, "
            f"nor in OpenMM's data folder)"
        ) from None
    except TimemachineError as exc:  # not valid XML, or a solvation model twice
        raise ConfigError(f"{where} = {name!r}: {exc}") from None
    return path


def default_config(command) -> dict:
    """{section: {key: default}} of every section ``command`` reads (required keys None);
    ``"_file"`` None. A program that builds its settings itself (the main job) starts here,
    so its dict has the form ``load_config`` returns."""
    return {"_file": None, **{name: {k: key.default for k, key in SCHEMA[name].items()}
                              for name in COMMANDS[command]}}  # fmt: skip


def config_label(cfg) -> str:
    """How errors name a configuration: its file's name, or ``cfg["_label"]`` for settings
    built in a program."""
    if cfg.get("_file"):
        return os.path.basename(cfg["_file"])
    return cfg.get("_label") or "the settings"


def schema_markdown() -> str:
    """``docs/configuration.md``: every section and key of ``SCHEMA`` with its type,
    default (JSON; null: none, or "required") and meaning, and the commands that read
    each section."""
    import json

    lines = ["# Configuration files", "",
             "Generated from `timemachine.config.SCHEMA` (`tests/test_fit_config.py` checks "
             "that it is current). Paths are relative to the configuration file; "
             "`--set section.key=value` overrides one key.", ""]  # fmt: skip
    for name, spec in SCHEMA.items():
        users = [c for c, sections in COMMANDS.items() if name in sections]
        lines += [f"## [{name}]", "", f"Read by: {', '.join(users)}.", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]  # fmt: skip
        for key, k in spec.items():
            default = "required" if k.required else json.dumps(k.default, ensure_ascii=False)
            what = k.doc + (f" (one of {', '.join(k.choices)})" if k.choices else "")
            lines.append(f"| `{key}` | {_type_name(k.types)} | {default} | {what} |")
        lines.append("")
    return "\n".join(lines)


def parse_override(text):
    """``"section.key=value"`` (value in TOML syntax; a bare word is a string) -> (section,
    key, value)."""
    name, eq, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key.strip(), value


def load_config(path, command, overrides=()) -> dict:
    """Read and check the configuration file ``path`` for ``command`` ("simulate" |
    "fdcheck" | "run" | "fit").

    Args:
      path: a TOML file.
      command: which sections apply (``COMMANDS``).
      overrides: ``(section, key, value)`` triples (``parse_override``) applied before the
        checks, as from the command line.

    Returns:
      {section: {key: value}} with every default filled in; paths made absolute
      (``system.pdb``) or resolved (``system.forcefield``: a list of files); ``wrt`` and
      ``forcefield`` always lists; ``"_file"``: the configuration's path.

    Raises:
      ConfigError: one line, naming the file and the first offending key: a TOML syntax
        error, an unknown section or key (with a did-you-mean hint), a wrong type, a
        value out of range or not among the choices, a missing required key, a missing
        file, an unknown force field, a target without a value or an uncertainty, or
        inconsistent keys (pdb and sequence, a save interval longer than the run, no
        targets at all).
    """
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}: one of {', '.join(sorted(COMMANDS))}")
    path = os.fspath(path)
    label = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: not UTF-8 text ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{label}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: configuration file cannot be read: {exc.strerror or exc}"
        ) from None
    for section, key, value in overrides:
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{label}: --set {section}.{key}: [{section}] is not a section")
        raw.setdefault(section, {})[key] = value
    sections = COMMANDS[command]
    base = os.path.dirname(os.path.abspath(path))
    out = {"_file": path}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(
                f"{label}: [{name}]: unknown section for {command}{_hint(name, sections)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: {name} = {value!r}: must be a [{name}] section")
    for name in sections:
        given = raw.get(name, {})
        spec = SCHEMA[name]
        for key in given:
            if key not in spec:
                raise ConfigError(f"{label}: [{name}].{key}: unknown key{_hint(key, spec)}")
        section = {}
        for key, k in spec.items():
            where = f"{label}: [{name}].{key}"
            if key not in given:
                if k.required:
                    raise ConfigError(f"{where}: missing (required: {k.doc})")
                section[key] = k.default
                continue
            _check_value(where, k, given[key])
            section[key] = given[key]
        out[name] = section
    _check_consistency(out, label, base, command)
    return out


def _check_consistency(cfg, label, base, command):
    system = cfg["system"]
    if (system["pdb"] is None) == (system["sequence"] is None):
        both = "both" if system["pdb"] is not None else "neither"
        raise ConfigError(f"{label}: [system]: give one of pdb and sequence ({both} given)")
    if system["pdb"] is not None:
        pdb = os.path.join(base, system["pdb"])
        if not os.path.isfile(pdb):
            raise ConfigError(f"{label}: [system].pdb = {system['pdb']!r}: file not found ({pdb})")
        system["pdb"] = pdb
    if system["nonbonded_method"] == "NoCutoff" and system["cutoff"] is not None:
        raise ConfigError(
            f"{label}: [system].cutoff = {system['cutoff']}: NoCutoff takes every pair; set "
            '[system].nonbonded_method = "CutoffNonPeriodic" for a cutoff'
        )
    if system["nonbonded_method"] != "NoCutoff" and system["cutoff"] is None:
        system["cutoff"] = DEFAULT_CUTOFF
    files = system["forcefield"]
    files = [files] if isinstance(files, str) else list(files)
    if not files:
        raise ConfigError(f"{label}: [system].forcefield: must name at least one XML file")
    where = f"{label}: [system].forcefield"
    resolved = [_forcefield_file(f, base, where) for f in files]
    system["forcefield"] = resolved
    if command == "run":
        run, dt = cfg["run"], cfg["integrator"]["dt"]
        if run["save_interval"] > run["time"]:
            raise ConfigError(
                f"{label}: [run].save_interval = {run['save_interval']}: longer than the run "
                f"([run].time = {run['time']} ps)"
            )
        if run["save_interval"] < dt:
            raise ConfigError(
                f"{label}: [run].save_interval = {run['save_interval']}: shorter than the "
                f"time step ([integrator].dt = {dt} ps)"
            )
        return
    wrt = cfg["parameters"]["wrt"]
    cfg["parameters"]["wrt"] = [wrt] if isinstance(wrt, str) else list(wrt)
    if command == "fit":
        _check_fit(cfg, label, base)
        return
    run = cfg[command]
    if run["save_every"] is not None and run["save_every"] > run["steps"]:
        raise ConfigError(
            f"{label}: [{command}].save_every = {run['save_every']}: longer than the run "
            f"([{command}].steps = {run['steps']})"
        )


def _check_fit(cfg, label, base):
    """The fit's sections beyond their single keys: the targets (each inline entry and the
    data file's, before any system is built), the sampling's frame spacing."""
    import json

    t = cfg["targets"]
    if t["builtin"] is None and t["file"] is None and t["entry"] is None:
        raise ConfigError(
            f"{label}: [targets]: give the data: builtin = {BUILTIN_TARGETS[0]!r}, "
            "file = a JSON target file, or [[targets.entry]] tables"
        )
    if t["entry"] is not None:
        for i, entry in enumerate(t["entry"]):
            _check_target_entry(f"{label}: [[targets.entry]] {i + 1}", entry)
    if t["file"] is not None:
        path = os.path.join(base, t["file"])
        where = f"{label}: [targets].file = {t['file']!r}"
        if not os.path.isfile(path):
            raise ConfigError(f"{where}: file not found ({path})")
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: not a readable JSON target file: {exc}") from None
        entries = data.get("targets") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}: expected a non-empty list or {{'targets': [...]}}")
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and entry.get("skip") is True):
                _check_target_entry(f"{where}, target {i}", entry)
        t["file"] = path
    s = cfg["sampling"]
    if s["save_every"] > s["sample_steps"] or s["sample_steps"] % s["save_every"]:
        raise ConfigError(
            f"{label}: [sampling].sample_steps = {s['sample_steps']}: must be a multiple of "
            f"[sampling].save_every = {s['save_every']} (the steps between kept frames)"
        )
    if s["decorrelation_steps"] % s["save_every"]:
        raise ConfigError(
            f"{label}: [sampling].decorrelation_steps = {s['decorrelation_steps']}: must be "
            f"a multiple of [sampling].save_every = {s['save_every']}"
        )
    v = cfg["validation"]
    if v["compare"] and v["ns"] == 0:
        raise ConfigError(
            f"{label}: [validation].compare: needs the OpenMM validation, which "
            "[validation].ns = 0 skips"
        )
    v["compare"] = [
        _forcefield_file(f, base, f"{label}: [validation].compare") for f in v["compare"]
    ]
    _check_executor(cfg, label)


def _check_executor(cfg, label):
    """``[executor]``: n_workers and address only with kind "dask", not both, and Dask
    installed (the optional extra) when it is asked for."""
    e = cfg["executor"]
    for key in ("n_workers", "address"):
        if e[key] is not None and e["kind"] != "dask":
            raise ConfigError(
                f'{label}: [executor].{key} = {e[key]!r}: applies to kind = "dask", not '
                f"kind = {e['kind']!r}"
            )
    if e["address"] is not None and e["n_workers"] is not None:
        raise ConfigError(
            f"{label}: [executor].n_workers = {e['n_workers']}: an existing cluster "
            f"([executor].address = {e['address']!r}) has its own workers"
        )
    if e["kind"] == "dask":
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ConfigError(
                f'{label}: [executor].kind = "dask": Dask is not installed '
                "(pip install 'timemachine[dask]')"
            ) from None


def executor_keys(executor, n_workers):
    """The command line's ``--executor`` and ``--n-workers`` as ``[executor]`` keys:
    (section, key, value) triples, none for a flag not given (None); an address sets
    kind "dask" and the address."""
    keys = []
    if executor is not None:
        if "://" in executor:
            keys += [("executor", "kind", "dask"), ("executor", "address", executor)]
        else:
            keys.append(("executor", "kind", executor))
    if n_workers is not None:
        keys.append(("executor", "n_workers", n_workers))
    return keys


def executor_of(cfg):
    """(executor, n_workers) of a checked fit configuration's ``[executor]``, as
    ``timemachine.fit`` and ``fit_equilibrium`` take them: "in-process", "dask" (a local
    cluster of n_workers) or the scheduler address."""
    e = cfg.get("executor") or {"kind": "in-process", "n_workers": None, "address": None}
    return (e["address"] or e["kind"]), e["n_workers"]


def _check_target_entry(where, entry):
    """One target (an inline table or a data file's entry) before any topology exists: a
    known observable type and its keys, a value, and an uncertainty > 0."""
    from timemachine.fitting.observables.specs import OBSERVABLE_TYPES, SPEC_KEYS, TARGET_KEYS

    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table of keys (type, value, uncertainty, ...)")
    name = entry.get("name")
    if name is not None:
        where = f"{where} ({name!r})"
    kind = entry.get("type")
    if kind is None:
        raise ConfigError(
            f"{where}: 'type' missing (the observable: {', '.join(OBSERVABLE_TYPES)})"
        )
    if kind not in OBSERVABLE_TYPES:
        raise ConfigError(
            f"{where}: type = {kind!r}: unknown observable{_hint(kind, OBSERVABLE_TYPES)}"
        )
    known = {"type", *TARGET_KEYS, *SPEC_KEYS[kind]}
    for key in entry:
        if key not in known:
            raise ConfigError(
                f"{where}: {key!r}: unknown key for a {kind} target{_hint(key, sorted(known))}"
            )
    value = entry.get("value", entry.get("values"))
    if value is None:
        raise ConfigError(f"{where}: 'value' missing (the measured value(s))")
    sigma = entry.get("uncertainty", entry.get("uncertainties", entry.get("sigma")))
    if sigma is None:
        raise ConfigError(f"{where}: 'uncertainty' missing (σ > 0 of the measured value(s))")
    for what, v in (("value", value), ("uncertainty", sigma)):
        items = v if isinstance(v, list) else [v]
        ok = items and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in items
        )
        if not ok:
            raise ConfigError(f"{where}: {what} = {v!r}: must be a finite number or a list of them")
        if what == "uncertainty" and min(items) <= 0:
            raise ConfigError(f"{where}: uncertainty = {v!r}: must be > 0")


def build_structure(cfg):
    """(topology, positions (N, 3) nm) of a checked configuration's ``[system]``: its PDB
    (solvent kept as it is) or the peptide built from its sequence."""
    from timemachine.io import build_peptide

    s = cfg["system"]
    if s["pdb"] is not None:
        import numpy as np
        import openmm.app as app
        import openmm.unit as unit

        pdb = app.PDBFile(s["pdb"])
        x = np.asarray(pdb.positions.value_in_unit(unit.nanometer), np.float64).reshape(-1, 3)
        return pdb.topology, x
    return build_peptide(s["sequence"], tuple(s["forcefield"]))


def nonbonded_options(cfg) -> dict:
    """``load_system``'s (and ``validate_openmm``'s) ``nonbonded_method`` and ``cutoff``
    of a checked configuration's ``[system]``."""
    s = cfg["system"]
    return {"nonbonded_method": s["nonbonded_method"], "cutoff": s["cutoff"]}


def build_system(cfg):
    """The objects a checked configuration describes: (system, x (N, 3) nm, topology, wrt
    (P,) int64, integrator); ``x`` minimised when ``[system].minimize``.

    Raises:
      ConfigError: a ``[parameters].wrt`` glob matching none of the system's parameters.
    """
    import numpy as np

    from timemachine.integrator import LangevinIntegrator
    from timemachine.io import load_system
    from timemachine.structured import minimize_system

    s = cfg["system"]
    files = tuple(s["forcefield"])
    structure = build_structure(cfg)
    solvent = None if s["implicit_solvent"] == "none" else s["implicit_solvent"]
    system, x = load_system(structure, forcefield=files, implicit_solvent=solvent,
                            **nonbonded_options(cfg))  # fmt: skip
    try:  # θ order, as System.select gives it
        wrt = system.select(cfg["parameters"]["wrt"])
    except InputError as exc:
        raise ConfigError(f"{config_label(cfg)}: [parameters].wrt: {exc}") from None
    if s["minimize"]:
        x = minimize_system(system, x, tolerance=1.0, max_iterations=500, warn=False)
    i = cfg["integrator"]
    integrator = LangevinIntegrator(
        temperature=i["temperature"], friction=i["friction"], dt=i["dt"], seed=i["seed"]
    )
    return system, np.asarray(x), system.topology, np.asarray(wrt, np.int64), integrator


def build_targets(cfg, topology):
    """(all targets, fitted targets) of a checked fit configuration: the builtin data set,
    the file's entries and the inline ones, in that order; the fitted ones are those not
    named (by name or coupling type) in ``[targets].holdout``.

    Raises:
      ConfigError: a holdout naming no target, or one leaving nothing to fit.
      InputError: a target the topology cannot compute (a residue or atom selection it
        lacks), naming the file and the entry.
    """
    from timemachine.fitting.targets import graf2007_targets, load_targets, targets_from_specs

    t = cfg["targets"]
    label = config_label(cfg)
    targets = []
    if t["builtin"] == "graf2007":
        targets += graf2007_targets(topology)
    if t["file"] is not None:
        targets += load_targets(t["file"], topology)
    if t["entry"] is not None:
        targets += targets_from_specs(t["entry"], topology, source=f"{label}: [[targets.entry]]")
    names = [x.name for x in targets]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{label}: [targets]: two targets are named {twice[0]!r}")
    held = set(t["holdout"])
    kinds = {x.name: (x.spec or {}).get("type") for x in targets}
    unknown = sorted(h for h in held if h not in kinds and h not in kinds.values())
    if unknown:
        have = sorted(set(kinds) | {k for k in kinds.values() if k})
        raise ConfigError(
            f"{label}: [targets].holdout = {unknown[0]!r}: no target of that name or type "
            f"(the targets: {', '.join(have)})"
        )
    fitted = [x for x in targets if x.name not in held and kinds[x.name] not in held]
    if not fitted:
        raise ConfigError(f"{label}: [targets].holdout leaves no target to fit")
    return targets, fitted
