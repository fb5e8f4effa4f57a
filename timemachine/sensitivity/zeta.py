"""The ζ operator (paper eq. 6): ζ = H(x) · dx/dθ + ∂²E/∂x∂θ, shape (P, N, 3).

ζ_p is the directional derivative of ∇_x E along (dx/dθ_p, e_p): one Jacobian-vector
product of the gradient per parameter. ``zeta_reference`` computes exactly that with
``jax.jvp``, vmapped over the P parameters; it is the definition every faster path is
tested against.

``make_zeta`` (and ``make_gradient_and_zeta``) build the production ζ for a System: the
Hessian of every structured term is assembled once per call and contracted with all P
tangents at once, so the cost is a few gradients rather than P Hessian-vector products
(docs/design.md, "Performance principles").
"""

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.backends import xla_cpu
from timemachine.backends.plan import coordinate_term_groups
from timemachine.constants import COULOMB, COULOMB_GB
from timemachine.errors import InputError
from timemachine.potentials import gbsa
from timemachine.potentials.bonded import dihedral_angle
from timemachine.potentials.nonbonded import _lj_coulomb, safe_sqrt
from timemachine.system import (
    OBC2,
    HarmonicAngles,
    HarmonicBonds,
    Nonbonded,
    PeriodicTorsions,
)


def zeta_reference(energy_fn, x, params, dx_dtheta, wrt):
    """ζ by one jvp of ∇_x E per parameter (the straightforward, always-correct path).

    Args:
      energy_fn: E(x (N,3), θ (P_all,)) -> kJ/mol, JAX-traceable (``system.energy_fn()``).
      x: (N, 3) positions, nm.
      params: (P_all,) full parameter vector θ.
      dx_dtheta: (P, N, 3) current sensitivities of x to the chosen parameters, nm/[θ].
      wrt: (P,) int indices into θ of the chosen parameters.
    Returns:
      (P, N, 3) ζ, kJ/mol/nm/[θ].
    """
    grad = jax.grad(energy_fn, argnums=0)
    wrt = jnp.asarray(wrt)

    def one(dx, p):
        dtheta = jnp.zeros_like(params).at[p].set(1.0)
        return jax.jvp(grad, (x, params), (dx, dtheta))[1]

    return jax.vmap(one)(dx_dtheta, wrt)


def mixed_partial_reference(energy_fn, x, params, wrt):
    """∂²E/∂x∂θ_p for the chosen parameters, (P, N, 3): ζ with dx/dθ = 0."""
    wrt = jnp.asarray(wrt)
    return zeta_reference(energy_fn, x, params, jnp.zeros((wrt.shape[0],) + x.shape), wrt)


# ---------------------------------------------------------------------------------------
# Production ζ: the Hessian of every structured term is applied to all P tangents at once:
# in the pure-JAX path as one dense symmetric (3N, 3N) matrix and one matrix product; on
# the CPU custom call as pair blocks over the upper triangle and per-tuple bonded blocks.
# Mixed partials are scattered from the few terms that use each chosen parameter.
# ---------------------------------------------------------------------------------------


