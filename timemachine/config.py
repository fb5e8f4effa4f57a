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
    ``backend`` ("jax" | "cuda"): a sensitivity trajectory.
``[fdcheck]``
    ``steps``, ``h`` (relative central-difference step), ``save_every``,
    ``max_rel_error``: analytic dx/dθ against central finite differences.
``[run]``
    ``time`` ps (required), ``save_interval`` ps (between ``dt`` and ``time``): a plain
    simulation (``timemachine run CONFIG``).
``[output]``
    ``dir``: the output folder (relative to the working directory).

Command-line flags override single keys: ``--set simulate.steps=500``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable

import tomllib

from timemachine.errors import InputError

__all__ = ["SCHEMA", "ConfigError", "Key", "load_config", "parse_override"]


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


_INT, _REAL, _STR, _BOOL = (int,), (int, float), (str,), (bool,)

SCHEMA: dict[str, dict[str, Key]] = {
    "system": {
        "pdb": Key(_STR, "a PDB file (path relative to the configuration file)"),
        "sequence": Key(_STR, "a peptide sequence to build", check=_sequence),
        "forcefield": Key(
            (list, str), "OpenMM force-field XML files", default=["amber99sbildn.xml"]
        ),
        "implicit_solvent": Key(_STR, "implicit solvent", default="none", choices=("obc2", "none")),
        "minimize": Key(_BOOL, "minimise before dynamics", default=True),
    },
    "integrator": {
        "temperature": Key(_REAL, "bath temperature", default=300.0, check=_positive("K")),
        "friction": Key(_REAL, "Langevin friction", default=1.0, check=_nonnegative("1/ps")),
        "dt": Key(_REAL, "time step", default=0.001, check=_between(0.0, 0.01, "ps")),
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
        "time": Key(_REAL, "simulated time", required=True, check=_positive("ps")),
        "save_interval": Key(
            _REAL, "time between saved frames", default=0.1, check=_positive("ps")
        ),  # fmt: skip
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
}


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
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} = {value!r}: must be a list of strings")
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
    "fdcheck" | "run").

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
        file, an unknown force field, or inconsistent keys (pdb and sequence, a save
        interval longer than the run).
    """
    path = os.fspath(path)
    label = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
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
    run = cfg[command]
    if run["save_every"] is not None and run["save_every"] > run["steps"]:
        raise ConfigError(
            f"{label}: [{command}].save_every = {run['save_every']}: longer than the run "
            f"([{command}].steps = {run['steps']})"
        )
