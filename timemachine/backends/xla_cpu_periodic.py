"""The plain-MD step of periodic (and cutoff) Systems on the CPU: Verlet-list pairs, the
list build and PME's reciprocal sum in C++ XLA custom calls.

``cuda/kernels/host/tm_xla_cpu.cpp`` holds three calls for a ``CutoffNonbonded`` term
summing its pairs over a Verlet list (``timemachine.neighbours``):

* ``tm_neighbour_forces``: the cutoff pairs' ∇E (LJ with OpenMM's switch, reaction field
  or PME's erfc-screened Coulomb), each row in two passes: its partners within the cutoff
  gathered into contiguous arrays, then their pair scalars in SIMD batches with the
  closed forms of ``cutoff.cuh`` (the CUDA kernels' and the ζ call's too);
* ``tm_neighbour_build``: the Verlet list through a cell list, the same partners in each
  row as ``cutoffs.build_neighbours``' JAX build (the tests compare them), which it
  replaces once this module is imported (``cutoffs.register_list_builder``);
* ``tm_pme_charge_spread`` and ``tm_pme_force_gather``: PME's charge spread and force
  gather around XLA's real FFT (``cutoffs.pme_reciprocal_gradient``).

A cutoff ``OBC2`` term on its Verlet list takes ``tm_gb_list_gradient`` of
:mod:`timemachine.backends.xla_cpu_gb` (the Born integrals, dE/dB and the chain, each pair
once from the heads of the rows). The rest of a ``CutoffNonbonded`` term (PME's self and
exclusion terms, the 1-4 exceptions, the dispersion correction) keeps ``jax.grad``;
bonds, angles and torsions go to the bonded custom call of
:mod:`timemachine.backends.xla_cpu` with no tangents. :func:`make_gradient` is
registered with :func:`timemachine.structured.register_fast_gradient`, so
``gradient_fn(system)`` (``EquilibriumChains``, plain dynamics, ``tm.simulate``'s
primal where it runs plain steps) uses it; ``timemachine.structured.make_gradient`` (the
sparse JAX path) stays the reference, equal to it to round-off. Every sum is in a fixed
order: bitwise the same on any number of threads. It has a ``jax.custom_jvp`` whose
tangent is the reference's, so force matching and any jvp through it stay exact.

It applies where :func:`timemachine.backends.xla_cpu.available` (JAX on the CPU, a C++
compiler, ``TIMEMACHINE_HOST_KERNELS`` not 0) and in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.backends import xla_cpu, xla_cpu_gb
from timemachine.backends.tables import coordinate_term_groups
from timemachine.potentials import cutoffs
from timemachine.structured import make_gradient as reference_gradient
from timemachine.structured import register_fast_gradient
from timemachine.structured.autodiff import coordinate_only, gradient_part
from timemachine.system import System


def build_list(x, box, radius, capacity, cells, cell_capacity, allowed):
    """``cutoffs.build_neighbours``' list in the custom call, or None where it cannot run
    (registered with ``cutoffs.register_list_builder``; ``cell_capacity`` is the JAX
    table's: the compiled cells hold every atom)."""
    if not xla_cpu.available()[0]:
        return None
    if allowed is None:  # every pair (generalized Born)
        return xla_cpu.neighbour_build(x, box, radius, capacity)
    if jnp.asarray(allowed).dtype == jnp.bool_:  # an (N, N) mask of the allowed pairs
        return xla_cpu.neighbour_build(x, box, radius, capacity, mask=allowed)
    return xla_cpu.neighbour_build(x, box, radius, capacity, exclusions=allowed)


def _term_gradient(term):
    """``fn(x, params, neighbours) -> ∇_x E`` of one ``CutoffNonbonded`` term on its
    Verlet list: pairs and PME's reciprocal sum in the custom calls, the rest by
    ``jax.grad``."""
    rest = jax.grad(lambda y, p: term._long_range(y, p, reciprocal=False))

    def fn(x, params, neighbours):
        box = None if term.box is None else jnp.asarray(term.box)
        q = params[term.charge_index]
        g = cutoffs.neighbour_pair_gradient(
            x, q, params[term.sigma_index], params[term.epsilon_index], neighbours, box,
            term.cutoff, term.dielectric, term.switch_distance, term.alpha,
            host=xla_cpu.neighbour_forces,
        )  # fmt: skip
        if term.alpha is not None:
            g = g + cutoffs.pme_reciprocal_gradient(x, q, box, term.alpha, term.grid,
                                                    host=xla_cpu)  # fmt: skip
        return g + rest(x, params)

    return fn


def make_gradient(system):
    """The plain-MD ``gradient(x (N,3), params (P_all,), neighbours=None) -> ∇_x E (N, 3)``
    of a System whose cutoff pairs run on Verlet lists, with them in the custom calls
    (module docstring), or None where this path does not apply (no list terms, or the
    custom call cannot run here). Without ``neighbours``, or in float32, it is the JAX
    reference. Jittable; differentiable through the reference (``jax.custom_jvp``)."""
    if not any(getattr(t, "uses_neighbours", False) for t in system.terms):
        return None
    if not xla_cpu.available()[0]:
        return None
    by_tables = coordinate_only(system)
    parts = []
    for term, tabled in zip(system.terms, by_tables, strict=True):
        if tabled:
            parts.append(None)
        elif getattr(term, "uses_neighbours", False) and hasattr(term, "_long_range"):
            parts.append(_term_gradient(term))
        elif (getattr(term, "uses_neighbours", False) and term.kind == "gb"
              and xla_cpu_gb.available()[0]):  # fmt: skip
            parts.append(functools.partial(xla_cpu_gb.gb_list_gradient, term))
        else:
            parts.append(gradient_part(term))
    covered = [t for t, c in zip(system.terms, by_tables, strict=True) if c]
    only = System(system.masses, covered, system.param_names, system.params)
    bonded = xla_cpu.BondedTables.build(coordinate_term_groups(only), system.n_params,
                                        np.zeros(0, np.int64))  # fmt: skip
    reference = reference_gradient(system)

    @jax.custom_jvp
    def fast(x, params, neighbours):
        grad = jnp.zeros_like(x)
        if bonded.kind.size:
            grad = grad + bonded(x, params, jnp.zeros((0,) + x.shape, x.dtype))[0]
        for part, nb in zip(parts, neighbours, strict=True):
            if part is not None:
                grad = grad + part(x, params, nb)
        return grad

    @fast.defjvp
    def _fast_jvp(primals, tangents):  # the custom calls have no derivative: the reference's
        x, params, neighbours = primals
        dx, dparams, _ = tangents
        tangent = jax.jvp(lambda y, p: reference(y, p, neighbours), (x, params), (dx, dparams))[1]
        return fast(*primals), tangent

    def gradient(x, params, neighbours=None):
        if neighbours is None or jnp.result_type(x, params) != jnp.float64:
            return reference(x, params, neighbours)
        return fast(x, params, neighbours)

    return gradient


register_fast_gradient(make_gradient)
cutoffs.register_list_builder(build_list)

__all__ = ["build_list", "make_gradient"]
