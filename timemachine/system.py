"""The System: atoms, masses, typed parameters, and the energy as a sum of terms.

A System holds a flat float64 parameter vector θ (length P, one name per entry, named
``kind/type-key/field``) and a tuple of terms. Every term maps its per-term parameters
to entries of θ through integer index arrays, so a force-field *type* shared by many
terms is one entry of θ and derivatives with respect to it sum over all its uses.

Terms are JAX pytrees (their index arrays are leaves), so ``energy_fn(terms, x, θ)`` can be
jit-compiled once and reused for any θ.

The term registry: each term class declares what the fast paths need of it, and the
fast paths look these up instead of testing the class:

* ``coordinate_groups(where)`` — its terms of one internal coordinate (a bond length, an
  angle, a dihedral, a 1-4 pair distance) as :class:`CoordinateGroup` s: the atoms, the
  θ indices and constants of each, the coordinate and the scalar form from
  ``timemachine.potentials``. The structured derivatives, the CPU custom call and the
  CUDA term kernels all read these.
* ``structured`` — the name of its all-pairs part in ``timemachine.structured.PAIR_PARTS``
  (closed-form pair scalars and Born-radius chain), or None.
* ``kernel`` — the name of its CUDA table builder in
  ``timemachine.backends.tables.TABLE_BUILDERS``, or None.

A term with no coordinate group and no structured part (CustomTerm, any new form) gets
its derivatives from autodiff; one with neither a coordinate group nor a kernel has no
CUDA path. Adding a term type is one class here (or in a module of its own) and, for a
fast path, one registered builder.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine import potentials
from timemachine.errors import InputError


class CoordinateGroup(NamedTuple):
    """Terms E = Σ_t form(q(x[idx_t]), θ[pidx_t], consts_t) of one internal coordinate q.

    Attributes:
      kind: "bond" | "angle" | "torsion" | "exception": the channel layout (the CUDA term
        kernels' and the CPU custom call's kind).
      coordinate: "distance" | "angle" | "dihedral": q, in nm or radians.
      form: ``form(q, p (C,), c (NC,)) -> kJ/mol`` for one term, built on the scalar forms
        of ``timemachine.potentials``.
      idx: (T, k) atoms; pidx: (T, C) θ indices per channel; consts: (T, NC) float64.
      where: the term it came from, for error messages.
    """

    kind: str
    coordinate: str
    form: Callable
    idx: np.ndarray
    pidx: np.ndarray
    consts: np.ndarray
    where: str


def _group(kind, coordinate, form, idx, channels, consts, where):
    idx = np.asarray(idx)
    pidx = np.stack([np.asarray(c) for c in channels], 1) if channels else np.zeros((len(idx), 0))
    cst = (
        np.stack([np.broadcast_to(np.asarray(c, np.float64), (len(idx),)) for c in consts], 1)
        if consts
        else np.zeros((len(idx), 0))
    )
    return CoordinateGroup(kind, coordinate, form, idx, pidx, cst, where)


def _pytree(cls, data, meta=()):
    return jax.tree_util.register_dataclass(
        dataclasses.dataclass(frozen=True, eq=False)(cls),
        data_fields=list(data),
        meta_fields=list(meta),
    )


class HarmonicBonds:
    """Harmonic bonds. idx (B, 2); length_index, k_index (B,) into θ."""

    kind = "bond"
    structured = None
    kernel = None  # the CUDA term kernels, through coordinate_groups
    idx: np.ndarray
    length_index: np.ndarray
    k_index: np.ndarray

    def energy(self, x, params):
        return potentials.harmonic_bond(
            x, self.idx, params[self.length_index], params[self.k_index]
        )

    @staticmethod
    def form(r, p, c):
        """One bond: p = (r0, k)."""
        return potentials.harmonic(r, p[0], p[1])

    def coordinate_groups(self, where):
        channels = [self.length_index, self.k_index]
        return [_group("bond", "distance", self.form, self.idx, channels, [], where)]


HarmonicBonds = _pytree(HarmonicBonds, ["idx", "length_index", "k_index"])


class HarmonicAngles:
    """Harmonic angles. idx (A, 3); theta0_index, k_index (A,) into θ."""

    kind = "angle"
    structured = None
    kernel = None  # the CUDA term kernels, through coordinate_groups
    idx: np.ndarray
    theta0_index: np.ndarray
    k_index: np.ndarray

    def energy(self, x, params):
        return potentials.harmonic_angle(
            x, self.idx, params[self.theta0_index], params[self.k_index]
        )

    @staticmethod
    def form(theta, p, c):
        """One angle: p = (θ0, k)."""
        return potentials.harmonic(theta, p[0], p[1])

    def coordinate_groups(self, where):
        channels = [self.theta0_index, self.k_index]
        return [_group("angle", "angle", self.form, self.idx, channels, [], where)]


HarmonicAngles = _pytree(HarmonicAngles, ["idx", "theta0_index", "k_index"])


class PeriodicTorsions:
    """Periodic torsions. idx (T, 4); periodicity (T,) fixed; phase_index, k_index (T,) into θ.

    ``kind`` is "torsion" for propers and "improper" for impropers.
    """

    structured = None
    kernel = None  # the CUDA term kernels, through coordinate_groups
    idx: np.ndarray
    periodicity: np.ndarray
    phase_index: np.ndarray
    k_index: np.ndarray
    kind: str = "torsion"

    def energy(self, x, params):
        return potentials.periodic_torsion(
            x, self.idx, self.periodicity, params[self.phase_index], params[self.k_index]
        )

    @staticmethod
    def form(phi, p, c):
        """One torsion: p = (φ0, k), c = (periodicity,). Propers and impropers share it."""
        return potentials.periodic(phi, c[0], p[0], p[1])

    def coordinate_groups(self, where):
        channels = [self.phase_index, self.k_index]
        per = [np.asarray(self.periodicity, np.float64)]
        return [_group("torsion", "dihedral", self.form, self.idx, channels, per, where)]


PeriodicTorsions = _pytree(
    PeriodicTorsions, ["idx", "periodicity", "phase_index", "k_index"], ["kind"]
)


class Nonbonded:
    """All-pairs LJ + Coulomb with exclusions and scaled 1-4 exceptions (no cutoff).

    charge_index, sigma_index, epsilon_index: (N,) into θ.
    pair_mask: (N, N) bool, True for pairs that interact at full strength.
    exception_idx: (E, 2) scaled pairs; coulomb_scale, lj_scale: (E,) fixed scale factors.
    """

    kind = "nonbonded"
    structured = "nonbonded"  # timemachine.structured.nonbonded: all-pairs pair scalars
    kernel = "nonbonded"  # the CUDA tm_nonbonded_* kernels; exceptions: coordinate_groups
    charge_index: np.ndarray
    sigma_index: np.ndarray
    epsilon_index: np.ndarray
    pair_mask: np.ndarray
    exception_idx: np.ndarray
    coulomb_scale: np.ndarray
    lj_scale: np.ndarray

    def energy(self, x, params):
        q = params[self.charge_index]
        sig = params[self.sigma_index]
        eps = params[self.epsilon_index]
        e = potentials.nonbonded_all_pairs(x, q, sig, eps, self.pair_mask)
        return e + potentials.nonbonded_exceptions(
            x, self.exception_idx, q, sig, eps, self.coulomb_scale, self.lj_scale
        )

    @staticmethod
    def exception_form(r, p, c):
        """One 1-4 exception: p = (q_i, q_j, σ_i, σ_j, ε_i, ε_j), c = (coulomb, lj scale)."""
        return potentials.exception_pair(r, *(p[k] for k in range(6)), c[0], c[1])

    def coordinate_groups(self, where):
        exc = np.asarray(self.exception_idx)
        if not exc.shape[0]:
            return []
        i, j = exc[:, 0], exc[:, 1]
        per_atom = [np.asarray(a) for a in (self.charge_index, self.sigma_index)]
        per_atom.append(np.asarray(self.epsilon_index))
        channels = [a[k] for a in per_atom for k in (i, j)]
        scales = [self.coulomb_scale, self.lj_scale]
        form = self.exception_form
        return [_group("exception", "distance", form, exc, channels, scales, f"{where} exceptions")]


Nonbonded = _pytree(
    Nonbonded,
    [
        "charge_index",
        "sigma_index",
        "epsilon_index",
        "pair_mask",
        "exception_idx",
        "coulomb_scale",
        "lj_scale",
    ],
)


class CutoffNonbonded:
    """LJ + Coulomb within a cutoff, as OpenMM's NonbondedForce ``CutoffPeriodic`` (a
    rectangular periodic box, minimum image, the dispersion correction) or
    ``CutoffNonPeriodic``: reaction-field electrostatics, OpenMM's optional LJ switch,
    plain 1-4 exceptions (``timemachine.potentials.cutoffs``); or ``PME`` with ``alpha``
    and ``grid``: erfc-screened direct space within the cutoff, the smooth-PME reciprocal
    sum (order 5), the self energy and the excluded pairs' correction.

    charge_index, sigma_index, epsilon_index: (N,) into θ; exclusion_rows: (N, M) int32,
    row i the atoms excluded from i, padded with -1 (``cutoffs.exclusion_table``: no
    (N, N) array is kept, so memory stays O(N) at 10⁵ atoms; ``pair_mask`` builds the
    dense mask on demand); exception_idx (E, 2), coulomb_scale, lj_scale (E,) as
    ``Nonbonded``'s; class_sigma_index, class_epsilon_index, class_counts: (C,) the atom
    classes of the dispersion correction (counts a tuple); box: (3,) nm (periodic) or
    None; exclusion_idx: (X, 2) every excluded pair, i < j in lexicographic order.
    A periodic box at least 3 cutoffs across on every edge sums its pairs through a cell
    list rebuilt at every evaluation (``cells``, ``cell_capacity``; O(N)), a smaller
    one densely (O(N²)). Derivatives (ζ) come from autodiff of the reference; the CUDA
    kernels of its Verlet-list pair sum exist (cuda/kernels/cutoff.cuh) but backend="cuda"
    does not run the term yet (``backends.tables.NOT_WIRED``).
    """

    kind = "nonbonded-cutoff"
    structured = None
    kernel = None
    charge_index: np.ndarray
    sigma_index: np.ndarray
    epsilon_index: np.ndarray
    exclusion_rows: np.ndarray  # (N, M) int32, ``cutoffs.exclusion_table(exclusion_idx)``
    exception_idx: np.ndarray
    coulomb_scale: np.ndarray
    lj_scale: np.ndarray
    class_sigma_index: np.ndarray
    class_epsilon_index: np.ndarray
    class_counts: tuple  # of ints (static)
    box: np.ndarray | None
    exclusion_idx: np.ndarray  # (X, 2) every excluded pair, 1-4s included (PME's correction)
    cutoff: float = 1.0
    dielectric: float = 78.3
    switch_distance: float | None = None
    dispersion_correction: bool = True
    alpha: float | None = None  # PME's Ewald α (nm⁻¹); None: reaction field
    grid: tuple | None = None  # PME's (K_x, K_y, K_z)
    cells: tuple | None = None  # a cell list's (3,) cells per edge; None: the dense sum
    cell_capacity: int = 0
    skin: float = 0.0  # the Verlet list's skin, nm; 0: no list (the step programs' choice)
    neighbour_capacity: int = 0  # partners per row of the Verlet list
    neighbour_cells: tuple | None = None  # the list build's cells (edge ≥ cutoff + skin)
    neighbour_cell_capacity: int = 0

    @property
    def pair_mask(self) -> np.ndarray:
        """(N, N) bool, True for the full-strength pairs (not excluded, not 1-4, not
        i = j), built from ``exclusion_idx`` on each call: O(N²) memory, for checks on
        small systems; the term itself uses ``exclusion_rows``."""
        n = np.asarray(self.charge_index).shape[0]
        return potentials.nonbonded.full_strength_mask(n, self.exclusion_idx)

    @property
    def uses_neighbours(self) -> bool:
        """True when the step programs carry a Verlet list for this term."""
        return self.skin > 0

    def build_neighbours(self, x):
        """The term's Verlet list of x (N, 3) nm (``cutoffs.Neighbours``); jittable."""
        from timemachine.potentials import cutoffs

        box = None if self.box is None else jnp.asarray(self.box)
        return cutoffs.build_neighbours(
            x, self.exclusion_rows, box, self.cutoff + self.skin, self.neighbour_capacity,
            self.neighbour_cells, self.neighbour_cell_capacity,
        )  # fmt: skip

    def energy(self, x, params, neighbours=None):
        """E (kJ/mol) at x (N, 3) nm; with ``neighbours`` (a fresh ``cutoffs.Neighbours``
        of this term: no atom moved more than skin/2 since it was built) the pair sum runs
        over the Verlet list, else over the cell list or densely (always exact)."""
        from timemachine.potentials import cutoffs

        q = params[self.charge_index]
        sig = params[self.sigma_index]
        eps = params[self.epsilon_index]
        box = None if self.box is None else jnp.asarray(self.box)
        if neighbours is not None:
            e = cutoffs.neighbour_pair_energy(x, q, sig, eps, neighbours, box, self.cutoff,
                                              self.dielectric, self.switch_distance,
                                              self.alpha)  # fmt: skip
            return e + self._long_range(x, params)
        if self.cells is not None and box is not None:
            e = cutoffs.cell_list_pair_energy(
                x, q, sig, eps, self.exclusion_idx, box, self.cutoff, self.dielectric,
                self.cells, self.cell_capacity, self.switch_distance, self.alpha,
            )  # fmt: skip
        else:
            e = cutoffs.cutoff_pair_energy(x, q, sig, eps, self.exclusion_rows, box, self.cutoff,
                                            self.dielectric, self.switch_distance,
                                            self.alpha)  # fmt: skip
        return e + self._long_range(x, params)

    def gradient(self, x, params, neighbours):
        """∇_x E (N, 3) kJ/mol/nm on a fresh Verlet list: the pairs' written out
        (``cutoffs.neighbour_pair_gradient``, no scatter), the rest by autodiff."""
        from timemachine.potentials import cutoffs

        box = None if self.box is None else jnp.asarray(self.box)
        g = cutoffs.neighbour_pair_gradient(
            x, params[self.charge_index], params[self.sigma_index], params[self.epsilon_index],
            neighbours, box, self.cutoff, self.dielectric, self.switch_distance, self.alpha,
        )  # fmt: skip
        return g + jax.grad(self._long_range)(x, params)

    def gradient_and_zeta(self, x, params, dx, wrt, neighbours, host=None):
        """(∇_x E (N, 3), ζ (P, N, 3)) on a fresh Verlet list for tangents dx (P, N, 3)
        and parameters ``wrt`` (P,): the pairs' from per-pair scalars
        (``cutoffs.neighbour_pair_gradient_and_zeta``, which with PME also takes the
        excluded pairs' erf correction in closed form, in the custom call's pass over the
        rows), PME's reciprocal part written out with one batched spread, FFT and gather
        for all P (``cutoffs.pme_reciprocal_gradient_and_zeta``), the rest by
        ``jax.linearize``.
        ``host``: the CPU custom call (``timemachine.backends.xla_cpu``, passed in from
        the sensitivity layer) for the pairs' contraction and PME's spread and gather, or
        None for XLA's."""
        from timemachine.potentials import cutoffs

        wrt = np.asarray(wrt)
        box = None if self.box is None else jnp.asarray(self.box)
        onehots = {}
        for kind, index in (("charge", self.charge_index), ("sigma", self.sigma_index),
                            ("epsilon", self.epsilon_index)):  # fmt: skip
            hit = np.asarray(index)[:, None] == wrt[None, :]
            cols = np.nonzero(hit.any(0))[0]
            onehots[kind] = (cols, hit[:, cols].astype(np.float64)) if cols.size else None
        pme = self.alpha is not None
        g, z = cutoffs.neighbour_pair_gradient_and_zeta(
            x, params[self.charge_index], params[self.sigma_index], params[self.epsilon_index],
            neighbours, box, self.cutoff, self.dielectric, self.switch_distance, self.alpha,
            dx, onehots, None if host is None else host.neighbour_pairs,
            (self.exclusion_rows, self.exclusion_idx) if pme else None,
        )  # fmt: skip
        onehot = jnp.zeros((wrt.shape[0], params.shape[0]), params.dtype)
        onehot = onehot.at[np.arange(wrt.shape[0]), wrt].set(1.0)
        if pme:
            q, dq = params[self.charge_index], onehot[:, self.charge_index]
            g_rec, z_rec = cutoffs.pme_reciprocal_gradient_and_zeta(
                x, q, box, self.alpha, self.grid, dx, dq, host=host
            )  # fmt: skip
            g, z = g + g_rec, z + z_rec
        rest = jax.grad(lambda y, p: self._long_range(y, p, reciprocal=False,
                                                      exclusions=False))  # fmt: skip
        g_rest, lin = jax.linearize(rest, x, params)
        return g + g_rest, z + jax.vmap(lin)(dx, onehot)

    def _long_range(self, x, params, reciprocal=True, exclusions=True):
        """Everything but the cutoff pair sum: PME's reciprocal (unless ``reciprocal`` is
        False), self and exclusion terms (the latter unless ``exclusions`` is False), the
        1-4 exceptions and the dispersion correction, kJ/mol."""
        from timemachine.potentials import cutoffs

        q = params[self.charge_index]
        sig = params[self.sigma_index]
        eps = params[self.epsilon_index]
        box = None if self.box is None else jnp.asarray(self.box)
        e = 0.0
        if self.alpha is not None:  # PME: reciprocal space, self energy, exclusions
            if reciprocal:
                e = e + cutoffs.pme_reciprocal_energy(x, q, box, self.alpha, self.grid)
            e = e + cutoffs.ewald_self_energy(q, self.alpha)
            if exclusions:
                e = e + cutoffs.ewald_exclusion_energy(x, q, self.exclusion_idx, self.alpha)
        e = e + potentials.nonbonded_exceptions(
            x, self.exception_idx, q, sig, eps, self.coulomb_scale, self.lj_scale
        )
        if box is not None and self.dispersion_correction:
            e = e + cutoffs.dispersion_correction(
                params[self.class_sigma_index], params[self.class_epsilon_index],
                self.class_counts, box, self.cutoff, self.switch_distance,
            )  # fmt: skip
        return e

    def coordinate_groups(self, where):
        return []  # the whole term through autodiff


