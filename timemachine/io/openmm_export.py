"""Write fitted parameters back as an OpenMM ForceField XML file.

OpenMM has no writer for a ``ForceField``, so the export edits the force field's own XML:
it reads the original files (OpenMM's bundled data directory or paths, with their
``<Include>`` files, in the order ``ForceField.loadFile`` reads them), finds the element
that defines each typed parameter, replaces its value, and writes one self-contained
file that ``openmm.app.ForceField(path)`` loads on its own.

Which XML element a parameter name belongs to is found the way
``timemachine.io.openmm_import`` names parameters: OpenMM types the topology (with every
bonded force constant replaced by a unique tag, so each term names the entry it came
from), and the names are rebuilt from those entries. Every name of the System is then
required to resolve, so a System that was not built from ``forcefield`` is refused rather
than exported wrongly.

Implicit solvent (OBC2) is written one of two ways:

* ``"native"`` (the default for a System with a GB term): a ``<GBSAOBCForce>`` section in
  the exported file, one ``<Atom>`` per atom type with the fitted charge (or
  ``<UseAttributeFromResidue name="charge"/>`` when the force field gives charges per
  residue atom), the mbondi2 radius and the OBC screening scale of that type, and a
  three-line ``<Script>`` that sets the force's dielectrics. OpenMM then builds its
  native ``GBSAOBCForce`` (OBC type II, ACE surface term), ~17x faster than the
  CustomGBForce on the Reference platform. No bundled OpenMM file reproduces
  ``implicit/obc2.xml``: ``amber99_obc.xml`` (and amber96/amber10_obc.xml) use other radii
  (N 0.1706/0.1625, C 0.19/0.1875, H 0.115/0.125, O 0.148 nm instead of mbondi2's
  0.155, 0.17, 0.13/0.12, 0.15), solvent dielectric 78.3 instead of 78.5, and their own
  fixed charges, so a fit's charges would not reach the GB term (trialanine: 23 kJ/mol
  apart). The exported file is therefore self-contained: ``ForceField(path)`` alone.
  Fitted ``gb/*`` radii and scales are carried too (per GB class: element, H(N)).
  The native force's Coulomb constant is OpenMM's ONE_4PI_EPS0 (138.935457644), the
  script's 138.935485; the dielectric the script sets absorbs the 2e-7 ratio so the polar
  energy is the script's to round-off (it reads 78.50118...; pass ``solventDielectric`` to
  ``createSystem`` to override).
* ``"obc2"``: OpenMM's ``implicit/obc2.xml`` script (a CustomGBForce) merged in, as
  before. ``gb/*`` values are computed by that script from elements, so a fit that changed
  them is refused with an error naming the parameter.

:func:`openmm_forcefield_files` names the files that reproduce an exported model, and
:func:`check_forcefield_files` refuses a combination that solvates twice (an exported
file that already has GB, loaded beside ``amber99_obc.xml`` or ``implicit/obc2.xml``).
"""

from __future__ import annotations

import copy
import os
import xml.etree.ElementTree as ET
from collections import defaultdict

import numpy as np

from timemachine.errors import ForceFieldError, InputError
from timemachine.files import atomic_write
from timemachine.io import openmm_import as imp
from timemachine.io.forcefield_xml import (
    _merge,
    _read_trees,
    check_forcefield_files,
    format_value,
    openmm_forcefield_files,
)
from timemachine.io.native_gb import DIELECTRIC_SCRIPT, check_native_gb, native_gb_section
from timemachine.system import System

__all__ = [
    "check_forcefield_files",
    "export_forcefield",
    "forcefield_sources",
    "openmm_forcefield_files",
]


# --------------------------------------------------------------------------- name -> source


