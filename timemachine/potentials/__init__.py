"""JAX reference energies: pure functions of coordinates and per-term parameters.

Each energy function takes positions ``x`` (N, 3) in nm and per-term parameter arrays,
and returns a scalar energy in kJ/mol. They are the reference that every fast path (the
structured derivatives of ``timemachine.structured``, the CUDA kernels) is tested against.

The scalar forms (``harmonic``, ``periodic``, ``lj_coulomb``, ``exception_pair``,
``born_integral``, ``born_radius``, ``gb_self``, ``gb_pair``) are the physics of one
coordinate, pair or atom, elementwise over arrays; the energies here and the structured
derivatives both call them (as JAX MD keeps its scalar energies apart from the mapping
over pairs).
"""

from timemachine.potentials.bonded import (
    dihedral_angle,
    harmonic,
    harmonic_angle,
    harmonic_bond,
    periodic,
    periodic_torsion,
)
from timemachine.potentials.gbsa import (
    born_integral,
    born_radius,
    gb_pair,
    gb_prefactor,
    gb_self,
    obc2_born_radii,
    obc2_energy,
)
from timemachine.potentials.nonbonded import (
    exception_pair,
    lj_coulomb,
    nonbonded_all_pairs,
    nonbonded_exceptions,
)

__all__ = [
    "born_integral",
    "born_radius",
    "exception_pair",
    "gb_pair",
    "gb_prefactor",
    "gb_self",
    "harmonic",
    "lj_coulomb",
    "periodic",
    "dihedral_angle",
    "harmonic_angle",
    "harmonic_bond",
    "periodic_torsion",
    "nonbonded_all_pairs",
    "nonbonded_exceptions",
    "obc2_born_radii",
    "obc2_energy",
]
