"""OpenMM force-field XML files: read with their ``<Include>`` files in ``loadFile`` order,
merged into one root, and checked for implicit solvent.

:func:`openmm_forcefield_files` names the files that reproduce an exported model, and
:func:`check_forcefield_files` refuses a combination that solvates twice (an exported
file that already has GB, loaded beside ``amber99_obc.xml`` or ``implicit/obc2.xml``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from timemachine.errors import ForceFieldError, InputError, MissingFileError

__all__ = ["check_forcefield_files", "format_value", "openmm_forcefield_files"]


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


def format_value(value: float) -> str:
    """A float as XML attribute text that reads back to the same float."""
    return repr(float(value))


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
