"""Checks of a starting structure before any dynamics: atoms too close, energy overflow.

``check_start`` is the one place every entry point that starts dynamics from positions
calls (``simulate`` through ``sensitivity.options.initial_state``,
``fitting.run_replicas``, ``fitting.fit``, the equilibrium fit's ``EquilibriumChains``),
so a structure that would blow up at its first step is refused with an ``InputError``
that names the atoms and what to try, instead of a ``SimulationError`` some steps later
(docs/design.md, "Conventions").

The bounds, and why:

- ``MIN_PAIR_DISTANCE`` = 0.05 nm between two atoms that interact through the nonbonded
  term (not excluded; 1-4 exceptions included). The shortest physical non-bonded contact
  is a hydrogen bond's H···O at ~0.15 nm, and a covalent X-H bond (0.1 nm) is excluded;
  Amber's LJ repulsion at 0.05 nm between two carbons (σ = 0.34 nm, ε = 0.36 kJ/mol) is
  4ε(σ/r)¹² ≈ 1e10 kJ/mol. A pair this close is a broken structure:
  positions converted to nm twice (nm read as Å shrinks every distance tenfold: 0.3 nm
  contacts become 0.03 nm), two copies of one atom, or a clash from model building.
- ``MAX_ENERGY`` = 1e10 kJ/mol for |E| (also what ``sensitivity.diagnosis`` calls an
  overflowing energy): a folded protein of a few thousand atoms has |E| ~ 1e4-1e5
  kJ/mol, an unminimised model with clashes ~1e6-1e8.
- ``MAX_GRADIENT`` = 1e12 kJ/mol/nm for any atom's |∇E|: at dt = 2 fs such a force moves
  a hydrogen by dt²|F|/m ≈ 4e6 nm in one step. Non-finite E or ∇E is always refused.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from timemachine import neighbours
from timemachine.errors import InputError
from timemachine.structured import gradient_fn

__all__ = [
    "MAX_ENERGY",
    "MAX_GRADIENT",
    "MIN_PAIR_DISTANCE",
    "atom_label",
    "check_start",
    "closest_pair",
]

MIN_PAIR_DISTANCE = 0.05  # nm
MAX_ENERGY = 1e10  # kJ/mol
MAX_GRADIENT = 1e12  # kJ/mol/nm
# rows of the distance matrix per block: 1024 × N float64 distances at a time
_BLOCK = 1024

_WHAT_TO_TRY = (
    "minimize it first (tm.minimize_system(system, x)) and check the structure's units: "
    "positions are nm, and Å read as nm (or nm as Å) is the usual cause"
)


def atom_label(system, i: int) -> str:
    """``atom 7`` or, with a topology, ``atom 7 (ALA2:CB)``."""
    i = int(i)
    top = getattr(system, "topology", None)
    if top is not None:
        try:
            atom = list(top.atoms())[i]
            return f"atom {i} ({atom.residue.name}{atom.residue.id}:{atom.name})"
        except (AttributeError, IndexError, TypeError):
            pass
    return f"atom {i}"


def _interacting_pairs(system):
    """(mask (N, N) bool of full-strength pairs or None, (E, 2) exception pairs) over the
    system's Nonbonded terms; (None, empty) when it has none."""
    mask, exceptions = None, []
    for term in system.terms:
        if getattr(term, "kind", None) != "nonbonded" or not hasattr(term, "pair_mask"):
            continue
        m = np.asarray(term.pair_mask, dtype=bool)
        mask = m if mask is None else (mask | m)
        exc = np.asarray(term.exception_idx, dtype=np.int64).reshape(-1, 2)
        exceptions.append(exc)
    exc = np.concatenate(exceptions) if exceptions else np.zeros((0, 2), np.int64)
    return mask, exc


