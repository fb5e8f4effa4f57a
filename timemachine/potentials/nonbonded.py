"""Lennard-Jones + Coulomb over all pairs, no cutoff, as OpenMM's NonbondedForce(NoCutoff).

Pairs are evaluated densely as (N, N) matrices: for the molecule sizes this engine
targets that is cheap, and it is the layout the structured Hessian contractions of
``timemachine.sensitivity`` need. Excluded pairs (1-2, 1-3, and 1-4 which are re-added
scaled) are masked out, never subtracted, so no precision is lost.

Lorentz-Berthelot combination: σ_ij = (σ_i + σ_j)/2, ε_ij = sqrt(ε_i ε_j).
"""

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.constants import COULOMB


@jax.custom_jvp
def safe_sqrt(a):
    """sqrt with derivative 0 at a == 0 instead of inf.

    ε = 0 (hydrogens in amber) would otherwise poison forward-mode tangents with 0·inf.
    """
    return jnp.sqrt(a)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    s = jnp.sqrt(a)
    return s, jnp.where(a > 0, da / (2.0 * jnp.where(a > 0, s, 1.0)), 0.0)


def lj_coulomb(r, sigma, epsilon, qq):
    """LJ + Coulomb pair form 4ε((σ/r)¹² - (σ/r)⁶) + k_e qq/r, elementwise, kJ/mol.

    r, σ in nm; ε in kJ/mol; qq the charge product in e². The all-pairs energy, the 1-4
    exceptions and the structured derivatives (``timemachine.structured``) call it.
    """
    s6 = (sigma / r) ** 6
    return 4.0 * epsilon * (s6 * s6 - s6) + COULOMB * qq / r


def pair_distances(x):
    """(N, N) distance matrix with ones on the diagonal (so 1/r stays finite there)."""
    n = x.shape[0]
    d = x[:, None, :] - x[None, :, :]
    eye = jnp.eye(n, dtype=x.dtype)
    return jnp.sqrt(jnp.sum(d * d, axis=-1) + eye)


def full_strength_mask(n, excluded) -> np.ndarray:
    """(N, N) bool numpy mask of the pairs at full strength: every i ≠ j but the
    ``excluded`` (X, 2) pairs (either order), i.e. ``nonbonded_all_pairs``' pair_mask."""
    mask = ~np.eye(n, dtype=bool)
    pairs = np.asarray(excluded, dtype=np.int64).reshape(-1, 2)
    mask[pairs[:, 0], pairs[:, 1]] = mask[pairs[:, 1], pairs[:, 0]] = False
    return mask


def nonbonded_all_pairs(x, charge, sigma, epsilon, pair_mask):
    """LJ + Coulomb energy summed over every unordered pair (i, j) with pair_mask[i, j].

    Args:
      x: (N, 3) positions, nm.
      charge: (N,) partial charges, e.
      sigma: (N,) LJ diameters, nm.
      epsilon: (N,) LJ well depths, kJ/mol.
      pair_mask: (N, N) float or bool, symmetric, zero on the diagonal and for excluded pairs.
    Returns: scalar energy, kJ/mol.
    """
    r = pair_distances(x)
    sig = 0.5 * (sigma[:, None] + sigma[None, :])
    sqrt_eps = safe_sqrt(epsilon)
    eps = sqrt_eps[:, None] * sqrt_eps[None, :]
    qq = charge[:, None] * charge[None, :]
    return 0.5 * jnp.sum(jnp.where(pair_mask, lj_coulomb(r, sig, eps, qq), 0.0))


def exception_pair(r, charge_i, charge_j, sigma_i, sigma_j, eps_i, eps_j, coulomb_scale, lj_scale):
    """One scaled 1-4 pair from per-atom parameters, elementwise, kJ/mol (OpenMM's rules:
    chargeProd = coulomb_scale q_i q_j, σ = (σ_i + σ_j)/2, ε = lj_scale sqrt(ε_i ε_j))."""
    eps = lj_scale * safe_sqrt(eps_i) * safe_sqrt(eps_j)
    return lj_coulomb(r, 0.5 * (sigma_i + sigma_j), eps, coulomb_scale * charge_i * charge_j)


def nonbonded_exceptions(x, idx, charge, sigma, epsilon, coulomb_scale, lj_scale):
    """Scaled 1-4 interactions, OpenMM's NonbondedForce exceptions.

    chargeProd = coulomb_scale q_i q_j, σ = (σ_i + σ_j)/2, ε = lj_scale sqrt(ε_i ε_j).

    Args:
      x: (N, 3) positions, nm.
      idx: (E, 2) int atom pairs.
      charge, sigma, epsilon: (N,) per-atom parameters (e, nm, kJ/mol).
      coulomb_scale, lj_scale: (E,) or scalar scale factors.
    Returns: scalar energy, kJ/mol.
    """
    i, j = idx[:, 0], idx[:, 1]
    d = x[j] - x[i]
    r = jnp.sqrt(jnp.sum(d * d, axis=-1))
    return jnp.sum(
        exception_pair(
            r,
            charge[i],
            charge[j],
            sigma[i],
            sigma[j],
            epsilon[i],
            epsilon[j],
            coulomb_scale,
            lj_scale,
        )
    )