def _registered(root, section, entry, n_types, ff, torsion=False):
    """Elements of ``section/entry`` that OpenMM registered, in generator order."""
    out = []
    for sec in root.findall(section):
        for el in sec.findall(entry):
            types = ff._findAtomTypes(el.attrib, n_types)
            if None in types:
                continue
            if torsion and ff._parseTorsion(el.attrib) is None:
                continue
            out.append(el)
    return out


def forcefield_sources(system: System, forcefield, implicit_solvent=None):
    """Where each typed parameter of ``system`` lives in the XML of ``forcefield``.

    Returns:
        (root, sources): the merged XML root (a copy, safe to edit) and a dict
        ``name -> list of (element, attribute)`` for every parameter that XML defines.
        ``gb/*`` parameters are absent (computed by OpenMM's script).

    Raises:
        ForceFieldError: the System has a bonded or nonbonded parameter the force field
            does not produce on its topology (it was built from another force field).
    """
    if system.topology is None:
        raise InputError("export needs system.topology (the System has none)")
    ff, files = imp._make_forcefield(forcefield, implicit_solvent)
    root = _merge(_read_trees(files))
    topology = system.topology

    recorder = imp._DataRecorder()
    ff.registerGenerator(recorder)
    try:
        real = imp._create_system(ff, topology, "system.topology")
        data = recorder.data
        with imp._tagged(ff) as tags:
            tagged = imp._create_system(ff, topology, "system.topology")
    finally:
        ff._forces.remove(recorder)

    bonds = _registered(root, "HarmonicBondForce", "Bond", 2, ff)
    angles = _registered(root, "HarmonicAngleForce", "Angle", 3, ff)
    propers = _registered(root, "PeriodicTorsionForce", "Proper", 4, ff, torsion=True)
    impropers = _registered(root, "PeriodicTorsionForce", "Improper", 4, ff, torsion=True)
    sources = defaultdict(list)

    def add(name, element, attribute):
        if (element, attribute) not in sources[name]:
            sources[name].append((element, attribute))

    _bonded_sources(real, tagged, ff, tags, bonds, angles, propers, impropers, add)
    _nonbonded_sources(real, ff, data, topology, root, add)

    bonded = ("bond/", "angle/", "torsion/", "improper/", "charge/", "sigma/", "epsilon/")
    missing = [n for n in system.param_names if n.startswith(bonded) and n not in sources]
    if missing:
        raise ForceFieldError(
            f"parameter {missing[0]!r} of the System is not produced by force field "
            f"{list(files)} on its topology ({len(missing)} such); export with the force field "
            "the System was built from"
        )
    return root, dict(sources)


def _bonded_sources(real, tagged, ff, tags, bonds, angles, propers, impropers, add):
    """Mirror of ``openmm_import._bonded_terms``: the same names, pointing at XML elements."""
    import openmm as mm

    type_key = imp._TypeKeys(ff)

    for f_real, f_tag in zip(real.getForces(), tagged.getForces(), strict=True):
        if isinstance(f_real, mm.HarmonicBondForce):
            for b in range(f_real.getNumBonds()):
                gen, d, _ = tags[f_tag.getBondParameters(b)[3]._value]
                key = type_key("bond", gen, d, (gen.types1[d], gen.types2[d]))
                add(f"bond/{key}/length", bonds[d], "length")
                add(f"bond/{key}/k", bonds[d], "k")
        elif isinstance(f_real, mm.HarmonicAngleForce):
            for a in range(f_real.getNumAngles()):
                gen, d, _ = tags[f_tag.getAngleParameters(a)[4]._value]
                key = type_key("angle", gen, d, (gen.types1[d], gen.types2[d], gen.types3[d]))
                add(f"angle/{key}/theta0", angles[d], "angle")
                add(f"angle/{key}/k", angles[d], "k")
        elif isinstance(f_real, mm.PeriodicTorsionForce):
            for t in range(f_real.getNumTorsions()):
                gen, (which, d), m = tags[f_tag.getTorsionParameters(t)[6]._value]
                _, kind, key, field = imp._torsion_name(type_key, gen, which, d, m)
                el = (propers if which == "proper" else impropers)[d]
                add(f"{kind}/{key}/k{field}", el, f"k{m + 1}")
                add(f"{kind}/{key}/phase{field}", el, f"phase{m + 1}")


