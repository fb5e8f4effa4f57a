"""Build and clean up small protein structures with PeptideBuilder and OpenMM's Modeller."""

from __future__ import annotations

import io
import numbers
import random

import numpy as np

from timemachine.errors import ForceFieldError, InputError
from timemachine.io.openmm_import import check_forcefield_names, make_forcefield

_ONE_LETTER = set("ACDEFGHIKLMNPQRSTVWY")


def build_peptide(sequence: str, forcefield=("amber99sbildn.xml",), phi=-60.0, psi=-45.0):
    """An all-atom, hydrogenated, zwitterionic peptide in an extended or helical geometry.

    PeptideBuilder places the heavy atoms from standard internal coordinates (backbone
    dihedrals ``phi``/``psi`` in degrees, default α-helix), and OpenMM's Modeller adds the
    hydrogens that the force field's templates expect.

    Args:
      sequence: one-letter amino-acid codes, e.g. "AAA" for trialanine.
      forcefield: OpenMM force-field XML files used to place hydrogens.
    Returns:
      (topology, positions): an openmm.app.Topology and an (N, 3) float64 array in nm.
    """
    import openmm as mm
    import openmm.app as app
    import openmm.unit as unit
    import PeptideBuilder
    from Bio.PDB import PDBIO
    from PeptideBuilder import Geometry

    if not isinstance(sequence, str):
        raise InputError(
            f"peptide sequence must be a string of one-letter codes such as 'AAA', got "
            f"{sequence!r} of type {type(sequence).__name__}"
        )
    seq = sequence.upper()
    bad = sorted(set(seq) - _ONE_LETTER)
    if not seq or bad:
        raise InputError(f"peptide sequence {sequence!r} has unknown residue letters {bad}")
    for name, angle in (("phi", phi), ("psi", psi)):
        if isinstance(angle, bool) or not isinstance(angle, numbers.Real) or not np.isfinite(angle):
            raise InputError(
                f"build_peptide: {name} must be a finite angle (degrees), got {angle!r}"
            )
    forcefield = check_forcefield_names(forcefield, "build_peptide: forcefield")
    geos = []
    for aa in seq:
        g = Geometry.geometry(aa)
        g.phi, g.psi_im1 = phi, psi
        geos.append(g)
    structure = PeptideBuilder.initialize_res(geos[0])
    for g in geos[1:]:
        PeptideBuilder.add_residue(structure, g)
    PeptideBuilder.add_terminal_OXT(structure)
    buf = io.StringIO()
    writer = PDBIO()
    writer.set_structure(structure)
    writer.save(buf)
    pdb = app.PDBFile(io.StringIO(buf.getvalue()))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    # Modeller places some hydrogens with Python's global ``random`` and relaxes them with
    # a minimiser on the default (multithreaded) platform. Seed the one (giving the
    # caller's state back) and pin the other to Reference so that the same sequence always
    # gives the same structure, bit for bit.
    state = random.getstate()
    try:
        random.seed(0)
        ff = make_forcefield(forcefield, None)[0]
        try:
            modeller.addHydrogens(ff, platform=mm.Platform.getPlatformByName("Reference"))
        except ValueError as e:  # OpenMM: no template for a residue of the sequence
            raise ForceFieldError(
                f"peptide sequence {sequence!r}: force field {list(forcefield)} cannot template "
                f"it: {e}"
            ) from None
    finally:
        random.setstate(state)
    x = np.array(modeller.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return modeller.topology, x


def strip_solvent(topology, positions):
    """Remove water and monatomic ions (OpenMM Modeller.deleteWater + ion residues).

    Args:
      topology: openmm.app.Topology; positions: (N, 3) nm array or OpenMM Quantity.
    Returns: (topology, positions (M, 3) nm).
    """
    import openmm.app as app
    import openmm.unit as unit

    if not unit.is_quantity(positions):
        positions = np.asarray(positions) * unit.nanometer
    modeller = app.Modeller(topology, positions)
    modeller.deleteWater()
    ions = [r for r in modeller.topology.residues() if len(r) == 1 and r.name not in ("HOH",)]
    ions = [
        r
        for r in ions
        if next(r.atoms()).element is not None
        and next(r.atoms()).element.symbol
        in ("Na", "Cl", "K", "Mg", "Ca", "Zn", "Li", "Rb", "Cs", "F", "Br", "I")
    ]
    if ions:
        modeller.delete(ions)
    x = np.array(modeller.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return modeller.topology, x
