"""OBC2 generalized Born implicit solvent, as OpenMM's ``implicit/obc2.xml`` defines it.

OpenMM 8 builds it as a CustomGBForce (``openmm.app.internal.customgbforces.GBSAOBC2Force``,
Amber igb=5) with per-atom parameters (charge, or, sr): offset radius or = radius - 0.009 nm
and scaled offset radius sr = scale * or. We implement exactly those expressions:

    I_i = Σ_{j≠i} [r + sr_j > or_i] · ½ (1/L - 1/U + ¼ (r - sr_j²/r)(1/U² - 1/L²) + ½ ln(L/U)/r)
          U = r + sr_j,  L = max(or_i, |r - sr_j|)
    ψ_i = I_i or_i
    B_i = 1 / (1/or_i - tanh(ψ - 0.8 ψ² + 4.85 ψ³) / radius_i)
    E   = -½ k_GB (1/ε_in - 1/ε_out) Σ_i q_i²/B_i                       (self)
          + Σ_i 28.3919551 (radius_i + 0.14)² (radius_i/B_i)^6           (ACE surface area)
          - k_GB (1/ε_in - 1/ε_out) Σ_{i<j} q_i q_j / f_ij                (pairs)
    f_ij = sqrt(r² + B_i B_j exp(-r²/(4 B_i B_j)))

With a cutoff r_c (OpenMM's ``CutoffNonPeriodic``: obc2.xml passes ``nonbondedCutoff`` to
GBSAOBC2Force, which shifts the pair expression, and the CustomGBForce skips every pair with
r ≥ r_c both in its ParticlePair computed value I and in its ParticlePairNoExclusions
energy; the native GBSAOBCForce, ReferenceObc.cpp, does the same, skipping r > r_c), only
pairs with r < r_c enter I_i and the pair sum, and the pair term is shifted by -1/r_c:

    E_pair = -k_GB (1/ε_in - 1/ε_out) Σ_{i<j, r<r_c} q_i q_j (1/f_ij - 1/r_c)

The self and ACE terms are unchanged. As in OpenMM, neither the energy nor its gradient is
continuous at r_c: a pair's share of I_i (so the Born radii) stops abruptly there, and the
shifted pair term 1/f_ij - 1/r_c is only nearly zero at r = r_c (f_ij > r; f_ij → r for
r ≫ √(B_i B_j)).
"""

import math

import jax
import jax.numpy as jnp

from timemachine.constants import COULOMB_GB
from timemachine.errors import InputError
from timemachine.potentials.cutoffs import _row_blocks
from timemachine.potentials.nonbonded import pair_distances

DIELECTRIC_OFFSET = 0.009  # nm
PROBE_RADIUS = 0.14  # nm
ACE_FACTOR = 28.3919551  # kJ/mol/nm^2, 4π × 2.25936
OBC2_ALPHA, OBC2_BETA, OBC2_GAMMA = 1.0, 0.8, 4.85


def born_integral(r, or_i, sr_j):
    """The OBC pair integrand T(r; or_i, sr_j) of I_i (without the step [r + sr_j > or_i]),
    elementwise, 1/nm."""
    upper = r + sr_j
    lower = jnp.maximum(or_i, jnp.abs(r - sr_j))
    return 0.5 * (
        1.0 / lower
        - 1.0 / upper
        + 0.25 * (r - sr_j**2 / r) * (1.0 / upper**2 - 1.0 / lower**2)
        + 0.5 * jnp.log(lower / upper) / r
    )


def born_radius(psi, offset_r, radius):
    """Effective Born radius B(ψ) = 1 / (1/or - tanh(αψ - βψ² + γψ³)/radius), nm."""
    tanh_sum = jnp.tanh(OBC2_ALPHA * psi - OBC2_BETA * psi**2 + OBC2_GAMMA * psi**3)
    return 1.0 / (1.0 / offset_r - tanh_sum / radius)


def gb_self(born, charge, radius, pre):
    """One atom's self energy ½ pre q²/B plus its ACE surface term, kJ/mol;
    pre = -k_GB (1/ε_in - 1/ε_out), kJ nm/mol/e²."""
    ace = ACE_FACTOR * (radius + PROBE_RADIUS) ** 2 * (radius / born) ** 6
    return 0.5 * pre * charge**2 / born + ace


def gb_pair(r, born_i, born_j, pre):
    """The GB pair energy per unit charge product, pre / f_ij, kJ/mol/e²."""
    bb = born_i * born_j
    return pre / jnp.sqrt(r * r + bb * jnp.exp(-r * r / (4.0 * bb)))