def _nonbonded_sources(real, ff, data, topology, root, add):
    """Mirror of ``openmm_import._nonbonded_term``'s charge and Lennard-Jones keys."""
    import openmm as mm

    forces = [f for f in real.getForces() if isinstance(f, mm.NonbondedForce)]
    if not forces:
        return
    f = forces[0]
    gen = imp._generators(ff, "NonbondedGenerator")[0]
    per_type = gen.params.paramsForType
    atoms = list(topology.atoms())
    templates = ff.getMatchingTemplates(topology)
    values = np.array([[v._value for v in f.getParticleParameters(i)] for i in range(len(atoms))])

    nb_atoms = [el for sec in root.findall("NonbondedForce") for el in sec.findall("Atom")]

    def nb_elements(atom_type):
        cls = ff._atomTypes[atom_type].atomClass
        hits = [
            el
            for el in nb_atoms
            if el.attrib.get("type") == atom_type
            or ("class" in el.attrib and el.attrib["class"] == cls)
        ]
        if not hits:
            raise ForceFieldError(f"no <NonbondedForce><Atom> entry for atom type {atom_type!r}")
        return hits

    residues = {el.attrib["name"]: el for el in root.iter("Residue")}
    type_label = {}
    for a in atoms:
        t = data.atomType[a]
        tmpl = templates[a.residue.index]
        atom_name = tmpl.atoms[data.atomTemplateIndexes[a]].name
        where = f"{tmpl.name}:{atom_name}"
        if "charge" in per_type.get(t, {}):
            key = type_label.setdefault(t, where if t.isdigit() else t)
            for el in nb_elements(t):
                add(f"charge/{key}/q", el, "charge")
        else:
            res = residues.get(tmpl.name)
            hits = (
                []
                if res is None
                else [e for e in res.findall("Atom") if e.attrib.get("name") == atom_name]
            )
            if not hits:
                raise ForceFieldError(
                    f"no <Residue name={tmpl.name!r}><Atom name={atom_name!r}> in the XML"
                )
            add(f"charge/{where}/q", hits[0], "charge")

    cls_of = {a.index: ff._atomTypes[data.atomType[a]].atomClass for a in atoms}
    lj_by_class = defaultdict(set)
    for a in atoms:
        lj_by_class[cls_of[a.index]].add(tuple(values[a.index, 1:]))
    for a in atoms:
        t = data.atomType[a]
        key = cls_of[a.index] if len(lj_by_class[cls_of[a.index]]) == 1 else t
        for el in nb_elements(t):
            add(f"sigma/{key}/sigma", el, "sigma")
            add(f"epsilon/{key}/epsilon", el, "epsilon")


# --------------------------------------------------------------------------- export


_MODES = (None, "native", "obc2")


