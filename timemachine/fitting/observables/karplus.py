"""Backbone scalar couplings in Hz from published Karplus relations on mdtraj's φ and ψ.

``KARPLUS`` holds every parameter set with its citation and RMS ``sigma``; ``COUPLINGS``
says which dihedral(s) each coupling reads and its default set; ``ScalarCoupling`` (and a
subclass per coupling) evaluates one. The table of relations and their sources is in
``timemachine.fitting.observables``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError
from timemachine.fitting.observables.base import Observable
from timemachine.potentials.bonded import dihedral_angle

__all__ = [
    "COUPLINGS",
    "KARPLUS",
    "JCoupling1NCA",
    "JCoupling2NCA",
    "JCoupling3HAC",
    "JCoupling3HNC",
    "JCoupling3HNCA",
    "JCoupling3HNCB",
    "JCoupling3HNHA",
    "ScalarCoupling",
    "to_mdtraj_topology",
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