def make_zeta(system, wrt, method="structured", bonded="auto"):
    """A jittable ``zeta(x (N,3), params (P_all,), dx_dtheta (P,N,3)) -> (P,N,3)``.

    ζ_p = H(x)·dx/dθ_p + ∂²E/∂x∂θ_p (paper eq. 6) for the P parameters ``wrt``.

    Args:
      system: a :class:`timemachine.System`.
      wrt: (P,) int indices into ``system.params`` (``system.select(...)``).
      method: "reference" — :func:`zeta_reference`, one jvp of ∇E per parameter (the
        definition); "structured" — the fast path, term by term:

        * all-pairs LJ + Coulomb: closed-form pair Hessian blocks
          ``(E'' - E'/r) r̂r̂ᵀ + (E'/r) I`` from two (N, N) scalar matrices;
        * bonds and 1-4 exceptions (pair lists): the same two scalars per pair, added to
          those matrices;
        * angles, proper and improper torsions: (3k × 3k) blocks
          ``E''(q) ∇q∇qᵀ + E'(q) ∇²q`` of the internal coordinate q (analytic ∇q, its
          Jacobian by forward mode), once per distinct atom tuple;
        * OBC2: its pair part (through r with the Born radii fixed) joins the same two
          matrices; the Born-radius chain adds three matrix products over all tangents
          (see ``_OBC2Pairs``);
        * with ``bonded="jax"``, all of the above form one dense symmetric (3N, 3N)
          Hessian, applied to the P tangents with a single (P, 3N)·(3N, 3N) product; with
          the custom call, the pair blocks are applied there instead, over the upper
          triangle (half the flops, no (3N, 3N) matrix), split among XLA's CPU threads;
        * mixed partials: scattered from the terms whose index arrays point at a chosen
          parameter; for per-atom charge/σ/ε of the all-pairs term, one
          (3N, N)·(N, P_kind) product per parameter kind; for OBC2's charge, radius and
          scale, one jvp of its gradient per chosen GB parameter;
        * CustomTerm and any other term: ``jax.linearize`` of the term's gradient once
          per call, its linear map vmapped over the P tangents (exact autodiff).
      bonded: where the bonds, angles, torsions and 1-4 exceptions go. "jax": as above,
        in XLA (the pure-JAX path); "host": one C++ XLA custom call on the CPU
        (:mod:`timemachine.backends.xla_cpu`) that applies each tuple's block to all P
        tangents without forming it and scatters the mixed partials, the same maths to
        round-off (≤ 1e-12 relative in the tests), and also contracts the all-pairs
        blocks A_ij d dᵀ + B_ij I with the tangents; "auto" (default): "host" where JAX
        computes on the CPU and a C++ compiler is present, else "jax". The custom call
        is forward-only: use "jax" to differentiate through ζ.

    The returned function is pure and does no input checks: jit it, or call it in a scan.
    Cost per call: O(N²) to assemble, O(N²·P) in one matrix product (or the custom call's
    contraction), O(terms) elsewhere; memory O(N²) (two N×N scalar matrices; the dense path
    also a 3N×3N float64 matrix in column tiles, 24 MB in all for 582 atoms).
    """
    wrt = system.resolve_wrt(wrt, allow_repeats=True)
    if method == "reference":
        energy_fn = system.energy_fn()

        def zeta(x, params, dx_dtheta):
            return zeta_reference(energy_fn, x, params, dx_dtheta, wrt)

        return zeta
    if method != "structured":
        raise InputError(f"method must be 'structured' or 'reference', got {method!r}")
    both = _structured(system, wrt, bonded=bonded)

    def zeta(x, params, dx_dtheta):
        return both(x, params, dx_dtheta)[1]  # jit drops the unused gradient

    return zeta


def make_gradient_and_zeta(system, wrt, method="structured", bonded="auto"):
    """A jittable ``fn(x, params, dx_dtheta) -> (∇_x E (N,3), ζ (P,N,3))``.

    A sensitivity step needs both at the same x; the structured path gets the gradient
    almost free from the same pair scalars (Σ_j B_ij d_ij), bonded derivatives and
    linearizations, so one call costs about what ζ alone does. ``method`` and ``bonded``
    as in :func:`make_zeta`; "reference" is ``jax.grad`` plus :func:`zeta_reference`.
    """
    wrt = system.resolve_wrt(wrt, allow_repeats=True)
    if method == "reference":
        energy_fn = system.energy_fn()
        grad = jax.grad(energy_fn, argnums=0)

        def fn(x, params, dx_dtheta):
            return grad(x, params), zeta_reference(energy_fn, x, params, dx_dtheta, wrt)

        return fn
    if method != "structured":
        raise InputError(f"method must be 'structured' or 'reference', got {method!r}")
    return _structured(system, wrt, bonded=bonded)