def gb_prefactor(solute_dielectric, solvent_dielectric):
    """pre = -k_GB (1/ε_in - 1/ε_out), kJ nm/mol/e², with OpenMM's k_GB (``COULOMB_GB``)."""
    return -COULOMB_GB * (1.0 / solute_dielectric - 1.0 / solvent_dielectric)


def check_cutoff(cutoff, where="cutoff"):
    """``cutoff`` as a float: None (all pairs) or a finite number > 0, nm; InputError
    naming ``where`` and the value otherwise."""
    if cutoff is None:
        return None
    if (
        isinstance(cutoff, bool)
        or not isinstance(cutoff, (int, float))
        or not math.isfinite(cutoff)
        or not cutoff > 0
    ):
        raise InputError(f"{where} must be None or a finite number > 0 (nm), got {cutoff!r}")
    return float(cutoff)


def obc2_born_radii(x, radius, scale, cutoff=None):
    """Effective Born radii B (N,), nm.

    Args:
      x: (N, 3) positions, nm.
      radius: (N,) intrinsic (mbondi2) radii, nm.
      scale: (N,) OBC screening factors, dimensionless.
      cutoff: None (all pairs) or r_c, nm (a Python number): only pairs with r < r_c
        enter the Born integral I_i, as OpenMM's CutoffNonPeriodic.
    """
    cutoff = check_cutoff(cutoff)
    n = x.shape[0]
    r = pair_distances(x)  # ones on the diagonal
    offset_r = radius - DIELECTRIC_OFFSET
    sr = scale * offset_r
    or_i = offset_r[:, None]
    sr_j = sr[None, :]
    term = born_integral(r, or_i, sr_j)
    use = (r + sr_j - or_i >= 0.0) & ~jnp.eye(n, dtype=bool)
    if cutoff is not None:
        use = use & (r < cutoff)
    psi = jnp.sum(jnp.where(use, term, 0.0), axis=1) * offset_r
    return born_radius(psi, offset_r, radius)


def obc2_energy(
    x, charge, radius, scale, solute_dielectric=1.0, solvent_dielectric=78.5, cutoff=None
):
    """OBC2 solvation energy (polar GB + ACE non-polar), kJ/mol.

    Args:
      x: (N, 3) positions, nm.
      charge: (N,) partial charges, e (the same as the NonbondedForce's).
      radius: (N,) intrinsic radii, nm.
      scale: (N,) screening factors.
      solute_dielectric, solvent_dielectric: ε_in, ε_out.
      cutoff: None (all pairs, the default) or r_c, nm (a Python number): OpenMM's
        CutoffNonPeriodic GB, pairs with r < r_c only, in the Born radii and in the pair
        sum, whose term is shifted to pre q_i q_j (1/f_ij - 1/r_c).
    Cost O(N²) time and memory (N × N pair arrays), with or without the cutoff.
    """
    cutoff = check_cutoff(cutoff)
    n = x.shape[0]
    born = obc2_born_radii(x, radius, scale, cutoff)
    pre = gb_prefactor(solute_dielectric, solvent_dielectric)
    e_self = jnp.sum(gb_self(born, charge, radius, pre))
    r = pair_distances(x)
    qq = charge[:, None] * charge[None, :]
    off_diag = ~jnp.eye(n, dtype=bool)
    h = gb_pair(r, born[:, None], born[None, :], pre)
    if cutoff is not None:
        h = h - pre / cutoff
        off_diag = off_diag & (r < cutoff)
    e_pair = 0.5 * jnp.sum(jnp.where(off_diag, qq * h, 0.0))
    return e_self + e_pair


# --------------------------------------------------------------- on a Verlet list (cutoff)


def _list_rows(x, rows, j, cutoff):
    """The pairs of atoms ``rows`` (B,) with their listed partners j (B, K) (N for none):
    the displacement components d_k = x_i,k - x_j,k (three (B, K) arrays), ``inside``
    (listed and r < r_c), r (1 outside) and j with the padding replaced by 0."""
    n = x.shape[0]
    valid = j < n
    j = jnp.where(valid, j, 0)
    d = [x[rows, k][:, None] - x[j, k] for k in range(3)]
    r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    inside = valid & (r2 < cutoff * cutoff)
    return d, inside, jnp.sqrt(jnp.where(inside, r2, 1.0)), j


