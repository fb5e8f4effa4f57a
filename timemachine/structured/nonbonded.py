"""All-pairs LJ + Coulomb (``Nonbonded``) in closed form: pair scalars A, B and the
mixed partials of the per-atom charge, σ and ε. The 1-4 exceptions are a coordinate
group (``coordinates``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from timemachine.constants import COULOMB
from timemachine.structured.registry import register_pair_part


@register_pair_part("nonbonded")
class NonbondedPairs:
    """``nonbonded_all_pairs`` in closed form.

    For a pair energy φ(r) (``potentials.lj_coulomb``) the gradient is g_i = Σ_j φ'/r d_ij
    (d_ij = x_i - x_j) and ∂g_i/∂x_j = -(A_ij d dᵀ + B_ij I), A = (φ'' - φ'/r)/r², B = φ'/r:
    this returns A, B, with φ' and φ'' written out in powers of (σ/r)² (no odd powers, no
    autodiff over (N, N) arrays: these loops dominate the cost of a step).

    Mixed partials: ∂g_i/∂θ_p = Σ_j d_ij/r_ij (D_ij S_ip + D_ji S_jp), with
    D_ij = ∂φ'_ij/∂c_i for the per-atom parameter c (charge, σ, ε) and S_ip = 1 when
    atom i's c is θ_p: one (3N, N)·(N, P_c) product per chosen parameter kind.
    """

    def __init__(self, term, wrt):
        self.mask = np.asarray(term.pair_mask, dtype=bool)
        self.index = [np.asarray(a) for a in (term.charge_index, term.sigma_index)]
        self.index.append(np.asarray(term.epsilon_index))
        self.kinds = []
        for kind, index in zip(("charge", "sigma", "epsilon"), self.index, strict=True):
            cols = np.flatnonzero(np.isin(wrt, index))
            if cols.size:
                sel = (index[:, None] == wrt[cols][None, :]).astype(np.float64)
                self.kinds.append((kind, cols, sel))

    def __call__(self, x, r, inv_r, dc, params, out):
        n = self.mask.shape[0]
        q, sig, eps = (params[i] for i in self.index)
        inv_r2 = inv_r * inv_r
        sig_ij = 0.5 * (sig[:, None] + sig[None, :])
        s2 = sig_ij * sig_ij * inv_r2  # (σ/r)², so that no odd power is needed for ∇E
        s6 = s2 * s2 * s2
        s12 = s6 * s6
        sqrt_eps = jnp.sqrt(eps)
        eps_ij = sqrt_eps[:, None] * sqrt_eps[None, :]
        coul = COULOMB * (q[:, None] * q[None, :]) * inv_r
        lj1 = 4.0 * (6.0 * s6 - 12.0 * s12)  # r ∂φ_LJ/∂r per unit ε
        e1r = eps_ij * lj1 - coul  # r φ'
        e2 = (4.0 * eps_ij * (156.0 * s12 - 42.0 * s6) + 2.0 * coul) * inv_r2
        b = jnp.where(self.mask, e1r * inv_r2, 0.0)  # φ'/r
        a = jnp.where(self.mask, (e2 - e1r * inv_r2) * inv_r2, 0.0)
        for kind, cols, sel in self.kinds:
            if kind == "charge":
                dphi = -COULOMB * q[None, :] * inv_r2
            elif kind == "sigma":
                s5 = s2 * s2 * sig_ij * inv_r
                dphi = 2.0 * eps_ij * (36.0 * s5 - 144.0 * s5 * s6) * inv_r2
            else:  # d sqrt(ε_i)/dε_i as safe_sqrt defines it: 0 at ε_i = 0
                dsqrt = jnp.where(eps > 0, 0.5 / jnp.where(eps > 0, sqrt_eps, 1.0), 0.0)
                dphi = lj1 * inv_r * dsqrt[:, None] * sqrt_eps[None, :]
            g = jnp.where(self.mask, dphi * inv_r, 0.0)  # G_ij = D_ij / r_ij
            u = jnp.stack([jnp.sum(g * dc[k], axis=1) for k in range(3)], axis=1)
            sel = jnp.asarray(sel, x.dtype)
            other = jnp.concatenate([g.T * dc[k] for k in range(3)]) @ sel  # rows (a, i)
            other = jnp.transpose(other.T.reshape(-1, 3, n), (0, 2, 1))
            out = out.at[cols].add(sel.T[:, :, None] * u[None, :, :] + other)
        return a, b, out, None
