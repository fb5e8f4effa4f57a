"""Systems from OpenMM force fields, with the force field's *types* as parameters.

OpenMM's own ``ForceField`` does all residue-template and parameter matching. To learn
which force-field type each term came from, we build the System twice: once as is, and
once with every bonded type's force constant replaced by a unique integer tag. Term i of
each force is the same in both, so the tag read back from term i names its type. Per-atom
nonbonded types come from the atom types and residue templates OpenMM matched (recorded
by a generator we register), and GB radii/scales from their (mbondi2) element classes.
Every parameter rebuilt from θ is checked against OpenMM's value for that term.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict

import numpy as np

from timemachine.constants import DEFAULT_CUTOFF
from timemachine.errors import ForceFieldError, InputError, MissingFileError
from timemachine.potentials.nonbonded import full_strength_mask
from timemachine.system import (
    OBC2,
    CutoffNonbonded,
    HarmonicAngles,
    HarmonicBonds,
    Nonbonded,
    PeriodicTorsions,
    System,
)

IMPLICIT_SOLVENT_FILES = {"obc2": "implicit/obc2.xml"}


class _DataRecorder:
    """A ForceField generator that creates no force and keeps OpenMM's matching data."""

    data = None

    def createForce(self, sys, data, nonbondedMethod, nonbondedCutoff, args):  # noqa: N802
        self.data = data


def check_forcefield_names(forcefield, name="forcefield") -> tuple:
    """``forcefield`` (one file or several: bundled names or paths) as a tuple of str;
    InputError naming ``name`` for anything else or an empty list."""
    if isinstance(forcefield, (str, os.PathLike)):
        forcefield = (forcefield,)
    try:
        files = tuple(forcefield)
    except TypeError:
        raise InputError(
            f"{name} must be a force-field file name or a list of them, got {forcefield!r}"
        ) from None
    if not files:
        raise InputError(f"{name} is empty: give at least one force-field file")
    for f in files:
        if not isinstance(f, (str, os.PathLike)) or not os.fspath(f):
            raise InputError(
                f"{name} entries must be file names such as 'amber99sbildn.xml', got {f!r}"
            )
    return tuple(os.fspath(f) for f in files)


def _make_forcefield(forcefield, implicit_solvent):
    import openmm.app as app

    files = list(check_forcefield_names(forcefield))
    if implicit_solvent is not None:
        if implicit_solvent not in IMPLICIT_SOLVENT_FILES:
            raise InputError(
                f"implicit_solvent={implicit_solvent!r} is not supported; "
                f"choose None or one of {sorted(IMPLICIT_SOLVENT_FILES)}"
            )
        files.append(IMPLICIT_SOLVENT_FILES[implicit_solvent])
    try:
        return app.ForceField(*files), files
    except ValueError as e:
        missing = [f for f in files if f'Could not locate file "{f}"' in str(e)]
        if missing:
            raise MissingFileError(
                f"force-field file {missing[0]!r} not found on disk or among OpenMM's bundled "
                f"force fields (openmm/app/data)"
            ) from None
        raise ForceFieldError(f"force-field files {files} could not be read: {e}") from e
    except Exception as e:  # XML parse errors and the like
        raise ForceFieldError(f"force-field files {files} could not be read: {e}") from e


make_forcefield = _make_forcefield  # the one force-field loader, for the peptide builder too


#: the nonbonded methods the engine computes (``load_system``'s ``nonbonded_method``)
NONBONDED_METHODS = ("NoCutoff", "CutoffNonPeriodic", "CutoffPeriodic", "PME")