CutoffNonbonded = _pytree(
    CutoffNonbonded,
    ["charge_index", "sigma_index", "epsilon_index", "exclusion_rows", "exception_idx",
     "coulomb_scale", "lj_scale", "class_sigma_index", "class_epsilon_index", "box",
     "exclusion_idx"],
    ["class_counts", "cutoff", "dielectric", "switch_distance", "dispersion_correction",
     "alpha", "grid", "cells", "cell_capacity", "skin", "neighbour_capacity",
     "neighbour_cells", "neighbour_cell_capacity"],
)  # fmt: skip


class OBC2:
    """OBC2 generalized Born + ACE surface term; charge/radius/scale_index (N,) into θ.

    ``cutoff``: None (all pairs) or r_c in nm, OpenMM's ``CutoffNonPeriodic`` GB (pairs with
    r < r_c only, the pair term shifted by -1/r_c; ``timemachine.potentials.gbsa``). With
    a cutoff the term has no all-pairs structured part and no CUDA kernel (backend="cuda"
    refuses it). With a cutoff and a ``skin`` > 0
    (``timemachine.neighbours.with_neighbour_list``) the step programs sum its Born
    integrals and pairs over a Verlet list of every pair (``neighbour_capacity`` partners
    per row): O(N K), not O(N²), and ζ on that list is structured
    (``gradient_and_zeta``); without a list, ζ is forward-mode autodiff of its gradient.
    """

    kind = "gb"
    box = None  # no periodic images (the Verlet list's upkeep reads it)
    charge_index: np.ndarray
    radius_index: np.ndarray
    scale_index: np.ndarray
    solute_dielectric: float = 1.0
    solvent_dielectric: float = 78.5
    cutoff: float | None = None
    skin: float = 0.0  # the Verlet list's skin, nm; 0: no list
    neighbour_capacity: int = 0  # partners per row of the Verlet list

    def __post_init__(self):
        cutoff = potentials.gbsa.check_cutoff(self.cutoff, "OBC2 cutoff")
        object.__setattr__(self, "cutoff", cutoff)

    @property
    def structured(self):
        """The structured part: ``"obc2"`` (timemachine.structured.obc2, pair scalars and
        the Born-radius chain) without a cutoff; None with one (autodiff)."""
        return "obc2" if self.cutoff is None else None

    @property
    def kernel(self):
        """The CUDA table: ``"gb"`` (the tm_gb_* kernels) without a cutoff; None with one."""
        return "gb" if self.cutoff is None else None

    @property
    def uses_neighbours(self) -> bool:
        """True when the step programs carry a Verlet list for this term (a skin and a
        cutoff: without one it sums every pair, the structured path)."""
        return self.skin > 0 and self.cutoff is not None

    def build_neighbours(self, x):
        """The term's Verlet list of x (N, 3) nm: every pair within cutoff + skin (GB
        excludes none; ``cutoffs.Neighbours``). Jittable."""
        from timemachine.potentials import cutoffs

        return cutoffs.build_neighbours(x, None, None, self.cutoff + self.skin,
                                        self.neighbour_capacity)  # fmt: skip

    def per_atom(self, params):
        """(charge e, radius nm, scale), each (N,), from θ (P_all,)."""
        return (params[self.charge_index], params[self.radius_index],
                params[self.scale_index])  # fmt: skip

    def energy(self, x, params, neighbours=None):
        """E (kJ/mol) at x (N, 3) nm; with ``neighbours`` (a fresh list of this term) the
        Born integrals and pairs are summed over it, else over all pairs (exact)."""
        if neighbours is not None:
            return potentials.gbsa.obc2_neighbour_energy(
                x, *self.per_atom(params), neighbours, self.cutoff,
                self.solute_dielectric, self.solvent_dielectric,
            )  # fmt: skip
        return potentials.obc2_energy(
            x, *self.per_atom(params), self.solute_dielectric, self.solvent_dielectric,
            self.cutoff,
        )  # fmt: skip

    def gradient(self, x, params, neighbours):
        """∇_x E (N, 3) kJ/mol/nm on a fresh Verlet list, written out (no scatter;
        ``gbsa.obc2_neighbour_gradient``)."""
        return potentials.gbsa.obc2_neighbour_gradient(
            x, *self.per_atom(params), neighbours, self.cutoff,
            self.solute_dielectric, self.solvent_dielectric,
        )  # fmt: skip

    def gradient_and_zeta(self, x, params, dx, wrt, neighbours, host=None):
        """(∇_x E (N, 3), ζ (P, N, 3)) on a fresh Verlet list for tangents dx (P, N, 3)
        and parameters ``wrt`` (P,): the Hessian-vector products from per-pair scalars
        and the Born-radius chain, contracted with all P tangents at once
        (``gbsa.obc2_neighbour_gradient_and_zeta``); the mixed partials ∂²E/∂x∂θ_p of
        the wrt parameters this term uses (charges, radii, scales) by one forward-mode
        derivative of the list gradient each. ``host``: None, or the CPU custom call's
        module (``timemachine.backends.xla_cpu``, passed in from the sensitivity layer),
        whose ``gb_list_zeta`` computes ∇E and H·t in compiled code where it can run
        (the gbsa function being its reference)."""
        wrt = np.asarray(wrt)
        call = getattr(host, "gb_list_zeta", None)
        fast = None if call is None else call(self, x, params, neighbours, dx)
        if fast is not None:
            g, hvp = fast
        else:
            g, hvp = potentials.gbsa.obc2_neighbour_gradient_and_zeta(
                x, *self.per_atom(params), neighbours, self.cutoff, dx,
                self.solute_dielectric, self.solvent_dielectric,
            )  # fmt: skip
        used = np.concatenate([np.asarray(i) for i in (self.charge_index, self.radius_index,
                                                        self.scale_index)])  # fmt: skip
        cols = np.flatnonzero(np.isin(wrt, used))
        if not cols.size:
            return g, hvp
        onehot = np.zeros((cols.size, params.shape[0]))
        onehot[np.arange(cols.size), wrt[cols]] = 1.0
        _, lin = jax.linearize(lambda th: self.gradient(x, th, neighbours), params)
        mixed = jax.vmap(lin)(jnp.asarray(onehot, params.dtype))
        return g, hvp.at[cols].add(mixed)

    def coordinate_groups(self, where):
        return []