def make_gradient(system, bonded="jax"):
    """A jittable ``gradient(x (N,3), params (P_all,)) -> ∇_x E (N, 3)``, kJ/mol/nm.

    The gradient half of the structured path, with no ζ: the all-pairs terms (LJ +
    Coulomb, OBC2) as Σ_j B_ij d_ij from closed-form pair scalars, the bonded terms from
    analytic internal-coordinate derivatives, ``jax.grad`` only for CustomTerm and other
    terms without a closed form. It equals ``jax.grad(system.energy_fn())`` to round-off
    (≤ 1e-13 relative on villin) at about a quarter of its cost for all-pairs systems,
    because autodiff of the dense (N, N) energy keeps and reverses many (N, N)
    intermediates. Pure, no input checks: jit it, or call it in a scan.

    ``bonded`` defaults to "jax" here, not "auto", so that the gradient stays
    differentiable (force matching differentiates it with respect to θ); "host" puts the
    bonded terms' gradient in the C++ custom call (:func:`make_zeta`).
    """
    return _structured(system, np.zeros(0, np.int64), gradient_only=True, bonded=bonded)


def _use_host_bonded(bonded, gradient_only):
    if bonded not in ("auto", "jax", "host"):
        raise InputError(f"bonded must be 'auto', 'jax' or 'host', got {bonded!r}")
    if bonded == "jax" or (gradient_only and bonded == "auto"):
        return False  # plain MD's gradient stays differentiable (force matching)
    ok, why = xla_cpu.available()
    if bonded == "host" and not ok:
        raise InputError(f"bonded='host': the CPU custom call cannot run here: {why}")
    return ok


