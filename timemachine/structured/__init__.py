"""Closed-form derivatives of each term type, and the plain-MD gradient built from them.

The layer above the terms (``timemachine.system``) and below the backends and the
sensitivities: what a term is (its energy, its coordinate groups, the name of its
structured part) is declared there; how its gradient, Hessian blocks and mixed partials
are computed in closed form is here, one module per kind of term:

* ``coordinates`` — terms of one internal coordinate (bonds, angles, torsions, 1-4
  exceptions): analytic ∇q, per-tuple Hessian blocks, mixed partials;
* ``nonbonded`` — all-pairs LJ + Coulomb pair scalars;
* ``obc2`` — OBC2's pair scalars and Born-radius chain;
* ``autodiff`` — everything else (CustomTerm), by ``jax.linearize``;
* ``assembly`` — a System's structured terms, found through the registry
  (``registry.PAIR_PARTS``), and the gradient they give;
* ``gradient`` — :func:`make_gradient` / :func:`gradient_fn`, the plain-MD gradient;
* ``minimize`` — :func:`minimize_system`, L-BFGS-B on a System with that gradient.

ζ (``timemachine.sensitivity.zeta``) contracts the same pieces with the tangents.
"""

from timemachine.structured import nonbonded, obc2  # noqa: F401  (register the pair parts)
from timemachine.structured.assembly import PairScalars, StructuredTerms
from timemachine.structured.coordinates import COORDINATES, CoordinateTerms, merge_groups
from timemachine.structured.gradient import gradient_fn, make_gradient, register_fast_gradient
from timemachine.structured.minimize import minimize_system
from timemachine.structured.registry import PAIR_PARTS, pair_part, register_pair_part

__all__ = [
    "COORDINATES",
    "CoordinateTerms",
    "PAIR_PARTS",
    "PairScalars",
    "StructuredTerms",
    "gradient_fn",
    "make_gradient",
    "merge_groups",
    "minimize_system",
    "pair_part",
    "register_fast_gradient",
    "register_pair_part",
]
