"""Terms without a closed form (CustomTerm, any new functional form): exact autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gradient_part(term):
    """``fn(x, params, neighbours=None) -> ∇_x E`` of any term: ``jax.grad`` of its
    energy, or on a Verlet list (``timemachine.neighbours``) the term's own written-out
    ``gradient`` (no scatter)."""
    grad_x = jax.grad(term.energy, argnums=0)

    def part(x, params, neighbours=None):
        if neighbours is None:
            return grad_x(x, params)
        return term.gradient(x, params, neighbours)

    return part


def autodiff_part(term, wrt):
    """(∇E, ζ) of any term by ``jax.linearize`` of its gradient, vmapped over the P tangents.

    linearize evaluates the primal (and the residuals the tangent map needs) once; only
    the linear map runs P times. With ``neighbours`` the gradient linearized is the
    term's own on that Verlet list (forward mode through gathers only).
    """
    grad_x = gradient_part(term)

    def part(x, params, dx, neighbours=None):
        onehot = jnp.zeros((wrt.shape[0], params.shape[0]), params.dtype)
        onehot = onehot.at[np.arange(wrt.shape[0]), wrt].set(1.0)
        grad, lin = jax.linearize(lambda y, p: grad_x(y, p, neighbours), x, params)
        return grad, jax.vmap(lin)(dx, onehot)

    return part


def sparse_gradient(system):
    """``fn(x, params, neighbours=None) -> ∇_x E (N, 3)`` for a System whose cutoff pairs
    run on Verlet lists (``timemachine.neighbours``): every term by its own gradient
    (``gradient_part``), so nothing is O(N²): the closed-form path's dense (N, N) pair
    scalars and GEMM serve all-pairs Systems and would dominate a periodic box's step."""
    parts = [gradient_part(t) for t in system.terms]

    def gradient(x, params, neighbours=None):
        lists = (None,) * len(parts) if neighbours is None else neighbours
        return sum(part(x, params, nb) for part, nb in zip(parts, lists, strict=True))

    return gradient


def coordinate_only(system) -> list[bool]:
    """Per term of ``system``: True where its coordinate groups are the whole term (bonds,
    angles, torsions: no structured part), so that the bonded custom call can stand for
    it. A term with a structured part (the all-pairs Nonbonded, whose groups are only its
    1-4 exceptions) is False."""
    return [
        t.structured is None and bool(t.coordinate_groups(f"system.terms[{k}]"))
        for k, t in enumerate(system.terms)
    ]


def sparse_gradient_and_zeta(system, wrt, host=None, bonded=None):
    """``fn(x, params, dx (P, N, 3), neighbours=None) -> (∇_x E, ζ (P, N, 3))`` for a
    System with Verlet lists: a term's own ``gradient_and_zeta`` on its list where it has
    one (the cutoff pairs' per-pair scalars contracted with all P tangents at once), and
    one ``jax.linearize`` of the other terms' gradients, its linear map vmapped over the P
    tangents (dx_p and the one-hot θ direction of ``wrt[p]``). Exact; nothing O(N²).
    ``host``: the cutoff pairs and PME's tangent spread and gather in compiled code
    (``timemachine.backends.xla_cpu``, passed in from the sensitivity layer), or None for
    XLA's. ``bonded``: None, or ``fn(x, params, dx) -> (∇E, ζ)`` of every term that is
    wholly internal coordinates (bonds, angles, torsions: the bonded custom call's
    ``BondedTables`` of the terms ``coordinate_only`` picks, and of no other), which then
    leave the linearize."""
    parts = [gradient_part(t) for t in system.terms]
    wrt = np.asarray(wrt, dtype=np.int64)
    terms = system.terms
    by_tables = coordinate_only(system) if bonded is not None else [False] * len(terms)

    def fn(x, params, dx, neighbours=None):
        lists = (None,) * len(terms) if neighbours is None else neighbours
        own = [nb is not None and hasattr(t, "gradient_and_zeta")
               for t, nb in zip(terms, lists, strict=True)]  # fmt: skip
        skip = [o or b for o, b in zip(own, by_tables, strict=True)]

        def rest(y, p):
            return sum((part(y, p, nb) for part, nb, s in zip(parts, lists, skip, strict=True)
                        if not s), jnp.zeros_like(y))  # fmt: skip

        onehot = jnp.zeros((wrt.shape[0], params.shape[0]), params.dtype)
        onehot = onehot.at[np.arange(wrt.shape[0]), wrt].set(1.0)
        grad, lin = jax.linearize(rest, x, params)
        zeta = jax.vmap(lin)(dx, onehot)
        if bonded is not None:
            g, z = bonded(x, params, dx)
            grad, zeta = grad + g, zeta + z
        for t, nb, o in zip(terms, lists, own, strict=True):
            if o:
                g, z = t.gradient_and_zeta(x, params, dx, wrt, nb, host=host)
                grad, zeta = grad + g, zeta + z
        return grad, zeta

    return fn