def _nonbonded_options(topology, nonbonded_method, cutoff, switch_distance, source):
    """createSystem's nonbonded keywords for ``load_system``'s settings, checked: a known
    method, a cutoff > 0, a switch distance in [0, cutoff), and for CutoffPeriodic a
    rectangular box at least twice the cutoff across."""
    import openmm.app as app
    import openmm.unit as unit

    if nonbonded_method in ("Ewald", "LJPME"):
        raise ForceFieldError(
            f"nonbonded_method={nonbonded_method!r}: the engine computes NoCutoff, "
            "CutoffNonPeriodic, CutoffPeriodic (reaction field) and PME"
        )
    if nonbonded_method not in NONBONDED_METHODS:
        raise InputError(
            f"nonbonded_method must be one of {NONBONDED_METHODS}, got {nonbonded_method!r}"
        )
    if nonbonded_method == "NoCutoff":
        given = [f"{name}={v!r}" for name, v in (("cutoff", cutoff),
                                                 ("switch_distance", switch_distance))
                 if v is not None]  # fmt: skip
        if given:
            raise InputError(
                f"{' and '.join(given)} with NoCutoff, which takes every pair: cutoff and "
                "switch_distance apply to the cutoff methods"
            )
        return {"nonbondedMethod": app.NoCutoff}
    cutoff = DEFAULT_CUTOFF if cutoff is None else cutoff
    if (isinstance(cutoff, bool) or not isinstance(cutoff, (int, float))
            or not math.isfinite(cutoff) or not cutoff > 0):  # fmt: skip
        raise InputError(f"cutoff must be a number > 0 (nm), got {cutoff!r}")
    options = {"nonbondedMethod": getattr(app, nonbonded_method),
               "nonbondedCutoff": float(cutoff) * unit.nanometer}  # fmt: skip
    if switch_distance is not None:
        if not (isinstance(switch_distance, (int, float)) and 0 <= switch_distance < cutoff):
            raise InputError(
                f"switch_distance must be in [0, cutoff = {cutoff}) nm, got {switch_distance!r}"
            )
        options["switchDistance"] = float(switch_distance) * unit.nanometer
    if nonbonded_method in ("CutoffPeriodic", "PME"):
        vectors = topology.getPeriodicBoxVectors()
        if vectors is None:
            raise InputError(
                f"nonbonded_method={nonbonded_method!r} needs a periodic box: {source} has "
                "none (solvate it, or set topology.setPeriodicBoxVectors)"
            )
        v = np.array([[c.value_in_unit(unit.nanometer) for c in vec] for vec in vectors])
        if np.abs(v - np.diag(np.diag(v))).max() > 0:
            raise InputError(f"the box of {source} is triclinic; the engine takes rectangular ones")
        if np.diag(v).min() < 2 * cutoff:
            raise InputError(
                f"the box of {source} is {np.diag(v).min():.4g} nm across, less than twice the "
                f"cutoff ({cutoff} nm)"
            )
    return options


def _create_system(ff, topology, source, nonbonded=None):
    import openmm.app as app

    try:
        return ff.createSystem(
            topology,
            **(nonbonded or {"nonbondedMethod": app.NoCutoff}),
            constraints=None,
            rigidWater=False,
            removeCMMotion=False,
        )
    except ValueError as e:
        raise ForceFieldError(
            f"OpenMM could not parametrise {source}: {e}{_unknown_residues(ff, topology)}"
        ) from e


def _unknown_residues(ff, topology) -> str:
    """A note naming the residues whose names no template of ``ff`` carries (a
    nonstandard residue breaks the chain's bonds, so OpenMM's message may name its
    neighbour instead)."""
    known = set(ff._templates)
    for name in list(known):  # amber's terminal variants NALA, CALA name ALA too
        if len(name) == 4 and name[0] in "NC":
            known.add(name[1:])
    odd = [f"{r.name}{r.index + 1}" for r in topology.residues() if r.name not in known]
    if not odd:
        return ""
    return f" (no template of this force field is named after residue(s) {', '.join(odd[:5])})"


def _generators(ff, cls_name):
    return [g for g in ff._forces if type(g).__name__ == cls_name]


@contextlib.contextmanager
def _tagged(ff):
    """Temporarily replace every bonded type's k by a unique tag; yields tag -> (gen, def, slot)."""
    saved, tags = [], {}
    counter = 1.0

    def tag_list(owner, attr, gen, d, skip_zero):
        nonlocal counter
        values = getattr(owner, attr)
        saved.append((owner, attr, list(values)))
        new = list(values)
        for m, v in enumerate(values):
            if skip_zero and v == 0:
                continue
            new[m] = counter
            tags[counter] = (gen, d, m)
            counter += 1.0
        setattr(owner, attr, new)

    try:
        for gen in _generators(ff, "HarmonicBondGenerator") + _generators(
            ff, "HarmonicAngleGenerator"
        ):
            saved.append((gen, "k", list(gen.k)))
            for d in range(len(gen.k)):
                tags[counter] = (gen, d, None)
                gen.k[d] = counter
                counter += 1.0
        for gen in _generators(ff, "PeriodicTorsionGenerator"):
            for d, tordef in enumerate(gen.proper):
                tag_list(tordef, "k", gen, ("proper", d), True)
            for d, tordef in enumerate(gen.improper):
                tag_list(tordef, "k", gen, ("improper", d), True)
        yield tags
    finally:
        for owner, attr, values in reversed(saved):
            if isinstance(getattr(owner, attr), list) and attr == "k" and hasattr(owner, "types1"):
                getattr(owner, attr)[:] = values
            else:
                setattr(owner, attr, values)


