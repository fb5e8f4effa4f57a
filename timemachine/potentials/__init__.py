"""JAX reference energies: pure functions of coordinates and per-term parameters.

Each function takes positions ``x`` (N, 3) in nm and per-term parameter arrays, and
returns a scalar energy in kJ/mol. They are the reference that every fast path (the
structured ζ of ``timemachine.sensitivity``, the CUDA kernels) is tested against.
"""

from timemachine.potentials.bonded import (
    dihedral_angle,
    harmonic_angle,
    harmonic_bond,
    periodic_torsion,
)
from timemachine.potentials.gbsa import obc2_born_radii, obc2_energy
from timemachine.potentials.nonbonded import nonbonded_all_pairs, nonbonded_exceptions

__all__ = [
    "dihedral_angle",
    "harmonic_angle",
    "harmonic_bond",
    "periodic_torsion",
    "nonbonded_all_pairs",
    "nonbonded_exceptions",
    "obc2_born_radii",
    "obc2_energy",
]