def _structured(system, wrt, gradient_only=False, bonded="auto"):
    n = system.n_atoms
    dense, coords, autodiff = [], [], []
    # bonds, angles, torsions and 1-4 exceptions in one C++ custom call (CPU), if it runs
    host = (
        xla_cpu.BondedTables.build(coordinate_term_groups(system), system.n_params, wrt)
        if _use_host_bonded(bonded, gradient_only)
        else None
    )
    # propers and impropers share one form: one group, fewer kernels per call
    torsions = [t for t in system.terms if isinstance(t, PeriodicTorsions)]
    if torsions and host is None:
        coords.append(
            _CoordinateTerms(
                _DIHEDRAL,
                np.concatenate([np.asarray(t.idx) for t in torsions]),
                _torsion_energy,
                [np.concatenate([np.asarray(t.phase_index) for t in torsions])]
                + [np.concatenate([np.asarray(t.k_index) for t in torsions])],
                [np.concatenate([np.asarray(t.periodicity) for t in torsions])],
                wrt,
            )
        )
    for term in system.terms:
        if host is not None and isinstance(term, (HarmonicBonds, HarmonicAngles)):
            pass  # in the custom call
        elif isinstance(term, HarmonicBonds):
            coords.append(
                _CoordinateTerms(
                    _PAIR, term.idx, _bond_energy, [term.length_index, term.k_index], [], wrt
                )
            )
        elif isinstance(term, HarmonicAngles):
            coords.append(
                _CoordinateTerms(
                    _ANGLE, term.idx, _angle_energy, [term.theta0_index, term.k_index], [], wrt
                )
            )
        elif isinstance(term, PeriodicTorsions):
            pass  # grouped above
        elif isinstance(term, OBC2):
            dense.append(_OBC2Pairs(term, wrt))
        elif isinstance(term, Nonbonded):
            dense.append(_NonbondedPairs(term, wrt))
            exc = np.asarray(term.exception_idx)
            if exc.shape[0] and host is None:
                i, j = exc[:, 0], exc[:, 1]
                per_atom = [np.asarray(a) for a in (term.charge_index, term.sigma_index)]
                per_atom.append(np.asarray(term.epsilon_index))
                coords.append(
                    _CoordinateTerms(
                        _PAIR,
                        exc,
                        _exception_energy,
                        [a[k] for a in per_atom for k in (i, j)],
                        [term.coulomb_scale, term.lj_scale],
                        wrt,
                    )
                )
        elif gradient_only:
            autodiff.append(jax.grad(term.energy, argnums=0))
        else:
            autodiff.append(_autodiff_part(term, wrt))
    if host is not None and not host.kind.size and (gradient_only or not dense):
        host = None  # nothing for the call to do: no bonded terms, no all-pairs blocks
    pair_terms = [c for c in coords if c.coord is _PAIR]
    block_terms = [c for c in coords if c.coord is not _PAIR]
    # static scatter targets, concatenated so that each kind lands in one scatter per call
    none = [np.zeros(0, np.int64)]
    pair_rows = np.concatenate([c.pair_rows for c in pair_terms] + none)
    pair_cols = np.concatenate([c.pair_cols for c in pair_terms] + none)
    block_flat = np.concatenate([c.block_flat(n) for c in block_terms] + none)
    block_atoms = np.concatenate([c.uniq.reshape(-1) for c in block_terms] + none)
    # E: three extra "tangents" t_ib = δ_ab whose product with C gives its block row sums
    unit = _unit_rows(n)
    tiles = _column_tiles(n, block_flat)

    def gradient_and_zeta(x, params, dx_dtheta):
        xt = x.T
        # components of d_ij = x_i - x_j as three (N, N) arrays: XLA on CPU fuses and
        # vectorises 2-D elementwise work far better than a (3, N, N) array with a reduction
        dc = [xt[k][:, None] - xt[k][None, :] for k in range(3)]
        # r is 1 on the diagonal, as in pair_distances. 1/r as the root of 1/r² (not 1/√r²)
        # halves the cost of the all-pairs LJ + Coulomb loop that XLA fuses on CPU
        r2 = dc[0] ** 2 + dc[1] ** 2 + dc[2] ** 2 + jnp.eye(n, dtype=x.dtype)
        inv_r = jnp.sqrt(1.0 / r2)
        r = jnp.sqrt(r2)  # only OBC2 uses r; jit drops it in vacuum
        a = jnp.zeros((n, n), x.dtype)
        b = jnp.zeros((n, n), x.dtype)
        mixed = jnp.zeros_like(dx_dtheta)
        applies = []
        for term in dense:
            ta, tb, mixed, apply = term(x, r, inv_r, dc, params, mixed)
            a, b = a + ta, b + tb
            if apply is not None:
                applies.append(apply)
        evals = [c.evaluate(x, params) for c in coords]
        if pair_rows.size:
            pa = jnp.concatenate([e["a"] for e in evals if "a" in e])
            pb = jnp.concatenate([e["b"] for e in evals if "b" in e])
            a = a.at[pair_rows, pair_cols].add(pa)
            b = b.at[pair_rows, pair_cols].add(pb)
        elif host is None:  # no pair list to scatter, and the G tiles read A and B
            a, b = _in_memory(a, x), _in_memory(b, x)
        # gradient: Σ_j B_ij d_ij over every pair form, plus f' ∇q of the bonded blocks
        # Σ_j B_ij (x_i - x_j) as x_i Σ_j B_ij - B·x: a GEMM, where XLA's CPU row reductions
        # are slow; centring x keeps the cancellation to ~|x - x̄|/r ulps
        xc = x - jnp.mean(x, axis=0)
        bx = b @ jnp.concatenate([xc, jnp.ones((n, 1), x.dtype)], axis=1)
        grad = xc * bx[:, 3:] - bx[:, :3]
        if block_atoms.size:
            gq = jnp.concatenate([e["grad"].reshape(-1, 3) for e in evals if "grad" in e])
            grad = grad.at[block_atoms].add(gq)
        if gradient_only:
            if host is not None:
                grad = grad + host(x, params, dx_dtheta)[0]
            for part in autodiff:
                grad = grad + part(x, params)
            return grad
        p = dx_dtheta.shape[0]
        tangents = jnp.transpose(dx_dtheta, (0, 2, 1)).reshape(p, 3 * n)
        ext = jnp.concatenate([tangents, unit])  # (P + 3, 3N)
        if host is not None:
            # the pair contraction Σ_j C_ij (t_i - t_j) joins the bonded terms in the custom
            # call: half the flops of the dense product (upper triangle), no (3N, 3N) matrix
            g_host, out = host(x, params, dx_dtheta, *((a, b) if dense else ()))
            grad, out = grad + g_host, out + mixed
            for apply in applies:
                out = out + jnp.transpose(apply(ext), (0, 2, 1))
        else:
            hess_t = _dense_pair_product(a, b, dc, ext, tiles, evals, block_flat.size, p, n)
            for apply in applies:
                hess_t = hess_t + apply(ext)
            out = jnp.transpose(hess_t, (0, 2, 1)) + mixed
        for c, e in zip(coords, evals, strict=True):
            if c.hit_term.size:
                out = out.at[c.hit_param[:, None], c.hit_atoms].add(e["mixed"])
        for part in autodiff:
            g_term, z_term = part(x, params, dx_dtheta)
            grad, out = grad + g_term, out + z_term
        return grad, out

    if gradient_only:

        def gradient(x, params):  # jit drops the Hessian scalars A that only ζ uses
            return gradient_and_zeta(x, params, jnp.zeros((0,) + x.shape, x.dtype))

        return gradient
    return gradient_and_zeta