class _Labeler:
    """Readable labels for the type sets OpenMM stores in its generators."""

    def __init__(self, ff):
        self.by_set = {}
        for cls, types in ff._atomClasses.items():
            self.by_set.setdefault(frozenset(types), "X" if cls == "" else cls)

    def __call__(self, typeset):
        s = frozenset(typeset)
        if s in self.by_set:
            return self.by_set[s]
        if len(s) == 1:
            return next(iter(s))
        return "|".join(sorted(s))


class _Params:
    """Accumulates named parameters, de-duplicating by name and checking values agree."""

    def __init__(self):
        self.names, self.values, self.index = [], [], {}

    def get(self, name, value, where):
        i = self.index.get(name)
        if i is None:
            i = self.index[name] = len(self.names)
            self.names.append(name)
            self.values.append(float(value))
        elif not np.isclose(self.values[i], value, rtol=1e-12, atol=0.0):
            raise ForceFieldError(
                f"parameter {name!r} is shared by terms with different values "
                f"({self.values[i]!r} and {value!r}, at {where}); cannot type it"
            )
        return i


def _unique_name(taken, base):
    if base not in taken:
        return base
    n = 2
    while f"{base}#{n}" in taken:
        n += 1
    return f"{base}#{n}"


def _check(value, expected, what):
    if not np.isclose(value, expected, rtol=1e-10, atol=1e-14):
        raise ForceFieldError(f"{what}: typed value {value!r} differs from OpenMM's {expected!r}")


class _TypeKeys:
    """``type_key(kind, gen, d, typesets)``: the type-key of entry d of a bonded generator,
    its atom classes joined by "-", made unique per kind. Shared by the import and the
    export (``openmm_export``), which must name every entry the same way."""

    def __init__(self, ff):
        self.label = _Labeler(ff)
        self.names = {}  # (kind, gen id, def) -> key

    def __call__(self, kind, gen, d, typesets):
        key = (kind, id(gen), d)
        if key not in self.names:
            taken = {v for k, v in self.names.items() if k[0] == kind}
            self.names[key] = _unique_name(taken, "-".join(self.label(t) for t in typesets))
        return self.names[key]


def _torsion_name(type_key, gen, which, d, m):
    """(entry, kind, key, field) of periodicity term m of <Proper>/<Improper> entry d:
    its parameters are ``{kind}/{key}/k{field}`` and ``phase{field}``; field is the
    periodicity, with ``_m`` appended when the entry repeats that periodicity."""
    tordef = (gen.proper if which == "proper" else gen.improper)[d]
    kind = "torsion" if which == "proper" else "improper"
    key = type_key(
        kind, gen, (which, d), (tordef.types1, tordef.types2, tordef.types3, tordef.types4)
    )
    field = f"{tordef.periodicity[m]}"
    if list(tordef.periodicity).count(tordef.periodicity[m]) > 1:
        field += f"_{m}"
    return tordef, kind, key, field


def _bonded_terms(real, tagged, ff, tags, params):
    import openmm as mm

    type_key = _TypeKeys(ff)

    terms = []
    for f_real, f_tag in zip(real.getForces(), tagged.getForces(), strict=True):
        if isinstance(f_real, mm.HarmonicBondForce) and f_real.getNumBonds():
            idx, li, ki = [], [], []
            for b in range(f_real.getNumBonds()):
                i, j, r0, k = f_real.getBondParameters(b)
                gen, d, _ = tags[f_tag.getBondParameters(b)[3]._value]
                key = type_key("bond", gen, d, (gen.types1[d], gen.types2[d]))
                where = f"bond {b} (atoms {i}-{j})"
                li.append(params.get(f"bond/{key}/length", gen.length[d], where))
                ki.append(params.get(f"bond/{key}/k", gen.k[d], where))
                _check(gen.length[d], r0._value, where + " length")
                _check(gen.k[d], k._value, where + " k")
                idx.append((i, j))
            terms.append(HarmonicBonds(np.array(idx), np.array(li), np.array(ki)))
        elif isinstance(f_real, mm.HarmonicAngleForce) and f_real.getNumAngles():
            idx, ti, ki = [], [], []
            for a in range(f_real.getNumAngles()):
                i, j, k_, th, k = f_real.getAngleParameters(a)
                gen, d, _ = tags[f_tag.getAngleParameters(a)[4]._value]
                key = type_key("angle", gen, d, (gen.types1[d], gen.types2[d], gen.types3[d]))
                where = f"angle {a} (atoms {i}-{j}-{k_})"
                ti.append(params.get(f"angle/{key}/theta0", gen.angle[d], where))
                ki.append(params.get(f"angle/{key}/k", gen.k[d], where))
                _check(gen.angle[d], th._value, where + " theta0")
                _check(gen.k[d], k._value, where + " k")
                idx.append((i, j, k_))
            terms.append(HarmonicAngles(np.array(idx), np.array(ti), np.array(ki)))
        elif isinstance(f_real, mm.PeriodicTorsionForce) and f_real.getNumTorsions():
            by_kind = {"proper": ([], [], [], []), "improper": ([], [], [], [])}
            for t in range(f_real.getNumTorsions()):
                i, j, k_, l_, n, phase, k = f_real.getTorsionParameters(t)
                gen, (which, d), m = tags[f_tag.getTorsionParameters(t)[6]._value]
                tordef, kind, key, field = _torsion_name(type_key, gen, which, d, m)
                where = f"{kind} {t} (atoms {i}-{j}-{k_}-{l_})"
                _check(tordef.k[m], k._value, where + " k")
                _check(tordef.phase[m], phase._value, where + " phase")
                lists = by_kind[which]
                lists[0].append((i, j, k_, l_))
                lists[1].append(n)
                lists[2].append(params.get(f"{kind}/{key}/phase{field}", tordef.phase[m], where))
                lists[3].append(params.get(f"{kind}/{key}/k{field}", tordef.k[m], where))
            for which, (idx, per, pi, ki) in by_kind.items():
                if idx:
                    terms.append(
                        PeriodicTorsions(
                            np.array(idx),
                            np.array(per, dtype=np.float64),
                            np.array(pi),
                            np.array(ki),
                            kind="torsion" if which == "proper" else "improper",
                        )
                    )
    return terms