def export_forcefield(
    system: System,
    params,
    path,
    forcefield=("amber99sbildn.xml",),
    implicit_solvent="auto",
) -> str:
    """Write ``params`` as an OpenMM ForceField XML file that OpenMM loads on its own.

    Args:
        system: the System the parameters belong to (built from ``forcefield``; its
            topology decides which XML entry each name refers to).
        params: (P,) float64 θ in the System's units (nm, rad, kJ/mol, e), e.g. a fit's
            result; entries equal to ``system.params`` keep the force field's original text.
        path: output ``.xml``; written atomically (temporary file, then rename).
        forcefield: the XML files the System was built from (bundled names or paths).
        implicit_solvent: "auto" ("native" when the System has a GB term, else None),
            None, "native" (a ``<GBSAOBCForce>`` section: OpenMM's native, fast force, and
            fitted ``gb/*`` radii and scales are carried) or "obc2" (OpenMM's
            ``implicit/obc2.xml`` script, a CustomGBForce, merged in). Either way
            ``ForceField(path)`` alone rebuilds the same energy; see
            :func:`openmm_forcefield_files`.

    Returns:
        ``path`` as a string.

    Raises:
        InputError: params of the wrong shape or non-finite, an unknown implicit_solvent,
            GB asked of a System without one, or a changed parameter that XML cannot carry
            (``gb/*`` in "obc2" mode, terms added with ``add_term``).
        ForceFieldError: the System was not built from ``forcefield``.
    """
    if not isinstance(system, System):
        raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
    try:
        theta = np.asarray(params, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"params must be a ({system.n_params},) array of numbers, got {params!r}"
        ) from exc
    if theta.shape != (system.n_params,):
        raise InputError(f"params must have shape ({system.n_params},), got {theta.shape}")
    bad = np.flatnonzero(~np.isfinite(theta))
    if bad.size:
        raise InputError(
            f"params[{bad[0]}] ({system.param_names[bad[0]]}) is {theta[bad[0]]}; cannot export"
        )
    system.check_physical(theta)  # an XML with a negative σ or k loads, and then explodes
    has_gb = any(t.kind == "gb" for t in system.terms)
    if implicit_solvent == "auto":
        implicit_solvent = "native" if has_gb else None
    if implicit_solvent not in _MODES:
        raise InputError(
            f"implicit_solvent={implicit_solvent!r} is not supported; choose 'auto' or one of "
            f"{list(_MODES)}"
        )
    if (implicit_solvent is not None) != has_gb:
        raise InputError(
            f"implicit_solvent={implicit_solvent!r} but the System "
            + ("has" if has_gb else "has no")
            + " generalized-Born term"
        )
    native = implicit_solvent == "native"
    root, sources = forcefield_sources(system, forcefield, None if native else implicit_solvent)

    originals = {}
    for p, name in enumerate(system.param_names):
        changed = not np.isclose(theta[p], system.params[p], rtol=1e-15, atol=0.0)
        if name not in sources:
            if changed and not (native and name.startswith("gb/")):
                raise InputError(
                    f"parameter {name!r} changed ({system.params[p]!r} -> {theta[p]!r}) but an "
                    "OpenMM ForceField XML cannot carry it (in implicit_solvent='obc2' mode GB "
                    "radii/scales are computed by OpenMM's script, use 'native'; custom terms "
                    "have no XML form)"
                )
            continue
        for el, attr in sources[name]:
            old = originals.setdefault((id(el), attr), el.attrib.get(attr))
            if old is None:
                raise ForceFieldError(f"XML element {el.tag} {el.attrib} has no {attr!r}")
            if changed:
                el.set(attr, format_value(theta[p]))

    if native:
        ff, _ = imp._make_forcefield(forcefield, None)
        root.append(native_gb_section(root, ff, system, theta))
        script = ET.SubElement(root, "Script")
        script.text = DIELECTRIC_SCRIPT

    comment = ET.Comment(
        f" written by timemachine.export_forcefield from {list(forcefield)}"
        + (f" + implicit solvent {implicit_solvent}" if implicit_solvent else "")
        + "; load it on its own: ForceField(this file) "
    )
    root.insert(0, comment)
    info = ET.Element("Info")
    ET.SubElement(info, "Source").text = f"timemachine.export_forcefield from {list(forcefield)}"
    ET.SubElement(info, "ImplicitSolvent").text = implicit_solvent or "none"
    root.insert(1, info)
    tree = ET.ElementTree(copy.deepcopy(root))
    ET.indent(tree, space=" ")
    out = atomic_write(path, lambda fh: tree.write(fh, encoding="utf-8", xml_declaration=False))
    if native:
        try:
            check_native_gb(out, system, theta)
        except Exception:
            os.remove(out)
            raise
    return out
