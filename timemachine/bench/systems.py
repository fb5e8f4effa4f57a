"""The benchmark systems, built once per process, with their OpenMM twins.

Every case is parametrised twice from the same force field and topology: as a
``timemachine.System`` (``tm.load_system``) and as the OpenMM System that
``load_system`` reproduces (NoCutoff, no constraints, no CM-motion remover), so every
engine integrates the same energy. Starting positions are relaxed once by
``tm.minimize_system`` (L-BFGS-B in float64, deterministic; at most
``minimise_iterations``) so that no engine starts from a clash. OpenMM's
``LocalEnergyMinimizer`` on the Reference platform would do the same, but its obc2.xml
CustomGBForce takes seconds per evaluation on the 2,000-atom peptide.

Cases (amber99sbildn):
  trialanine-vacuum, trialanine-obc2  33 atoms, ``tm.build_peptide("AAA")``
  villin-vacuum, villin-obc2          582 atoms: OpenMM's ``data/test.pdb`` after
                                      ``tm.strip_solvent`` removes the water and both Cl⁻
                                      ions (the issue quotes 584 atoms; 582 is what the file
                                      holds without them)
  peptide2k-obc2                      1,987 atoms: a 144-residue helical peptide,
                                      ``tm.build_peptide``
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from timemachine.errors import InputError

__all__ = ["CASES", "Case", "load_case", "torsion_k_map"]

# A helix-forming 20-residue motif, seven times and a four-residue tail: 144 residues,
# 1,987 atoms with hydrogens.
_PEPTIDE2K = "AEAAAKEAAAKALEKAAAEK" * 7 + "AEAA"

# (structure, implicit solvent); structures are built lazily (PeptideBuilder, PDB reading).
CASES = {
    "trialanine-vacuum": ("trialanine", None),
    "trialanine-obc2": ("trialanine", "obc2"),
    "villin-vacuum": ("villin", None),
    "villin-obc2": ("villin", "obc2"),
    "peptide2k-obc2": ("peptide2k", "obc2"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One benchmark system.

    Attributes:
      name: key of ``CASES``.
      system: the ``timemachine.System``.
      openmm_system: the equivalent ``openmm.System`` (NoCutoff, no constraints).
      topology: ``openmm.app.Topology``.
      positions: (N, 3) float64 minimised positions, nm.
      solvent: None (vacuum) or "obc2".
    """

    name: str
    system: object
    openmm_system: object
    topology: object
    positions: np.ndarray
    solvent: str | None

    @property
    def n_atoms(self) -> int:
        return self.system.n_atoms


@functools.cache
def _structure(kind: str):
    import timemachine as tm

    if kind == "trialanine":
        return tm.build_peptide("AAA")
    if kind == "villin":
        import openmm.app as app

        pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
        return tm.strip_solvent(pdb.topology, pdb.positions)
    if kind == "peptide2k":
        return tm.build_peptide(_PEPTIDE2K)
    raise InputError(f"unknown benchmark structure {kind!r}; known: trialanine, villin, peptide2k")


@functools.cache
def load_case(name: str, minimise_iterations: int = 200) -> Case:
    """Build (once per process) the benchmark case ``name``; see ``CASES``.

    Raises:
      InputError: ``name`` is not a key of ``CASES``.
    """
    import timemachine as tm
    from timemachine.io.openmm_import import openmm_system_for

    if name not in CASES:
        raise InputError(f"unknown benchmark system {name!r}; known: {', '.join(CASES)}")
    kind, solvent = CASES[name]
    topology, x = _structure(kind)
    system, x = tm.load_system((topology, x), implicit_solvent=solvent)
    omm = openmm_system_for(topology, implicit_solvent=solvent)
    x = np.asarray(x, dtype=np.float64)
    if minimise_iterations:
        x = tm.minimize_system(system, x, max_iterations=minimise_iterations, warn=False)
    return Case(name, system, omm, topology, x, solvent)


def torsion_k_map(system, torsion_keys, wrt) -> list[np.ndarray]:
    """For each selected θ index, the positions in ``torsion_keys`` whose barrier it sets.

    Args:
      system: ``timemachine.System``.
      torsion_keys: sequence of (i, j, k, l, periodicity) tuples, one per torsion of an
        external engine (OpenMM's PeriodicTorsionForce, JAX MD's ``torsion_k``).
      wrt: (P,) indices into ``system.params`` of torsion barriers ``torsion/*/k*``.

    Returns:
      P int arrays of indices into ``torsion_keys``.

    Raises:
      InputError: a torsion of the external engine has no counterpart in ``system``.
    """
    ours = {}
    for term in system.terms:
        if term.kind not in ("torsion", "improper"):
            continue
        for quad, n, p in zip(
            np.asarray(term.idx),
            np.asarray(term.periodicity),
            np.asarray(term.k_index),
            strict=True,
        ):
            ours[tuple(int(a) for a in quad) + (int(n),)] = int(p)
    owner = np.empty(len(torsion_keys), dtype=np.int64)
    for t, key in enumerate(torsion_keys):
        key = tuple(int(a) for a in key)
        if key not in ours:
            raise InputError(
                f"torsion {key} (atoms i, j, k, l, periodicity) of the external engine has no "
                f"counterpart among this System's torsions"
            )
        owner[t] = ours[key]
    return [np.flatnonzero(owner == int(p)) for p in wrt]