def _born_term_and_slope(r, or_i, sr_j, inside):
    """The Born integrand T(r; or_i, sr_j) with its step [r + sr_j ≥ or_i] and the list's
    ``inside``, and dT/dr (elementwise, forward mode), zero where a pair does not count."""
    use = inside & (r + sr_j - or_i >= 0.0)
    term, slope = jax.jvp(lambda s: born_integral(s, or_i, sr_j), (r,), (jnp.ones_like(r),))
    zero = jnp.zeros_like(r)
    return jnp.where(use, term, zero), jnp.where(use, slope, zero)


def _pair_and_slopes(r, born_i, born_j, qq, pre, cutoff, inside):
    """q_i q_j (pre/f_ij - pre/r_c), its derivatives by r and by B_i, zero outside."""
    bb = born_i * born_j
    decay = jnp.exp(-r * r / (4.0 * bb))
    f2 = r * r + bb * decay
    inv_f = 1.0 / jnp.sqrt(f2)
    dh_df2 = -0.5 * pre * qq * inv_f * inv_f * inv_f  # d(pre qq / f)/d(f²)
    zero = jnp.zeros_like(r)
    energy = jnp.where(inside, qq * pre * (inv_f - 1.0 / cutoff), zero)
    d_r = jnp.where(inside, dh_df2 * r * (2.0 - 0.5 * decay), zero)
    d_born_i = jnp.where(inside, dh_df2 * born_j * decay * (1.0 + r * r / (4.0 * bb)), zero)
    return energy, d_r, d_born_i


def _pair_block(x, charge, born, pre, cutoff, i, j):
    """A row block's pairs (``_list_rows``) and their GB pair energies and slopes
    (``_pair_and_slopes``): (d, inside, r, j, energy, d/dr, d/dB_i)."""
    d, inside, r, j = _list_rows(x, i, j, cutoff)
    qq = charge[i][:, None] * charge[j]
    return (d, inside, r, j,
            *_pair_and_slopes(r, born[i][:, None], born[j], qq, pre, cutoff, inside))  # fmt: skip


def _list_born_radii(x, offset_r, sr, radius, neighbours, cutoff, pairs_per_block):
    """(B (N,), dB/dI (N,)): the Born radii from I_i summed over row i of the list."""
    n = x.shape[0]
    rows, table = _row_blocks(neighbours, 1, pairs_per_block)

    def one_block(args):
        i, j = args
        _, inside, r, j = _list_rows(x, i, j, cutoff)
        term, _ = _born_term_and_slope(r, offset_r[i][:, None], sr[j], inside)
        return jnp.sum(term, axis=1)

    integral = jax.lax.map(one_block, (rows, table)).reshape(-1)[:n]
    return jax.jvp(lambda s: born_radius(s * offset_r, offset_r, radius), (integral,),
                   (jnp.ones_like(integral),))  # fmt: skip


def obc2_neighbour_energy(x, charge, radius, scale, neighbours, cutoff,
                          solute_dielectric=1.0, solvent_dielectric=78.5,
                          pairs_per_block=1 << 18):  # fmt: skip
    """``obc2_energy`` with its cutoff, summed over a Verlet list of every pair
    (``cutoffs.build_neighbours`` with ``allowed`` None) instead of all N² pairs: O(N K).
    Exact when the list is fresh (no atom moved more than skin/2 since it was built; the
    pairs beyond the cutoff count for nothing either way); NaN when it overflowed.

    Args:
      x: (N, 3) nm; charge, radius, scale: (N,) e, nm, 1; neighbours: a
      ``cutoffs.Neighbours``; cutoff: r_c, nm.
    Returns: scalar, kJ/mol.
    """
    offset_r = radius - DIELECTRIC_OFFSET
    sr = scale * offset_r
    born, _ = _list_born_radii(x, offset_r, sr, radius, neighbours, cutoff, pairs_per_block)
    pre = gb_prefactor(solute_dielectric, solvent_dielectric)
    rows, table = _row_blocks(neighbours, 1, pairs_per_block)

    def one_block(args):
        return jnp.sum(_pair_block(x, charge, born, pre, cutoff, *args)[4])

    e_pair = 0.5 * jnp.sum(jax.lax.map(jax.checkpoint(one_block), (rows, table)))
    e = jnp.sum(gb_self(born, charge, radius, pre)) + e_pair
    return e * jnp.where(neighbours.overflow, jnp.nan, 1.0)