def _bond_graph(topology):
    nbrs = defaultdict(set)
    for b in topology.bonds():
        nbrs[b[0].index].add(b[1].index)
        nbrs[b[1].index].add(b[0].index)
    return nbrs


def _graph_distance(nbrs, i, j, limit=3):
    frontier, seen = {i}, {i}
    for d in range(1, limit + 1):
        frontier = {n for a in frontier for n in nbrs[a]} - seen
        if j in frontier:
            return d
        seen |= frontier
    return None


def _nonbonded_term(f, ff, data, topology, params):
    gen = _generators(ff, "NonbondedGenerator")[0]
    atoms = list(topology.atoms())
    n = len(atoms)
    templates = ff.getMatchingTemplates(topology)
    per_type = gen.params.paramsForType
    values = np.array([[v._value for v in f.getParticleParameters(i)] for i in range(n)])

    # charge: typed by atom type when the XML gives it per type, else by residue-template atom
    # (numbered types, as in amber99sbildn.xml, are labelled by their first template atom)
    charge_keys, type_label = [], {}
    for a in atoms:
        t = data.atomType[a]
        tmpl = templates[a.residue.index]
        where = f"{tmpl.name}:{tmpl.atoms[data.atomTemplateIndexes[a]].name}"
        if "charge" in per_type.get(t, {}):
            charge_keys.append(type_label.setdefault(t, where if t.isdigit() else t))
        else:
            charge_keys.append(where)
    # LJ: by atom class when every type of that class in this system agrees, else by type
    cls_of = {a.index: ff._atomTypes[data.atomType[a]].atomClass for a in atoms}
    lj_by_class = defaultdict(set)
    for a in atoms:
        lj_by_class[cls_of[a.index]].add(tuple(values[a.index, 1:]))
    lj_keys = [
        cls_of[a.index] if len(lj_by_class[cls_of[a.index]]) == 1 else data.atomType[a]
        for a in atoms
    ]
    qi = np.array(
        [params.get(f"charge/{charge_keys[i]}/q", values[i, 0], f"atom {i}") for i in range(n)]
    )
    si = np.array(
        [params.get(f"sigma/{lj_keys[i]}/sigma", values[i, 1], f"atom {i}") for i in range(n)]
    )
    ei = np.array(
        [params.get(f"epsilon/{lj_keys[i]}/epsilon", values[i, 2], f"atom {i}") for i in range(n)]
    )

    nbrs = _bond_graph(topology)
    excluded, exc, cs, ls = [], [], [], []  # every exception's pair; the 1-4s' parameters
    c14, l14 = float(gen.coulomb14scale), float(gen.lj14scale)
    for e in range(f.getNumExceptions()):
        i, j, qq, sig, eps = f.getExceptionParameters(e)
        excluded.append((i, j))
        qq, sig, eps = qq._value, sig._value, eps._value
        d = _graph_distance(nbrs, i, j)
        where = f"nonbonded exception {e} (atoms {i}-{j})"
        if d in (1, 2):
            if qq != 0 or eps != 0:
                raise ForceFieldError(f"{where}: a 1-{d + 1} pair has non-zero parameters")
            continue
        if d != 3:
            raise ForceFieldError(
                f"{where}: exception between atoms {d or '>3'} bonds apart is not supported"
            )
        _check(c14 * values[i, 0] * values[j, 0], qq, where + " chargeProd")
        _check(l14 * np.sqrt(values[i, 2] * values[j, 2]), eps, where + " epsilon")
        if eps != 0:
            _check(0.5 * (values[i, 1] + values[j, 1]), sig, where + " sigma")
        exc.append((i, j))
        cs.append(c14)
        ls.append(l14)
    exc = np.array(exc, dtype=np.int64).reshape(-1, 2)
    method = f.getNonbondedMethod()
    if method == f.NoCutoff:  # all pairs: the (N, N) mask of full-strength pairs
        mask = full_strength_mask(n, excluded)
        return Nonbonded(qi, si, ei, mask, exc, np.array(cs), np.array(ls)), qi
    box = alpha = grid = None
    if method in (f.CutoffPeriodic, f.PME):
        import openmm.unit as unit

        vectors = topology.getPeriodicBoxVectors()
        box = np.array([vectors[k][k].value_in_unit(unit.nanometer) for k in range(3)])
    if method == f.PME:
        alpha, grid = _pme_parameters(f, box)
    elif method != f.CutoffPeriodic and method != f.CutoffNonPeriodic:
        raise ForceFieldError(f"NonbondedForce method {method} is not computed by the engine")
    from timemachine.potentials.cutoffs import exclusion_table

    # every excluded pair (1-2, 1-3 and the 1-4 exceptions), i < j, lexicographic
    exclusions = np.unique(np.sort(np.asarray(excluded, np.int64).reshape(-1, 2), axis=1),
                           axis=0)  # fmt: skip
    classes = sorted(set(zip(si.tolist(), ei.tolist(), strict=True)))
    counts = tuple(int(np.sum((si == a) & (ei == b))) for a, b in classes)
    term = CutoffNonbonded(
        qi, si, ei, exclusion_table(exclusions, n), exc, np.array(cs), np.array(ls),
        np.array([a for a, _ in classes], dtype=np.int64),
        np.array([b for _, b in classes], dtype=np.int64),
        counts, box, exclusions,
        cutoff=f.getCutoffDistance()._value,
        dielectric=float(f.getReactionFieldDielectric()),
        switch_distance=f.getSwitchingDistance()._value if f.getUseSwitchingFunction() else None,
        dispersion_correction=bool(f.getUseDispersionCorrection()),
        alpha=alpha, grid=grid,
    )  # fmt: skip
    return term, qi