def _dense_pair_product(a, b, dc, ext, tiles, evals, n_block, p, n):
    """H·t of the pair forms and the bonded blocks through one dense symmetric Hessian,
    (P, 3, N): the pure-JAX path (``bonded="jax"``).

    G = C - (bonded blocks), rows/columns ordered (a, i): C[ai, bj] = A d_a d_b + B δ_ab.
    The Hessian is diag_i(Σ_j C_ij) - G; the bonded part drops out of the row sums
    (translation invariance), so one product [t | E]·G gives both t·G and Σ_j C_ij.
    """
    blocks = (
        -jnp.concatenate([e["block"].reshape(-1) for e in evals if "block" in e])
        if n_block
        else None
    )
    # G by column tiles of atoms J: each (3N, 3|J|) tile is written, scattered into and
    # multiplied while it is in cache, where the whole (3N, 3N) G would go to memory
    pieces = []
    for j0, j1, local, entries in tiles:
        cols = slice(j0, j1)
        g = jnp.stack(
            [
                jnp.stack(
                    [
                        a[:, cols] * dc[i][:, cols] * dc[j][:, cols]
                        + (b[:, cols] if i == j else 0.0)
                        for j in range(3)
                    ],
                    1,
                )
                for i in range(3)
            ]
        ).reshape(-1)  # (3, N, 3, w) flattened; stack, not concatenate, keeps the GEMM fast
        if local.size:  # one tile (small N) takes every entry, in order: no gather
            g = g.at[local].add(blocks if len(tiles) == 1 else blocks[entries])
        pieces.append((ext @ g.reshape(3 * n, 3 * (j1 - j0))).reshape(-1, 3, j1 - j0))
    prod = jnp.concatenate(pieces, axis=2).reshape(-1, 3 * n)
    rowsum = prod[p:].reshape(3, 3, n)  # [b, a, i] = Σ_j C_ij[a, b]
    t3 = ext[:p].reshape(p, 3, n)
    hess_t = sum(rowsum[k][None, :, :] * t3[:, k : k + 1, :] for k in range(3))
    return hess_t - prod[:p].reshape(p, 3, n)


# -- internal coordinates: value and analytic gradient ----------------------------------


def _pair_coord(xl):
    d = xl[0] - xl[1]
    r = jnp.sqrt(d @ d)
    u = d / r
    return r, jnp.stack([u, -u])


