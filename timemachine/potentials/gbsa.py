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
