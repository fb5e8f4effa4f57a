"""OBC2 generalized Born (``OBC2``) in structured form: pair scalars joining the all-pairs
A, B matrices, and the Born-radius chain as three matrix products over all tangents.

The scalar pieces are ``timemachine.potentials.gbsa``'s (``born_integral``,
``born_radius``, ``gb_self``, ``gb_pair``), differentiated elementwise in forward mode, so
the expressions are the reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.potentials.gbsa import (
    DIELECTRIC_OFFSET,
    born_integral,
    born_radius,
    gb_pair,
    gb_prefactor,
    gb_self,
)
from timemachine.structured.fusion import unit_rows
from timemachine.structured.registry import register_pair_part


def elementwise(fn, argnums, order, *args):
    """Elementwise partial derivatives of a scalar function over broadcast arrays.

    order 1: gradient, 2: Hessian with respect to ``argnums``; (1, 2) with a single int
    argnum: the first and second derivative together. Forward mode throughout: for a
    scalar function of a few scalars it builds a far smaller expression than reverse
    mode (grad of grad), and on CPU these elementwise (N, N) formulas dominate OBC2's ζ.
    """
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
    flat = [jnp.broadcast_to(a, shape).reshape(-1) for a in args]
    if order == (1, 2):

        def along(a, fun):
            def g(z):
                return fun(*a[:argnums], z, *a[argnums + 1 :])

            return jax.jvp(g, (a[argnums],), (jnp.ones_like(a[argnums]),))

        def first(*a):
            return along(a, fn)[1]

        def f(*a):
            return along(a, first)

    else:
        f = jax.jacfwd(fn, argnums) if order == 1 else jax.jacfwd(jax.jacfwd(fn, argnums), argnums)
    out = jax.vmap(f)(*flat)
    return jax.tree_util.tree_map(lambda v: v.reshape(shape), out)


@register_pair_part("obc2")
class OBC2Pairs:
    """OBC2 in structured form. With h = pre/f (per unit charge product), w_ij = q_i q_j h,
    T_ij the Born integrand, ψ_i = or_i Σ_j T_ij, B_i = b(ψ_i) and e_i(B_i) the self + ACE
    energy, the gradient is a pair form g_k = Σ_j φ'_kj r̂_kj with

        φ'_kj = w_r(kj) + c_k T'_kj + c_j T'_jk,   c_i = β_i b'_i or_i,
        β_i = ∂E/∂B_i = e'_i + Σ_j w_Bi(ij).

    Its directional derivative along t: the pair part (φ' fixed and φ'' = w_rr + c_k T''_kj
    + c_j T''_jk along δr) joins the all-pairs A, B matrices; the Born-radius chain adds

        δψ_i = or_i Σ_j T'_ij δr_ij,  δB = b' δψ,
        δβ_i = (e''_i + Σ_j w_BiBi) δB_i + Σ_j w_BiBj δB_j + Σ_j w_Bir δr_ij,
        δc_i = or_i (b'_i δβ_i + β_i b''_i δψ_i),
        δg_k += Σ_j (w_rBk δB_k + w_rBj δB_j + δc_k T'_kj + δc_j T'_jk) r̂_kj,

    where Σ_j M_ij δr_ij = Σ_a (Σ_j M_ij r̂_ij,a) t_ia - Σ_j (M ∘ r̂_a)_ij t_ja: two products
    (P+3, 3N)·(3N, 2N) and (P, 2N)·(2N, 3N) and one (P, N)·(N, N) for all P tangents.
    Mixed partials (charge, radius, scale): autodiff, one jvp per chosen GB parameter.
    """

    def __init__(self, term, wrt):
        self.term = term
        self.index = [np.asarray(a) for a in (term.charge_index, term.radius_index)]
        self.index.append(np.asarray(term.scale_index))
        # charges: closed form below; radius and scale: one jvp each (autodiff)
        self.q_cols = np.flatnonzero(np.isin(wrt, self.index[0]))
        self.q_sel = (self.index[0][None, :] == wrt[self.q_cols][:, None]).astype(np.float64)
        used = np.unique(np.concatenate(self.index[1:]))
        self.cols = np.flatnonzero(np.isin(wrt, used) & ~np.isin(wrt, self.index[0]))
        self.wrt = wrt[self.cols]
        self.pre = gb_prefactor(term.solute_dielectric, term.solvent_dielectric)

    def __call__(self, x, r, inv_r, dc, params, out):
        n = x.shape[0]
        pre = self.pre
        q, radius, scale = (params[i] for i in self.index)
        offset_r = radius - DIELECTRIC_OFFSET
        sr = scale * offset_r
        off = ~np.eye(n, dtype=bool)
        use = (r + sr[None, :] - offset_r[:, None] >= 0.0) & off
        t0 = jnp.where(use, born_integral(r, offset_r[:, None], sr[None, :]), 0.0)
        psi = jnp.sum(t0, axis=1) * offset_r
        born = born_radius(psi, offset_r, radius)
        zero = jnp.zeros_like(psi)
        # T' and T'' and, separately, T'ᵀ and T''ᵀ evaluated with the roles of i and j
        # swapped: XLA on CPU fuses a transpose into its producers and reads them all
        # column-wise, which costs far more than evaluating the formula twice
        use_t = (r + sr[:, None] - offset_r[None, :] >= 0.0) & off
        t1, t2 = elementwise(born_integral, 0, (1, 2), r, offset_r[:, None], sr[None, :])
        t1t, t2t = elementwise(born_integral, 0, (1, 2), r, offset_r[None, :], sr[:, None])
        t1, t2 = jnp.where(use, t1, 0.0), jnp.where(use, t2, 0.0)
        t1t, t2t = jnp.where(use_t, t1t, 0.0), jnp.where(use_t, t2t, 0.0)
        b1, b2 = elementwise(born_radius, 0, (1, 2), psi, offset_r, radius)
        e1, e2 = elementwise(gb_self, 0, (1, 2), born, q, radius, pre + zero)
        qq = jnp.where(off, q[:, None] * q[None, :], 0.0)
        bi, bj = born[:, None], born[None, :]
        h1 = elementwise(gb_pair, (0, 1), 1, r, bi, bj, pre)
        h2 = elementwise(gb_pair, (0, 1, 2), 2, r, bi, bj, pre)
        w_r, w_b = qq * h1[0], qq * h1[1]
        w_rr = qq * h2[0][0]
        w_rb_t = qq * h2[0][2]  # ∂²w_ij/∂r∂B_j: the transpose of w_rb(ij) = ∂²w_ij/∂r∂B_i
        w_bb, w_bc = qq * h2[1][1], qq * h2[1][2]  # ∂²/∂B_i², ∂²/∂B_i∂B_j
        beta = e1 + jnp.sum(w_b, axis=1)
        c = beta * b1 * offset_r
        d1 = w_r + c[:, None] * t1 + c[None, :] * t1t
        d2 = w_rr + c[:, None] * t2 + c[None, :] * t2t
        a = (d2 - d1 * inv_r) * inv_r * inv_r
        b = d1 * inv_r
        rhat = [dc[k] * inv_r for k in range(3)]
        # K_T[(a, j), i] = (T'∘r̂_a)[i, j] = -(T'ᵀ∘r̂_a)[j, i], K_W likewise with w_rb
        k_t = jnp.stack([-t1t * rhat[k] for k in range(3)]).reshape(3 * n, n)
        k_w = jnp.stack([-w_rb_t * rhat[k] for k in range(3)]).reshape(3 * n, n)
        diag_bb = e2 + jnp.sum(w_bb, axis=1)
        if self.cols.size:
            out = out.at[self.cols].add(self._mixed(x, params))
        if self.q_cols.size:
            # ∂g/∂q along the charge tangents S (P_q, N): w = q_i q_j h and the self energy
            # move; T, B do not. δβ_i = S_i (∂e'_i/∂q_i + Σ_j h_Bi q_j) + q_i Σ_j h_Bi S_j,
            # δc = b' or δβ, δg_k = Σ_j (h_r (S_k q_j + q_k S_j) + δc_k T'_kj + δc_j T'_jk) r̂_kj
            sel = jnp.asarray(self.q_sel, x.dtype)
            h_r, h_b = jnp.where(off, h1[0], 0.0), jnp.where(off, h1[1], 0.0)
            de1 = elementwise(
                lambda bb, qq_, rr, pp: jax.grad(gb_self)(bb, qq_, rr, pp),
                1,
                1,
                born,
                q,
                radius,
                pre + zero,
            )
            dbeta = sel * (de1 + h_b @ q)[None, :] + q[None, :] * (sel @ h_b.T)
            dc_q = b1 * offset_r * dbeta
            hr_rhat = jnp.stack([h_r * rhat[k] for k in range(3)], axis=1)  # [k, a, j]
            own = sel[:, None, :] * (hr_rhat @ q).T[None]  # Σ_j h_r q_j r̂_kj S_k
            other = -(sel @ hr_rhat.reshape(n, 3 * n)).reshape(-1, 3, n) * q[None, None, :]
            rs_t = (unit_rows(n).astype(x.dtype) @ k_t).reshape(3, n)  # Σ_j T'_kj r̂_kj,a
            born_part = dc_q[:, None, :] * rs_t[None] - (dc_q @ k_t.T).reshape(-1, 3, n)
            dq = jnp.transpose(own + other + born_part, (0, 2, 1))
            out = out.at[self.q_cols].add(dq)

        def apply(ext):
            p = ext.shape[0] - 3
            y_t, y_w = ext @ k_t, ext @ k_w  # (P + 3, N) each
            rs_t, rs_w = y_t[p:], y_w[p:]  # [a, i] = Σ_j M_ij r̂_ij,a
            t3 = ext[:p].reshape(p, 3, n)
            dr_t = sum(rs_t[k][None] * t3[:, k] for k in range(3)) - y_t[:p]  # Σ_j T'_ij δr_ij
            dr_w = sum(rs_w[k][None] * t3[:, k] for k in range(3)) - y_w[:p]  # Σ_j w_rb δr_ij
            dpsi = offset_r * dr_t
            dborn = b1 * dpsi
            dbeta = diag_bb * dborn + dborn @ w_bc + dr_w
            dc_ = offset_r * (b1 * dbeta + beta * b2 * dpsi)
            # Σ_j T'_jk r̂_kj δc_j + Σ_j w_rb(jk) r̂_kj δB_j = -(δc·K_Tᵀ + δB·K_Wᵀ)
            other = -(dc_ @ k_t.T + dborn @ k_w.T).reshape(p, 3, n)
            own = dborn[:, None, :] * rs_w[None] + dc_[:, None, :] * rs_t[None]
            return other + own

        return a, b, out, apply

    def _mixed(self, x, params):
        grad_x = jax.grad(self.term.energy, argnums=0)
        onehot = np.zeros((self.wrt.size, params.shape[0]))
        onehot[np.arange(self.wrt.size), self.wrt] = 1.0
        _, lin = jax.linearize(lambda th: grad_x(x, th), params)
        return jax.vmap(lin)(jnp.asarray(onehot, params.dtype))