def _angle_coord(xl):
    u = xl[0] - xl[1]
    w = xl[2] - xl[1]
    n = jnp.cross(u, w)
    s = jnp.sqrt(n @ n)
    c = u @ w
    du = (c / (u @ u) * u - w) / s
    dw = (c / (w @ w) * w - u) / s
    return jnp.arctan2(s, c), jnp.stack([du, -du - dw, dw])


def _dihedral_coord(xl):
    # Blondel & Karplus, J. Comput. Chem. 17, 1132 (1996); IUPAC sign, as dihedral_angle.
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


_PAIR, _ANGLE, _DIHEDRAL = _pair_coord, _angle_coord, _dihedral_coord


# -- per-term energies as functions of their coordinate (the potentials' formulas) ------


def _bond_energy(r, p, c):
    return 0.5 * p[1] * (r - p[0]) ** 2


def _angle_energy(theta, p, c):
    return 0.5 * p[1] * (theta - p[0]) ** 2


def _torsion_energy(phi, p, c):
    return p[1] * (1.0 + jnp.cos(c[0] * phi - p[0]))


def _exception_energy(r, p, c):
    # p = (q_i, q_j, σ_i, σ_j, ε_i, ε_j), c = (coulomb_scale, lj_scale)
    eps = c[1] * safe_sqrt(p[4]) * safe_sqrt(p[5])
    return _lj_coulomb(r, 0.5 * (p[2] + p[3]), eps, c[0] * p[0] * p[1])


def _in_memory(a, x):
    """``a`` unchanged, through an in-place scatter of one zero (data-dependent, so that
    XLA cannot fold it away).

    XLA on CPU fuses an elementwise producer into every consumer, so an (N, N) matrix of
    pair scalars read by several products would be recomputed in each; a scatter updates
    a buffer, so its operand is computed once into memory. Far cheaper than a product
    with the identity (``_materialised``) for large arrays.
    """
    return a.at[(0,) * a.ndim].add(x[0, 0] * 0.0)


def _materialised(a):
    """``a`` (..., m), unchanged, through a product with the (m, m) identity.

    XLA on CPU drops optimisation barriers and fuses any elementwise producer into its
    consumer; a dot is never fused, so its input is computed once into memory.
    """
    return a @ jnp.eye(a.shape[-1], dtype=a.dtype)


class _CoordinateTerms:
    """Terms E = Σ_t f(q(x[idx_t]); θ[pidx_t], c_t) of one scalar internal coordinate q.

    Hessian: ∇²E = f'' ∇q∇qᵀ + f' ∇²q, evaluated once per distinct atom tuple with f', f''
    summed over the terms that share it (a proper torsion has up to 6 periodicities).
    Pairs (k = 2) give only the two pair scalars A = (f'' - f'/r)/r², B = f'/r.
    Mixed partial for a chosen θ_p: Σ_{t,c: pidx[t,c] = p} ∂f'/∂θ_c ∇q_t.
    """

    def __init__(self, coord, idx, energy, pidx_list, const_list, wrt):
        idx = np.asarray(idx, dtype=np.int64)
        n_terms = idx.shape[0]
        self.coord, self.energy = coord, energy
        self.uniq, self.inv = np.unique(idx, axis=0, return_inverse=True)
        self.inv = self.inv.reshape(-1)
        self.pidx = np.stack([np.asarray(a, dtype=np.int64) for a in pidx_list], axis=1)
        self.consts = (
            np.stack([np.asarray(a, dtype=np.float64) for a in const_list], axis=1)
            if const_list
            else np.zeros((n_terms, 0))
        )
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
        f1 = jax.grad(self.energy, argnums=0)
        d1 = jax.vmap(f1)(q_t, pl, self.consts)
        d2 = jax.vmap(jax.grad(f1, argnums=0))(q_t, pl, self.consts)
        n_uniq = self.uniq.shape[0]
        d1 = jax.ops.segment_sum(d1, self.inv, n_uniq)
        d2 = jax.ops.segment_sum(d2, self.inv, n_uniq)
        out = {}
        if self.coord is _PAIR:
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
            g2 = _materialised(grad_q.reshape(n_uniq, width))
            hess_q = _materialised(hess_q)
            out["block"] = (
                d2[:, None, None] * (g2[:, :, None] * g2[:, None, :]) + d1[:, None, None] * hess_q
            )
        if self.hit_term.size:
            t = self.hit_term
            dmix = jax.vmap(jax.grad(f1, argnums=1))(q_t[t], pl[t], self.consts[t])
            dmix = dmix[np.arange(t.size), self.hit_channel]
            out["mixed"] = dmix[:, None, None] * grad_q[self.inv[t]]
        return out


