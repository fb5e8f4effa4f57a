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

Modules: ``base`` (the ``Observable`` interface and its combinations), ``geometry`` (Rg,
NOE, dihedrals), ``karplus`` (the couplings) and ``specs`` (observables from target-file
dicts).
"""

from timemachine.fitting.observables.base import Observable, ObservableFunction, ObservableSet
from timemachine.fitting.observables.geometry import Dihedral, NOEDistance, RadiusOfGyration
from timemachine.fitting.observables.karplus import (
    COUPLINGS,
    KARPLUS,
    JCoupling1NCA,
    JCoupling2NCA,
    JCoupling3HAC,
    JCoupling3HNC,
    JCoupling3HNCA,
    JCoupling3HNCB,
    JCoupling3HNHA,
    ScalarCoupling,
    to_mdtraj_topology,
)
from timemachine.fitting.observables.specs import (
    J_COUPLING_TYPES,
    OBSERVABLE_TYPES,
    observable_from_spec,
    select_atoms,
)

__all__ = [
    "COUPLINGS",
    "J_COUPLING_TYPES",
    "KARPLUS",
    "OBSERVABLE_TYPES",
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
    "select_atoms",
    "to_mdtraj_topology",
]
