"""Observables from target-file dicts (``observable_from_spec``) and atom selections
(``select_atoms``: mdtraj selection strings or index lists)."""

from __future__ import annotations

import numpy as np

from timemachine.errors import InputError
from timemachine.fitting.observables.base import Observable, _indices
from timemachine.fitting.observables.geometry import Dihedral, NOEDistance, RadiusOfGyration
from timemachine.fitting.observables.karplus import KARPLUS, ScalarCoupling, to_mdtraj_topology

__all__ = [
    "J_COUPLING_TYPES",
    "OBSERVABLE_TYPES",
    "SPEC_KEYS",
    "TARGET_KEYS",
    "observable_from_spec",
    "select_atoms",
]

J_COUPLING_TYPES = tuple(KARPLUS)
OBSERVABLE_TYPES = (*J_COUPLING_TYPES, "Rg", "NOE", "dihedral")
# keys a target file puts next to the observable's own; they do not build it
TARGET_KEYS = {
    "value",
    "values",
    "uncertainty",
    "uncertainties",
    "sigma",
    "weight",
    "name",
    "note",
    "skip",
    "skip_reason",
}
SPEC_KEYS = {
    **{kind: {"model", "residues"} for kind in J_COUPLING_TYPES},
    "Rg": {"atoms", "mass_weighted"},
    "NOE": {"pairs", "power"},
    "dihedral": {"indices"},
}


def select_atoms(topology, selection, where="selection") -> np.ndarray:
    """Atom indices (n,) of an mdtraj selection string ("name CA") or an index list.

    Raises:
        InputError: the selection is invalid or matches no atom (named in the message).
    """
    if isinstance(selection, str):
        top = to_mdtraj_topology(topology)
        try:
            idx = top.select(selection)
        except Exception as exc:  # mdtraj raises ValueError/SyntaxError/... for bad input
            raise InputError(f"{where}: invalid atom selection {selection!r}: {exc}") from exc
        if idx.size == 0:
            raise InputError(
                f"{where}: atom selection {selection!r} matches no atom of the topology "
                f"({top.n_atoms} atoms, {top.n_residues} residues)"
            )
        return idx.astype(np.int64)
    idx = _indices(np.atleast_1d(selection), where, 1)
    n_atoms = _n_atoms(topology)
    if n_atoms is not None and idx.max() >= n_atoms:
        raise InputError(f"{where}: atom {int(idx.max())} but the topology has {n_atoms} atoms")
    return idx


def _n_atoms(topology):
    if topology is None:
        return None
    n = getattr(topology, "n_atoms", None)
    if n is None and hasattr(topology, "getNumAtoms"):
        n = topology.getNumAtoms()
    return n


