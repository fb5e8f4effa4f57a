"""The native generalized-Born export: a ``<GBSAOBCForce>`` section (OpenMM's fast OBC2
force) that carries the fitted charges, mbondi2 radii and OBC scales, the ``<Script>`` that
sets its dielectrics, and the check that OpenMM builds the System's values from it (see
``timemachine.io.openmm_export`` for why no bundled OpenMM file does)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from timemachine.constants import COULOMB, COULOMB_GB
from timemachine.errors import ForceFieldError
from timemachine.io.forcefield_xml import format_value

__all__ = ["DIELECTRIC_SCRIPT", "check_native_gb", "native_gb_section"]


# mbondi2 radii (Angstrom) and OBC screening scales, as OpenMM's customgbforces assigns
# them for implicit/obc2.xml (GBSAOBC2Force.getStandardParameters), keyed like the
# System's gb/* names: element symbol, "H(N)" for a hydrogen bonded to nitrogen.
_MBONDI2_RADIUS = {
    "H(N)": 1.3, "H": 1.2, "C": 1.7, "N": 1.55, "O": 1.5, "F": 1.5,
    "Si": 2.1, "P": 1.85, "S": 1.8, "Cl": 1.7,
}  # fmt: skip
_DEFAULT_RADIUS = 1.5
_OBC_SCALE = {"H(N)": 0.85, "H": 0.85, "C": 0.72, "N": 0.79, "O": 0.85, "F": 0.88, "P": 0.86,
              "S": 0.96}  # fmt: skip
_DEFAULT_SCALE = 0.8
_SOLUTE_DIELECTRIC = 1.0
_SOLVENT_DIELECTRIC = 78.5
# the dielectric that gives the native force (ONE_4PI_EPS0) the script's polar prefactor
_NATIVE_SOLVENT_DIELECTRIC = 1.0 / (
    1.0 / _SOLUTE_DIELECTRIC
    - COULOMB_GB / COULOMB * (1.0 / _SOLUTE_DIELECTRIC - 1.0 / _SOLVENT_DIELECTRIC)
)

DIELECTRIC_SCRIPT = f"""
import openmm
# timemachine: the dielectrics of the fitted OBC2 model (implicit/obc2.xml: 1 and 78.5;
# {_NATIVE_SOLVENT_DIELECTRIC!r} absorbs the ratio of OpenMM's Coulomb constant
# {COULOMB!r} to the script's {COULOMB_GB!r})
for _force in sys.getForces():
    if isinstance(_force, openmm.GBSAOBCForce):
        if 'soluteDielectric' not in args:
            _force.setSoluteDielectric({_SOLUTE_DIELECTRIC!r})
        if 'solventDielectric' not in args:
            _force.setSolventDielectric({_NATIVE_SOLVENT_DIELECTRIC!r})
"""


def _type_gb_classes(ff):
    """atom type -> GB class ("C", "H(N)", ...) from the residue templates' bonds; a type
    whose class differs between templates maps to None."""
    out = {}
    for tmpl in ff._templates.values():
        for atom in tmpl.atoms:
            at = ff._atomTypes.get(atom.type)
            elem = at.element if at is not None else atom.element
            sym = elem.symbol if elem is not None else "X"
            if sym in ("H", "D"):
                sym = "H"
                partners = [tmpl.atoms[j] for j in atom.bondedTo]
                if partners:
                    pt = ff._atomTypes.get(partners[0].type)
                    pe = pt.element if pt is not None else partners[0].element
                    if pe is not None and pe.symbol == "N":
                        sym = "H(N)"
            if out.setdefault(atom.type, sym) != sym:
                out[atom.type] = None
    return out


def native_gb_section(root, ff, system, theta):
    """<GBSAOBCForce> for every atom type of ``ff``: fitted charge, radius, scale."""
    index = {n: i for i, n in enumerate(system.param_names)}

    def value(key, what, table, default):
        name = f"gb/{key}/{what}"
        if name in index:
            return float(theta[index[name]])
        return table.get(key, default) / (10.0 if what == "radius" else 1.0)

    nb_sections = root.findall("NonbondedForce")
    per_residue = any(
        u.attrib.get("name") == "charge"
        for sec in nb_sections
        for u in sec.findall("UseAttributeFromResidue")
    )
    nb_atoms = [el for sec in nb_sections for el in sec.findall("Atom")]
    charge_of = {}
    if not per_residue:
        for t, at in ff._atomTypes.items():
            hits = [
                el
                for el in nb_atoms
                if el.attrib.get("type") == t
                or ("class" in el.attrib and el.attrib["class"] == at.atomClass)
            ]
            if hits and "charge" in hits[-1].attrib:
                charge_of[t] = hits[-1].attrib["charge"]

    section = ET.Element("GBSAOBCForce")
    if per_residue:
        ET.SubElement(section, "UseAttributeFromResidue", name="charge")
    for t, key in _type_gb_classes(ff).items():
        if key is None or (not per_residue and t not in charge_of):
            continue  # createSystem on a topology that uses it fails loudly
        attrib = {"type": t}
        if not per_residue:
            attrib["charge"] = charge_of[t]
        attrib["radius"] = format_value(value(key, "radius", _MBONDI2_RADIUS, _DEFAULT_RADIUS))
        attrib["scale"] = format_value(value(key, "scale", _OBC_SCALE, _DEFAULT_SCALE))
        ET.SubElement(section, "Atom", attrib)
    return section


def check_native_gb(path, system, theta):
    """The GBSAOBCForce OpenMM builds from ``path`` carries the System's charge/radius/scale."""
    import openmm as mm
    import openmm.app as app

    omm = app.ForceField(os.fspath(path)).createSystem(
        system.topology, nonbondedMethod=app.NoCutoff
    )
    gb = [f for f in omm.getForces() if isinstance(f, mm.GBSAOBCForce)]
    terms = [t for t in system.terms if t.kind == "gb"]
    if len(gb) != 1 or len(terms) != 1:
        raise ForceFieldError(f"{path}: expected one GBSAOBCForce, OpenMM built {len(gb)}")
    t = terms[0]
    want = np.stack([theta[t.charge_index], theta[t.radius_index], theta[t.scale_index]], 1)
    got = np.array(
        [
            [getattr(v, "_value", v) for v in gb[0].getParticleParameters(i)]
            for i in range(len(want))
        ]
    )
    bad = np.flatnonzero(~np.isclose(got, want, rtol=1e-12, atol=1e-15).all(axis=1))
    if bad.size:
        raise ForceFieldError(
            f"native GB export: atom {bad[0]} gets (charge, radius, scale) {tuple(got[bad[0]])} "
            f"from {path}, the System has {tuple(want[bad[0]])}; export with "
            "implicit_solvent='obc2'"
        )