# -- all-pairs LJ + Coulomb ------------------------------------------------------------


class _NonbondedPairs:
    """``nonbonded_all_pairs`` in closed form.

    For a pair energy φ(r) the gradient is g_i = Σ_j φ'/r d_ij (d_ij = x_i - x_j) and
    ∂g_i/∂x_j = -(A_ij d dᵀ + B_ij I), A = (φ'' - φ'/r)/r², B = φ'/r: this returns A, B.

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
            other = jnp.concatenate([g.T * dc[k] for k in range(3)]) @ sel  # rows (a, i)
            other = jnp.transpose(other.T.reshape(-1, 3, n), (0, 2, 1))
            out = out.at[cols].add(sel.T[:, :, None] * u[None, :, :] + other)
        return a, b, out, None


# -- OBC2 generalized Born -------------------------------------------------------------
# The scalar pieces of ``timemachine.potentials.gbsa``, one pair or one atom at a time, so
# that their derivatives are elementwise arrays (the same expressions as the reference).


def _gb_integral(r, or_i, sr_j):
    upper = r + sr_j
    lower = jnp.maximum(or_i, jnp.abs(r - sr_j))
    return 0.5 * (
        1.0 / lower
        - 1.0 / upper
        + 0.25 * (r - sr_j**2 / r) * (1.0 / upper**2 - 1.0 / lower**2)
        + 0.5 * jnp.log(lower / upper) / r
    )


def _gb_born(psi, offset_r, radius):
    tanh_sum = jnp.tanh(gbsa.OBC2_ALPHA * psi - gbsa.OBC2_BETA * psi**2 + gbsa.OBC2_GAMMA * psi**3)
    return 1.0 / (1.0 / offset_r - tanh_sum / radius)


def _gb_self(born, q, radius, pre):
    ace = gbsa.ACE_FACTOR * (radius + gbsa.PROBE_RADIUS) ** 2 * (radius / born) ** 6
    return 0.5 * pre * q**2 / born + ace


def _gb_pair(r, bi, bj, pre):
    """Pair energy per unit q_i q_j: pre / f_ij."""
    bb = bi * bj
    return pre / jnp.sqrt(r * r + bb * jnp.exp(-r * r / (4.0 * bb)))


# Atoms per column tile of G: a (3N, 3·64) float64 tile is 2.7 MiB at N = 582 (villin),
# where the whole (3N, 3N) G is 23 MiB. Measured on villin, 2-core EPYC: the tiled ∇E+ζ
# took 12-18 ms per call at P = 79 against 13-32 ms for the untiled one, run alternately.
TILE_ATOMS = 64


def _column_tiles(n, block_flat):
    """Static column tiles of G for atom columns [j0, j1): (j0, j1, flat indices into the
    (3, N, 3, j1 - j0) tile, indices into the concatenated bonded block entries) of each
    entry of ``block_flat`` that falls in the tile."""
    row, col = np.divmod(block_flat, 3 * n)
    b, j = np.divmod(col, n)
    out = []
    for j0 in range(0, n, TILE_ATOMS):
        j1 = min(j0 + TILE_ATOMS, n)
        entries = np.flatnonzero((j >= j0) & (j < j1))
        w = j1 - j0
        local = row[entries] * 3 * w + b[entries] * w + (j[entries] - j0)
        out.append((j0, j1, local, entries))
    return out


def _unit_rows(n):
    """(3, 3N): row a is 1 on the entries (a, j) of a (xyz, atom)-ordered vector."""
    return np.repeat(np.eye(3), n, axis=1)


def _elementwise(fn, argnums, order, *args):
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


class _OBC2Pairs:
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
        self.pre = -COULOMB_GB * (1.0 / term.solute_dielectric - 1.0 / term.solvent_dielectric)

    def __call__(self, x, r, inv_r, dc, params, out):
        n = x.shape[0]
        pre = self.pre
        q, radius, scale = (params[i] for i in self.index)
        offset_r = radius - gbsa.DIELECTRIC_OFFSET
        sr = scale * offset_r
        off = ~np.eye(n, dtype=bool)
        use = (r + sr[None, :] - offset_r[:, None] >= 0.0) & off
        t0 = jnp.where(use, _gb_integral(r, offset_r[:, None], sr[None, :]), 0.0)
        psi = jnp.sum(t0, axis=1) * offset_r
        born = _gb_born(psi, offset_r, radius)
        zero = jnp.zeros_like(psi)
        # T' and T'' and, separately, T'ᵀ and T''ᵀ evaluated with the roles of i and j
        # swapped: XLA on CPU fuses a transpose into its producers and reads them all
        # column-wise, which costs far more than evaluating the formula twice
        use_t = (r + sr[:, None] - offset_r[None, :] >= 0.0) & off
        t1, t2 = _elementwise(_gb_integral, 0, (1, 2), r, offset_r[:, None], sr[None, :])
        t1t, t2t = _elementwise(_gb_integral, 0, (1, 2), r, offset_r[None, :], sr[:, None])
        t1, t2 = jnp.where(use, t1, 0.0), jnp.where(use, t2, 0.0)
        t1t, t2t = jnp.where(use_t, t1t, 0.0), jnp.where(use_t, t2t, 0.0)
        b1, b2 = _elementwise(_gb_born, 0, (1, 2), psi, offset_r, radius)
        e1, e2 = _elementwise(_gb_self, 0, (1, 2), born, q, radius, pre + zero)
        qq = jnp.where(off, q[:, None] * q[None, :], 0.0)
        bi, bj = born[:, None], born[None, :]
        h1 = _elementwise(_gb_pair, (0, 1), 1, r, bi, bj, pre)
        h2 = _elementwise(_gb_pair, (0, 1, 2), 2, r, bi, bj, pre)
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
            sel = self.q_sel
            h_r, h_b = jnp.where(off, h1[0], 0.0), jnp.where(off, h1[1], 0.0)
            de1 = _elementwise(
                lambda bb, qq_, rr, pp: jax.grad(_gb_self)(bb, qq_, rr, pp),
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
            rs_t = (_unit_rows(n) @ k_t).reshape(3, n)  # Σ_j T'_kj r̂_kj,a
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
        return jax.vmap(lin)(jnp.asarray(onehot))


# -- everything else: exact autodiff ---------------------------------------------------


def _autodiff_part(term, wrt):
    """(∇E, ζ) of any term by ``jax.linearize`` of its gradient, vmapped over the P tangents.

    linearize evaluates the primal (and the residuals the tangent map needs) once; only
    the linear map runs P times. Used for OBC2 and CustomTerm (new functional forms).
    """
    grad_x = jax.grad(term.energy, argnums=0)

    def part(x, params, dx):
        onehot = jnp.zeros((wrt.shape[0], params.shape[0]), params.dtype)
        onehot = onehot.at[np.arange(wrt.shape[0]), wrt].set(1.0)
        grad, lin = jax.linearize(grad_x, x, params)
        return grad, jax.vmap(lin)(dx, onehot)

    return part