def observable_from_spec(spec: dict, topology=None) -> Observable:
    """Build an observable from a dict, as read from a target file.

    Forms (atom selections are mdtraj selection strings or index lists)::

        {"type": "J3_HN_HA", "model": "Bax2007", "residues": ["ALA2"]}
            # any of J_COUPLING_TYPES; "model" (default: the coupling's default set) and
            # "residues" (indices or names; default: every residue with the coupling)
        {"type": "Rg", "atoms": "name CA", "mass_weighted": True}
        {"type": "NOE", "pairs": [[[i, ...], [j, ...]], ...], "power": 6}
        {"type": "dihedral", "indices": [[i, j, k, l], ...]}

    Keys of the target itself ("value", "uncertainty", "sigma", "weight", "name", "note",
    "skip", "skip_reason") are ignored here. ``topology`` (OpenMM or mdtraj) is needed for J
    couplings, selection strings and Rg masses.

    Raises:
        InputError: unknown type (the known ones are listed), a coupling type with no
            Karplus set, an unknown Karplus model, unknown key, a residue the topology lacks
            or that has no such coupling, or a selection that matches nothing.
    """
    if not isinstance(spec, dict):
        raise InputError(f"an observable spec must be a dict, got {spec!r}")
    kind = spec.get("type")
    if not isinstance(kind, str):
        raise InputError(f"an observable spec needs a 'type' string, got {kind!r} in {spec!r}")
    if kind.startswith("J") and kind not in KARPLUS:
        raise InputError(
            f"coupling type {kind!r} in {spec!r} has no Karplus set; couplings with one: "
            f"{', '.join(J_COUPLING_TYPES)}"
        )
    if kind not in OBSERVABLE_TYPES:
        raise InputError(
            f"unknown observable type {kind!r} in {spec!r}; known types: "
            f"{', '.join(OBSERVABLE_TYPES)}"
        )
    _check_spec_types(kind, spec)
    extra = set(spec) - {"type"} - TARGET_KEYS - SPEC_KEYS[kind]
    if extra:
        raise InputError(
            f"observable {kind!r}: unknown key(s) {sorted(extra)}; it takes "
            f"{sorted(SPEC_KEYS[kind]) or 'no options'}"
        )
    if kind in KARPLUS:
        if topology is None:
            raise InputError(f"observable {kind!r} needs a topology")
        return ScalarCoupling(
            topology, coupling=kind, model=spec.get("model"), residues=spec.get("residues")
        )
    if kind == "Rg":
        atoms = spec.get("atoms")
        idx = None if atoms is None else select_atoms(topology, atoms, "Rg atoms")
        masses = None
        if spec.get("mass_weighted", True):
            if topology is None:
                raise InputError("a mass-weighted Rg needs a topology (element masses)")
            masses = _element_masses(topology)
        return RadiusOfGyration(masses=masses, atoms=idx)
    if kind == "NOE":
        pairs = spec.get("pairs")
        if not pairs:
            raise InputError(f"NOE spec needs 'pairs': [[group_a, group_b], ...], got {spec!r}")
        ga, gb = [], []
        for k, pair in enumerate(pairs):
            if len(pair) != 2:
                raise InputError(f"NOE pair {k} must be [group_a, group_b], got {pair!r}")
            ga.append(select_atoms(topology, pair[0], f"NOE pair {k} group a"))
            gb.append(select_atoms(topology, pair[1], f"NOE pair {k} group b"))
        return NOEDistance(ga, gb, power=spec.get("power", 6))
    indices = spec.get("indices")
    if indices is None:
        raise InputError(f"dihedral spec needs 'indices': [[i, j, k, l], ...], got {spec!r}")
    return Dihedral(indices)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_spec_types(kind, spec) -> None:
    """InputError naming the key whose value has the wrong type (before any is used)."""

    def bad(key, what):
        raise InputError(f"observable {kind!r}: {key!r} must be {what}, got {spec[key]!r}")

    if spec.get("model") is not None and not isinstance(spec["model"], str):
        bad("model", "the name of a Karplus set")
    residues = spec.get("residues")
    if residues is not None and not (
        _is_int(residues)
        or isinstance(residues, str)
        or (
            isinstance(residues, (list, tuple))
            and all(_is_int(r) or isinstance(r, str) for r in residues)
        )
    ):
        bad("residues", "a list of residue indices or names such as 'ALA2'")
    if "mass_weighted" in spec and not isinstance(spec["mass_weighted"], bool):
        bad("mass_weighted", "true or false")
    atoms = spec.get("atoms")
    if atoms is not None and not (
        isinstance(atoms, str)
        or _is_int(atoms)
        or (isinstance(atoms, (list, tuple)) and all(map(_is_int, atoms)))
    ):
        bad("atoms", "a selection string or a list of atom indices")
    if "power" in spec and (
        isinstance(spec["power"], bool)
        or not isinstance(spec["power"], (int, float))
        or not np.isfinite(spec["power"])
        or spec["power"] <= 0
    ):
        bad("power", "a number > 0")
    pairs = spec.get("pairs")
    if pairs is not None and not (
        isinstance(pairs, (list, tuple))
        and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs)
    ):
        bad("pairs", "a list of [group_a, group_b] pairs")
    for k, pair in enumerate(pairs or ()):
        for group in pair:
            if not (
                isinstance(group, str)
                or _is_int(group)
                or (isinstance(group, (list, tuple)) and group and all(map(_is_int, group)))
            ):
                raise InputError(
                    f"observable {kind!r}: pairs[{k}] groups must be selection strings or "
                    f"non-empty lists of atom indices, got {group!r}"
                )
    indices = spec.get("indices")
    if indices is not None and not (
        isinstance(indices, (list, tuple))
        and indices
        and all(
            isinstance(q, (list, tuple)) and len(q) == 4 and all(map(_is_int, q)) for q in indices
        )
    ):
        bad("indices", "a non-empty list of [i, j, k, l] atom indices")


def _element_masses(topology) -> np.ndarray:
    top = to_mdtraj_topology(topology)
    masses = np.array([a.element.mass if a.element is not None else 0.0 for a in top.atoms])
    bad = np.flatnonzero(~(masses > 0))
    if bad.size:
        raise InputError(f"atom {int(bad[0])} ({top.atom(int(bad[0]))}) has no element mass")
    return masses
