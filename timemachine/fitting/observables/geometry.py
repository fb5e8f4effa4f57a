"""Geometric observables of one configuration: radius of gyration, NOE distances (r⁻ᵖ
averaged over atom groups) and dihedral angles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError
from timemachine.fitting.observables.base import Observable, _indices
from timemachine.potentials.bonded import dihedral_angle

__all__ = ["Dihedral", "NOEDistance", "RadiusOfGyration"]


class RadiusOfGyration(Observable):
    """Radius of gyration, nm, K = 1, label "Rg".

    Rg = sqrt(Σ_i m_i |x_i - x_c|² / Σ_i m_i), x_c the mass-weighted centre, over the
    selected atoms.

    Args:
        masses: (N,) amu of every atom (indexed by ``atoms``), or (len(atoms),) of the
            selected ones; None weights all atoms equally.
        atoms: (n,) int atom indices; None means every atom.
    """

    def __init__(self, masses=None, atoms=None, label: str = "Rg"):
        self.atoms = None if atoms is None else _indices(atoms, "RadiusOfGyration.atoms", 1)
        if masses is not None:
            m = np.asarray(masses, dtype=np.float64)
            if m.ndim != 1 or not (np.isfinite(m) & (m > 0)).all():
                raise InputError(
                    f"RadiusOfGyration.masses must be 1-D, finite and > 0 (amu), got {m!r}"
                )
            if self.atoms is not None and m.shape[0] != self.atoms.shape[0]:
                if self.atoms.max() >= m.shape[0]:
                    raise InputError(
                        f"RadiusOfGyration: atom {int(self.atoms.max())} selected but masses "
                        f"has only {m.shape[0]} entries"
                    )
                m = m[self.atoms]
            masses = m
        self.masses = masses
        self.labels = (label,)
        self._max_index = -1 if self.atoms is None else int(self.atoms.max())

    def _evaluate(self, x):
        sel = x if self.atoms is None else x[self.atoms]
        if self.masses is None:
            w = jnp.full(sel.shape[0], 1.0 / sel.shape[0])
        else:
            if self.masses.shape[0] != sel.shape[0]:
                raise InputError(
                    f"RadiusOfGyration has {self.masses.shape[0]} masses for {sel.shape[0]} atoms"
                )
            w = jnp.asarray(self.masses / self.masses.sum())
        centre = w @ sel
        return jnp.sqrt(w @ jnp.sum((sel - centre) ** 2, axis=1))[None]


class NOEDistance(Observable):
    """NOE distances with r⁻ᵖ averaging over atom groups, nm, one value per restraint.

    d_k = (Σ_{i∈A_k, j∈B_k} r_ij⁻ᵖ / (|A_k| |B_k|))^(-1/p), p = 6 (or 3), for restraint k
    between groups A_k and B_k (degenerate protons, methyls).

    Args:
        groups_a, groups_b: K lists of atom indices each (a single int is a group of one).
        power: 6 or 3.
        labels: optional K names; default "NOE a-b" with the atom indices (joined by ",").
    """

    def __init__(self, groups_a, groups_b, power=6, labels=None):
        if power not in (3, 6):
            raise InputError(f"NOEDistance.power must be 6 or 3, got {power!r}")
        if len(groups_a) != len(groups_b) or len(groups_a) == 0:
            raise InputError(
                f"NOEDistance needs as many groups_a as groups_b (one per restraint, >= 1), "
                f"got {len(groups_a)} and {len(groups_b)}"
            )
        rows, cols, owner, names = [], [], [], []
        for k, (ga, gb) in enumerate(zip(groups_a, groups_b, strict=True)):
            a = _indices(np.atleast_1d(ga), f"NOE restraint {k} group a", 1)
            b = _indices(np.atleast_1d(gb), f"NOE restraint {k} group b", 1)
            i, j = np.meshgrid(a, b, indexing="ij")
            if (i == j).any():
                raise InputError(
                    f"NOE restraint {k}: atom {int(i[i == j][0])} is in both groups (r = 0)"
                )
            rows.append(i.ravel())
            cols.append(j.ravel())
            owner.append(np.full(i.size, k))
            names.append(f"NOE {','.join(map(str, a))}-{','.join(map(str, b))}")
        self.power = int(power)
        self.i = np.concatenate(rows)
        self.j = np.concatenate(cols)
        self.restraint = np.concatenate(owner)
        self.n_pairs = np.bincount(self.restraint).astype(np.float64)
        self.labels = tuple(names) if labels is None else tuple(labels)
        if len(self.labels) != len(groups_a):
            raise InputError(
                f"NOEDistance: {len(self.labels)} labels for {len(groups_a)} restraints"
            )
        self._max_index = int(max(self.i.max(), self.j.max()))

    def _evaluate(self, x):
        d = x[self.i] - x[self.j]
        r2 = jnp.sum(d * d, axis=1)
        inv = r2 ** (-self.power / 2)
        mean = jax.ops.segment_sum(inv, self.restraint, num_segments=self.n_values) / self.n_pairs
        return mean ** (-1.0 / self.power)


class Dihedral(Observable):
    """Dihedral angles, radians in (-π, π], IUPAC sign (as OpenMM and mdtraj).

    Args:
        indices: (K, 4) int atom indices (a single quartet (4,) is K = 1).
        labels: optional K names; default "dihedral i-j-k-l".
    """

    def __init__(self, indices, labels=None):
        idx = _indices(np.atleast_2d(indices), "Dihedral.indices", 2, width=4)
        self.indices = idx
        self.labels = (
            tuple("dihedral " + "-".join(map(str, q)) for q in idx)
            if labels is None
            else tuple(labels)
        )
        if len(self.labels) != idx.shape[0]:
            raise InputError(f"Dihedral: {len(self.labels)} labels for {idx.shape[0]} dihedrals")
        self._max_index = int(idx.max())

    def _evaluate(self, x):
        return dihedral_angle(x, self.indices)
