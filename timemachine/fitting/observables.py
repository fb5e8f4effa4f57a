"""Differentiable observables of one configuration: Rg, NOE distances, ³J couplings, dihedrals.

Every observable is an object called on positions ``x`` (N, 3) in nm that returns a float64
JAX array of shape (K,); ``obs.labels`` names the K values and ``obs.n_values == K``. The
call is a pure function of ``x`` (the atom indices are constants), so it composes with
``jax.jit``, ``jax.vmap`` (frames) and ``jax.jvp``/``jax.grad`` (the pathwise gradient
∂O/∂x · dx/dθ of ``timemachine.fitting.estimators``).

Backbone scalar couplings (``ScalarCoupling`` and its subclasses) use published Karplus
relations on mdtraj's φ and ψ dihedrals, in Hz; ``KARPLUS`` holds every set with its
citation and its RMS ``sigma``:

==========  ==============  =====================================  ========  ========
type        coupling        relation (θ0 = phase)                  default   σ (Hz)
==========  ==============  =====================================  ========  ========
J3_HN_HA    ³J(HN,Hα)       A cos²(φ−60°) + B cos(φ−60°) + C        Bax2007   0.36
J3_HN_C     ³J(HN,C′)       A cos²(φ+180°) + B cos(φ+180°) + C      Bax2007   0.30
J3_HN_CB    ³J(HN,Cβ)       A cos²(φ+60°) + B cos(φ+60°) + C        Bax2007   0.22
J3_HA_C     ³J(Hα,C′)       3.72 cos²(φ+120°) − 2.18 cos(φ+120°)    Bax1997   0.24
                            + 1.28
J1_N_CA     ¹J(N,Cα)        1.70 cos²ψ_i − 0.98 cos ψ_i + 9.51      Wirmer02  0.53
J2_N_CA     ²J(N,Cα)        −0.66 cos²ψ_{i−1} − 1.52 cos ψ_{i−1}    Ding04    0.48
                            + 7.85
J3_HN_CA    ³J(HN,Cα)       Fourier series in φ_i and ψ_{i−1}       Hennig00  0.25 *
==========  ==============  =====================================  ========  ========

Bax2007 is Vögeli, Ying, Grishaev & Bax, JACS 129, 9377 (2007), Table 1 (motion-corrected);
Bax1997 Hu & Bax, JACS 119, 6360 (1997), Table 2 (for ³J(HN,C′): 4.29 cos²(φ+180°) −
1.01 cos(φ−60°), a second phase); Ruterjans1999 Schmidt, Blümel, Löhr & Rüterjans,
J. Biomol. NMR 14, 1 (1999); Wirmer2002 Wirmer & Schwalbe, J. Biomol. NMR 23, 47 (2002);
Ding2004 Ding & Gronenborn, JACS 126, 6232 (2004); Hennig2000 Hennig, Bermel, Schwalbe &
Griesinger, JACS 122, 6268 (2000). (*) Hennig et al.'s RMS was not found; see ``KARPLUS``.
The ³J(HN,*) sets keep mdtraj's names and numbers (``compute_J3_HN_HA``, ``compute_J3_HN_C``,
``compute_J3_HN_CB``), and the dihedral atoms are mdtraj's own ``indices_phi`` /
``indices_psi``, so the values agree with mdtraj's on the same frames (mdtraj computes in
float32; these in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError
from timemachine.potentials.bonded import dihedral_angle

__all__ = [
    "COUPLINGS",
    "KARPLUS",
    "Dihedral",
    "JCoupling1NCA",
    "JCoupling2NCA",
    "JCoupling3HAC",
    "JCoupling3HNC",
    "JCoupling3HNCA",
    "JCoupling3HNCB",
    "JCoupling3HNHA",
    "NOEDistance",
    "Observable",
    "ObservableFunction",
    "ObservableSet",
    "RadiusOfGyration",
    "ScalarCoupling",
    "observable_from_spec",
]

_DEG = math.pi / 180.0

# Backbone scalar couplings: which dihedral(s) each one reads, and the default Karplus set.
#   "phi":          φ_i = C(i-1)-N(i)-CA(i)-C(i) of residue i
#   "psi":          ψ_i = N(i)-CA(i)-C(i)-N(i+1) of the same residue i
#   "psi_prev":     ψ_{i-1} of the previous residue (the coupling is labelled by residue i,
#                   whose N it involves)
#   "phi_psi_prev": φ_i and ψ_{i-1}
COUPLINGS = {
    "J3_HN_HA": dict(symbol="³J(HN,Hα)", dihedral="phi", default="Bax2007"),
    "J3_HN_C": dict(symbol="³J(HN,C′)", dihedral="phi", default="Bax2007"),
    "J3_HN_CB": dict(symbol="³J(HN,Cβ)", dihedral="phi", default="Bax2007"),
    "J3_HA_C": dict(symbol="³J(Hα,C′)", dihedral="phi", default="Bax1997"),
    "J1_N_CA": dict(symbol="¹J(N,Cα)", dihedral="psi", default="Wirmer2002"),
    "J2_N_CA": dict(symbol="²J(N,Cα)", dihedral="psi_prev", default="Ding2004"),
    "J3_HN_CA": dict(symbol="³J(HN,Cα)", dihedral="phi_psi_prev", default="Hennig2000"),
}

_VOGELI = (
    "Vögeli, Ying, Grishaev & Bax, J. Am. Chem. Soc. 129, 9377 (2007), Table 1 (motion-corrected)"
)
_HU_BAX = "Hu & Bax, J. Am. Chem. Soc. 119, 6360 (1997), Table 2"

# Karplus parameter sets by coupling and by published set. One-angle sets (θ = φ or ψ):
#     J(θ) = A cos²(θ + θ0) + B cos(θ + θ1) + C   [Hz],  θ1 = θ0 unless given
# with θ0 stored as "phi0"/"psi0" (θ1 as "phi1"), in radians. The two-angle ³J(HN,Cα) set is
#     J(φ, ψ) = Σ c_ab f_a(φ) g_b(ψ) + const,  f, g ∈ {cos, sin}
# Each set carries "sigma", the RMS deviation (Hz) of the published relation from the data it
# was fitted to, and "citation". That RMS is the uncertainty of a computed coupling (NMR
# measurement errors, ~0.05 Hz, are far smaller), so a target's σ is the Karplus σ alone —
# it is not added to a measurement error a second time.
KARPLUS = {
    "J3_HN_HA": {
        "Bax2007": dict(A=8.4, B=-1.36, C=0.33, phi0=-60 * _DEG, sigma=0.36, citation=_VOGELI),
        "Bax1997": dict(A=7.09, B=-1.42, C=1.55, phi0=-60 * _DEG, sigma=0.39, citation=_HU_BAX),
        "Ruterjans1999": dict(
            A=7.90,
            B=-1.05,
            C=0.65,
            phi0=-60 * _DEG,
            sigma=0.25,
            citation=("Schmidt, Blümel, Löhr & Rüterjans, J. Biomol. NMR 14, 1 (1999), Table 1"),
        ),
    },
    "J3_HN_C": {
        "Bax2007": dict(A=4.36, B=-1.08, C=-0.01, phi0=180 * _DEG, sigma=0.30, citation=_VOGELI),
        # J = 4.29 cos²(φ + 180°) − 1.01 cos(φ − 60°): the linear term has its own phase
        "Bax1997": dict(
            A=4.29,
            B=-1.01,
            C=0.0,
            phi0=180 * _DEG,
            phi1=-60 * _DEG,
            sigma=0.32,
            citation=_HU_BAX,
        ),
    },
    "J3_HN_CB": {
        "Bax2007": dict(A=3.71, B=-0.59, C=0.08, phi0=60 * _DEG, sigma=0.22, citation=_VOGELI),
        "Bax1997": dict(A=3.06, B=-0.74, C=0.13, phi0=60 * _DEG, sigma=0.21, citation=_HU_BAX),
    },
    "J3_HA_C": {
        "Bax1997": dict(A=3.72, B=-2.18, C=1.28, phi0=120 * _DEG, sigma=0.24, citation=_HU_BAX),
    },
    "J1_N_CA": {
        # σ = 0.53 Hz: RMS of the relation against the data of their Fig. 4A (read off the
        # figure; the paper does not print it)
        "Wirmer2002": dict(
            A=1.70,
            B=-0.98,
            C=9.51,
            psi0=0.0,
            sigma=0.53,
            citation="Wirmer & Schwalbe, J. Biomol. NMR 23, 47 (2002), Fig. 4A",
        ),
    },
    "J2_N_CA": {
        "Ding2004": dict(
            A=-0.66,
            B=-1.52,
            C=7.85,
            psi0=0.0,
            sigma=0.48,
            citation="Ding & Gronenborn, J. Am. Chem. Soc. 126, 6232 (2004)",
        ),
    },
    "J3_HN_CA": {
        # σ: Hennig et al.'s RMS was not found in any stored source. 0.25 Hz is the standard
        # deviation of the relation itself over uniformly distributed (φ, ψ),
        # sqrt((0.23² + 0.20² + 0.07² + 0.08²)/2 + (0.07² + 0.12² + 0.08² + 0.14²)/4) = 0.25 Hz:
        # a conservative stand-in (a fit error is smaller than the spread it explains), to be
        # replaced by the published RMS.
        "Hennig2000": dict(
            cos_phi=-0.23,
            cos_psi=-0.20,
            sin_phi=0.07,
            sin_psi=0.08,
            cos_phi_cos_psi=0.07,
            cos_phi_sin_psi=0.12,
            sin_phi_cos_psi=-0.08,
            sin_phi_sin_psi=-0.14,
            const=0.54,
            sigma=0.25,
            citation=("Hennig, Bermel, Schwalbe & Griesinger, J. Am. Chem. Soc. 122, 6268 (2000)"),
        ),
    },
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


# --------------------------------------------------------------------------- J couplings


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


_NEEDS = {
    "phi": "the residue's φ, C(i-1)-N-CA-C (no previous residue in its chain)",
    "psi": "the residue's own ψ, N-CA-C-N(i+1) (no next residue in its chain)",
    "psi_prev": "the previous residue's ψ, N(i-1)-CA(i-1)-C(i-1)-N(i) (no previous residue)",
    "phi_psi_prev": "the residue's φ and the previous residue's ψ (no previous residue)",
}


def _coupling_sites(top, dihedral):
    """{residue index: (residue, φ quartet or None, ψ quartet or None)} of every residue that
    has the dihedral(s) ``dihedral`` names, in topology order (mdtraj's own φ/ψ atoms)."""
    from mdtraj.geometry.dihedral import indices_phi, indices_psi

    phi = np.asarray(indices_phi(top), dtype=np.int64).reshape(-1, 4)
    psi = np.asarray(indices_psi(top), dtype=np.int64).reshape(-1, 4)
    # key every quartet by the N atom of the residue the coupling belongs to
    by_n_phi = {int(q[1]): q for q in phi}  # φ_i: N(i) is atom 1
    if dihedral == "psi":
        by_n_psi = {int(q[0]): q for q in psi}  # ψ_i: N(i) is atom 0
    else:
        by_n_psi = {int(q[3]): q for q in psi}  # ψ_{i-1}: N(i) is atom 3
    if dihedral == "phi":
        keys = list(by_n_phi)
    elif dihedral in ("psi", "psi_prev"):
        keys = list(by_n_psi)
    else:
        keys = [n for n in by_n_phi if n in by_n_psi]
    sites = {}
    for n in keys:
        res = top.atom(n).residue
        sites[res.index] = (res, by_n_phi.get(n), by_n_psi.get(n))
    return dict(sorted(sites.items()))


def _select_residues(top, residues, coupling, sites):
    """Residue indices (in the order asked) from indices or names like "ALA2"."""
    if isinstance(residues, (str, int, np.integer)):
        residues = [residues]
    try:
        residues = list(residues)
    except TypeError:
        raise InputError(
            f"{coupling}: residues must be a list of residue indices or names like 'ALA2', "
            f"got {residues!r}"
        ) from None
    if not residues:
        raise InputError(f"{coupling}: residues=[] selects no residue")
    names = [str(r) for r in top.residues]
    shown = ", ".join(names[:12]) + (", …" if len(names) > 12 else "")
    chosen = []
    for r in residues:
        if isinstance(r, (int, np.integer)) and not isinstance(r, bool):
            if not 0 <= int(r) < top.n_residues:
                raise InputError(
                    f"{coupling}: residue index {int(r)} is not in the topology "
                    f"({top.n_residues} residues, indices 0-{top.n_residues - 1})"
                )
            idx = int(r)
        elif isinstance(r, str):
            hits = [i for i, name in enumerate(names) if name == r]
            if not hits:
                raise InputError(
                    f"{coupling}: residue {r!r} is not in the topology (residues: {shown})"
                )
            if len(hits) > 1:
                raise InputError(
                    f"{coupling}: residue name {r!r} matches {len(hits)} residues "
                    f"(indices {hits}); give residue indices instead"
                )
            idx = hits[0]
        else:
            raise InputError(f"{coupling}: a residue is an index or a name like 'ALA2', got {r!r}")
        if idx in chosen:
            raise InputError(f"{coupling}: residue {names[idx]} is selected twice")
        if idx not in sites:
            raise InputError(
                f"residue {names[idx]} has no {coupling} coupling: it needs "
                f"{_NEEDS[COUPLINGS[coupling]['dihedral']]}"
            )
        chosen.append(idx)
    return chosen


class ScalarCoupling(Observable):
    """A backbone scalar coupling in Hz from its Karplus relation, one value per residue.

    Couplings (``KARPLUS`` holds every parameter set with its citation and σ):

    * ``J3_HN_HA``, ``J3_HN_C``, ``J3_HN_CB``, ``J3_HA_C``: φ_i of residue i;
    * ``J1_N_CA``: ψ_i of the same residue (none for a chain's last residue);
    * ``J2_N_CA``: ψ_{i-1} of the previous residue, labelled by residue i (whose N it is);
    * ``J3_HN_CA``: φ_i and ψ_{i-1}.

    The φ and ψ atoms are mdtraj's own (``indices_phi``/``indices_psi``), so residues, order
    and values line up with mdtraj's ``compute_J3_HN_HA`` and friends. Labels are
    "<coupling> <residue>", e.g. "J3_HA_C ALA2". ``sigma`` is the RMS of the Karplus set,
    the uncertainty to give a computed coupling (measurement errors are much smaller).

    Args:
        topology: OpenMM or mdtraj Topology.
        coupling: one of ``COUPLINGS`` (fixed by the subclasses).
        model: name of a Karplus set of that coupling; None means the default
            (``COUPLINGS[coupling]["default"]``).
        residues: optional residue indices (0-based, topology order) or names like "ALA2"
            (mdtraj's ``str(residue)``); the values come in this order. None means every
            residue that has the coupling, in topology order.

    Attributes:
        indices: (K, 4) atom quartets of the dihedral the values read (φ, or ψ for the ψ
            couplings; φ for ``J3_HN_CA``, whose ψ_{i-1} quartets are ``psi_indices``).
        residues: (K,) residue names; ``sigma`` (Hz), ``citation``, ``coefficients``.

    Raises:
        InputError: unknown coupling or model (the valid ones are listed), a residue the
            topology lacks or that has no such coupling (e.g. ¹J(N,Cα) of the C-terminal
            residue, whose ψ does not exist), or a topology with no residue that has it.
    """

    coupling = ""

    def __init__(self, topology, coupling=None, model=None, residues=None):
        if coupling is None:
            coupling = self.coupling
        elif self.coupling and coupling != self.coupling:
            raise InputError(f"{type(self).__name__} computes {self.coupling}, not {coupling!r}")
        if coupling not in KARPLUS:
            raise InputError(
                f"unknown coupling type {coupling!r}: no Karplus set; valid couplings: "
                f"{', '.join(KARPLUS)}"
            )
        models = KARPLUS[coupling]
        if model is None:
            model = COUPLINGS[coupling]["default"]
        if model not in models:
            raise InputError(
                f"unknown {coupling} Karplus model {model!r}; valid models: {', '.join(models)}"
            )
        top = to_mdtraj_topology(topology)
        dihedral = COUPLINGS[coupling]["dihedral"]
        sites = _coupling_sites(top, dihedral)
        if residues is None:
            if not sites:
                raise InputError(
                    f"{type(self).__name__}: no residue of the topology ({top.n_residues} "
                    f"residues) has a {coupling} coupling: it needs {_NEEDS[dihedral]}"
                )
            chosen = list(sites)
        else:
            chosen = _select_residues(top, residues, coupling, sites)
        phi = np.array([sites[i][1] for i in chosen]) if dihedral != "psi" else None
        psi = np.array([sites[i][2] for i in chosen]) if dihedral != "phi" else None
        self.coupling = coupling
        self.model = model
        self.coefficients = {k: v for k, v in models[model].items() if k != "citation"}
        self.sigma = float(models[model]["sigma"])
        self.citation = models[model]["citation"]
        self.dihedral = dihedral
        self.residues = tuple(str(sites[i][0]) for i in chosen)
        if dihedral == "phi_psi_prev":
            self.indices, self.psi_indices = phi.reshape(-1, 4), psi.reshape(-1, 4)
        else:
            self.indices = (phi if psi is None else psi).reshape(-1, 4)
            self.psi_indices = None
        self.labels = tuple(f"{coupling} {r}" for r in self.residues)
        self._max_index = int(
            max(self.indices.max(), -1 if self.psi_indices is None else self.psi_indices.max())
        )

    def _evaluate(self, x):
        c = self.coefficients
        theta = dihedral_angle(x, self.indices)
        if self.psi_indices is not None:
            psi = dihedral_angle(x, self.psi_indices)
            cf, sf, cp, sp = jnp.cos(theta), jnp.sin(theta), jnp.cos(psi), jnp.sin(psi)
            return (
                c["cos_phi"] * cf
                + c["cos_psi"] * cp
                + c["sin_phi"] * sf
                + c["sin_psi"] * sp
                + c["cos_phi_cos_psi"] * cf * cp
                + c["cos_phi_sin_psi"] * cf * sp
                + c["sin_phi_cos_psi"] * sf * cp
                + c["sin_phi_sin_psi"] * sf * sp
                + c["const"]
            )
        theta0 = c.get("phi0", c.get("psi0", 0.0))
        theta1 = c.get("phi1", theta0)
        return c["A"] * jnp.cos(theta + theta0) ** 2 + c["B"] * jnp.cos(theta + theta1) + c["C"]


class _FixedCoupling(ScalarCoupling):
    """A ScalarCoupling whose coupling type the subclass fixes."""

    def __init__(self, topology, model=None, residues=None):
        super().__init__(topology, model=model, residues=residues)


class JCoupling3HNHA(_FixedCoupling):
    """³J(HN,Hα) in Hz from φ_i: "Bax2007" (default), "Bax1997" or "Ruterjans1999"."""

    coupling = "J3_HN_HA"


class JCoupling3HNC(_FixedCoupling):
    """³J(HN,C′) in Hz from φ_i: "Bax2007" (default) or "Bax1997"."""

    coupling = "J3_HN_C"


class JCoupling3HNCB(_FixedCoupling):
    """³J(HN,Cβ) in Hz from φ_i: "Bax2007" (default) or "Bax1997"."""

    coupling = "J3_HN_CB"


class JCoupling3HAC(_FixedCoupling):
    """³J(Hα,C′) in Hz from φ_i: "Bax1997" (Hu & Bax 1997, the default)."""

    coupling = "J3_HA_C"


class JCoupling1NCA(_FixedCoupling):
    """¹J(N,Cα) in Hz from the same residue's ψ_i: "Wirmer2002" (default)."""

    coupling = "J1_N_CA"


class JCoupling2NCA(_FixedCoupling):
    """²J(N(i),Cα(i-1)) in Hz from the previous residue's ψ_{i-1}, labelled by residue i:
    "Ding2004" (default)."""

    coupling = "J2_N_CA"


class JCoupling3HNCA(_FixedCoupling):
    """³J(HN(i),Cα(i-1)) in Hz from φ_i and ψ_{i-1}: "Hennig2000" (default)."""

    coupling = "J3_HN_CA"


_Karplus = ScalarCoupling  # the former private base class


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

J_COUPLING_TYPES = tuple(KARPLUS)
OBSERVABLE_TYPES = (*J_COUPLING_TYPES, "Rg", "NOE", "dihedral")
# keys a target file puts next to the observable's own; they do not build it
_TARGET_KEYS = {
    "value",
    "values",
    "uncertainty",
    "uncertainties",
    "sigma",
    "weight",
    "name",
    "note",
    "skip",
    "skip_reason",
}
_SPEC_KEYS = {
    **{kind: {"model", "residues"} for kind in J_COUPLING_TYPES},
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

        {"type": "J3_HN_HA", "model": "Bax2007", "residues": ["ALA2"]}
            # any of J_COUPLING_TYPES; "model" (default: the coupling's default set) and
            # "residues" (indices or names; default: every residue with the coupling)
        {"type": "Rg", "atoms": "name CA", "mass_weighted": True}
        {"type": "NOE", "pairs": [[[i, ...], [j, ...]], ...], "power": 6}
        {"type": "dihedral", "indices": [[i, j, k, l], ...]}

    Keys of the target itself ("value", "uncertainty", "sigma", "weight", "name", "note",
    "skip", "skip_reason") are ignored here. ``topology`` (OpenMM or mdtraj) is needed for J
    couplings, selection strings and Rg masses.

    Raises:
        InputError: unknown type (the known ones are listed), a coupling type with no
            Karplus set, an unknown Karplus model, unknown key, a residue the topology lacks
            or that has no such coupling, or a selection that matches nothing.
    """
    if not isinstance(spec, dict):
        raise InputError(f"an observable spec must be a dict, got {spec!r}")
    kind = spec.get("type")
    if isinstance(kind, str) and kind.startswith("J") and kind not in KARPLUS:
        raise InputError(
            f"coupling type {kind!r} in {spec!r} has no Karplus set; couplings with one: "
            f"{', '.join(J_COUPLING_TYPES)}"
        )
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
    if kind in KARPLUS:
        if topology is None:
            raise InputError(f"observable {kind!r} needs a topology")
        return ScalarCoupling(
            topology, coupling=kind, model=spec.get("model"), residues=spec.get("residues")
        )
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