def obc2_neighbour_gradient(x, charge, radius, scale, neighbours, cutoff,
                            solute_dielectric=1.0, solvent_dielectric=78.5,
                            pairs_per_block=1 << 18):  # fmt: skip
    """∇_x of ``obc2_neighbour_energy``, (N, 3) kJ/mol/nm, written out in three passes
    over the list's rows (each pair is in both atoms' rows, so no scatter runs):

    1. I_i = Σ_j T(r_ij; or_i, sr_j), so B_i and dB_i/dI_i;
    2. c_i = dE/dI_i = (∂E_self/∂B_i + Σ_j q_i q_j ∂h_ij/∂B_i) dB_i/dI_i;
    3. ∇_i E = Σ_j [q_i q_j ∂h_ij/∂r + c_i T'(r; or_i, sr_j) + c_j T'(r; or_j, sr_i)] d_ij/r.

    Differentiable by forward mode (ζ's Hessian-vector products and mixed partials), all
    gathers. Arguments as ``obc2_neighbour_energy``'s.
    """
    n = x.shape[0]
    offset_r = radius - DIELECTRIC_OFFSET
    sr = scale * offset_r
    born, dborn = _list_born_radii(x, offset_r, sr, radius, neighbours, cutoff,
                                   pairs_per_block)  # fmt: skip
    pre = gb_prefactor(solute_dielectric, solvent_dielectric)
    rows, table = _row_blocks(neighbours, 1, pairs_per_block)

    def pair_born_slope(args):
        return jnp.sum(_pair_block(x, charge, born, pre, cutoff, *args)[6], axis=1)

    _, self_slope = jax.jvp(lambda b: gb_self(b, charge, radius, pre), (born,),
                            (jnp.ones_like(born),))  # fmt: skip
    pair_slope = jax.lax.map(pair_born_slope, (rows, table)).reshape(-1)[:n]
    c = (self_slope + pair_slope) * dborn

    def gradient_rows(args):
        i = args[0]
        d, inside, r, j, _, d_r, _ = _pair_block(x, charge, born, pre, cutoff, *args)
        _, slope_i = _born_term_and_slope(r, offset_r[i][:, None], sr[j], inside)
        _, slope_j = _born_term_and_slope(r, offset_r[j], sr[i][:, None], inside)
        w = (d_r + c[i][:, None] * slope_i + c[j] * slope_j) / r
        return jnp.stack([jnp.sum(w * dk, axis=1) for dk in d], axis=1)

    grad = jax.lax.map(gradient_rows, (rows, table)).reshape(-1, 3)[:n]
    return grad * jnp.where(neighbours.overflow, jnp.nan, 1.0)


def _radial(fn, r):
    """(f, f', f'') of an elementwise function of r, by nested forward mode."""
    ones = jnp.ones_like(r)

    def first(s):
        return jax.jvp(fn, (s,), (ones,))

    (value, slope), (_, curvature) = jax.jvp(first, (r,), (ones,))
    return value, slope, curvature


def _pair_partials(r, born_i, born_j, qq, pre):
    """The partial derivatives of one pair's h = pre q_i q_j / f_ij (elementwise, nested
    forward mode): {"r", "i", "rr", "ri", "rj", "ii", "ij"} (i, j: by B_i, B_j)."""

    def h(rr, bi, bj):
        return qq * gb_pair(rr, bi, bj, pre)

    primal = tuple(jnp.broadcast_arrays(r, born_i, born_j))
    ones, zero = jnp.ones_like(primal[0]), jnp.zeros_like(primal[0])
    basis = {"r": (ones, zero, zero), "i": (zero, ones, zero), "j": (zero, zero, ones)}

    def partial(a):
        return lambda *args: jax.jvp(h, args, basis[a])[1]

    out = {a: partial(a)(*primal) for a in ("r", "i")}
    for a, b in (("r", "r"), ("r", "i"), ("r", "j"), ("i", "i"), ("i", "j")):
        out[a + b] = jax.jvp(partial(a), primal, basis[b])[1]
    return out


