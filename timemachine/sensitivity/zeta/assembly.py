"""The production ζ (paper eq. 6) and ∇E-and-ζ of a System, assembled from the structured
terms (``timemachine.structured``): the Hessian of every structured term is applied to all
P tangents at once, so the cost is a few gradients rather than P Hessian-vector products
(docs/design.md, "Performance principles").

In the pure-JAX path the pair forms and bonded blocks form one dense symmetric (3N, 3N)
matrix, applied in column tiles (``dense``); on the CPU custom call
(``timemachine.backends.xla_cpu``) the bonded terms and the pair blocks are applied there
instead. Mixed partials are scattered from the few terms that use each chosen parameter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.backends import xla_cpu
from timemachine.backends.tables import coordinate_term_groups
from timemachine.errors import InputError
from timemachine.sensitivity.zeta.dense import column_tiles, dense_pair_product
from timemachine.sensitivity.zeta.reference import zeta_reference
from timemachine.structured import StructuredTerms
from timemachine.structured import make_gradient as _plain_gradient
from timemachine.structured.autodiff import (
    coordinate_only,
    sparse_gradient,
    sparse_gradient_and_zeta,
)
from timemachine.structured.fusion import unit_rows
from timemachine.system import System


def make_zeta(system, wrt, method="structured", bonded="auto"):
    """A jittable ``zeta(x (N,3), params (P_all,), dx_dtheta (P,N,3)) -> (P,N,3)``.

    ζ_p = H(x)·dx/dθ_p + ∂²E/∂x∂θ_p (paper eq. 6) for the P parameters ``wrt``.

    Args:
      system: a :class:`timemachine.System`.
      wrt: (P,) int indices into ``system.params`` (``system.select(...)``).
      method: "reference" — :func:`zeta_reference`, one jvp of ∇E per parameter (the
        definition); "structured" — the fast path, term by term:

        * all-pairs LJ + Coulomb: closed-form pair Hessian blocks
          ``(E'' - E'/r) r̂r̂ᵀ + (E'/r) I`` from two (N, N) scalar matrices;
        * bonds and 1-4 exceptions (pair lists): the same two scalars per pair, added to
          those matrices;
        * angles, proper and improper torsions: (3k × 3k) blocks
          ``E''(q) ∇q∇qᵀ + E'(q) ∇²q`` of the internal coordinate q (analytic ∇q, its
          Jacobian by forward mode), once per distinct atom tuple;
        * OBC2: its pair part (through r with the Born radii fixed) joins the same two
          matrices; the Born-radius chain adds three matrix products over all tangents
          (see ``timemachine.structured.obc2.OBC2Pairs``);
        * with ``bonded="jax"``, all of the above form one dense symmetric (3N, 3N)
          Hessian, applied to the P tangents with a single (P, 3N)·(3N, 3N) product; with
          the custom call, the pair blocks are applied there instead, over the upper
          triangle (half the flops, no (3N, 3N) matrix), split among XLA's CPU threads;
        * mixed partials: scattered from the terms whose index arrays point at a chosen
          parameter; for per-atom charge/σ/ε of the all-pairs term, one
          (3N, N)·(N, P_kind) product per parameter kind; for OBC2's charge, radius and
          scale, one jvp of its gradient per chosen GB parameter;
        * CustomTerm and any other term: ``jax.linearize`` of the term's gradient once
          per call, its linear map vmapped over the P tangents (exact autodiff).
      bonded: where the bonds, angles, torsions and 1-4 exceptions go. "jax": as above,
        in XLA (the pure-JAX path); "host": one C++ XLA custom call on the CPU
        (:mod:`timemachine.backends.xla_cpu`) that applies each tuple's block to all P
        tangents without forming it and scatters the mixed partials, the same maths to
        round-off (≤ 1e-12 relative in the tests), and also contracts the all-pairs
        blocks A_ij d dᵀ + B_ij I with the tangents; "auto" (default): "host" where JAX
        computes on the CPU and a C++ compiler is present, else "jax". The custom call
        is forward-only: use "jax" to differentiate through ζ.

    The returned function is pure and does no input checks: jit it, or call it in a scan.
    Cost per call: O(N²) to assemble, O(N²·P) in one matrix product (or the custom call's
    contraction), O(terms) elsewhere; memory O(N²) (two N×N scalar matrices; the dense path
    also a 3N×3N float64 matrix in column tiles, 24 MB in all for 582 atoms).
    """
    wrt = system.resolve_wrt(wrt, allow_repeats=True)
    if method == "reference":
        energy_fn = system.energy_fn()

        def zeta(x, params, dx_dtheta):
            return zeta_reference(energy_fn, x, params, dx_dtheta, wrt)

        return zeta
    if method != "structured":
        raise InputError(f"method must be 'structured' or 'reference', got {method!r}")
    both = _structured(system, wrt, bonded=bonded)

    def zeta(x, params, dx_dtheta):
        return both(x, params, dx_dtheta)[1]  # jit drops the unused gradient

    return zeta


def make_gradient_and_zeta(system, wrt, method="structured", bonded="auto"):
    """A jittable ``fn(x, params, dx_dtheta, neighbours=None) -> (∇_x E (N,3), ζ (P,N,3))``
    (``neighbours``: the Verlet lists of ``timemachine.neighbours.build``, or None).

    A sensitivity step needs both at the same x; the structured path gets the gradient
    almost free from the same pair scalars (Σ_j B_ij d_ij), bonded derivatives and
    linearizations, so one call costs about what ζ alone does. ``method`` and ``bonded``
    as in :func:`make_zeta`; "reference" is ``jax.grad`` plus :func:`zeta_reference`.
    """
    wrt = system.resolve_wrt(wrt, allow_repeats=True)
    if method == "reference":
        energy_fn = system.energy_fn()
        grad = jax.grad(energy_fn, argnums=0)

        def fn(x, params, dx_dtheta, neighbours=None):
            energy = functools.partial(energy_fn, neighbours=neighbours)
            return grad(x, params, neighbours), zeta_reference(energy, x, params, dx_dtheta, wrt)

        return fn
    if method != "structured":
        raise InputError(f"method must be 'structured' or 'reference', got {method!r}")
    return _structured(system, wrt, bonded=bonded)


def make_gradient(system, bonded="jax"):
    """A jittable ``gradient(x (N,3), params (P_all,)) -> ∇_x E (N, 3)``, kJ/mol/nm.

    ``bonded="jax"`` (default): :func:`timemachine.structured.make_gradient`, the plain-MD
    gradient, differentiable with respect to θ (force matching differentiates it);
    "host" puts the bonded terms' gradient in the C++ custom call (:func:`make_zeta`);
    "auto" is "jax" here.
    """
    if not _use_host_bonded(bonded, gradient_only=True):
        return _plain_gradient(system)
    return _structured(system, np.zeros(0, np.int64), gradient_only=True, bonded=bonded)


def _use_host_bonded(bonded, gradient_only):
    if bonded not in ("auto", "jax", "host"):
        raise InputError(f"bonded must be 'auto', 'jax' or 'host', got {bonded!r}")
    if bonded == "jax" or (gradient_only and bonded == "auto"):
        return False  # plain MD's gradient stays differentiable (force matching)
    ok, why = xla_cpu.available()
    if bonded == "host" and not ok:
        raise InputError(f"bonded='host': the CPU custom call cannot run here: {why}")
    return ok


def _structured(system, wrt, gradient_only=False, bonded="auto"):
    if any(getattr(t, "uses_neighbours", False) for t in system.terms):
        # Verlet lists: every term by its own gradient, nothing O(N²) (structured.autodiff)
        if gradient_only:
            return sparse_gradient(system)
        host = xla_cpu if _use_host_bonded(bonded, False) else None
        tables = None
        # the bonds, angles and torsions in the bonded custom call, not linearize: the
        # groups of exactly the terms sparse_gradient_and_zeta then leaves out (an
        # all-pairs term's 1-4 exceptions stay in its own gradient)
        covered = [t for t, c in zip(system.terms, coordinate_only(system), strict=True) if c]
        if host is not None and covered and np.unique(wrt).size == wrt.size:
            only = System(system.masses, covered, system.param_names, system.params)
            tables = xla_cpu.BondedTables.build(coordinate_term_groups(only), system.n_params, wrt)
        return sparse_gradient_and_zeta(system, wrt, host=host, bonded=tables)
    n = system.n_atoms
    # bonds, angles, torsions and 1-4 exceptions in one C++ custom call (CPU), if it runs
    host = (
        xla_cpu.BondedTables.build(coordinate_term_groups(system), system.n_params, wrt)
        if _use_host_bonded(bonded, gradient_only)
        else None
    )
    has_pairs = any(t.structured is not None for t in system.terms)
    if host is not None and not host.kind.size and (gradient_only or not has_pairs):
        host = None  # nothing for the call to do: no bonded terms, no all-pairs blocks
    terms = StructuredTerms(system, wrt, gradient_only=gradient_only, host_bonded=host is not None)
    # E: three extra "tangents" t_ib = δ_ab whose product with C gives its block row sums
    unit = unit_rows(n)
    tiles = column_tiles(n, terms.block_flat)

    def gradient_and_zeta(x, params, dx_dtheta, neighbours=None):
        def lists(t_no):
            return None if neighbours is None else neighbours[t_no]

        s = terms.evaluate(x, params, jnp.zeros_like(dx_dtheta))
        # gradient: Σ_j B_ij d_ij over every pair form, plus f' ∇q of the bonded blocks
        grad = terms.gradient(x, s)
        if gradient_only:
            if host is not None:
                grad = grad + host(x, params, dx_dtheta)[0]
            for t_no, part in terms.autodiff:
                grad = grad + part(x, params, lists(t_no))
            return grad
        p = dx_dtheta.shape[0]
        tangents = jnp.transpose(dx_dtheta, (0, 2, 1)).reshape(p, 3 * n)
        ext = jnp.concatenate([tangents, unit.astype(x.dtype)])  # (P + 3, 3N)
        if host is not None:
            # the pair contraction Σ_j C_ij (t_i - t_j) joins the bonded terms in the custom
            # call: half the flops of the dense product (upper triangle), no (3N, 3N) matrix
            g_host, out = host(x, params, dx_dtheta, *((s.a, s.b) if terms.pairs else ()))
            grad, out = grad + g_host, out + s.mixed
            for apply in s.applies:
                out = out + jnp.transpose(apply(ext), (0, 2, 1))
        else:
            n_block = terms.block_flat.size
            hess_t = dense_pair_product(s.a, s.b, s.dc, ext, tiles, s.evals, n_block, p, n)
            for apply in s.applies:
                hess_t = hess_t + apply(ext)
            out = jnp.transpose(hess_t, (0, 2, 1)) + s.mixed
        out = terms.add_mixed(out, s)
        for t_no, part in terms.autodiff:
            g_term, z_term = part(x, params, dx_dtheta, lists(t_no))
            grad, out = grad + g_term, out + z_term
        return grad, out

    if gradient_only:

        def gradient(x, params, neighbours=None):  # jit drops the Hessian scalars A (ζ's)
            return gradient_and_zeta(x, params, jnp.zeros((0,) + x.shape, x.dtype), neighbours)

        return gradient
    return gradient_and_zeta
