"""Bonded terms with OpenMM's functional forms.

* HarmonicBondForce:    E = 1/2 k (r - r0)^2
* HarmonicAngleForce:   E = 1/2 k (θ - θ0)^2
* PeriodicTorsionForce: E = k (1 + cos(n φ - φ0)), propers and impropers alike

The scalar forms (:func:`harmonic`, :func:`periodic`) are functions of one internal
coordinate, elementwise over arrays; the energies below and the structured derivatives
(``timemachine.structured``) both call them, so each formula is written once.
"""

import jax.numpy as jnp


def _norm(v):
    return jnp.sqrt(jnp.sum(v * v, axis=-1))


def harmonic(q, q0, k):
    """Harmonic form 1/2 k (q - q0)², elementwise, kJ/mol (q in nm or rad, k to match)."""
    return 0.5 * k * (q - q0) ** 2


def periodic(phi, periodicity, phase, k):
    """Periodic torsion form k (1 + cos(n φ - φ0)), elementwise, kJ/mol (φ, φ0 in rad)."""
    return k * (1.0 + jnp.cos(periodicity * phi - phase))


def harmonic_bond(x, idx, length, k):
    """Harmonic bond energy.

    Args:
      x: (N, 3) positions, nm.
      idx: (B, 2) int atom indices.
      length: (B,) equilibrium lengths r0, nm.
      k: (B,) force constants, kJ/mol/nm^2.
    Returns: scalar energy, kJ/mol.
    """
    r = _norm(x[idx[:, 1]] - x[idx[:, 0]])
    return jnp.sum(harmonic(r, length, k))


def bond_angle(x, idx):
    """Angles (A,) in radians at atom idx[:, 1]; atan2 keeps the gradient finite at 0 and π."""
    u = x[idx[:, 0]] - x[idx[:, 1]]
    w = x[idx[:, 2]] - x[idx[:, 1]]
    return jnp.arctan2(_norm(jnp.cross(u, w)), jnp.sum(u * w, axis=-1))


def harmonic_angle(x, idx, theta0, k):
    """Harmonic angle energy.

    Args:
      x: (N, 3) positions, nm.
      idx: (A, 3) int atom indices, the vertex in the middle.
      theta0: (A,) equilibrium angles, radians.
      k: (A,) force constants, kJ/mol/rad^2.
    Returns: scalar energy, kJ/mol.
    """
    return jnp.sum(harmonic(bond_angle(x, idx), theta0, k))


def dihedral_angle(x, idx):
    """Dihedral angles (T,) in radians, IUPAC sign convention (as OpenMM and mdtraj).

    Args:
      x: (N, 3) positions, nm.
      idx: (T, 4) int atom indices.
    """
    b1 = x[idx[:, 1]] - x[idx[:, 0]]
    b2 = x[idx[:, 2]] - x[idx[:, 1]]
    b3 = x[idx[:, 3]] - x[idx[:, 2]]
    n1 = jnp.cross(b1, b2)
    n2 = jnp.cross(b2, b3)
    y = _norm(b2) * jnp.sum(b1 * n2, axis=-1)
    return jnp.arctan2(y, jnp.sum(n1 * n2, axis=-1))


def periodic_torsion(x, idx, periodicity, phase, k):
    """Periodic torsion energy, proper or improper.

    Args:
      x: (N, 3) positions, nm.
      idx: (T, 4) int atom indices.
      periodicity: (T,) multiplicities n (ints or floats).
      phase: (T,) phase offsets φ0, radians.
      k: (T,) barrier constants, kJ/mol.
    Returns: scalar energy, kJ/mol.
    """
    phi = dihedral_angle(x, idx)
    return jnp.sum(periodic(phi, periodicity, phase, k))
