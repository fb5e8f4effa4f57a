"""A C++ XLA custom call for the CPU: ∇E and ζ of the internal-coordinate terms, the
all-pairs Hessian contraction of ζ, a Verlet list's cutoff pairs (``neighbour_pairs``: ∇E
and ζ with the pair scalars computed in C++, with PME's excluded-pair correction in the
same rows), and PME's tangent spread and gather
(``pme_spread``, ``pme_gather``).

The structured ζ (``timemachine.sensitivity.zeta``) needs, for every bond, angle, proper
and improper torsion and 1-4 exception, the block f''∇q∇qᵀ + f'∇²q of its coordinate q
contracted with all P tangents, and the mixed partials of the terms whose parameters are
chosen. In XLA on CPU that is hundreds of tiny kernels (about half of trialanine's
sensitivity step) or, on a protein, a large scatter into the dense Hessian.
``cuda/kernels/host/tm_xla_cpu.cpp`` does it in one pass over the distinct atom tuples
with the per-term maths of ``bonded.cuh`` (the functions the CUDA kernels and the host
build share), registered with ``jax.ffi`` so that it runs inside the compiled step.

Given the all-pairs scalars A, B (N, N) that the structured terms (timemachine.structured)
compute in XLA, the same call also applies the pair blocks A_ij d dᵀ + B_ij I to the
tangents over the upper triangle (half the flops of XLA's dense (P, 3N)·(3N, 3N)
product, and no 24 MB matrix on villin). The
tangents are split in chunks of 8 among XLA's intra-op threads; each chunk is summed in
one fixed order, so the results do not depend on the number of threads.

The pure-JAX path stays the reference: ``make_gradient_and_zeta(..., bonded="jax")``, and
the tests compare the two. This path is used where JAX computes on the CPU and a C++
compiler is present; ``TIMEMACHINE_HOST_KERNELS=0`` turns it off. The library is built on
first use with ``-O3 -march=native`` into the cache directory (``$TIMEMACHINE_CACHE``,
else ``~/.cache/timemachine``), keyed by the sources, the compiler, the CPU and jaxlib.
``TIMEMACHINE_XLA_CPU_FLAGS`` replaces the compiler flags (the tests build it with the
address and undefined-behaviour sanitizers that way).

It is a forward computation only: ``jax.grad``/``jax.jvp`` through it are not defined
(nothing differentiates ζ; plain MD's gradient keeps the JAX path).
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.backends import kernel_dir
from timemachine.backends.host import build_shared_library, host_compiler
from timemachine.errors import SimulationError

TARGET = "tm_gradient_zeta"
NEIGHBOUR_TARGET = "tm_neighbour_pairs"
PME_SPREAD_TARGET = "tm_pme_spread"
PME_GATHER_TARGET = "tm_pme_gather"
FORCES_TARGET = "tm_neighbour_forces"
BUILD_TARGET = "tm_neighbour_build"
CHARGE_SPREAD_TARGET = "tm_pme_charge_spread"
FORCE_GATHER_TARGET = "tm_pme_force_gather"
FIELD_GATHER_TARGET = "tm_pme_field_gather"
FLAGS = ("-O3", "-march=native", "-fno-math-errno")  # no errno: sqrt vectorises
_STATE: dict = {}


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def available() -> tuple[bool, str]:
    """(True, "") when the custom call can run here, else (False, why)."""
    if "ok" in _STATE:
        return _STATE["ok"], _STATE["why"]
    ok, why = True, ""
    if os.environ.get("TIMEMACHINE_HOST_KERNELS", "1") == "0":
        ok, why = False, "TIMEMACHINE_HOST_KERNELS=0"
    elif jax.default_backend() != "cpu":
        ok, why = False, f"JAX computes on {jax.default_backend()!r}, not the CPU"
    elif host_compiler() is None:
        ok, why = False, "no host C++ compiler ($CXX, g++ or clang++)"
    elif not hasattr(jax, "ffi"):
        ok, why = False, f"jax {jax.__version__} has no jax.ffi"
    if ok:
        try:
            _register()
        except SimulationError as exc:
            ok, why = False, str(exc)
    _STATE.update(ok=ok, why=why)
    return ok, why


def load_library(source, name, targets, flags=FLAGS):
    """Build ``cuda/kernels/host/<source>`` (cached; ``TIMEMACHINE_XLA_CPU_FLAGS`` replaces
    ``flags``) and register its handlers with XLA's CPU: ``targets`` {FFI target name:
    exported symbol}. Returns the loaded library (keep it alive for the process)."""
    import jaxlib

    src = os.path.join(kernel_dir(), "host", source)
    flags = tuple(os.environ.get("TIMEMACHINE_XLA_CPU_FLAGS", " ".join(flags)).split())
    path = build_shared_library(
        src,
        name,
        flags,
        include_dirs=(jax.ffi.include_dir(),),
        key_extra=_cpu_signature() + jaxlib.__version__,
    )
    lib = ctypes.CDLL(path)
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
    return lib


def _register() -> None:
    _STATE["lib"] = load_library(  # kept loaded for the process
        "tm_xla_cpu.cpp",
        "tm_xla_cpu",
        {TARGET: "TmGradientZeta", NEIGHBOUR_TARGET: "TmNeighbourPairs",
         PME_SPREAD_TARGET: "TmPmeSpread", PME_GATHER_TARGET: "TmPmeGather",
         FORCES_TARGET: "TmNeighbourForces", BUILD_TARGET: "TmNeighbourBuild",
         CHARGE_SPREAD_TARGET: "TmPmeChargeSpread", FORCE_GATHER_TARGET: "TmPmeForceGather",
         FIELD_GATHER_TARGET: "TmPmeFieldGather"},
    )  # fmt: skip


@dataclass(frozen=True, eq=False)
class BondedTables:
    """The internal-coordinate terms of a System as the custom call reads them.

    tuples (U, 4) int32 distinct atom tuples (unused slots 0), kind (U,) int32 (bonded.cuh
    TermKind), term_start (U + 1,) int32 (tuple u's terms are [term_start[u],
    term_start[u+1]), pidx (T, 6) int32 θ indices per channel, consts (T, 2) float64,
    inv_wrt (P_all,) int32: the tangent p of θ_m, or -1.
    """

    tuples: np.ndarray
    kind: np.ndarray
    term_start: np.ndarray
    pidx: np.ndarray
    consts: np.ndarray
    inv_wrt: np.ndarray

    @classmethod
    def build(cls, groups, n_params, wrt):
        """``groups``: (kind, idx (T, k), pidx (T, C), consts (T, NC), where) per term group,
        as :func:`timemachine.backends.tables.coordinate_term_groups` gives them (possibly
        none: the tables are then empty)."""
        tuples, kinds, counts, pidx, consts = [], [], [], [], []
        for kind, idx, pi, cst, _ in groups:
            idx = np.asarray(idx, np.int64)
            if idx.shape[0] == 0:
                continue
            uniq, inv = np.unique(idx, axis=0, return_inverse=True)
            order = np.argsort(inv.reshape(-1), kind="stable")
            k, c = idx.shape[1], np.shape(pi)[1]
            tup = np.zeros((uniq.shape[0], 4), np.int32)
            tup[:, :k] = uniq
            tuples.append(tup)
            kinds.append(np.full(uniq.shape[0], kind, np.int32))
            counts.append(np.bincount(inv.reshape(-1), minlength=uniq.shape[0]))
            p6 = np.zeros((idx.shape[0], 6), np.int32)
            p6[:, :c] = np.asarray(pi, np.int64)[order]
            pidx.append(p6)
            c2 = np.zeros((idx.shape[0], 2))
            cst = np.asarray(cst, np.float64).reshape(idx.shape[0], -1)
            c2[:, : cst.shape[1]] = cst[order]
            consts.append(c2)
        inv_wrt = np.full(n_params, -1, np.int32)
        inv_wrt[np.asarray(wrt, np.int64)] = np.arange(len(wrt), dtype=np.int32)
        # none at all (an LJ fluid): empty tables, the call then does the pairs alone
        tuples.append(np.zeros((0, 4), np.int32))
        kinds.append(np.zeros(0, np.int32))
        counts.append(np.zeros(0, np.int64))
        pidx.append(np.zeros((0, 6), np.int32))
        consts.append(np.zeros((0, 2)))
        start = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int32)
        return cls(
            np.concatenate(tuples),
            np.concatenate(kinds),
            start,
            np.concatenate(pidx),
            np.concatenate(consts),
            inv_wrt,
        )

    def __call__(self, x, params, dx_dtheta, pair_a=None, pair_b=None):
        """(∇E (N, 3) kJ/mol/nm, ζ (P, N, 3)) of these terms at x with tangents dx/dθ.

        ``pair_a``, ``pair_b``: optional symmetric (N, N) all-pairs Hessian scalars (the
        block of pair ij is A_ij d dᵀ + B_ij I, d = x_i - x_j, kJ/mol/nm⁴ and kJ/mol/nm²);
        given, ζ also gets Σ_j (A_ij d dᵀ + B_ij I)(t_i - t_j) (not the gradient: that is
        Σ_j B_ij d_ij, computed in XLA). The tangents are split among XLA's CPU threads.
        """
        out = (
            jax.ShapeDtypeStruct(x.shape, jnp.float64),
            jax.ShapeDtypeStruct(dx_dtheta.shape, jnp.float64),
        )
        if pair_a is None:
            pair_a = pair_b = jnp.zeros((0,), jnp.float64)
        call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
        return call(
            x,
            params,
            dx_dtheta,
            self.tuples,
            self.kind,
            self.term_start,
            self.pidx,
            self.consts,
            self.inv_wrt,
            pair_a,
            pair_b,
        )


def neighbour_pairs(x, box, idx, atoms, consts, dx_dtheta, mix_p=None, exclusions=None):
    """∇E (N, 3) and ζ (P, N, 3) of a Verlet list's cutoff pairs in the custom call, the
    per-pair scalars computed there with the closed forms of ``cutoffs._pair_scalars``
    (``cutoffs.neighbour_pair_gradient_and_zeta`` is the JAX reference).

    Args:
      x: (N, 3) nm; box: (3,) nm or None (no images); idx: (N, K) the list (partners
        first, padded with N; every pair in both rows).
      atoms: (4, N) each atom's charge (e), σ (nm), √ε and d√ε/dε (0 where ε = 0).
      consts: (cutoff nm, switch distance nm or -1, k_rf nm⁻³, α nm⁻¹ or 0 for the
        reaction field).
      dx_dtheta: (P, N, 3) tangents.
      mix_p: optional (3, N) int32, the tangent of atom a's charge, σ and ε (-1: none);
        given, ζ also gets the pairs' mixed partials ∂(∇E)/∂θ_p.
      exclusions: optional (N, M) int32, row i the atoms excluded from i (-1 after the
        last; ``cutoffs.exclusion_table``), with PME only: ∇E and ζ then also hold
        Ewald's correction -k_e q_i q_j erf(α r)/r over those pairs, without periodic
        images (``cutoffs.ewald_exclusion_gradient_and_zeta`` is its reference), each
        row's excluded partners summed after its listed ones.

    Rows are independent and summed in the list's order: bitwise the same on any number
    of threads."""
    box = jnp.zeros((0,), jnp.float64) if box is None else jnp.asarray(box, jnp.float64)
    mix_p = jnp.zeros((0,), jnp.int32) if mix_p is None else jnp.asarray(mix_p, jnp.int32)
    excl = (jnp.zeros((0,), jnp.int32) if exclusions is None
            else jnp.asarray(exclusions, jnp.int32))  # fmt: skip
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float64),
        jax.ShapeDtypeStruct(dx_dtheta.shape, jnp.float64),
    )
    call = jax.ffi.ffi_call(NEIGHBOUR_TARGET, out, vmap_method="sequential")
    return call(x, box, idx.astype(jnp.int32), atoms, jnp.asarray(consts, jnp.float64),
                dx_dtheta, mix_p, excl)  # fmt: skip


def gb_list_zeta(term, x, params, neighbours, tangents):
    """``xla_cpu_gb.gb_list_zeta`` (the cutoff GB's ∇E and H·t on its list, compiled), or
    None where that library cannot run here (the caller then takes the JAX path)."""
    from timemachine.backends import xla_cpu_gb

    if not xla_cpu_gb.available()[0]:
        return None
    return xla_cpu_gb.gb_list_zeta(term, x, params, neighbours, tangents)


def pme_spread(w, dw, idx, charge, dq, dx, grid):
    """PME's tangent spread in the custom call: (P, K_x, K_y, K_z) δQ_p = Σ_j dq_p,j W_j +
    q_j ∇W_j · dx_p,j, with atom j's stencil the product of its B-spline weights ``w``
    (N, 3, order) at grid indices ``idx`` (N, 3, order) int32 and ``dw`` their
    x-derivatives (nm⁻¹); charge (N,) e, dq (P, N), dx (P, N, 3). The JAX scatter of
    ``cutoffs.pme_reciprocal_gradient_and_zeta`` is the reference; bitwise the same on
    any number of threads."""
    p = dx.shape[0]
    out = jax.ShapeDtypeStruct((p,) + tuple(int(g) for g in grid), jnp.float64)
    call = jax.ffi.ffi_call(PME_SPREAD_TARGET, out, vmap_method="sequential")
    return call(w, dw, idx.astype(jnp.int32), charge, dq, dx)


def pme_gather(potential, w, dw, idx):
    """PME's tangent gather in the custom call: (P, N, 3) Σ_g δΨ_p(g) ∇W_i(g) for grid
    potentials ``potential`` (P, K_x, K_y, K_z) and the stencils of ``pme_spread``."""
    p, n = potential.shape[0], w.shape[0]
    out = jax.ShapeDtypeStruct((p, n, 3), jnp.float64)
    call = jax.ffi.ffi_call(PME_GATHER_TARGET, out, vmap_method="sequential")
    return call(potential, w, dw, idx.astype(jnp.int32))


def neighbour_forces(x, box, idx, atoms, consts):
    """∇E (N, 3) kJ/mol/nm of a Verlet list's cutoff pairs for plain MD (no tangents):
    ``neighbour_pairs``' arguments without dx and mix_p, the same closed forms, each row
    in two passes (its partners within the cutoff gathered, then their scalars in SIMD
    batches). ``cutoffs.neighbour_pair_gradient`` is the JAX reference. Bitwise the same
    on any number of threads."""
    box = jnp.zeros((0,), jnp.float64) if box is None else jnp.asarray(box, jnp.float64)
    out = jax.ShapeDtypeStruct(x.shape, jnp.float64)
    call = jax.ffi.ffi_call(FORCES_TARGET, out, vmap_method="sequential")
    return call(x, box, idx.astype(jnp.int32), atoms, jnp.asarray(consts, jnp.float64))


def neighbour_build(x, box, radius, capacity, exclusions=None, mask=None):
    """(idx (N, capacity) int32, overflow bool): ``cutoffs.build_neighbours``' Verlet list
    built in compiled code: the same partners in each row, those j > i first, then those
    j < i (``cutoffs.Neighbours``).

    The allowed pairs: ``exclusions``, the (N, M) ``cutoffs.exclusion_table``, ``mask``,
    the (N, N) bool of allowed pairs, or neither: every pair (generalized Born's list). In a
    periodic ``box`` (3,) nm 2.5 radii across, and without a box (box None: cells of a
    virtual box around the atoms, its edges their extent plus the radius, so that the
    minimum image keeps exactly the true pairs), the candidates come from a cell list
    (O(N): cells of edge ≥ radius/2, the 5³ around each atom's, skipping those wholly
    beyond the radius; the order within a row's two parts then differs from the JAX
    build's), else (a small periodic box; x not finite or more than 8 cells per atom)
    they are every atom by index (the JAX build's order). The cells hold every atom, so
    only a row over ``capacity`` overflows."""
    n = x.shape[0]
    box = jnp.zeros((0,), jnp.float64) if box is None else jnp.asarray(box, jnp.float64)
    if mask is None:
        exclusions = (jnp.zeros((n, 0), jnp.int32) if exclusions is None
                      else jnp.asarray(exclusions, jnp.int32))  # fmt: skip
        mask = jnp.zeros((0,), jnp.bool_)
    else:
        exclusions = jnp.zeros((n, 0), jnp.int32)
        mask = jnp.asarray(mask, jnp.bool_)
    out = (jax.ShapeDtypeStruct((n, int(capacity)), jnp.int32),
           jax.ShapeDtypeStruct((), jnp.int32))  # fmt: skip
    call = jax.ffi.ffi_call(BUILD_TARGET, out, vmap_method="sequential")
    idx, overflow = call(x, box, exclusions, mask, jnp.asarray([radius], jnp.float64))
    return idx, overflow > 0


def pme_charge_spread(w, dw, idx, charge, grid):
    """Q (K_x, K_y, K_z) = Σ_j q_j W_j: the charges on PME's grid, with ``pme_spread``'s
    stencils (plain MD; one pass in atom order)."""
    out = jax.ShapeDtypeStruct(tuple(int(g) for g in grid), jnp.float64)
    call = jax.ffi.ffi_call(CHARGE_SPREAD_TARGET, out, vmap_method="sequential")
    return call(w, dw, idx.astype(jnp.int32), charge)


def pme_force_gather(potential, w, dw, idx, charge):
    """(N, 3) q_i Σ_g Ψ(g) ∇W_i(g): PME's reciprocal gradient from the grid potential
    Ψ (K_x, K_y, K_z) (plain MD)."""
    out = jax.ShapeDtypeStruct((w.shape[0], 3), jnp.float64)
    call = jax.ffi.ffi_call(FORCE_GATHER_TARGET, out, vmap_method="sequential")
    return call(potential, w, dw, idx.astype(jnp.int32), charge)


def pme_field_gather(potential, w, dw, ddw, idx):
    """(Σ_g Ψ(g) ∇W_i(g) (N, 3), Σ_g Ψ(g) ∇∇W_i(g) (N, 3, 3)): the charges' grid
    potential Ψ (K_x, K_y, K_z) and its curvature at each atom's stencil, for the ζ step
    (``cutoffs.pme_reciprocal_gradient_and_zeta``'s g0 and h0; ddw (N, 3, order) the
    weights' second derivatives)."""
    n = w.shape[0]
    out = (jax.ShapeDtypeStruct((n, 3), jnp.float64), jax.ShapeDtypeStruct((n, 3, 3), jnp.float64))
    call = jax.ffi.ffi_call(FIELD_GATHER_TARGET, out, vmap_method="sequential")
    return call(potential, w, dw, ddw, idx.astype(jnp.int32))


__all__ = [
    "BondedTables",
    "available",
    "gb_list_zeta",
    "load_library",
    "neighbour_build",
    "neighbour_forces",
    "neighbour_pairs",
    "pme_charge_spread",
    "pme_field_gather",
    "pme_force_gather",
    "pme_gather",
    "pme_spread",
]
