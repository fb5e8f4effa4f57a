"""Verlet lists carried through the step programs: O(N) cutoff pairs, exact at every step.

A term with ``uses_neighbours`` (``CutoffNonbonded`` or cutoff ``OBC2`` with a skin) sums
its pairs over a Verlet list (``timemachine.potentials.cutoffs.Neighbours``): every pair within
``cutoff + skin`` at the positions it was built at. It holds every pair within the
cutoff as long as no atom has moved more than skin/2, so the step programs (the
equilibrium chains, ``simulate``'s sensitivity chunks, plain MD) carry the lists in
their loop state and, at every step t:

* check the lists against x_t and rebuild them at x_t where an atom has moved more than
  skin/2 since they were built (or a list overflowed its capacity), so the forces are
  those of the exact cutoff sum at every step;
* rebuild them also when t is a multiple of the ``period``, so that the lists at any
  step depend only on the trajectory since the last multiple: any chunking of a run at
  multiples of the period gives the same lists and the same bits (a chunk that starts
  elsewhere builds its own first). The skin trades the cost of rebuilds against the
  length of the lists.

The lists are integers: no derivative flows through them, and the energy is piecewise
the same function of x whichever valid list is used (pairs beyond the cutoff contribute
exactly zero), so the forces, Hessian-vector products and mixed partials (ζ) on a list
are those of the exact sum. Under ``jax.vmap`` over chains the check is reduced over the
chains (``batched``), each chain still choosing its own list.

Style follows JAX MD's ``partition.neighbor_list`` (allocate once at a fixed capacity,
update inside the compiled loop), with the update rule above instead of a flag the
caller must poll.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError
from timemachine.potentials import cutoffs

__all__ = [
    "build",
    "has_neighbours",
    "period",
    "stale",
    "step_lists",
    "with_neighbour_list",
]

#: a fast atomic speed in a thermal system, nm/ps (about 1.5× the RMS speed of a hydrogen
#: at 300 K, sqrt(3 k_B T / m) = 2.7 nm/ps): how ``period`` spaces the scheduled rebuilds
#: (between them a list is rebuilt whenever it goes stale)
_FAST_SPEED = 4.0


def has_neighbours(system) -> bool:
    """True when some term of ``system`` sums its pairs over a Verlet list."""
    return any(getattr(t, "uses_neighbours", False) for t in system.terms)


def build(system, x) -> tuple:
    """One Verlet list per term of ``system`` (None for terms without) at x (N, 3) nm:
    the ``neighbours`` argument of ``system.energy_fn()``. Jittable."""
    return tuple(t.build_neighbours(x) if getattr(t, "uses_neighbours", False) else None
                 for t in system.terms)  # fmt: skip


def stale(system, lists, x):
    """True (bool scalar) when a list of ``lists`` no longer holds every pair within its
    term's cutoff at x: some atom moved more than skin/2 since it was built, or it
    overflowed its capacity."""
    out = jnp.asarray(False)
    for t, nb in zip(system.terms, lists, strict=True):
        if nb is None:
            continue
        box = None if t.box is None else jnp.asarray(t.box)
        moved = cutoffs.max_displacement2(x, nb.reference, box) > (0.5 * t.skin) ** 2
        out = out | moved | nb.overflow
    return out


def period(system, dt):
    """Steps between scheduled rebuilds for a step of ``dt`` ps (traced or not): the steps
    an atom at ``_FAST_SPEED`` takes to cross half the smallest skin, at least 1 (an
    int32 scalar)."""
    skins = [t.skin for t in system.terms if getattr(t, "uses_neighbours", False)]
    if not skins:
        return jnp.asarray(1, jnp.int32)
    steps = jnp.floor(0.5 * min(skins) / (_FAST_SPEED * jnp.asarray(dt)))
    return jnp.maximum(1, steps).astype(jnp.int32)


def step_lists(system, lists, x, t, period, batched=False):
    """The lists for the step at x (time step t), rebuilt at x where t is a multiple of
    ``period`` or where they are stale (``stale``): exact at every step, and a function
    of the trajectory since the last multiple of ``period`` only (so any chunking of a
    run at multiples of the period rebuilds at the same steps).

    With ``batched`` x is (C, N, 3), the lists carry a leading chain axis and t is the
    step of every chain (their common clock); the rebuild runs when some chain needs one,
    and each chain takes the new list only where it needs it.
    """
    scheduled = t % period == 0
    if not batched:
        return jax.lax.cond(scheduled | stale(system, lists, x),
                            lambda y: build(system, y), lambda y: lists, x)  # fmt: skip
    need = scheduled | jax.vmap(lambda nb, y: stale(system, nb, y))(lists, x)  # (C,)

    def rebuild(y):
        fresh = jax.vmap(lambda z: build(system, z))(y)

        def pick(a, b):
            return jnp.where(need.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

        return jax.tree.map(pick, fresh, lists)

    return jax.lax.cond(jnp.any(need), rebuild, lambda y: lists, x)


def with_neighbour_list(system, x, skin=0.1, margin=1.3):
    """``system`` with its cutoff pair terms summing over a Verlet list in the step
    programs, sized for positions x (N, 3) nm.

    Args:
        skin: nm beyond the cutoff; 0 turns the list off (exact sums at every call).
        margin: capacity = the fullest row at x times ``margin``, plus 16 (a liquid's
            local density fluctuates; a row over capacity makes that step fall back to a
            list built on the spot, and an overflow there makes the energy NaN).

    Returns:
        a new ``System`` (the same terms otherwise).
    """
    from timemachine.system import System

    if not (isinstance(skin, (int, float)) and np.isfinite(skin) and skin >= 0):
        raise InputError(f"skin must be >= 0 nm, got {skin!r}")
    x = np.asarray(x, dtype=np.float64)
    terms = []
    for t in system.terms:
        if getattr(t, "kind", None) == "gb":
            if t.cutoff is not None:  # every pair (GB excludes none), no periodic images
                capacity = 0
                if skin > 0:
                    counts = cutoffs.partner_counts(x, None, t.cutoff + skin)
                    capacity = int(np.ceil(counts.max() * margin)) + 16
                t = dataclasses.replace(t, skin=float(skin), neighbour_capacity=capacity)
        elif hasattr(t, "build_neighbours"):
            if skin == 0:
                t = dataclasses.replace(t, skin=0.0, neighbour_capacity=0,
                                        neighbour_cells=None,
                                        neighbour_cell_capacity=0)  # fmt: skip
            else:
                radius = t.cutoff + skin
                cells = cell_cap = None
                if t.box is not None:
                    if np.min(t.box) < 2 * radius:
                        raise InputError(
                            f"skin {skin} nm: the box ({np.min(t.box):.3f} nm) must be at "
                            f"least twice cutoff + skin ({radius:.3f} nm) across"
                        )
                    cells = cutoffs.cell_grid(t.box, radius)
                    if cells is not None:
                        cell_cap = cutoffs.cell_capacity(x, t.box, cells)
                        if 27 * cell_cap >= system.n_atoms:
                            cells = None  # the dense build is cheaper in a small box
                box = None if t.box is None else np.asarray(t.box)
                counts = cutoffs.partner_counts(x, box, radius, t.exclusion_idx)
                capacity = int(np.ceil(counts.max() * margin)) + 16
                t = dataclasses.replace(t, skin=float(skin), neighbour_capacity=capacity,
                                        neighbour_cells=cells,
                                        neighbour_cell_capacity=int(cell_cap or 0))  # fmt: skip
        terms.append(t)
    return System(system.masses, terms, system.param_names, system.params, system.topology)
