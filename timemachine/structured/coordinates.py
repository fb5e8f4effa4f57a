"""Terms of one internal coordinate in closed form: value, gradient, Hessian blocks and
mixed partials.

A :class:`~timemachine.system.CoordinateGroup` is E = Σ_t f(q(x[idx_t]); θ[pidx_t], c_t)
for a scalar coordinate q (a distance, an angle, a dihedral) and a scalar form f from
``timemachine.potentials``. Its derivatives follow from q's analytic gradient and f's
derivatives in q:

    ∇E = f' ∇q,    ∇²E = f'' ∇q∇qᵀ + f' ∇²q,    ∂∇E/∂θ_c = ∂f'/∂θ_c ∇q.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.potentials.bonded import dihedral_angle
from timemachine.structured.fusion import materialised

# -- internal coordinates: value and analytic gradient ----------------------------------


def distance(xl):
    """(r, ∇r (2, 3)) of the pair xl (2, 3), nm."""
    d = xl[0] - xl[1]
    r = jnp.sqrt(d @ d)
    u = d / r
    return r, jnp.stack([u, -u])


def angle(xl):
    """(θ, ∇θ (3, 3)) at the middle atom of xl (3, 3), radians."""
    u = xl[0] - xl[1]
    w = xl[2] - xl[1]
    n = jnp.cross(u, w)
    s = jnp.sqrt(n @ n)
    c = u @ w
    du = (c / (u @ u) * u - w) / s
    dw = (c / (w @ w) * w - u) / s
    return jnp.arctan2(s, c), jnp.stack([du, -du - dw, dw])


def dihedral(xl):
    """(φ, ∇φ (4, 3)) of xl (4, 3), radians, IUPAC sign (as ``dihedral_angle``).

    Blondel & Karplus, J. Comput. Chem. 17, 1132 (1996).
    """
    f = xl[0] - xl[1]
    g = xl[1] - xl[2]
    h = xl[3] - xl[2]
    a = jnp.cross(f, g)
    b = jnp.cross(h, g)
    a2, b2 = a @ a, b @ b
    gn = jnp.sqrt(g @ g)
    gi = -gn / a2 * a
    gl = gn / b2 * b
    fg = (f @ g) / (a2 * gn)
    hg = (h @ g) / (b2 * gn)
    gj = -gi + fg * a - hg * b
    gk = -gl - fg * a + hg * b
    phi = dihedral_angle(xl, np.array([[0, 1, 2, 3]]))[0]
    return phi, jnp.stack([gi, gj, gk, gl])


COORDINATES = {"distance": distance, "angle": angle, "dihedral": dihedral}


def merge_groups(groups):
    """Concatenate the non-empty groups that share a coordinate and a form (propers and
    impropers, bonds of several terms): one group, fewer kernels per call. First-seen
    order."""
    merged = {}
    for g in groups:
        if np.asarray(g.idx).shape[0]:
            merged.setdefault((g.coordinate, g.form), []).append(g)
    out = []
    for (coordinate, form), gs in merged.items():
        cat = [np.concatenate([np.asarray(getattr(g, k)) for g in gs]) for k in ("idx", "pidx")]
        consts = np.concatenate([np.asarray(g.consts, np.float64) for g in gs])
        out.append((coordinate, form, cat[0], cat[1], consts))
    return out


class CoordinateTerms:
    """One merged coordinate group (``merge_groups``) in closed form.

    Hessian: ∇²E = f'' ∇q∇qᵀ + f' ∇²q, evaluated once per distinct atom tuple with f', f''
    summed over the terms that share it (a proper torsion has up to 6 periodicities).
    Pairs (k = 2) give only the two pair scalars A = (f'' - f'/r)/r², B = f'/r.
    Mixed partial for a chosen θ_p: Σ_{t,c: pidx[t,c] = p} ∂f'/∂θ_c ∇q_t.

    ``evaluate(x, params)`` returns a dict: "a", "b" ((2U,) pair scalars, both orders) for
    distances; "grad" ((U, k, 3) f' ∇q) and "block" ((U, 3k, 3k) Hessian blocks) otherwise;
    "mixed" ((hits, k, 3)) where a chosen parameter is used.
    """

    def __init__(self, coordinate, form, idx, pidx, consts, wrt):
        idx = np.asarray(idx, dtype=np.int64)
        self.is_pair = coordinate == "distance"
        self.coord, self.energy = COORDINATES[coordinate], form
        self.uniq, self.inv = np.unique(idx, axis=0, return_inverse=True)
        self.inv = self.inv.reshape(-1)
        self.pidx = np.asarray(pidx, dtype=np.int64)
        self.consts = np.asarray(consts, dtype=np.float64)
        hit_t, hit_c, hit_p = np.nonzero(self.pidx[:, :, None] == wrt[None, None, :])
        self.hit_term, self.hit_channel, self.hit_param = hit_t, hit_c, hit_p
        self.hit_atoms = idx[hit_t]  # (hits, k)
        i, j = self.uniq[:, 0], self.uniq[:, 1]
        self.pair_rows = np.concatenate([i, j])
        self.pair_cols = np.concatenate([j, i])

    def block_flat(self, n):
        """Flat indices into the (3N·3N) Hessian, rows and columns ordered (xyz, atom), of
        each entry of the (U, k, 3, k, 3) blocks."""
        k = self.uniq.shape[1]
        line = np.arange(3)[None, None, :] * n + self.uniq[:, :, None]  # (U, k, 3)
        row = line.reshape(-1, k, 3, 1, 1)
        col = line.reshape(-1, 1, 1, k, 3)
        return (row * 3 * n + col).reshape(-1)

    def evaluate(self, x, params):
        xl = x[self.uniq]
        q, grad_q = jax.vmap(self.coord)(xl)
        q_t = q[self.inv]
        pl = params[self.pidx]
        consts = jnp.asarray(self.consts, x.dtype)  # float32 in a float32 step
        f1 = jax.grad(self.energy, argnums=0)
        d1 = jax.vmap(f1)(q_t, pl, consts)
        d2 = jax.vmap(jax.grad(f1, argnums=0))(q_t, pl, consts)
        n_uniq = self.uniq.shape[0]
        d1 = jax.ops.segment_sum(d1, self.inv, n_uniq)
        d2 = jax.ops.segment_sum(d2, self.inv, n_uniq)
        out = {}
        if self.is_pair:
            inv_r = 1.0 / q
            a = (d2 - d1 * inv_r) * inv_r * inv_r
            b = d1 * inv_r
            out["a"] = jnp.concatenate([a, a])
            out["b"] = jnp.concatenate([b, b])
        else:
            out["grad"] = d1[:, None, None] * grad_q
            # the block as (U, 3k, 3k) arrays: 5-D broadcasts fused into one loop make XLA
            # index every entry the slow way and recompute ∇q, ∇²q for each of them
            n_uniq, width = xl.shape[0], 3 * xl.shape[1]

            def flat_grad(v):
                return self.coord(v.reshape(-1, 3))[1].reshape(-1)

            hess_q = jax.vmap(jax.jacfwd(flat_grad))(xl.reshape(n_uniq, width))
            g2 = materialised(grad_q.reshape(n_uniq, width))
            hess_q = materialised(hess_q)
            out["block"] = (
                d2[:, None, None] * (g2[:, :, None] * g2[:, None, :]) + d1[:, None, None] * hess_q
            )
        if self.hit_term.size:
            t = self.hit_term
            dmix = jax.vmap(jax.grad(f1, argnums=1))(q_t[t], pl[t], consts[t])
            dmix = dmix[np.arange(t.size), self.hit_channel]
            out["mixed"] = dmix[:, None, None] * grad_q[self.inv[t]]
        return out