def closest_pair(system, x):
    """The closest pair of atoms that interact through the nonbonded term (full strength
    or a 1-4 exception) → (i, j, distance nm), i < j; None without a Nonbonded term.

    O(N²) in blocks of ``_BLOCK`` rows, vectorised numpy (a few ms for 600 atoms)."""
    mask, exc = _interacting_pairs(system)
    if mask is None:
        return None
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    best = (np.inf, -1, -1)
    sq = (x * x).sum(axis=1)
    for start in range(0, n, _BLOCK):
        rows = slice(start, min(n, start + _BLOCK))
        # |a|² + |b|² - 2 a·b (one BLAS product); the closest pair is recomputed exactly
        d2 = sq[rows, None] + sq[None, :] - 2.0 * (x[rows] @ x.T)
        upper = np.arange(n)[None, :] > np.arange(start, rows.stop)[:, None]
        d2 = np.where(mask[rows] & upper, d2, np.inf)
        i, j = divmod(int(np.argmin(d2)), n)
        if np.isfinite(d2[i, j]):
            exact = float(((x[start + i] - x[j]) ** 2).sum())
            if exact < best[0]:
                best = (exact, start + i, j)
    if exc.shape[0]:
        d2 = ((x[exc[:, 0]] - x[exc[:, 1]]) ** 2).sum(axis=-1)
        k = int(np.argmin(d2))
        if d2[k] < best[0]:
            i, j = sorted(int(a) for a in exc[k])
            best = (float(d2[k]), i, j)
    if best[1] < 0:
        return None
    return best[1], best[2], float(np.sqrt(best[0]))


_ON_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_lists(system):
    """The jitted ``fn(x, θ) -> (E kJ/mol, ∇E (N, 3), r² nm² of the closest listed pair,
    its atoms (2,))`` of a System with Verlet lists (one per System, cached): the lists
    built at x, E over them and ∇E by the plain step's gradient (the compiled one where it
    is registered), both O(N) where the exact sums are O(N²); NaN E on an overflowed list.
    The closest pair is over the lists' pairs by minimum image (every pair within the
    cutoff is listed)."""
    fn = _ON_LISTS.get(system)
    if fn is not None:
        return fn
    energy_fn, grad_fn = system.energy_fn(), gradient_fn(system)

    def on_lists(x, theta):
        lists = neighbours.build(system, x)
        e, g = energy_fn(x, theta, lists), grad_fn(x, theta, lists)
        best_r2, best = jnp.inf, jnp.zeros(2, jnp.int32)
        n = x.shape[0]
        for t, nb in zip(system.terms, lists, strict=True):
            if nb is None:
                continue
            j = jnp.minimum(nb.idx, n - 1)
            d = x[:, None, :] - x[j]
            if t.box is not None:
                box = jnp.asarray(t.box)
                d = d - box * jnp.round(d / box)
            r2 = jnp.where(nb.idx < n, jnp.sum(d * d, axis=-1), jnp.inf)
            k = jnp.argmin(r2)
            i_k, s_k = k // r2.shape[1], k % r2.shape[1]
            closer = r2[i_k, s_k] < best_r2
            best_r2 = jnp.where(closer, r2[i_k, s_k], best_r2)
            best = jnp.where(closer, jnp.stack([i_k, j[i_k, s_k]]).astype(jnp.int32), best)
            e = jnp.where(nb.overflow, jnp.nan, e)
        return e, g, best_r2, best

    fn = _ON_LISTS[system] = jax.jit(on_lists)
    return fn


def _closest_exception(system, x):
    """(r² nm², i, j) of the closest 1-4 exception pair (by minimum image in a box), or
    None without exceptions."""
    best = None
    for term in system.terms:
        if getattr(term, "kind", None) != "nonbonded" or not hasattr(term, "exception_idx"):
            continue
        exc = np.asarray(term.exception_idx, dtype=np.int64).reshape(-1, 2)
        if not exc.shape[0]:
            continue
        d = x[exc[:, 0]] - x[exc[:, 1]]
        box = getattr(term, "box", None)
        if box is not None:
            box = np.asarray(box)
            d = d - box * np.round(d / box)
        d2 = (d * d).sum(axis=-1)
        k = int(np.argmin(d2))
        if best is None or d2[k] < best[0]:
            best = (float(d2[k]), *sorted(int(a) for a in exc[k]))
    return best


