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

from timemachine.constants import COULOMB, COULOMB_GB
from timemachine.errors import ForceFieldError, InputError, MissingFileError
from timemachine.files import atomic_write
from timemachine.io import openmm_import as imp
from timemachine.system import System

__all__ = [
    "check_forcefield_files",
    "export_forcefield",
    "forcefield_sources",
    "openmm_forcefield_files",
]


# --------------------------------------------------------------------------- XML files


def _data_dirs():
    import openmm.app.forcefield as off

    return list(off._getDataDirectories())


def _read_trees(files):
    """(path, ElementTree) in ``ForceField.loadFile`` order: given files, then includes."""
    files = [os.fspath(f) for f in files]
    out, i = [], 0
    while i < len(files):
        name = files[i]
        path = name
        if not os.path.isfile(path):
            for d in _data_dirs():
                if os.path.isfile(os.path.join(d, name)):
                    path = os.path.join(d, name)
                    break
        if not os.path.isfile(path):
            raise ForceFieldError(
                f"force-field file {name!r} not found on disk or in openmm/app/data"
            )
        try:
            tree = ET.parse(path)
        except ET.ParseError as e:
            raise ForceFieldError(f"force-field file {path!r} is not valid XML: {e}") from e
        out.append((path, tree))
        i += 1
        parent = os.path.dirname(path)
        for inc in tree.getroot().findall("Include"):
            f = inc.attrib["file"]
            joined = os.path.join(parent, f)
            f = joined if os.path.isfile(joined) else f
            if f not in files:
                files.append(f)
    return out


def _merge(trees):
    """One <ForceField> root equivalent to loading all trees together.

    ``loadFile`` reads only the first <AtomTypes>, <Residues> and <Patches> of each file,
    so those are merged into one element each; force sections and scripts keep their order.
    """
    root = ET.Element("ForceField")
    merged = {tag: ET.SubElement(root, tag) for tag in ("AtomTypes", "Residues", "Patches")}
    for _, tree in trees:
        for child in tree.getroot():
            if child.tag in merged:
                merged[child.tag].extend(list(child))
            elif child.tag not in ("Include", "Info"):
                root.append(child)
    for el in merged.values():
        if len(el) == 0:
            root.remove(el)
    return root


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


# --------------------------------------------------------------------------- native GB

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

_DIELECTRIC_SCRIPT = f"""
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


def _native_gb_section(root, ff, system, theta):
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
        attrib["radius"] = _format(value(key, "radius", _MBONDI2_RADIUS, _DEFAULT_RADIUS))
        attrib["scale"] = _format(value(key, "scale", _OBC_SCALE, _DEFAULT_SCALE))
        ET.SubElement(section, "Atom", attrib)
    return section


def _check_native_gb(path, system, theta):
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


# --------------------------------------------------------------------------- files


def _solvation_models(path, tree):
    """What implicit-solvent models one XML file adds (cheap: tags and script text)."""
    found = []
    root = tree.getroot()
    for tag in ("GBSAOBCForce", "AmoebaGeneralizedKirkwoodForce"):
        if root.find(tag) is not None:
            found.append(f"<{tag}>")
    for script in root.findall("Script"):
        text = script.text or ""
        if "CustomGBForce" in text or "customgbforces" in text or "GBSA" in text:
            if "timemachine: the dielectrics" not in text:
                found.append("a generalized-Born <Script>")
    return found


def check_forcefield_files(files):
    """Refuse force-field files that, loaded together, would solvate the system twice.

    Each file (with its ``<Include>`` files) is read for a ``<GBSAOBCForce>`` section,
    an AMOEBA GK section or a ``<Script>`` that builds a generalized-Born force
    (``implicit/obc2.xml`` and the scripts merged into an ``implicit_solvent="obc2"``
    export). Two or more such sources in one ``ForceField`` add two solvation terms (or,
    for two ``<GBSAOBCForce>`` sections, let the later file's per-type values silently
    replace the earlier's), so this raises.

    Returns:
        the files as a tuple of strings.

    Raises:
        MissingFileError: a file not found on disk or in openmm/app/data.
        InputError: more than one solvation source, naming the files.
    """
    if isinstance(files, (str, os.PathLike)):
        files = (files,)
    files = tuple(os.fspath(f) for f in files)
    sources = []
    for f in files:
        try:
            trees = _read_trees([f])
        except ForceFieldError as e:
            if "not found" in str(e):
                raise MissingFileError(str(e)) from None
            raise
        for path, tree in trees:
            sources += [(f, path, what) for what in _solvation_models(path, tree)]
    if len(sources) > 1:
        listed = "; ".join(
            f"{f!r}"
            + (f" (via {p!r})" if os.path.basename(p) != os.path.basename(f) else "")
            + f": {what}"
            for f, p, what in sources
        )
        raise InputError(
            f"force-field files {list(files)} define implicit solvent more than once ({listed}); "
            "OpenMM would add every one of them. Load an exported file on its own "
            "(openmm_forcefield_files names what to load)"
        )
    return files


def _recorded_solvent(path):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ForceFieldError(f"force-field file {path!r} is not valid XML: {e}") from e
    el = root.find("Info/ImplicitSolvent")
    if el is not None:
        return None if (el.text or "").strip() in ("", "none") else el.text.strip()
    if root.find("GBSAOBCForce") is not None:
        return "native"
    return "obc2" if _solvation_models(path, ET.ElementTree(root)) else None


def openmm_forcefield_files(path, implicit_solvent="auto"):
    """The OpenMM force-field files that reproduce a model written by export_forcefield.

    ``openmm.app.ForceField(*openmm_forcefield_files(path))`` with
    ``createSystem(topology, nonbondedMethod=NoCutoff)`` gives the energy of the System
    and θ that were exported. Every export is self-contained, so this is ``(path,)``; in
    particular OpenMM's ``amber99_obc.xml`` must NOT be added to a ``"native"`` export (it
    has other radii, dielectric and charges; see the module docstring).

    Args:
        path: a file written by :func:`export_forcefield`.
        implicit_solvent: "auto" (what the file records), or the mode the caller expects
            (None, "native", "obc2"): a file written another way raises.

    Raises:
        MissingFileError: ``path`` does not exist.
        InputError: the file was written with another implicit_solvent than asked.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"exported force field {path!r} does not exist")
    recorded = _recorded_solvent(path)
    if implicit_solvent != "auto" and implicit_solvent != recorded:
        raise InputError(
            f"{path!r} was exported with implicit_solvent={recorded!r}, not {implicit_solvent!r}"
        )
    return (path,)


# --------------------------------------------------------------------------- export


def _format(value: float) -> str:
    return repr(float(value))


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
    theta = np.asarray(params, dtype=np.float64)
    if theta.shape != (system.n_params,):
        raise InputError(f"params must have shape ({system.n_params},), got {theta.shape}")
    bad = np.flatnonzero(~np.isfinite(theta))
    if bad.size:
        raise InputError(
            f"params[{bad[0]}] ({system.param_names[bad[0]]}) is {theta[bad[0]]}; cannot export"
        )
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
                el.set(attr, _format(theta[p]))

    if native:
        ff, _ = imp._make_forcefield(forcefield, None)
        root.append(_native_gb_section(root, ff, system, theta))
        script = ET.SubElement(root, "Script")
        script.text = _DIELECTRIC_SCRIPT

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
            _check_native_gb(out, system, theta)
        except Exception:
            os.remove(out)
            raise
    return out
