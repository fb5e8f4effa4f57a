"""A solute in a box of explicit water: the OpenMM System and the solute's own System.

``solvate`` puts a structure in a periodic box of water with OpenMM's ``Modeller`` and
builds the OpenMM System (PME or reaction field, constraints, rigid or flexible water)
that ``timemachine.fitting.OpenMMSampler`` runs, and the ``timemachine.System`` of the
solute alone under the same force field, whose torsion parameters a fit changes. The
solute's atoms come first in the box, in the solute's order (``Modeller.addSolvent``
appends the water and ions).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from timemachine.errors import InputError

__all__ = ["Solvated", "solvate"]

#: water models and the force-field file OpenMM ships for each
WATER_MODELS = {"tip3p": "tip3p.xml", "tip3pfb": "tip3pfb.xml", "spce": "spce.xml",
                "tip4pew": "tip4pew.xml"}  # fmt: skip

_METHODS = ("PME", "CutoffPeriodic", "Ewald")
_CONSTRAINTS = ("HBonds", "AllBonds", "HAngles", None)


class Solvated(NamedTuple):
    """A solvated structure.

    Attributes:
        openmm_system: the ``openmm.System`` of the whole box.
        topology: the box's ``openmm.app.Topology`` (periodic box vectors set).
        positions: (N_total, 3) nm.
        solute: the solute's ``timemachine.System`` (vacuum, no cutoff), same atoms and
            order as the box's first ``solute.n_atoms`` particles.
        solute_x: (N_solute, 3) nm.
        box: (3,) nm, the box edge lengths.
    """

    openmm_system: object
    topology: object
    positions: np.ndarray
    solute: object
    solute_x: np.ndarray
    box: np.ndarray


def solvate(structure, forcefield=("amber99sbildn.xml",), water="tip3p", padding=1.0,
            cutoff=0.9, nonbonded_method="PME", constraints="HBonds", rigid_water=True,
            ionic_strength=0.0, ewald_error_tolerance=5e-4, hydrogen_mass=None
            ) -> Solvated:  # fmt: skip
    """Solvate a structure in a rectangular box of water and parametrise it.

    Args:
        structure: (topology, positions nm) or anything ``load_system`` reads.
        forcefield: the solute's OpenMM force-field files; the water model's file is added.
        water: a ``WATER_MODELS`` name.
        padding: nm between the solute and the box's faces (``Modeller.addSolvent``).
        cutoff: nm, the direct-space cutoff; every box edge must be at least twice it.
        nonbonded_method: "PME" (default), "CutoffPeriodic" (reaction field) or "Ewald".
        constraints: "HBonds" (default, with a 2 fs step), "AllBonds", "HAngles" or None.
        rigid_water: rigid water (SETTLE); False for flexible water (a ~0.5 fs step).
        ionic_strength: molar NaCl added besides the neutralising ions.
        ewald_error_tolerance: PME's and Ewald's relative force error.
        hydrogen_mass: amu, or None: hydrogen mass repartitioning in the box's System
            (OpenMM's ``hydrogenMass``: each hydrogen this heavy, its bonded heavy atom
            lighter by as much; water is left alone). With HBond constraints it allows a
            4 fs step. It changes the dynamics, not the Boltzmann distribution of the
            positions, which is all an equilibrium estimator uses; the solute System keeps
            the real masses.

    Returns:
        ``Solvated``.

    Raises:
        InputError: an unknown water model, method or constraint; a cutoff <= 0; a box
            smaller than twice the cutoff.
    """
    import openmm.app as app
    import openmm.unit as unit

    from timemachine.io.openmm_import import _read_structure, load_system

    if water not in WATER_MODELS:
        raise InputError(f"water must be one of {sorted(WATER_MODELS)}, got {water!r}")
    if nonbonded_method not in _METHODS:
        raise InputError(f"nonbonded_method must be one of {_METHODS}, got {nonbonded_method!r}")
    if constraints not in _CONSTRAINTS:
        raise InputError(f"constraints must be one of {_CONSTRAINTS}, got {constraints!r}")
    if not (isinstance(cutoff, (int, float)) and np.isfinite(cutoff) and cutoff > 0):
        raise InputError(f"cutoff must be > 0 nm, got {cutoff!r}")
    if hydrogen_mass is not None and not (
        isinstance(hydrogen_mass, (int, float)) and np.isfinite(hydrogen_mass) and hydrogen_mass > 0
    ):
        raise InputError(f"hydrogen_mass must be > 0 amu or None, got {hydrogen_mass!r}")
    if not (isinstance(padding, (int, float)) and np.isfinite(padding) and padding > 0):
        raise InputError(f"padding must be > 0 nm, got {padding!r}")
    topology, positions, source = _read_structure(structure)
    files = (forcefield,) if isinstance(forcefield, str) else tuple(forcefield)
    solute, solute_x = load_system((topology, positions), forcefield=files)
    ff = app.ForceField(*files, WATER_MODELS[water])
    modeller = app.Modeller(topology, solute_x * unit.nanometer)
    modeller.addSolvent(ff, model=water.replace("fb", "") if water == "tip3pfb" else water,
                        padding=padding * unit.nanometer,
                        ionicStrength=ionic_strength * unit.molar)  # fmt: skip
    box = np.array(
        [modeller.topology.getPeriodicBoxVectors()[k][k].value_in_unit(unit.nanometer)
         for k in range(3)]
    )  # fmt: skip
    if box.min() < 2 * cutoff:
        raise InputError(
            f"the box of {source} is {box.min():.3f} nm across, less than twice the cutoff "
            f"({cutoff} nm): raise padding or lower cutoff"
        )
    omm = ff.createSystem(
        modeller.topology,
        nonbondedMethod=getattr(app, nonbonded_method),
        nonbondedCutoff=cutoff * unit.nanometer,
        constraints=None if constraints is None else getattr(app, constraints),
        rigidWater=rigid_water,
        ewaldErrorTolerance=ewald_error_tolerance,
        hydrogenMass=None if hydrogen_mass is None else hydrogen_mass * unit.amu,
    )
    x = np.asarray(modeller.positions.value_in_unit(unit.nanometer), np.float64).reshape(-1, 3)
    return Solvated(omm, modeller.topology, x, solute, np.asarray(solute_x), box)