def with_cell_list(system, x):
    """``system`` with its periodic ``CutoffNonbonded`` summing through a cell list sized
    for positions x (N, 3) nm (``cutoffs.cell_capacity``), where the box allows one and
    it meets fewer candidates than the dense sum."""
    import dataclasses

    from timemachine.potentials import cutoffs

    terms = []
    for t in system.terms:
        if isinstance(t, CutoffNonbonded) and t.box is not None:
            cells = cutoffs.cell_grid(t.box, t.cutoff)
            if cells is not None:
                capacity = cutoffs.cell_capacity(x, t.box, cells)
                # only where 27 cells hold fewer candidates than half the box's atoms
                # (the dense sum's share per atom): in smaller boxes the list costs more
                if 27 * capacity < system.n_atoms / 2:
                    t = dataclasses.replace(t, cells=cells, cell_capacity=capacity)
        terms.append(t)
    return System(system.masses, terms, system.param_names, system.params, system.topology)


def _pme_parameters(force, box):
    """(α nm⁻¹, (K_x, K_y, K_z)) of a PME NonbondedForce: the ones OpenMM's Reference
    platform chooses from the force's Ewald error tolerance (read back from a Context, so
    that its rounding of the grid is the one used)."""
    import openmm as mm
    import openmm.unit as unit

    probe = mm.System()
    for _ in range(force.getNumParticles()):
        probe.addParticle(1.0)
    probe.setDefaultPeriodicBoxVectors(*(mm.Vec3(*(box[k] if c == k else 0.0 for c in range(3)))
                                         * unit.nanometer for k in range(3)))  # fmt: skip
    nb = mm.NonbondedForce()
    nb.setNonbondedMethod(mm.NonbondedForce.PME)
    nb.setCutoffDistance(force.getCutoffDistance())
    nb.setEwaldErrorTolerance(force.getEwaldErrorTolerance())
    alpha, nx, ny, nz = force.getPMEParameters()
    nb.setPMEParameters(alpha, nx, ny, nz)
    for _ in range(force.getNumParticles()):
        nb.addParticle(0.0, 0.1, 0.0)
    probe.addForce(nb)
    ctx = mm.Context(probe, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    alpha, nx, ny, nz = nb.getPMEParametersInContext(ctx)
    return float(alpha), (int(nx), int(ny), int(nz))


def _gb_class(atom, nbrs, atoms):
    sym = atom.element.symbol if atom.element is not None else "X"
    if sym == "H":
        partner = [atoms[j] for j in nbrs[atom.index]]
        if partner and partner[0].element is not None and partner[0].element.symbol == "N":
            return "H(N)"
    return sym


def _obc2_cutoff(f):
    """The cutoff (nm) of an obc2.xml CustomGBForce ``f``, or None (NoCutoff), checked
    against its pair expression: obc2.xml with a cutoff shifts the pair term by -1/r_c
    (``charge1*charge2*(1/f-<1/r_c>)``) and sets CutoffNonPeriodic; anything else raises."""
    import re

    import openmm as mm

    pair = [
        f.getEnergyTermParameters(k)[0]
        for k in range(f.getNumEnergyTerms())
        if f.getEnergyTermParameters(k)[1] == mm.CustomGBForce.ParticlePairNoExclusions
    ]
    shift = re.search(r"\(1/f-([^)]+)\)", pair[0]) if len(pair) == 1 else None
    method = f.getNonbondedMethod()
    if method == mm.CustomGBForce.NoCutoff:
        if shift is not None:
            raise ForceFieldError(
                "the obc2 CustomGBForce has NoCutoff but a pair term shifted by "
                f"{shift.group(1)} (built with a cutoff?): not OpenMM's implicit/obc2.xml"
            )
        return None
    if method != mm.CustomGBForce.CutoffNonPeriodic:
        raise ForceFieldError(
            f"the obc2 CustomGBForce has nonbonded method {method} (CutoffPeriodic): the "
            "engine computes generalized Born with NoCutoff or CutoffNonPeriodic only"
        )
    cutoff = float(f.getCutoffDistance()._value)
    try:
        value = float(shift.group(1)) if shift is not None else None
    except ValueError:
        value = None
    if value is None or abs(value * cutoff - 1.0) > 1e-12:
        raise ForceFieldError(
            f"the obc2 CustomGBForce has a cutoff of {cutoff} nm but its pair term is not "
            f"shifted by 1/cutoff (found {shift.group(1) if shift else 'no shift'}): not "
            "OpenMM's implicit/obc2.xml"
        )
    return cutoff


def _obc2_term(f, topology, charge_index, params):
    names = [f.getPerParticleParameterName(k) for k in range(f.getNumPerParticleParameters())]
    if names != ["charge", "or", "sr"] or "4.85*psi^3" not in f.getComputedValueParameters(1)[1]:
        raise ForceFieldError(
            "only OpenMM's implicit/obc2.xml generalized Born model is supported; found a "
            f"CustomGBForce with per-particle parameters {names}"
        )
    cutoff = _obc2_cutoff(f)
    atoms = list(topology.atoms())
    nbrs = _bond_graph(topology)
    ri, si = [], []
    for i, a in enumerate(atoms):
        q, offset_r, sr = f.getParticleParameters(i)
        key = _gb_class(a, nbrs, atoms)
        where = f"GB atom {i}"
        _check(params.values[charge_index[i]], q, where + " charge")
        ri.append(params.get(f"gb/{key}/radius", offset_r + 0.009, where))
        si.append(params.get(f"gb/{key}/scale", sr / offset_r, where))
    return OBC2(np.array(charge_index), np.array(ri), np.array(si), cutoff=cutoff)


def _check_implicit_solvent_method(implicit_solvent, nonbonded_method, cutoff):
    """InputError for a nonbonded method that generalized Born cannot take here: OpenMM's
    obc2.xml refuses the Ewald methods (PME, Ewald, LJPME); it accepts CutoffPeriodic
    (periodic GB), which the engine does not compute; a cutoff must be finite."""
    if implicit_solvent is None:
        return
    if nonbonded_method in ("PME", "Ewald", "LJPME"):
        raise InputError(
            f"nonbonded_method={nonbonded_method!r} with implicit_solvent={implicit_solvent!r}: "
            "OpenMM's implicit solvent does not take Ewald-type methods; use 'NoCutoff' or "
            "'CutoffNonPeriodic'"
        )
    if nonbonded_method == "CutoffPeriodic":
        raise InputError(
            f"nonbonded_method='CutoffPeriodic' with implicit_solvent={implicit_solvent!r}: "
            "the engine computes generalized Born with 'NoCutoff' or 'CutoffNonPeriodic' "
            "only (periodic GB is not implemented)"
        )
    if (
        isinstance(cutoff, (int, float))
        and not isinstance(cutoff, bool)
        and not np.isfinite(cutoff)
        and cutoff > 0
    ):
        raise InputError(f"cutoff must be a finite number > 0 (nm), got {cutoff!r}")


_IGNORED_FORCES = ("CMMotionRemover",)


def _build(ff, topology, source, nonbonded=None):
    import openmm as mm

    recorder = _DataRecorder()
    ff.registerGenerator(recorder)
    try:
        real = _create_system(ff, topology, source, nonbonded)
        data = recorder.data
        with _tagged(ff) as tags:
            tagged = _create_system(ff, topology, source, nonbonded)
    finally:
        ff._forces.remove(recorder)

    params = _Params()
    terms = _bonded_terms(real, tagged, ff, tags, params)
    charge_index = None
    for f in real.getForces():
        if isinstance(f, mm.NonbondedForce):
            term, charge_index = _nonbonded_term(f, ff, data, topology, params)
            terms.append(term)
    for f in real.getForces():
        name = type(f).__name__
        if isinstance(
            f,
            (
                mm.HarmonicBondForce,
                mm.HarmonicAngleForce,
                mm.PeriodicTorsionForce,
                mm.NonbondedForce,
            ),
        ):
            continue
        if isinstance(f, mm.CustomGBForce):
            if charge_index is None:
                raise ForceFieldError("generalized Born needs a NonbondedForce for its charges")
            terms.append(_obc2_term(f, topology, charge_index, params))
        elif name not in _IGNORED_FORCES:
            raise ForceFieldError(f"{source}: OpenMM force {name} is not supported by timemachine")
    masses = np.array([real.getParticleMass(i)._value for i in range(real.getNumParticles())])
    return System(masses, terms, params.names, params.values, topology), real


def _read_structure(pdb):
    import openmm.app as app
    import openmm.unit as unit

    if hasattr(pdb, "topology") and hasattr(pdb, "positions"):
        return pdb.topology, pdb.positions, repr(pdb)
    if isinstance(pdb, tuple) and len(pdb) == 2:
        top, pos = pdb
        if not unit.is_quantity(pos):
            pos = np.asarray(pos, dtype=np.float64) * unit.nanometer
        return top, pos, "the given topology"
    if not isinstance(pdb, (str, os.PathLike)):
        raise InputError(
            f"pdb must be a file path, an object with .topology and .positions, or a "
            f"(topology, positions) tuple, got {pdb!r} of type {type(pdb).__name__}"
        )
    path = os.fspath(pdb)
    if not os.path.exists(path):
        raise MissingFileError(f"structure file {path!r} does not exist")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InputError(f"structure file {path!r} is empty")
    pdbx = path.endswith((".cif", ".pdbx"))
    try:
        if not pdbx and not _has_atom_records(path):  # OpenMM's reader fails obscurely
            raise InputError(f"structure file {path!r} holds no atoms (no ATOM/HETATM records)")
        f = app.PDBxFile(path) if pdbx else app.PDBFile(path)
    except InputError:
        raise
    except Exception as e:
        raise ForceFieldError(f"could not read structure file {path!r}: {e}") from e
    if f.topology.getNumAtoms() == 0:
        raise InputError(f"structure file {path!r} holds no atoms (no ATOM/HETATM records)")
    return f.topology, f.positions, f"structure file {path!r}"


def _has_atom_records(path) -> bool:
    with open(path, errors="replace") as f:
        return any(line.startswith(("ATOM", "HETATM")) for line in f)


def load_system(pdb, forcefield=("amber99sbildn.xml",), implicit_solvent=None,
                nonbonded_method="NoCutoff", cutoff=None, switch_distance=None,
                neighbour_skin=0.1):  # fmt: skip
    """Parametrise a structure with OpenMM force-field XML files.

    Args:
      pdb: path to a PDB/PDBx file, an object with ``.topology`` and ``.positions``
        (``openmm.app.PDBFile``, ``Modeller``), or a ``(topology, positions_nm)`` tuple.
      forcefield: OpenMM force-field XML files (bundled names such as
        "amber99sbildn.xml", "amber14-all.xml", or paths; "tip3p.xml" for water, which
        the engine keeps flexible).
      implicit_solvent: None (vacuum) or "obc2" (OpenMM's implicit/obc2.xml); with
        "CutoffNonPeriodic" its GB term takes the same cutoff (``OBC2.cutoff``: pairs
        within it only, the pair term shifted by -1/cutoff, as OpenMM's), and the
        reaction field has dielectric 1, as obc2.xml sets it.
      nonbonded_method: "NoCutoff" (default: all pairs), "CutoffNonPeriodic" or
        "CutoffPeriodic" (reaction field within ``cutoff``; periodic in the topology's
        rectangular box, with the dispersion correction; ``CutoffNonbonded``).
      cutoff: nm (default 1.0, as OpenMM's); switch_distance: OpenMM's LJ switch, nm.
      neighbour_skin: nm, the Verlet list's skin with a cutoff method (the step programs
        then sum the cutoff pairs over a list carried through the steps,
        ``timemachine.neighbours``; energies outside them stay exact sums); capped at
        half the box's smallest edge minus the cutoff, and 0 (or a box too small for
        a skin of 0.02 nm) turns the list off.
    Returns:
      (system, positions): a :class:`timemachine.System` and (N, 3) float64 positions, nm.

    Raises:
      InputError: an unknown method, a cutoff <= 0, a switch distance outside [0,
        cutoff), CutoffPeriodic without a box, with a triclinic one or one smaller than
        twice the cutoff; implicit solvent with CutoffPeriodic or PME, or with a
        non-finite cutoff. ForceFieldError: PME or Ewald (not computed by the engine).
    """
    import openmm.unit as unit

    topology, positions, source = _read_structure(pdb)
    _check_implicit_solvent_method(implicit_solvent, nonbonded_method, cutoff)
    nonbonded = _nonbonded_options(topology, nonbonded_method, cutoff, switch_distance, source)
    ff, _ = _make_forcefield(forcefield, implicit_solvent)
    system, _ = _build(ff, topology, source, nonbonded)
    x = np.array(positions.value_in_unit(unit.nanometer), dtype=np.float64).reshape(-1, 3)
    x = system.check_positions(x, where=f"positions of {source}").__array__()
    if nonbonded_method in ("CutoffPeriodic", "PME"):
        system = with_cell_list(system, x)
    if nonbonded_method != "NoCutoff":
        system = _with_default_neighbour_list(system, x, neighbour_skin)
    return system, x


def _with_default_neighbour_list(system, x, skin):
    """``neighbours.with_neighbour_list`` with the skin capped by the box (module
    docstring of ``load_system``'s ``neighbour_skin``)."""
    from timemachine import neighbours

    if not (isinstance(skin, (int, float)) and np.isfinite(skin) and skin >= 0):
        raise InputError(f"neighbour_skin must be >= 0 nm, got {skin!r}")
    for t in system.terms:
        if isinstance(t, CutoffNonbonded) and t.box is not None:
            skin = min(skin, 0.5 * float(np.min(t.box)) - t.cutoff)
    if skin < 0.02:
        return system
    return neighbours.with_neighbour_list(system, x, skin=skin)


def openmm_system_for(topology, forcefield=("amber99sbildn.xml",), implicit_solvent=None):
    """The OpenMM System that :func:`load_system` parametrises (NoCutoff, no constraints)."""
    ff, _ = _make_forcefield(forcefield, implicit_solvent)
    return _create_system(ff, topology, "the given topology")


def from_openmm(openmm_system, topology, forcefield=("amber99sbildn.xml",), implicit_solvent=None):
    """A System equivalent to an OpenMM System built from ``forcefield`` on ``topology``.

    The force field is needed to know which *types* the terms came from. Every term of the
    given System is checked against the typed reconstruction, so a System that was edited
    after creation, or built with other settings, raises ForceFieldError naming the term.
    """
    import openmm as mm

    ff, _ = _make_forcefield(forcefield, implicit_solvent)
    system, rebuilt = _build(ff, topology, "the given topology")
    if openmm_system.getNumParticles() != rebuilt.getNumParticles():
        raise InputError(
            f"openmm_system has {openmm_system.getNumParticles()} particles but the topology "
            f"has {rebuilt.getNumParticles()}"
        )
    ours = {type(f).__name__: f for f in rebuilt.getForces()}
    for f in openmm_system.getForces():
        name = type(f).__name__
        if name in _IGNORED_FORCES:
            continue
        if name not in ours:
            raise ForceFieldError(f"openmm_system has a {name} that {forcefield} does not create")
        if mm.XmlSerializer.serialize(f) != mm.XmlSerializer.serialize(ours[name]):
            raise ForceFieldError(
                f"openmm_system's {name} differs from what {forcefield} creates on this topology "
                "(was it modified, or built with a cutoff or constraints?)"
            )
    return system
