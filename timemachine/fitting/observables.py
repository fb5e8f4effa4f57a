"""Differentiable observables of one configuration: Rg, NOE distances, ³J couplings, dihedrals.

Every observable is an object called on positions ``x`` (N, 3) in nm that returns a float64
JAX array of shape (K,); ``obs.labels`` names the K values and ``obs.n_values == K``. The
call is a pure function of ``x`` (the atom indices are constants), so it composes with
``jax.jit``, ``jax.vmap`` (frames) and ``jax.jvp``/``jax.grad`` (the pathwise gradient
∂O/∂x · dx/dθ of ``timemachine.fitting.estimators``).

³J scalar couplings use the Karplus relation on the backbone dihedral φ (C(i-1)-N-CA-C),
J(φ) = A cos²(φ + φ0) + B cos(φ + φ0) + C, in Hz, with the parameter sets of

* ³J(HN,Hα): Bax2007 — Vögeli, Ying, Grishaev & Bax, JACS 129, 9377 (2007), Table 1;
  Bax1997 — Hu & Bax, JACS 119, 6360 (1997), Table 2; Ruterjans1999 — Schmidt, Blümel,
  Löhr & Rüterjans, J. Biomol. NMR 14, 1 (1999), Table 1;
* ³J(HN,C′) and ³J(HN,Cβ): Bax2007 (Vögeli et al. 2007, Table 1),

the same names and numbers as mdtraj's ``compute_J3_HN_HA``, ``compute_J3_HN_C`` and
``compute_J3_HN_CB``, and the φ atoms are chosen by mdtraj's own ``indices_phi``, so the
values agree with mdtraj's on the same frames (mdtraj computes in float32; these in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from timemachine.errors import InputError  # noqa: E402
from timemachine.potentials.bonded import dihedral_angle  # noqa: E402

__all__ = [
    "KARPLUS",
    "Dihedral",
    "JCoupling3HNC",
    "JCoupling3HNCB",
    "JCoupling3HNHA",
    "NOEDistance",
    "Observable",
    "ObservableFunction",
    "ObservableSet",
    "RadiusOfGyration",
    "observable_from_spec",
]

_DEG = math.pi / 180.0

# Karplus parameters (A, B, C in Hz; φ0 in radians) by coupling and by published set.
KARPLUS = {
    "J3_HN_HA": {
        "Bax2007": dict(A=8.4, B=-1.36, C=0.33, phi0=-60 * _DEG),
        "Bax1997": dict(A=7.09, B=-1.42, C=1.55, phi0=-60 * _DEG),
        "Ruterjans1999": dict(A=7.90, B=-1.05, C=0.65, phi0=-60 * _DEG),
    },
    "J3_HN_C": {"Bax2007": dict(A=4.36, B=-1.08, C=-0.01, phi0=180 * _DEG)},
    "J3_HN_CB": {"Bax2007": dict(A=3.71, B=-0.59, C=0.08, phi0=60 * _DEG)},
}


class Observable:
    """Base class: ``obs(x (N, 3) nm) -> (K,) float64``; ``labels`` (K strings), ``n_values``.

    Subclasses set ``labels`` and ``_max_index`` (largest atom index used, or -1) and
    implement ``_evaluate(x)``.
    """

    labels: tuple[str, ...] = ()
    _max_index: int = -1

    @property
    def n_values(self) -> int:
        return len(self.labels)

    def __call__(self, x) -> jax.Array:
        x = jnp.asarray(x, dtype=jnp.float64)
        # shapes are static under jit/vmap, so this check costs nothing at run time
        if x.ndim != 2 or x.shape[1] != 3:
            raise InputError(
                f"{type(self).__name__} takes positions of shape (N, 3) nm, got {x.shape}"
            )
        if self._max_index >= x.shape[0]:
            raise InputError(
                f"{type(self).__name__} uses atom {self._max_index} but the positions have "
                f"only {x.shape[0]} atoms"
            )
        return self._evaluate(x)

    def _evaluate(self, x):
        raise NotImplementedError

    def __repr__(self):
        shown = ", ".join(self.labels[:3]) + (", …" if self.n_values > 3 else "")
        return f"{type(self).__name__}(K={self.n_values}: {shown})"


def _indices(value, name, ndim, width=None) -> np.ndarray:
    try:
        idx = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be an array of atom indices, got {value!r}") from exc
    if idx.size == 0:
        raise InputError(f"{name} is empty: it selects no atoms")
    if not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"{name} must hold integer atom indices, got dtype {idx.dtype}")
    if idx.ndim != ndim or (width is not None and idx.shape[-1] != width):
        shape = "(K, 4)" if width == 4 else f"{ndim}-D"
        raise InputError(f"{name} must have shape {shape}, got {idx.shape}")
    if (idx < 0).any():
        raise InputError(f"{name} has a negative atom index {int(idx.min())}")
    return idx.astype(np.int64)


# --------------------------------------------------------------------------- geometry


class RadiusOfGyration(Observable):
    """Radius of gyration, nm, K = 1, label "Rg".

    Rg = sqrt(Σ_i m_i |x_i - x_c|² / Σ_i m_i), x_c the mass-weighted centre, over the
    selected atoms.

    Args:
        masses: (N,) amu of every atom (indexed by ``atoms``), or (len(atoms),) of the
            selected ones; None weights all atoms equally.
        atoms: (n,) int atom indices; None means every atom.
    """

    def __init__(self, masses=None, atoms=None, label: str = "Rg"):
        self.atoms = None if atoms is None else _indices(atoms, "RadiusOfGyration.atoms", 1)
        if masses is not None:
            m = np.asarray(masses, dtype=np.float64)
            if m.ndim != 1 or not (np.isfinite(m) & (m > 0)).all():
                raise InputError(
                    f"RadiusOfGyration.masses must be 1-D, finite and > 0 (amu), got {m!r}"
                )
            if self.atoms is not None and m.shape[0] != self.atoms.shape[0]:
                if self.atoms.max() >= m.shape[0]:
                    raise InputError(
                        f"RadiusOfGyration: atom {int(self.atoms.max())} selected but masses "
                        f"has only {m.shape[0]} entries"
                    )
                m = m[self.atoms]
            masses = m
        self.masses = masses
        self.labels = (label,)
        self._max_index = -1 if self.atoms is None else int(self.atoms.max())

    def _evaluate(self, x):
        sel = x if self.atoms is None else x[self.atoms]
        if self.masses is None:
            w = jnp.full(sel.shape[0], 1.0 / sel.shape[0])
        else:
            if self.masses.shape[0] != sel.shape[0]:
                raise InputError(
                    f"RadiusOfGyration has {self.masses.shape[0]} masses for {sel.shape[0]} atoms"
                )
            w = jnp.asarray(self.masses / self.masses.sum())
        centre = w @ sel
        return jnp.sqrt(w @ jnp.sum((sel - centre) ** 2, axis=1))[None]


class NOEDistance(Observable):
    """NOE distances with r⁻ᵖ averaging over atom groups, nm, one value per restraint.

    d_k = (Σ_{i∈A_k, j∈B_k} r_ij⁻ᵖ / (|A_k| |B_k|))^(-1/p), p = 6 (or 3), for restraint k
    between groups A_k and B_k (degenerate protons, methyls).

    Args:
        groups_a, groups_b: K lists of atom indices each (a single int is a group of one).
        power: 6 or 3.
        labels: optional K names; default "NOE a-b" with the atom indices (joined by ",").
    """

    def __init__(self, groups_a, groups_b, power=6, labels=None):
        if power not in (3, 6):
            raise InputError(f"NOEDistance.power must be 6 or 3, got {power!r}")
        if len(groups_a) != len(groups_b) or len(groups_a) == 0:
            raise InputError(
                f"NOEDistance needs as many groups_a as groups_b (one per restraint, >= 1), "
                f"got {len(groups_a)} and {len(groups_b)}"
            )
        rows, cols, owner, names = [], [], [], []
        for k, (ga, gb) in enumerate(zip(groups_a, groups_b, strict=True)):
            a = _indices(np.atleast_1d(ga), f"NOE restraint {k} group a", 1)
            b = _indices(np.atleast_1d(gb), f"NOE restraint {k} group b", 1)
            i, j = np.meshgrid(a, b, indexing="ij")
            if (i == j).any():
                raise InputError(
                    f"NOE restraint {k}: atom {int(i[i == j][0])} is in both groups (r = 0)"
                )
            rows.append(i.ravel())
            cols.append(j.ravel())
            owner.append(np.full(i.size, k))
            names.append(f"NOE {','.join(map(str, a))}-{','.join(map(str, b))}")
        self.power = int(power)
        self.i = np.concatenate(rows)
        self.j = np.concatenate(cols)
        self.restraint = np.concatenate(owner)
        self.n_pairs = np.bincount(self.restraint).astype(np.float64)
        self.labels = tuple(names) if labels is None else tuple(labels)
        if len(self.labels) != len(groups_a):
            raise InputError(
                f"NOEDistance: {len(self.labels)} labels for {len(groups_a)} restraints"
            )
        self._max_index = int(max(self.i.max(), self.j.max()))

    def _evaluate(self, x):
        d = x[self.i] - x[self.j]
        r2 = jnp.sum(d * d, axis=1)
        inv = r2 ** (-self.power / 2)
        mean = jax.ops.segment_sum(inv, self.restraint, num_segments=self.n_values) / self.n_pairs
        return mean ** (-1.0 / self.power)


class Dihedral(Observable):
    """Dihedral angles, radians in (-π, π], IUPAC sign (as OpenMM and mdtraj).

    Args:
        indices: (K, 4) int atom indices (a single quartet (4,) is K = 1).
        labels: optional K names; default "dihedral i-j-k-l".
    """

    def __init__(self, indices, labels=None):
        idx = _indices(np.atleast_2d(indices), "Dihedral.indices", 2, width=4)
        self.indices = idx
        self.labels = (
            tuple("dihedral " + "-".join(map(str, q)) for q in idx)
            if labels is None
            else tuple(labels)
        )
        if len(self.labels) != idx.shape[0]:
            raise InputError(f"Dihedral: {len(self.labels)} labels for {idx.shape[0]} dihedrals")
        self._max_index = int(idx.max())

    def _evaluate(self, x):
        return dihedral_angle(x, self.indices)


# --------------------------------------------------------------------------- ³J couplings


def to_mdtraj_topology(topology):
    """An ``mdtraj.Topology`` from an OpenMM or mdtraj Topology (or an mdtraj Trajectory)."""
    import mdtraj

    if isinstance(topology, mdtraj.Trajectory):
        return topology.topology
    if isinstance(topology, mdtraj.Topology):
        return topology
    try:
        import openmm.app as app
    except ImportError:  # pragma: no cover - openmm is a dependency
        app = None
    if app is not None and isinstance(topology, app.Topology):
        return mdtraj.Topology.from_openmm(topology)
    raise InputError(
        f"topology must be an openmm.app.Topology or an mdtraj.Topology, got "
        f"{type(topology).__name__}"
    )


class _Karplus(Observable):
    coupling = ""

    def __init__(self, topology, model="Bax2007"):
        from mdtraj.geometry.dihedral import indices_phi

        models = KARPLUS[self.coupling]
        if model not in models:
            raise InputError(
                f"unknown {self.coupling} Karplus model {model!r}; valid models: "
                f"{', '.join(models)}"
            )
        top = to_mdtraj_topology(topology)
        # mdtraj's own φ selection (C(i-1)-N-CA-C per chain), so values line up with it
        idx = np.asarray(indices_phi(top), dtype=np.int64).reshape(-1, 4)
        if idx.shape[0] == 0:
            raise InputError(
                f"{type(self).__name__}: the topology ({top.n_residues} residues) has no "
                f"backbone φ dihedral C(i-1)-N-CA-C, so no residue has a {self.coupling} coupling"
            )
        self.model = model
        self.coefficients = dict(models[model])
        self.indices = idx
        self.labels = tuple(f"{self.coupling} {top.atom(int(q[1])).residue}" for q in idx)
        self._max_index = int(idx.max())

    def _evaluate(self, x):
        c = self.coefficients
        cos = jnp.cos(dihedral_angle(x, self.indices) + c["phi0"])
        return c["A"] * cos**2 + c["B"] * cos + c["C"]


class JCoupling3HNHA(_Karplus):
    """³J(HN,Hα) in Hz from φ, one per residue with a φ (mdtraj's order and atoms).

    Args:
        topology: OpenMM or mdtraj Topology.
        model: "Bax2007" (default), "Bax1997" or "Ruterjans1999" (see ``KARPLUS``).
    """

    coupling = "J3_HN_HA"


class JCoupling3HNC(_Karplus):
    """³J(HN,C′) in Hz from φ (Bax2007 Karplus parameters), one per residue with a φ."""

    coupling = "J3_HN_C"


class JCoupling3HNCB(_Karplus):
    """³J(HN,Cβ) in Hz from φ (Bax2007 Karplus parameters), one per residue with a φ."""

    coupling = "J3_HN_CB"


# --------------------------------------------------------------------------- combinations


class ObservableFunction(Observable):
    """Any JAX-traceable ``fn(x (N, 3)) -> (K,)`` (or a scalar, K = 1) with K labels."""

    def __init__(self, fn: Callable, labels: Sequence[str]):
        if not callable(fn):
            raise InputError(f"ObservableFunction needs a callable, got {fn!r}")
        self.fn = fn
        self.labels = (labels,) if isinstance(labels, str) else tuple(labels)

    def _evaluate(self, x):
        out = jnp.atleast_1d(jnp.asarray(self.fn(x), dtype=jnp.float64))
        if out.shape != (self.n_values,):
            raise InputError(
                f"ObservableFunction returned shape {out.shape} but has {self.n_values} labels"
            )
        return out


class ObservableSet(Observable):
    """Several observables as one: values and labels concatenated in order."""

    def __init__(self, observables: Sequence[Observable]):
        self.observables = tuple(observables)
        if not self.observables:
            raise InputError("ObservableSet needs at least one observable")
        for o in self.observables:
            if not callable(o) or not hasattr(o, "labels"):
                raise InputError(f"ObservableSet: {o!r} is not an observable")
        self.labels = tuple(lab for o in self.observables for lab in o.labels)
        self._max_index = max(getattr(o, "_max_index", -1) for o in self.observables)

    def _evaluate(self, x):
        return jnp.concatenate([jnp.atleast_1d(o(x)) for o in self.observables])


# --------------------------------------------------------------------------- specs

OBSERVABLE_TYPES = ("J3_HN_HA", "J3_HN_C", "J3_HN_CB", "Rg", "NOE", "dihedral")
# keys a target file puts next to the observable's own; they do not build it
_TARGET_KEYS = {"value", "values", "uncertainty", "uncertainties", "sigma", "weight", "name"}
_SPEC_KEYS = {
    "J3_HN_HA": {"model"},
    "J3_HN_C": {"model"},
    "J3_HN_CB": {"model"},
    "Rg": {"atoms", "mass_weighted"},
    "NOE": {"pairs", "power"},
    "dihedral": {"indices"},
}


def select_atoms(topology, selection, where="selection") -> np.ndarray:
    """Atom indices (n,) of an mdtraj selection string ("name CA") or an index list.

    Raises:
        InputError: the selection is invalid or matches no atom (named in the message).
    """
    if isinstance(selection, str):
        top = to_mdtraj_topology(topology)
        try:
            idx = top.select(selection)
        except Exception as exc:  # mdtraj raises ValueError/SyntaxError/... for bad input
            raise InputError(f"{where}: invalid atom selection {selection!r}: {exc}") from exc
        if idx.size == 0:
            raise InputError(
                f"{where}: atom selection {selection!r} matches no atom of the topology "
                f"({top.n_atoms} atoms, {top.n_residues} residues)"
            )
        return idx.astype(np.int64)
    idx = _indices(np.atleast_1d(selection), where, 1)
    n_atoms = _n_atoms(topology)
    if n_atoms is not None and idx.max() >= n_atoms:
        raise InputError(f"{where}: atom {int(idx.max())} but the topology has {n_atoms} atoms")
    return idx


def _n_atoms(topology):
    if topology is None:
        return None
    n = getattr(topology, "n_atoms", None)
    if n is None and hasattr(topology, "getNumAtoms"):
        n = topology.getNumAtoms()
    return n


def observable_from_spec(spec: dict, topology=None) -> Observable:
    """Build an observable from a dict, as read from a target file.

    Forms (atom selections are mdtraj selection strings or index lists)::

        {"type": "J3_HN_HA", "model": "Bax2007"}     # also "J3_HN_C", "J3_HN_CB"
        {"type": "Rg", "atoms": "name CA", "mass_weighted": True}
        {"type": "NOE", "pairs": [[[i, ...], [j, ...]], ...], "power": 6}
        {"type": "dihedral", "indices": [[i, j, k, l], ...]}

    Keys of the target itself ("value", "uncertainty", "sigma", "weight", "name") are
    ignored here. ``topology`` (OpenMM or mdtraj) is needed for J couplings, selection
    strings and Rg masses.

    Raises:
        InputError: unknown type (the known ones are listed), unknown key, or a
            selection that matches nothing.
    """
    if not isinstance(spec, dict):
        raise InputError(f"an observable spec must be a dict, got {spec!r}")
    kind = spec.get("type")
    if kind not in OBSERVABLE_TYPES:
        raise InputError(
            f"unknown observable type {kind!r} in {spec!r}; known types: "
            f"{', '.join(OBSERVABLE_TYPES)}"
        )
    extra = set(spec) - {"type"} - _TARGET_KEYS - _SPEC_KEYS[kind]
    if extra:
        raise InputError(
            f"observable {kind!r}: unknown key(s) {sorted(extra)}; it takes "
            f"{sorted(_SPEC_KEYS[kind]) or 'no options'}"
        )
    if kind.startswith("J3_"):
        if topology is None:
            raise InputError(f"observable {kind!r} needs a topology")
        cls = {"J3_HN_HA": JCoupling3HNHA, "J3_HN_C": JCoupling3HNC, "J3_HN_CB": JCoupling3HNCB}
        return cls[kind](topology, model=spec.get("model", "Bax2007"))
    if kind == "Rg":
        atoms = spec.get("atoms")
        idx = None if atoms is None else select_atoms(topology, atoms, "Rg atoms")
        masses = None
        if spec.get("mass_weighted", True):
            if topology is None:
                raise InputError("a mass-weighted Rg needs a topology (element masses)")
            masses = _element_masses(topology)
        return RadiusOfGyration(masses=masses, atoms=idx)
    if kind == "NOE":
        pairs = spec.get("pairs")
        if not pairs:
            raise InputError(f"NOE spec needs 'pairs': [[group_a, group_b], ...], got {spec!r}")
        ga, gb = [], []
        for k, pair in enumerate(pairs):
            if len(pair) != 2:
                raise InputError(f"NOE pair {k} must be [group_a, group_b], got {pair!r}")
            ga.append(select_atoms(topology, pair[0], f"NOE pair {k} group a"))
            gb.append(select_atoms(topology, pair[1], f"NOE pair {k} group b"))
        return NOEDistance(ga, gb, power=spec.get("power", 6))
    indices = spec.get("indices")
    if indices is None:
        raise InputError(f"dihedral spec needs 'indices': [[i, j, k, l], ...], got {spec!r}")
    return Dihedral(indices)


def _element_masses(topology) -> np.ndarray:
    top = to_mdtraj_topology(topology)
    masses = np.array([a.element.mass if a.element is not None else 0.0 for a in top.atoms])
    bad = np.flatnonzero(~(masses > 0))
    if bad.size:
        raise InputError(f"atom {int(bad[0])} ({top.atom(int(bad[0]))}) has no element mass")
    return masses
