"""The plain-MD gradient on the CPU with the all-pairs terms in a C++ XLA custom call.

``cuda/kernels/host/tm_xla_cpu_gb.cpp`` computes the gradient of OBC2 (no cutoff: the
Born radii, β = ∂E/∂B and the chain through them, three passes over the unordered pairs)
and of the all-pairs LJ + Coulomb (with its exclusions) in SIMD loops over the pairs,
with the per-term maths of ``gbsa.cuh`` and ``nonbonded.cuh``; the bonded terms and 1-4
exceptions go to the custom call of :mod:`timemachine.backends.xla_cpu` (with no
tangents), and any other term keeps ``jax.grad``. In XLA the same work is a few dozen
(N, N) arrays per step; this is what makes the plain step on villin and a 2,000-atom
peptide in OBC2 faster than OpenMM CPU's GBSAOBCForce (``benchmarks/obc2_plain_bench.py``).

:func:`make_gradient` is the plain-MD gradient of a System on this path, or None where it
does not apply (a GPU, no compiler, ``TIMEMACHINE_HOST_KERNELS=0``, cutoffs or Verlet
lists, no all-pairs term). It is registered with
:func:`timemachine.structured.register_fast_gradient`, so ``gradient_fn(system)`` (plain
dynamics, ``EquilibriumChains``, ``tm.simulate``'s primal, the benchmarks) uses it; the
JAX path (``timemachine.structured.make_gradient``) stays the reference, equal to it to
round-off (≤ 1e-12 relative in tests/test_xla_cpu_gb.py). The sums are split in fixed
units among XLA's intra-op threads: bitwise the same result on any number of threads.

The custom call is not differentiable; the gradient has a ``jax.custom_jvp`` whose
tangent is the JAX reference's, so force matching (∂∇E/∂θ) and any jvp/grad through it
get the reference's derivatives.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.backends import xla_cpu
from timemachine.backends.tables import coordinate_term_groups
from timemachine.errors import SimulationError
from timemachine.potentials.gbsa import gb_prefactor
from timemachine.structured import make_gradient as reference_gradient
from timemachine.structured import register_fast_gradient
from timemachine.structured.autodiff import gradient_part

TARGET = "tm_pair_gradient"
LIST_TARGET = "tm_gb_list_gradient"
LIST_ZETA_TARGET = "tm_gb_list_zeta"
# -fno-math-errno: sqrt of a SIMD vector stays one instruction (no errno branch per lane)
FLAGS = ("-O3", "-march=native", "-fno-math-errno")
# pass 1 keeps T'/r of every pair for pass 3 (8 N² bytes) up to this size: N ≤ 4,096
CACHE_BYTES = 128 * 2**20
_STATE: dict = {}


def available() -> tuple[bool, str]:
    """(True, "") when the custom call can run here, else (False, why). Reads
    ``TIMEMACHINE_HOST_KERNELS`` on every call; builds the library once."""
    if os.environ.get("TIMEMACHINE_HOST_KERNELS", "1") == "0":
        return False, "TIMEMACHINE_HOST_KERNELS=0"
    ok, why = xla_cpu.available()  # the CPU, a compiler, jax.ffi; and the bonded call
    if not ok:
        return ok, why
    if "ok" not in _STATE:
        try:
            _register()
            _STATE.update(ok=True, why="")
        except SimulationError as exc:
            _STATE.update(ok=False, why=str(exc))
    return _STATE["ok"], _STATE["why"]


def _register() -> None:
    _STATE["lib"] = xla_cpu.load_library(  # kept loaded for the process
        "tm_xla_cpu_gb.cpp",
        "tm_xla_cpu_gb",
        {
            TARGET: "TmPairGradient",
            LIST_TARGET: "TmGbListGradient",
            LIST_ZETA_TARGET: "TmGbListZeta",
        },  # fmt: skip
        FLAGS,
    )


def gb_list_gradient(term, x, params, neighbours):
    """∇_x (N, 3) kJ/mol/nm of a cutoff ``OBC2`` term on its Verlet list
    (``cutoffs.Neighbours`` of every pair) in the custom call: the three passes of
    ``gbsa.obc2_neighbour_gradient`` (its reference, equal to round-off), each pair once
    from the heads of the rows; NaN where the list overflowed. Not differentiable (the
    callers wrap it in a ``jax.custom_jvp``)."""
    ok, why = available()
    if not ok:
        raise SimulationError(f"the CPU custom call {LIST_TARGET} cannot run here: {why}")
    call = jax.ffi.ffi_call(LIST_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float64),
                            vmap_method="sequential")  # fmt: skip
    grad = call(
        jnp.asarray(x, jnp.float64), *term.per_atom(params),
        jnp.asarray(neighbours.idx, jnp.int32),
        pre=np.float64(gb_prefactor(term.solute_dielectric, term.solvent_dielectric)),
        cutoff=np.float64(term.cutoff),
    )  # fmt: skip
    return grad * jnp.where(neighbours.overflow, jnp.nan, 1.0)


def gb_list_zeta(term, x, params, neighbours, tangents):
    """(∇_x E (N, 3) kJ/mol/nm, H·t (P, N, 3)) of a cutoff ``OBC2`` term on its Verlet list
    for tangents (P, N, 3), in the custom call ``tm_gb_list_zeta``: the three row passes of
    ``gbsa.obc2_neighbour_gradient_and_zeta`` (its reference, equal to round-off; the
    mixed partials are not here), pair scalars in closed form W partners at a time, then
    contracted with W tangents at a time. Each row writes only its own atom's sums: the
    same bits on any number of threads. NaN where the list overflowed. Not
    differentiable."""
    ok, why = available()
    if not ok:
        raise SimulationError(f"the CPU custom call {LIST_ZETA_TARGET} cannot run here: {why}")
    shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float64),
              jax.ShapeDtypeStruct(tangents.shape, jnp.float64))  # fmt: skip
    call = jax.ffi.ffi_call(LIST_ZETA_TARGET, shapes, vmap_method="sequential")
    grad, hvp = call(
        jnp.asarray(x, jnp.float64), *term.per_atom(params),
        jnp.asarray(neighbours.idx, jnp.int32), jnp.asarray(tangents, jnp.float64),
        pre=np.float64(gb_prefactor(term.solute_dielectric, term.solvent_dielectric)),
        cutoff=np.float64(term.cutoff),
    )  # fmt: skip
    bad = jnp.where(neighbours.overflow, jnp.nan, 1.0)
    return grad * bad, hvp * bad


def exclusion_lists(pair_mask) -> tuple[np.ndarray, np.ndarray]:
    """(start (N+1,), partners (E,)) int32: the partners j > i of row i that ``pair_mask``
    (N, N) excludes, increasing, in CSR form."""
    mask = np.asarray(pair_mask, dtype=bool)
    n = mask.shape[0]
    excluded = np.triu(~mask, k=1)
    rows, cols = np.nonzero(excluded)  # row-major: rows, then columns, increasing
    start = np.zeros(n + 1, np.int64)
    np.add.at(start, rows + 1, 1)
    return np.cumsum(start).astype(np.int32), cols.astype(np.int32)


class PairGradient:
    """∇E (N, 3) of a System's all-pairs LJ + Coulomb and OBC2 (either may be absent) in
    the custom call: ``pairs(x, params)``. ``cache_bytes``: the memory OBC2's first pass
    may keep for its third (8 N² bytes; below that the third evaluates the Born
    integrals again)."""

    def __init__(self, n_atoms, nonbonded=None, obc2=None, cache_bytes=CACHE_BYTES):
        ok, why = available()
        if not ok:
            raise SimulationError(f"the CPU custom call {TARGET} cannot run here: {why}")
        self.n = n_atoms
        self.cache_bytes = float(cache_bytes)
        empty_i = np.zeros(0, np.int32)
        self.nb = nonbonded
        self.gb = obc2
        if nonbonded is not None:
            self.excl_start, self.excl = exclusion_lists(nonbonded.pair_mask)
        else:
            self.excl_start, self.excl = empty_i, empty_i
        self.pre = gb_prefactor(obc2.solute_dielectric, obc2.solvent_dielectric) if obc2 else 0.0

    def __call__(self, x, params):
        empty = jnp.zeros((0,), jnp.float64)
        gb = (
            [params[np.asarray(a)] for a in (self.gb.charge_index, self.gb.radius_index,
                                             self.gb.scale_index)]
            if self.gb is not None
            else [empty] * 3
        )  # fmt: skip
        nb = (
            [params[np.asarray(a)] for a in (self.nb.charge_index, self.nb.sigma_index,
                                             self.nb.epsilon_index)]
            if self.nb is not None
            else [empty] * 3
        )  # fmt: skip
        out = jax.ShapeDtypeStruct((self.n, 3), jnp.float64)
        call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
        return call(
            jnp.asarray(x, jnp.float64),
            *gb,
            *nb,
            self.excl_start,
            self.excl,
            pre=np.float64(self.pre),
            cache_bytes=np.float64(self.cache_bytes),
        )


def make_gradient(system):
    """The plain-MD ``gradient(x (N,3), params (P_all,), neighbours=None) -> ∇_x E (N, 3)``
    of ``system`` with its all-pairs terms in the custom call, or None where this path
    does not apply (see the module docstring). Jittable; differentiable through the JAX
    reference (``jax.custom_jvp``)."""
    if not available()[0]:
        return None
    if any(getattr(t, "uses_neighbours", False) for t in system.terms):
        return None
    nonbonded = [t for t in system.terms if t.structured == "nonbonded"]
    obc2 = [t for t in system.terms if t.structured == "obc2"]
    if len(nonbonded) > 1 or len(obc2) > 1 or not (nonbonded or obc2):
        return None
    others = []
    for t_no, term in enumerate(system.terms):
        if term.structured in ("nonbonded", "obc2"):
            continue
        if term.structured is not None:
            return None  # a structured part this call does not know
        if not term.coordinate_groups(f"system.terms[{t_no}]"):
            others.append(gradient_part(term))  # CustomTerm and the like: jax.grad
    pairs = PairGradient(
        system.n_atoms, nonbonded[0] if nonbonded else None, obc2[0] if obc2 else None
    )
    bonded = xla_cpu.BondedTables.build(
        coordinate_term_groups(system), system.n_params, np.zeros(0, np.int64)
    )
    reference = reference_gradient(system)

    @jax.custom_jvp
    def fast(x, params):
        grad = pairs(x, params)
        if bonded.kind.size:
            grad = grad + bonded(x, params, jnp.zeros((0,) + x.shape, x.dtype))[0]
        for part in others:
            grad = grad + part(x, params)
        return grad

    @fast.defjvp
    def _fast_jvp(primals, tangents):  # the custom call has no derivative: the reference's
        return fast(*primals), jax.jvp(reference, primals, tangents)[1]

    def gradient(x, params, neighbours=None):
        if jnp.result_type(x, params) != jnp.float64:
            return reference(x, params)  # float32 steps (timemachine.precision): the call is f64
        return fast(x, params)

    return gradient


register_fast_gradient(make_gradient)

__all__ = ["PairGradient", "available", "exclusion_lists", "make_gradient"]
