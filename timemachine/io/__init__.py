"""Translate to and from OpenMM: force fields, structures, typed parameters."""

from timemachine.io.openmm_export import export_forcefield
from timemachine.io.openmm_import import from_openmm, load_system, openmm_system_for
from timemachine.io.peptides import build_peptide, strip_solvent

__all__ = [
    "build_peptide",
    "export_forcefield",
    "from_openmm",
    "load_system",
    "openmm_system_for",
    "strip_solvent",
]
