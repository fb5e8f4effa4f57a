"""The plain-MD gradient: ∇E in closed form from the structured terms, no ζ."""

from __future__ import annotations

import weakref

import jax.numpy as jnp
import numpy as np

from timemachine.structured.assembly import StructuredTerms
from timemachine.structured.autodiff import sparse_gradient

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# factories system -> gradient or None, tried in order by gradient_fn: fast paths that live
# in higher layers (the CPU custom call, timemachine.backends.xla_cpu_gb) register here
_FAST_GRADIENTS: list = []


def register_fast_gradient(factory):
    """Register ``factory(system) -> gradient or None``, a faster plain-MD gradient with
    :func:`make_gradient`'s signature and values (to round-off), or None where it does
    not apply. :func:`gradient_fn` uses the first that applies. Returns ``factory``."""
    if factory not in _FAST_GRADIENTS:
        _FAST_GRADIENTS.append(factory)
    return factory


def make_gradient(system):
    """A jittable ``gradient(x (N,3), params (P_all,), neighbours=None) -> ∇_x E (N, 3)``,
    kJ/mol/nm (``neighbours``: the Verlet lists of ``timemachine.neighbours.build``).

    The all-pairs terms (LJ + Coulomb, OBC2) as Σ_j B_ij d_ij from closed-form pair
    scalars, the bonded terms from analytic internal-coordinate derivatives, ``jax.grad``
    only for CustomTerm and other terms without a closed form. It equals
    ``jax.grad(system.energy_fn())`` to round-off (≤ 1e-13 relative on villin) at about a
    quarter of its cost for all-pairs systems, because autodiff of the dense (N, N)
    energy keeps and reverses many (N, N) intermediates. Differentiable with respect to
    θ (force matching does). Pure, no input checks: jit it, or call it in a scan. The
    CPU custom call's variant is ``timemachine.sensitivity.zeta.make_gradient(bonded=
    "host")``.
    """
    if any(getattr(t, "uses_neighbours", False) for t in system.terms):
        return sparse_gradient(system)
    terms = StructuredTerms(system, np.zeros(0, np.int64), gradient_only=True)

    def gradient(x, params, neighbours=None):  # jit drops the Hessian scalars A (ζ's)
        s = terms.evaluate(x, params, jnp.zeros((0,) + x.shape, x.dtype))
        grad = terms.gradient(x, s)
        for t_no, part in terms.autodiff:
            grad = grad + part(x, params, None if neighbours is None else neighbours[t_no])
        return grad

    return gradient


def gradient_fn(system):
    """The cached plain-MD gradient of ``system``: one function per System, so that
    jitted programs keyed on it are reused (plain dynamics, finite differences, the
    integrator's minimiser). It is the first registered fast path that applies
    (:func:`register_fast_gradient`; the CPU custom call of all-pairs OBC2 and LJ +
    Coulomb), else :func:`make_gradient`. Use inside jit/scan (no input checks)."""
    fn = _CACHE.get(system)
    if fn is None:
        for factory in _FAST_GRADIENTS:
            fn = factory(system)
            if fn is not None:
                break
        else:
            fn = make_gradient(system)
        _CACHE[system] = fn
    return fn