OBC2 = _pytree(
    OBC2,
    ["charge_index", "radius_index", "scale_index"],
    ["solute_dielectric", "solvent_dielectric", "cutoff", "skin", "neighbour_capacity"],
)


class CustomTerm:
    """Any JAX-traceable energy ``fn(x, p) -> scalar`` of its own parameters ``p = θ[param_index]``.

    This is how a new functional form enters a System: its derivatives (forces, Hessian
    products, mixed partials) come from autodiff.
    """

    structured = None
    kernel = None
    param_index: np.ndarray
    fn: Callable
    kind: str = "custom"

    def energy(self, x, params):
        return self.fn(x, params[self.param_index])

    def coordinate_groups(self, where):
        return []


CustomTerm = _pytree(CustomTerm, ["param_index"], ["fn", "kind"])


# (kind, field) -> (lower bound, strict): the physical range of a typed parameter
_PHYSICAL = {
    ("bond", "k"): (0.0, False),
    ("bond", "length"): (0.0, True),
    ("angle", "k"): (0.0, False),
    ("sigma", "sigma"): (0.0, False),  # amber's hydroxyl hydrogens have σ = ε = 0
    ("epsilon", "epsilon"): (0.0, False),
    ("gb", "radius"): (0.0, True),
    ("gb", "scale"): (0.0, False),
}


