"""Translate to and from OpenMM: force fields, structures, typed parameters."""

from timemachine.io.openmm_export import export_forcefield
from timemachine.io.openmm_import import from_openmm, load_system, openmm_system_for
from timemachine.io.peptides import build_peptide, strip_solvent
from timemachine.io.solvation import Solvated, solvate

__all__ = [
    "Solvated",
    "build_peptide",
    "export_forcefield",
    "from_openmm",
    "load_system",
    "openmm_system_for",
    "solvate",
    "strip_solvent",
]
