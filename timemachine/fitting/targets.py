"""Experimental targets: an observable, its measured values and their uncertainties.

A target file is JSON: a list of entries, or ``{"targets": [...]}``. Each entry names an
observable spec (``timemachine.fitting.observable_from_spec``) and its data::

    {"name": "3J(HN,HA)", "type": "J3_HN_HA", "model": "Bax2007",
     "value": [6.1, 5.8], "uncertainty": 0.4}
    {"name": "Rg", "type": "Rg", "atoms": "all", "value": 0.52, "uncertainty": 0.01}

``value`` holds one number per value the observable returns (K of them, in its
``labels`` order); ``uncertainty`` (also ``sigma``) is one number for all or K numbers,
each > 0, in the observable's units (Hz, nm, rad). ``weight`` (default 1) scales the
entry's share of the χ² loss. A J-coupling entry may name its residues (indices or names
like "ALA2"; ``value`` then follows their order)::

    {"name": "3J(HA,C')", "type": "J3_HA_C", "model": "Bax1997", "residues": ["ALA2"],
     "value": [1.84], "uncertainty": 0.24}

For a coupling computed from a Karplus relation the uncertainty to give is the relation's
RMS (``KARPLUS[type][model]["sigma"]``): it dominates the NMR measurement error, which is
not added to it again. An entry with ``"skip": true`` (and, to say why, ``"skip_reason"``)
stays in the file as a record but is not loaded: a measured value with no model, such as
¹J(N,Cα) of a C-terminal residue, whose ψ does not exist. ``"note"`` is free text; a
top-level ``"citation"`` and ``"note"`` (beside ``"targets"``) are kept for the reader.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import numbers
import os

import numpy as np

from timemachine.errors import InputError, MissingFileError
from timemachine.fitting.observables.specs import TARGET_KEYS, observable_from_spec

__all__ = [
    "Target",
    "graf2007_targets",
    "load_targets",
    "make_target",
    "save_targets",
    "targets_from_specs",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """One experimental target.

    Attributes:
        name: label used in histories and plots.
        observable: callable ``obs(x (N, 3)) -> (K,)`` with ``labels``.
        value: (K,) measured values, the observable's units.
        uncertainty: (K,) standard uncertainties σ > 0, same units.
        weight: scale of this target's share of the χ² loss (> 0).
        spec: the observable spec dict it was built from, or None (built in Python).
    """

    name: str
    observable: object
    value: np.ndarray
    uncertainty: np.ndarray
    weight: float = 1.0
    spec: dict | None = None

    @property
    def n_values(self) -> int:
        return int(self.value.shape[0])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(f"{self.name}:{lab}" for lab in self.observable.labels)

    def to_dict(self) -> dict:
        """The JSON entry of this target (needs ``spec``)."""
        if self.spec is None:
            raise InputError(
                f"target {self.name!r} was built from a Python observable, not a spec, so it "
                "cannot be written to a target file"
            )
        out = {"name": self.name, **self.spec}
        out["value"] = [float(v) for v in self.value]
        out["uncertainty"] = [float(s) for s in self.uncertainty]
        if self.weight != 1.0:
            out["weight"] = float(self.weight)
        return out


def _numbers(value, k, what, where) -> np.ndarray:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        arr = np.full(k, float(value))
    else:
        try:
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InputError(
                f"{where}: {what} must be a number or a list of numbers, got {value!r}"
            ) from None
        if arr.size == 1 and k != 1:
            arr = np.full(k, float(arr[0]))
    if arr.shape != (k,):
        raise InputError(
            f"{where}: {what} has {arr.size} numbers but the observable returns {k} values"
        )
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise InputError(f"{where}: {what}[{bad[0]}] is {arr[bad[0]]}")
    return arr


def make_target(observable, value, uncertainty, name=None, weight=1.0, spec=None) -> Target:
    """A Target from a Python observable.

    Args:
        observable: ``obs(x (N, 3)) -> (K,)`` with ``labels`` (K strings).
        value: scalar or (K,) measured values.
        uncertainty: scalar or (K,) σ > 0.
        name: label (default: the observable's class name).
        weight: > 0, scales the target's share of the loss.
        spec: the observable spec it came from, if any (for ``save_targets``).

    Raises:
        InputError: wrong number of values, non-finite numbers, a missing or non-positive
            uncertainty, or a non-positive weight.
    """
    name = name or type(observable).__name__
    where = f"target {name!r}"
    labels = getattr(observable, "labels", None)
    if not callable(observable) or labels is None:
        raise InputError(f"{where}: {observable!r} is not an observable (callable with labels)")
    k = len(labels)
    if uncertainty is None:
        raise InputError(f"{where}: no uncertainty given; every target needs one (σ > 0)")
    value = _numbers(value, k, "value", where)
    sigma = _numbers(uncertainty, k, "uncertainty", where)
    bad = np.flatnonzero(~(sigma > 0))
    if bad.size:
        raise InputError(
            f"{where}: uncertainty[{bad[0]}] = {sigma[bad[0]]} must be > 0 (it divides the "
            "χ² residual)"
        )
    if not (isinstance(weight, numbers.Real) and math.isfinite(weight) and weight > 0):
        raise InputError(f"{where}: weight must be a number > 0, got {weight!r}")
    value.setflags(write=False)
    sigma.setflags(write=False)
    return Target(str(name), observable, value, sigma, float(weight), spec)


def targets_from_specs(entries, topology=None, source="targets") -> list[Target]:
    """Targets from a list of dicts (the entries of a target file).

    Args:
        entries: list of dicts, each an observable spec plus ``value``, ``uncertainty``
            (or ``sigma``), optional ``name``, ``weight``, ``note``; an entry with
            ``"skip": true`` is left out (it must still be a dict with a ``type``).
        topology: OpenMM or mdtraj topology for J couplings, selections and Rg masses.
        source: where the entries came from, for error messages (a file name).

    Raises:
        InputError: naming ``source`` and the entry (index and name) for an unknown
            observable type, a selection that matches nothing, a missing or non-positive
            uncertainty, or values of the wrong length.
    """
    if not isinstance(entries, (list, tuple)) or not entries:
        raise InputError(f"{source}: expected a non-empty list of targets, got {entries!r}")
    if all(isinstance(e, dict) and e.get("skip") is True for e in entries):
        raise InputError(f"{source}: every target is marked 'skip': nothing to load")
    out, names = [], set()
    for i, entry in enumerate(entries):
        label = entry.get("name") if isinstance(entry, dict) else None
        where = f"{source}, target {i}" + (f" ({label!r})" if label else "")
        if not isinstance(entry, dict):
            raise InputError(f"{where}: each target must be an object/dict, got {entry!r}")
        skip = entry.get("skip", False)
        if not isinstance(skip, bool):
            raise InputError(f"{where}: 'skip' must be true or false, got {skip!r}")
        if skip:
            if "type" not in entry:
                raise InputError(f"{where}: a skipped target still needs its 'type'")
            continue
        if label is not None and not isinstance(label, str):
            raise InputError(f"{where}: 'name' must be a string, got {label!r}")
        value = entry.get("value", entry.get("values"))
        if value is None:
            raise InputError(f"{where}: no 'value' (the measured value(s))")
        sigma = entry.get("uncertainty", entry.get("uncertainties", entry.get("sigma")))
        if sigma is None:
            raise InputError(f"{where}: no 'uncertainty' (σ > 0 of the measured value(s))")
        try:
            observable = observable_from_spec(entry, topology)
            # the target's own keys do not build the observable; a note stays with its spec
            spec = {k: v for k, v in entry.items() if k == "note" or k not in TARGET_KEYS}
            name = label or f"{entry['type']}#{i}"
            if name in names:
                raise InputError(f"two targets are named {name!r}; names must be unique")
            names.add(name)
            target = make_target(
                observable, value, sigma, name=name, weight=entry.get("weight", 1.0), spec=spec
            )
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        out.append(target)
    return out


def load_targets(path, topology=None) -> list[Target]:
    """Targets from a JSON file (see the module docstring for the format).

    Raises:
        MissingFileError: no such file.
        InputError: not JSON, or a bad entry (the file and entry are named).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"target file {path!r} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"target file {path!r} is not a file (a directory?)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"target file {path!r} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"target file {path!r} is not UTF-8 text (JSON): {e}") from None
    except RecursionError:
        raise InputError(f"target file {path!r}: JSON nested too deeply") from None
    except OSError as e:
        raise InputError(f"target file {path!r} cannot be read: {e.strerror or e}") from None
    if isinstance(data, dict):
        if "targets" not in data:
            raise InputError(f"target file {path!r}: expected a list or {{'targets': [...]}}")
        data = data["targets"]
    return targets_from_specs(data, topology, source=f"target file {path!r}")


def save_targets(path, targets) -> None:
    """Write targets built from specs as a JSON target file (atomically)."""
    from timemachine.files import atomic_write_text

    atomic_write_text(path, json.dumps({"targets": [t.to_dict() for t in targets]}, indent=1))


GRAF2007_FILE = "graf2007_ala3.json"


def graf2007_targets(topology) -> list[Target]:
    """The trialanine couplings of Graf, Nguyen, Stock & Schwalbe, JACS 129, 1179 (2007).

    Loads the shipped ``timemachine/data/graf2007_ala3.json`` with ``load_targets``: one
    Target per coupling type (³J(HN,Hα) of ALA2 and ALA3; ³J(HN,C′), ³J(Hα,C′), ³J(HN,Cβ) and
    ¹J(N,Cα) of ALA2; ²J(N,Cα) of ALA3), each σ the RMS of its Karplus set. The file's
    "note" names the couplings of the paper's table that are not in it and why.

    Args:
        topology: the topology of ``timemachine.build_peptide("AAA")`` (uncapped trialanine,
            residues ALA1-ALA3), OpenMM or mdtraj.

    Raises:
        InputError: the topology lacks a residue or dihedral a coupling needs.
    """
    resource = importlib.resources.files("timemachine.data").joinpath(GRAF2007_FILE)
    with importlib.resources.as_file(resource) as path:
        return load_targets(path, topology)