def check_start(system, x, params=None, where="x0") -> None:
    """Refuse a starting structure that cannot run: two interacting atoms closer than
    ``MIN_PAIR_DISTANCE``, or a non-finite or enormous energy or gradient.

    Args:
        system: a ``timemachine.System``; x: (N, 3) positions, nm (already shape- and
            finiteness-checked); params: (P,) θ, default ``system.params``; where: how
            the caller's argument is named in the message.

    Raises:
        InputError: naming both atoms (index, and residue:name with a topology) and their
            distance; or the energy, the atom with the largest |∇E| and its value; with
            what to try (minimize, check the units). The error carries ``.atoms`` (the
            pair, or the one atom of the largest |∇E|) and ``.distance`` (nm, or None).
    """
    x = np.asarray(x, dtype=np.float64)
    theta = system.params if params is None else params
    energy = grad = pair = None
    if neighbours.has_neighbours(system):
        # cutoff terms on Verlet lists: one O(N) pass for E, ∇E and the closest pair
        # (the exact sums are O(N²)); an overflowed list (NaN E) falls back to them
        e, g, r2, ij = _on_lists(system)(jnp.asarray(x), jnp.asarray(theta))
        if np.isfinite(float(e)):
            energy, grad = float(e), np.asarray(g)
            i, j = sorted(int(a) for a in np.asarray(ij))
            pair = (i, j, float(np.sqrt(r2))) if np.isfinite(float(r2)) else None
            exc = _closest_exception(system, x)
            if exc is not None and (pair is None or exc[0] < pair[2] ** 2):
                pair = (exc[1], exc[2], float(np.sqrt(exc[0])))
    if energy is None:
        pair = closest_pair(system, x)
    if pair is not None and pair[2] < MIN_PAIR_DISTANCE:
        i, j, d = pair
        err = InputError(
            f"{where}: {atom_label(system, i)} and {atom_label(system, j)} are {d:.4g} nm "
            f"apart, closer than {MIN_PAIR_DISTANCE} nm (no two non-bonded atoms come this "
            f"close in a physical structure); {_WHAT_TO_TRY}"
        )
        err.atoms, err.distance = (int(i), int(j)), d
        raise err
    with np.errstate(all="ignore"):
        if energy is None:
            energy = float(system.energy(x, theta))
            grad = np.asarray(system.gradient(x, theta))
        mag = np.linalg.norm(grad, axis=-1)
    mag = np.where(np.isfinite(mag), mag, np.inf)
    atom = int(np.argmax(mag))
    if np.isfinite(energy) and abs(energy) <= MAX_ENERGY and mag[atom] <= MAX_GRADIENT:
        return
    terms = ""
    try:
        with np.errstate(all="ignore"):
            per_term = system.energy_terms(x, theta)
        bad = [k for k, v in per_term.items() if not np.isfinite(v) or abs(v) > MAX_ENERGY]
        if bad:
            terms = f" (from the {', '.join(bad)} term{'s' if len(bad) > 1 else ''})"
    except Exception:  # the diagnosis must not hide the error it explains
        pass
    err = InputError(
        f"{where}: the starting energy is {energy:.4g} kJ/mol{terms} and "
        f"{atom_label(system, atom)} has |∇E| = {mag[atom]:.4g} kJ/mol/nm (limits: |E| <= "
        f"{MAX_ENERGY:g} kJ/mol, |∇E| <= {MAX_GRADIENT:g} kJ/mol/nm, finite): the first step "
        f"would blow up; {_WHAT_TO_TRY}, and that θ is physical"
    )
    err.atoms, err.distance = (atom,), None
    raise err
