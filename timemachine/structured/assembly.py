"""The structured terms of a System, looked up in the term registry, and the parts of
∇E they give: the shared first half of the plain-MD gradient and of ∇E-and-ζ.

Every all-pairs part adds its pair scalars to two (N, N) matrices A, B; the distance
groups (bonds, 1-4 exceptions) scatter theirs into the same matrices; the angle and
dihedral groups give per-tuple gradients and Hessian blocks. The gradient is then
Σ_j B_ij d_ij plus the tuples' f' ∇q (docs/design.md, "Performance principles").
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from timemachine.structured.autodiff import autodiff_part, gradient_part
from timemachine.structured.coordinates import CoordinateTerms, merge_groups
from timemachine.structured.fusion import in_memory
from timemachine.structured.registry import pair_part


class PairScalars(NamedTuple):
    """What one evaluation of the structured terms at x gives (shapes for N atoms, P
    tangents): ``dc`` three (N, N) components of d_ij = x_i - x_j; ``a``, ``b`` (N, N) pair
    scalars; ``mixed`` (P, N, 3) mixed partials of the all-pairs parts; ``applies`` their
    non-pair tangent maps; ``evals`` one dict per coordinate group."""

    dc: list
    a: jnp.ndarray
    b: jnp.ndarray
    mixed: jnp.ndarray
    applies: list
    evals: list


class StructuredTerms:
    """The terms of ``system`` in structured form, for parameters ``wrt`` (P,).

    Args:
      system: a :class:`timemachine.System`.
      wrt: (P,) int indices into θ (resolved by the caller; empty for a gradient).
      gradient_only: autodiff terms keep only ``jax.grad`` (no tangent map).
      host_bonded: the coordinate groups are evaluated elsewhere (the CPU custom call of
        ``timemachine.backends.xla_cpu``) and left out here.
    """

    def __init__(self, system, wrt, *, gradient_only=False, host_bonded=False):
        self.n = n = system.n_atoms
        self.host_bonded = host_bonded
        self.pairs = [pair_part(t, wrt) for t in system.terms if t.structured is not None]
        groups = [] if host_bonded else system.coordinate_groups()
        self.coords = [CoordinateTerms(*g, wrt) for g in merge_groups(groups)]
        # (term index, part): the index picks the term's Verlet list, where it has one
        self.autodiff = [
            (t_no, gradient_part(t) if gradient_only else autodiff_part(t, wrt))
            for t_no, t in enumerate(system.terms)
            if t.structured is None and not t.coordinate_groups(f"system.terms[{t_no}]")
        ]
        pair_terms = [c for c in self.coords if c.is_pair]
        block_terms = [c for c in self.coords if not c.is_pair]
        # static scatter targets, concatenated so that each kind lands in one scatter per call
        none = [np.zeros(0, np.int64)]
        self.pair_rows = np.concatenate([c.pair_rows for c in pair_terms] + none)
        self.pair_cols = np.concatenate([c.pair_cols for c in pair_terms] + none)
        self.block_flat = np.concatenate([c.block_flat(n) for c in block_terms] + none)
        self.block_atoms = np.concatenate([c.uniq.reshape(-1) for c in block_terms] + none)

    def evaluate(self, x, params, mixed) -> PairScalars:
        """Pair scalars and per-group derivatives at x (N, 3) nm, θ (P_all,); ``mixed``
        (P, N, 3) zeros to add the all-pairs mixed partials to."""
        n = self.n
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
        applies = []
        for part in self.pairs:
            ta, tb, mixed, apply = part(x, r, inv_r, dc, params, mixed)
            a, b = a + ta, b + tb
            if apply is not None:
                applies.append(apply)
        evals = [c.evaluate(x, params) for c in self.coords]
        if self.pair_rows.size:
            pa = jnp.concatenate([e["a"] for e in evals if "a" in e])
            pb = jnp.concatenate([e["b"] for e in evals if "b" in e])
            a = a.at[self.pair_rows, self.pair_cols].add(pa)
            b = b.at[self.pair_rows, self.pair_cols].add(pb)
        elif not self.host_bonded:  # no pair list to scatter, and the G tiles read A and B
            a, b = in_memory(a, x), in_memory(b, x)
        return PairScalars(dc, a, b, mixed, applies, evals)

    def gradient(self, x, s: PairScalars):
        """∇E (N, 3) of the pair forms and the coordinate groups: Σ_j B_ij d_ij + f' ∇q."""
        n = self.n
        # Σ_j B_ij (x_i - x_j) as x_i Σ_j B_ij - B·x: a GEMM, where XLA's CPU row reductions
        # are slow; centring x keeps the cancellation to ~|x - x̄|/r ulps
        xc = x - jnp.mean(x, axis=0)
        bx = s.b @ jnp.concatenate([xc, jnp.ones((n, 1), x.dtype)], axis=1)
        grad = xc * bx[:, 3:] - bx[:, :3]
        if self.block_atoms.size:
            gq = jnp.concatenate([e["grad"].reshape(-1, 3) for e in s.evals if "grad" in e])
            grad = grad.at[self.block_atoms].add(gq)
        return grad

    def add_mixed(self, out, s: PairScalars):
        """``out`` (P, N, 3) plus the coordinate groups' mixed partials."""
        for c, e in zip(self.coords, s.evals, strict=True):
            if c.hit_term.size:
                out = out.at[c.hit_param[:, None], c.hit_atoms].add(e["mixed"])
        return out
