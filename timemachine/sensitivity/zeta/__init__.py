"""The ζ operator (paper eq. 6): ζ = H(x) · dx/dθ + ∂²E/∂x∂θ, shape (P, N, 3).

* ``reference`` — :func:`zeta_reference`, the definition: one jvp of ∇_x E per parameter;
  :func:`mixed_partial_reference`, ∂²E/∂x∂θ (ζ at dx/dθ = 0).
* ``assembly`` — :func:`make_zeta`, :func:`make_gradient_and_zeta`: the production ζ of a
  System, assembled from the closed-form derivatives of ``timemachine.structured``
  (coordinate groups, pair parts, OBC2's Born-radius chain, autodiff for the rest) and
  applied to all P tangents at once, in XLA or in the CPU custom call.
* ``dense`` — the pure-JAX Hessian product in column tiles.

See docs/design.md, "The mathematics" and "Performance principles".
"""

from timemachine.sensitivity.zeta.assembly import make_gradient, make_gradient_and_zeta, make_zeta
from timemachine.sensitivity.zeta.dense import TILE_ATOMS
from timemachine.sensitivity.zeta.reference import mixed_partial_reference, zeta_reference

__all__ = [
    "TILE_ATOMS",
    "make_gradient",
    "make_gradient_and_zeta",
    "make_zeta",
    "mixed_partial_reference",
    "zeta_reference",
]
