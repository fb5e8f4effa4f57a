"""A C++ XLA custom call for the CPU: ∇E and ζ of the internal-coordinate terms, the
all-pairs Hessian contraction of ζ, and its Verlet-list contraction (``neighbour_zeta``).

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
NEIGHBOUR_TARGET = "tm_neighbour_zeta"
FLAGS = ("-O3", "-march=native")
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


def _register() -> None:
    import jaxlib

    src = os.path.join(kernel_dir(), "host", "tm_xla_cpu.cpp")
    flags = tuple(os.environ.get("TIMEMACHINE_XLA_CPU_FLAGS", " ".join(FLAGS)).split())
    path = build_shared_library(
        src,
        "tm_xla_cpu",
        flags,
        include_dirs=(jax.ffi.include_dir(),),
        key_extra=_cpu_signature() + jaxlib.__version__,
    )
    lib = ctypes.CDLL(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.TmGradientZeta), "cpu")
    jax.ffi.register_ffi_target(NEIGHBOUR_TARGET, jax.ffi.pycapsule(lib.TmNeighbourZeta), "cpu")
    _STATE["lib"] = lib  # keep the library loaded for the process


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


def neighbour_zeta(x, box, idx, pair_a, pair_b, dx_dtheta, mixed=None):
    """ζ's Verlet-list pair contraction in the custom call: (P, N, 3)
    Σ_j (A_ij d dᵀ + B_ij I)(t_i - t_j) over row i's partners j of ``idx`` (N, K) (padded
    with N at the end, every pair in both rows), d = x_i - x_j (minimum image in ``box``
    (3,) nm, or None), A, B (N, K) the pair scalars (``cutoffs``), t = dx_dtheta (P, N, 3).
    Rows are independent and summed in the list's order: bitwise the same on any number
    of threads. ``cutoffs.neighbour_pair_gradient_and_zeta`` is the JAX reference.

    ``mixed``: optional (mix_i, mix_j (M, N, K), mix_p (M, N) int32), M ≤ 3 parameter
    kinds: ∂B_ij/∂(atom i's, atom j's parameter of kind m) and each atom's tangent of
    that kind (-1: none); the call then adds Σ_j (mix_i [p = mix_p_i] + mix_j [p =
    mix_p_j]) d_ij, the pairs' mixed partials, to ζ."""
    box = jnp.zeros((0,), jnp.float64) if box is None else jnp.asarray(box, jnp.float64)
    if mixed is None:
        mixed = (jnp.zeros((0,), jnp.float64), jnp.zeros((0,), jnp.float64),
                 jnp.zeros((0,), jnp.int32))  # fmt: skip
    out = jax.ShapeDtypeStruct(dx_dtheta.shape, jnp.float64)
    call = jax.ffi.ffi_call(NEIGHBOUR_TARGET, out, vmap_method="sequential")
    return call(x, box, idx.astype(jnp.int32), pair_a, pair_b, dx_dtheta, *mixed)


__all__ = ["BondedTables", "available", "neighbour_zeta"]