def obc2_neighbour_gradient_and_zeta(x, charge, radius, scale, neighbours, cutoff, tangents,
                                     solute_dielectric=1.0, solvent_dielectric=78.5,
                                     elements_per_block=1 << 17):  # fmt: skip
    """∇_x E (N, 3) and the Hessian-vector products H·t_p (P, N, 3) of
    ``obc2_neighbour_energy`` for all P tangents at once, from per-pair scalars and the
    Born-radius chain (the structure of ``structured.obc2``, on the list's rows). With
    δr_ij = d_ij·(t_i - t_j)/r_ij along a tangent t, three passes over the rows:

    1. I_i = Σ_j T_ij and δI_i = Σ_j T'_ij δr_ij (T_ij = T(r; or_i, sr_j)), so B_i, and
       δB_i = B'(I_i) δI_i;
    2. β_i = ∂E/∂B_i = e'_i + Σ_j h_i(ij), δβ_i = (e''_i + Σ_j h_ii) δB_i
       + Σ_j (h_ij δB_j + h_ri δr_ij); c_i = β_i B'_i (dE/dI_i) and
       δc_i = δβ_i B'_i + β_i B''_i δI_i;
    3. with φ_ij = h_r + c_i T'_ij + c_j T'_ji (dE/dr_ij), ∇_i E = Σ_j φ_ij d_ij / r and
       δ∇_i E = Σ_j [(δφ_ij - φ_ij δr_ij / r) d_ij + φ_ij (t_i - t_j)] / r,
       δφ_ij = (h_rr + c_i T''_ij + c_j T''_ji) δr_ij + h_ri δB_i + h_rj δB_j
       + T'_ij δc_i + T'_ji δc_j,

    h the pair energy q_i q_j pre (1/f_ij - 1/r_c) and its partials by r, B_i and B_j, e_i
    the self + ACE energy. Each pass contracts (B, K) pair scalars with the (P, B, K)
    tangent differences; gathers only, no scatter. The mixed partials ∂²E/∂x∂θ are not
    here (the caller's, ``OBC2.gradient_and_zeta``).

    Args:
      x: (N, 3) nm; charge, radius, scale: (N,) e, nm, 1; neighbours: a fresh list of
      every pair (``cutoffs.Neighbours``); cutoff: r_c, nm; tangents: (P, N, 3).
      elements_per_block: P · rows · K per block, the size of one (B, K, P) array: small
        enough for the block's arrays to stay in cache (2¹⁷ was 2.8× faster than 2²² on
        villin, P = 20).
    Returns: (grad (N, 3) kJ/mol/nm, H·t (P, N, 3) kJ/mol/nm²·[t]), NaN on an overflow.
    """
    n = x.shape[0]
    p = tangents.shape[0]
    offset_r = radius - DIELECTRIC_OFFSET
    sr = scale * offset_r
    pre = gb_prefactor(solute_dielectric, solvent_dielectric)
    rows, table = _row_blocks(neighbours, max(p, 1), elements_per_block)
    # every per-atom tangent quantity with P last: a row of the list then gathers whole
    # (C·P,) rows of it (contiguous copies) and the pair arithmetic runs along P, where
    # (P, B, K) elementwise gathers cost XLA on CPU several times the arithmetic
    tan = jnp.moveaxis(tangents, 0, -1)  # (N, 3, P)

    def per_atom(*extra):
        """(N, (3 + len(extra)) P): the tangents and the per-atom (N, P) arrays ``extra``
        side by side, built once per pass (outside its map over the blocks)."""
        return jnp.concatenate([tan.reshape(n, 3 * p), *extra], axis=1)

    def geometry(i, j, atoms, extra=0):
        """The block's pairs, each tangent's δr_ij r_ij = d_ij·(t_i - t_j) (B, K, P), and
        the partners' rows of the ``extra`` (N, P) arrays after the tangents in ``atoms``
        (``per_atom``'s)."""
        d, inside, r, j = _list_rows(x, i, j, cutoff)
        rows_j = atoms[j]
        t_j = rows_j[..., : 3 * p].reshape(*j.shape, 3, p)
        t_i = tan[i]  # (B, 3, P)
        s = sum(d[k][..., None] * (t_i[:, None, k] - t_j[:, :, k]) for k in range(3))
        rest = [rows_j[..., 3 * p + m * p : 3 * p + (m + 1) * p] for m in range(extra)]
        return d, inside, r, j, s, t_i, t_j, rest

    def born_terms(r, i, j, inside, swap=False):
        """(T, T', T'') of T(r; or_i, sr_j) (or T(r; or_j, sr_i) when ``swap``), masked."""
        or_, sr_ = (offset_r[j], sr[i][:, None]) if swap else (offset_r[i][:, None], sr[j])
        use = inside & (r + sr_ - or_ >= 0.0)
        zero = jnp.zeros_like(r)
        return [jnp.where(use, v, zero)
                for v in _radial(lambda s: born_integral(s, or_, sr_), r)]  # fmt: skip

    tangent_rows = per_atom()

    def integrals(args):
        i, j = args
        _, inside, r, j, s, _, _, _ = geometry(i, j, tangent_rows)
        t0, t1, _ = born_terms(r, i, j, inside)
        t0, t1 = jax.lax.optimization_barrier((t0, t1))
        return jnp.sum(t0, axis=1), jnp.sum((t1 / r)[..., None] * s, axis=1)

    def unblock(v):  # (nb, B[, P]) -> (N[, P])
        return v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])[:n]

    i_sum, di_sum = (unblock(v) for v in jax.lax.map(integrals, (rows, table)))
    born, b1, b2 = _radial(lambda s: born_radius(s * offset_r, offset_r, radius), i_sum)
    dborn = b1[:, None] * di_sum  # (N, P)

    def pair_scalars(i, j, r, inside):
        qq = charge[i][:, None] * charge[j]
        h = _pair_partials(r, born[i][:, None], born[j], qq, pre)
        zero = jnp.zeros_like(r)
        return {k: jnp.where(inside, v, zero) for k, v in h.items()}

    chain_rows = per_atom(dborn)

    def chain(args):
        i, j = args
        _, inside, r, j, s, _, _, (db_j,) = geometry(i, j, chain_rows, 1)
        h = pair_scalars(i, j, r, inside)
        w_ij, w_ri = jax.lax.optimization_barrier((h["ij"], h["ri"] / r))
        ddb = jnp.sum(w_ij[..., None] * db_j + w_ri[..., None] * s, axis=1)
        return jnp.sum(h["i"], axis=1), jnp.sum(h["ii"], axis=1), ddb

    h_i, h_ii, ddb = (unblock(v) for v in jax.lax.map(chain, (rows, table)))
    _, e1, e2 = _radial(lambda b: gb_self(b, charge, radius, pre), born)
    beta = e1 + h_i
    dbeta = (e2 + h_ii)[:, None] * dborn + ddb
    c = beta * b1
    dc = dbeta * b1[:, None] + (beta * b2)[:, None] * di_sum  # (N, P)

    force_rows = per_atom(dborn, dc)

    def forces(args):
        i, j = args
        d, inside, r, j, s, t_i, t_j, (db_j, dc_j) = geometry(i, j, force_rows, 2)
        h = pair_scalars(i, j, r, inside)
        _, ti1, ti2 = born_terms(r, i, j, inside)
        _, tj1, tj2 = born_terms(r, i, j, inside, swap=True)
        inv_r = 1.0 / r
        phi = h["r"] + c[i][:, None] * ti1 + c[j] * tj1
        phi_r = phi * inv_r
        # δφ/r - φ δr/r² = a δr r + the B and c parts / r
        a = ((h["rr"] + c[i][:, None] * ti2 + c[j] * tj2) - phi_r) * inv_r * inv_r
        w_rj, w_tj = h["rj"] * inv_r, tj1 * inv_r
        own_b, own_c = h["ri"] * inv_r, ti1 * inv_r  # × δB_i, δc_i: row-constant
        a, phi_r, w_rj, w_tj, own_b, own_c = jax.lax.optimization_barrier(
            (a, phi_r, w_rj, w_tj, own_b, own_c))  # fmt: skip
        grad = jnp.stack([jnp.sum(phi_r * dk, axis=1) for dk in d], axis=1)  # (B, 3)
        coef = a[..., None] * s + w_rj[..., None] * db_j + w_tj[..., None] * dc_j  # (B, K, P)
        phi_sum = jnp.sum(phi_r, axis=1)[:, None]
        hvp = []
        for k in range(3):
            rows_b = jnp.sum(own_b * d[k], axis=1)[:, None]  # Σ_j h_ri d_ij,k / r
            rows_c = jnp.sum(own_c * d[k], axis=1)[:, None]
            hvp.append(jnp.sum(coef * d[k][..., None] - phi_r[..., None] * t_j[:, :, k], axis=1)
                       + t_i[:, k] * phi_sum + dborn[i] * rows_b + dc[i] * rows_c)  # fmt: skip
        return grad, jnp.stack(hvp, axis=1)  # (B, 3), (B, 3, P)

    g_blocks, z_blocks = jax.lax.map(forces, (rows, table))
    bad = jnp.where(neighbours.overflow, jnp.nan, 1.0)
    grad = g_blocks.reshape(-1, 3)[:n]
    hvp = jnp.moveaxis(z_blocks.reshape(rows.size, 3, p)[:n], -1, 0)
    return grad * bad, hvp * bad