@functools.lru_cache(maxsize=64)
def _physical_bounds(names):
    lower = np.full(len(names), -np.inf)
    strict = np.zeros(len(names), dtype=bool)
    for i, name in enumerate(names):
        parts = name.split("/")
        bound = _PHYSICAL.get((parts[0], parts[-1]))
        if bound is not None:
            lower[i], strict[i] = bound
    return lower, strict


def _energy(terms, x, params, neighbours=None):
    """Σ of the terms' energies; ``neighbours`` (``timemachine.neighbours``) a tuple with
    one Verlet list per term (None for terms without), or None for the exact sums."""
    if neighbours is None:
        return sum(t.energy(x, params) for t in terms)
    return sum(
        t.energy(x, params) if nb is None else t.energy(x, params, nb)
        for t, nb in zip(terms, neighbours, strict=True)
    )


_energy_jit = jax.jit(_energy)
_gradient_jit = jax.jit(jax.grad(_energy, argnums=1))
_term_energies_jit = jax.jit(lambda terms, x, params: [t.energy(x, params) for t in terms])


class System:
    """A molecular system: masses, typed parameters θ and energy terms.

    Attributes:
      masses: (N,) float64, amu.
      param_names: tuple of P names ``kind/type-key/field``.
      params: (P,) float64 default parameter vector (read-only copy).
      terms: tuple of term pytrees, each with ``energy(x, params)``.
      topology: the OpenMM Topology it came from, or None.
    """

    def __init__(self, masses, terms, param_names, params, topology=None):
        masses = np.asarray(masses, dtype=np.float64)
        if masses.ndim != 1 or masses.size == 0:
            raise InputError(f"masses must be a non-empty 1-D array, got shape {masses.shape}")
        bad = np.flatnonzero(~(np.isfinite(masses) & (masses > 0)))
        if bad.size:
            raise InputError(
                f"masses must be finite and > 0: atom {bad[0]} has mass {float(masses[bad[0]])} amu"
            )
        params = np.array(params, dtype=np.float64)
        param_names = tuple(param_names)
        if params.shape != (len(param_names),):
            raise InputError(
                f"params has shape {params.shape} but there are {len(param_names)} param_names"
            )
        dup = (
            {n for n in param_names if param_names.count(n) > 1}
            if len(set(param_names)) != len(param_names)
            else set()
        )
        if dup:
            raise InputError(f"duplicate parameter names: {sorted(dup)[:5]}")
        params.setflags(write=False)
        masses.setflags(write=False)
        self.masses = masses
        self.terms = tuple(terms)
        self.param_names = param_names
        self.params = params
        self.topology = topology

    @property
    def n_atoms(self) -> int:
        return self.masses.shape[0]

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def __repr__(self):
        kinds = ", ".join(t.kind for t in self.terms)
        return f"System(n_atoms={self.n_atoms}, n_params={self.n_params}, terms=[{kinds}])"

    # -- parameters -----------------------------------------------------------------
    def select(self, pattern: str | Sequence[str]) -> np.ndarray:
        """Indices into θ of the parameters whose names match a glob (or any of several).

        ``system.select("torsion/*/k*")`` → (P_sel,) int array in θ order.
        Raises InputError if a pattern matches nothing.
        """
        if not isinstance(pattern, (str, list, tuple)):
            raise InputError(
                f"select() takes a glob such as 'torsion/*/k*' or a list of globs, got "
                f"{pattern!r} of type {type(pattern).__name__}"
            )
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        if not patterns:
            raise InputError("select() needs at least one glob pattern, got an empty list")
        chosen = np.zeros(self.n_params, dtype=bool)
        for pat in patterns:
            if not isinstance(pat, str):
                raise InputError(f"parameter pattern must be a string, got {pat!r}")
            hit = np.array([fnmatch.fnmatchcase(n, pat) for n in self.param_names], dtype=bool)
            if not hit.any():
                kinds = sorted({n.split("/")[0] for n in self.param_names})
                raise InputError(
                    f"parameter glob {pat!r} matches none of the {self.n_params} parameters "
                    f"(kinds present: {', '.join(kinds)}; names look like {self.param_names[0]!r})"
                )
            chosen |= hit
        return np.flatnonzero(chosen)

    def resolve_wrt(self, wrt, allow_repeats: bool = False) -> np.ndarray:
        """(P,) int64 indices into θ from ``wrt``: a glob, a list of globs, or int indices.

        The public entry points resolve ``wrt`` once with this and pass the indices down.
        Raises InputError for no match, a bad type or shape, an index out of range or a
        repeated one (unless ``allow_repeats``: ζ's tangents may repeat a parameter, e.g.
        to build a full Hessian column by column).
        """
        if isinstance(wrt, str) or (
            isinstance(wrt, (list, tuple)) and wrt and all(isinstance(w, str) for w in wrt)
        ):
            return self.select(wrt)
        try:
            idx = np.asarray(wrt)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"wrt must be a glob, a list of globs or int indices, got {wrt!r}"
            ) from exc
        if idx.ndim == 0 and np.issubdtype(idx.dtype, np.integer):
            idx = idx.reshape(1)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise InputError(
                f"wrt must be a glob such as 'torsion*', a list of globs, or a non-empty 1-D list "
                f"of int indices into self.params, got {wrt!r}"
            )
        bad = np.flatnonzero((idx < 0) | (idx >= self.n_params))
        if bad.size:
            raise InputError(
                f"wrt[{bad[0]}] = {int(idx[bad[0]])} is not an index into self.params "
                f"(the system has {self.n_params} parameters)"
            )
        if not allow_repeats and np.unique(idx).size != idx.size:
            raise InputError(f"wrt has repeated indices: {idx.tolist()}")
        return idx.astype(np.int64)

    def resolve_params(self, params) -> np.ndarray:
        """(P_all,) float64 θ: ``params`` checked for shape and finiteness, or the default θ."""
        if params is None:
            return np.asarray(self.params)
        if np.iscomplexobj(params):
            raise InputError(f"params must be real numbers, got a {np.asarray(params).dtype} array")
        try:
            theta = np.asarray(params, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"params must be a ({self.n_params},) array of numbers (system.param_names "
                f"order), got {params!r}"
            ) from exc
        if theta.shape != (self.n_params,):
            raise InputError(f"params must have shape ({self.n_params},), got {theta.shape}")
        bad = np.flatnonzero(~np.isfinite(theta))
        if bad.size:
            raise InputError(f"params[{bad[0]}] ({self.param_names[bad[0]]}) is {theta[bad[0]]}")
        self.check_physical(theta)
        return theta

    def check_physical(self, theta, where="params") -> None:
        """InputError naming the first entry of θ outside its physical range: a negative
        bond or angle force constant, σ or ε, a bond length or GB radius <= 0, a negative
        GB scale. Torsion barriers and phases, and charges, may take any sign."""
        lower, strict = _physical_bounds(self.param_names)
        theta = np.asarray(theta, dtype=np.float64)
        bad = np.flatnonzero(np.where(strict, theta <= lower, theta < lower))
        if bad.size:
            i = int(bad[0])
            bound = "> 0" if strict[i] else ">= 0"
            raise InputError(
                f"{where}[{i}] ({self.param_names[i]}) = {float(theta[i])!r} is out of its "
                f"physical range: it must be {bound} ({bad.size} entries out of range in all)"
            )

    def index(self, name: str) -> int:
        """Index into θ of one parameter name."""
        try:
            return self.param_names.index(name)
        except ValueError:
            raise InputError(f"no parameter named {name!r} in this system") from None

    def with_params(self, params) -> System:
        """A copy of this System whose default θ is ``params`` (P,)."""
        return System(self.masses, self.terms, self.param_names, params, self.topology)

    def add_term(self, fn: Callable, param_names=(), values=(), kind="custom") -> System:
        """A new System with an extra energy term ``fn(x, p)`` with its own parameters.

        Args:
          fn: JAX-traceable ``fn(x (N,3) nm, p (k,)) -> energy kJ/mol``.
          param_names: k new names, ``kind/type-key/field``.
          values: k initial values.
        """
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(param_names) != values.size:
            raise InputError(f"add_term: {len(param_names)} param_names but {values.size} values")
        start = self.n_params
        term = CustomTerm(np.arange(start, start + values.size), fn, kind)
        return System(
            self.masses,
            self.terms + (term,),
            self.param_names + tuple(param_names),
            np.concatenate([self.params, values]),
            self.topology,
        )

    def without_terms(self, kind: str) -> System:
        """A new System without the terms of one kind (for example to replace 'bond')."""
        kept = tuple(t for t in self.terms if t.kind != kind)
        if len(kept) == len(self.terms):
            raise InputError(f"no term of kind {kind!r}; kinds: {[t.kind for t in self.terms]}")
        return System(self.masses, kept, self.param_names, self.params, self.topology)

    # -- energies -------------------------------------------------------------------
    def check_positions(self, x, where="positions") -> jnp.ndarray:
        """Validate positions: shape (N, 3) and finite. Returns a float64 array."""
        if np.iscomplexobj(x):  # numpy would drop the imaginary part with a warning
            raise InputError(f"{where} must be real (N, 3) coordinates (nm), got complex values")
        try:
            x = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{where} must be an ({self.n_atoms}, 3) array (nm), got {x!r}"
            ) from exc
        if x.shape != (self.n_atoms, 3):
            raise InputError(
                f"{where} must have shape ({self.n_atoms}, 3) for this system, got {x.shape}"
            )
        bad = np.argwhere(~np.isfinite(x))
        if bad.size:
            i, c = bad[0]
            raise InputError(
                f"{where} contains {float(x[i, c])} at atom {i}, coordinate {'xyz'[c]}"
            )
        return jnp.asarray(x)

    def _params(self, params):
        if params is None:
            return jnp.asarray(self.params)
        if isinstance(params, jax.core.Tracer):  # inside a caller's transformation
            p = jnp.asarray(params, dtype=jnp.float64)
            if p.shape != (self.n_params,):
                raise InputError(f"params must have shape ({self.n_params},), got {p.shape}")
            return p
        return jnp.asarray(self.resolve_params(params))

    def energy_fn(self) -> Callable:
        """The pure function ``E(x, θ)``, for use inside jit/scan/grad (no input checks)."""
        return partial(_energy, self.terms)

    def coordinate_groups(self) -> list[CoordinateGroup]:
        """Every term's :class:`CoordinateGroup` s, in term order (the term registry's
        internal-coordinate face; see the module docstring)."""
        return [
            g
            for t_no, term in enumerate(self.terms)
            for g in term.coordinate_groups(f"system.terms[{t_no}] ({term.kind})")
        ]

    def energy(self, x, params=None) -> float:
        """Potential energy (kJ/mol) at positions x (N, 3) nm and parameters θ (P,)."""
        return _energy_jit(self.terms, self.check_positions(x), self._params(params))

    def gradient(self, x, params=None) -> jnp.ndarray:
        """∇_x E (N, 3), kJ/mol/nm (forces are its negative)."""
        return _gradient_jit(self.terms, self.check_positions(x), self._params(params))

    def energy_terms(self, x, params=None) -> dict:
        """Energy of each term, {kind: kJ/mol}."""
        values = _term_energies_jit(self.terms, self.check_positions(x), self._params(params))
        out = {}
        for t, v in zip(self.terms, values, strict=True):
            out[t.kind] = out.get(t.kind, 0.0) + float(v)
        return out
