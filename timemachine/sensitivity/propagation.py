"""Forward propagation of dx/dθ along a Langevin trajectory: exact and windowed.

The primal update is the integrator's own ``langevin_step`` (paper eqs. 3-4), with the
noise ``noise(seed, t, N, replica)``, so the positions and velocities carried here are
the ones ``timemachine.integrator.run`` produces for the same seed. Next to them, with
ζ_t = H(x_t)·dx_t/dθ + ∂²E/∂x∂θ(x_t) (paper eq. 6) and dx_0/dθ = dv_0/dθ = 0:

Exact mode (docs/design.md, "The mathematics")::

    dv_{t+1} = a dv_t - b ∘ ζ_t
    dx_{t+1} = dx_t + δt dv_{t+1}

which unrolls to the paper's geometric series (eqs. 7-8)::

    dx_t = -δt b ∘ Σ_{i<t} w_{t-1-i} ζ_i,    w_m = 1 + a + … + a^m = (1 - a^{m+1}) / (1 - a)

Memory O(P·N): two (P, N, 3) arrays, no truncation.

Window mode (paper eq. 9): the ζ's of the last k steps keep their exact weights w_m
(m < k); every older ζ is folded with the converged weight w_∞ = 1/(1 - a)::

    dx_t = -δt b ∘ [ Σ_{m<k} w_m ζ_{t-1-m} + w_∞ Σ_{m≥k} ζ_{t-1-m} ]

Written as running sums, with F_t = Σ_{i<t} ζ_i (the plain sum of the window plus the
accumulator of folded ζ's) and G_t = Σ_{m<k} a^m ζ_{t-1-m} (the window's geometric sum),
this is ``dx_t = -δt b (F_t - a G_t) / (1 - a)``. The difference ``F - aG`` cancels
badly when a → 1, so the same quantity is propagated in the equivalent recursive form:
with D_t = Σ_m w^{(k)}_m ζ_{t-1-m} (so dx_t = -δt b D_t), folding ζ_{t-k} raises its
weight from the recursion's w_k = 1 + a w_{k-1} to w_∞, i.e. by
c_t = (w_∞ - w_k) ζ_{t-k} = a^{k+1}/(1 - a) ζ_{t-k}, hence D_{t+1} = F_{t+1} + a D_t + c_t
and, differencing once more::

    dv_{t+1} = a dv_t - b ∘ (ζ_t + c_t - c_{t-1}),     dx_{t+1} = dx_t + δt dv_{t+1}

(dv here is the windowed velocity sensitivity (dx_{t+1} - dx_t)/δt). Each step costs
O(P·N): one ζ goes into the ring buffer of the last k ζ's (updated in place) and the one
it evicts, ζ_{t-k}, is folded. The ring buffer makes the memory O(k·P·N);
``state_memory_bytes`` reports it. Until t > k nothing is folded and window mode is exact
mode bit for bit. Each folded ζ is mis-weighted by a^{k+1} relative to its weight w_∞,
so k = ceil(log(tol)/log(a)) (``window_size``) bounds that relative error by tol. As in
the paper, ζ_t is evaluated at the windowed dx_t, so the error feeds back: the fold
correction acts like a delayed force b·a^{k+1}/(1-a)·H·(dx_{t-k} - dx_{t-1-k}), and
window mode goes unstable when a^k ω²/γ² is not small, ω the fastest vibration
(trialanine, γ = 100/ps, δt = 1 fs: k = 25, a^k = 0.08, diverges; k ≥ 50 converges).
The default tol = 1e-8 keeps a^k ω²/γ² ≤ 0.01 for γ ≥ 1e-3 ω (≈ 0.6/ps for X-H
stretches at ω ≈ 565/ps).

Style follows JAX MD and ``timemachine.integrator.langevin``: immutable states
(``ExactState``, ``WindowState``), ``*_init``/``*_step`` pure functions that compose with
``jit``, ``vmap`` and ``lax.scan``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError
from timemachine.integrator.langevin import (
    LangevinCoefficients,
    LangevinIntegrator,
    LangevinState,
    langevin_step,
)

__all__ = [
    "ExactState",
    "WindowCoefficients",
    "WindowState",
    "exact_init",
    "exact_step",
    "sensitivity_update",
    "state_memory_bytes",
    "window_coefficients",
    "window_init",
    "window_size",
    "window_source",
    "window_step",
]

GradientFn = Callable[[jax.Array], jax.Array]
# zeta_fn(x (N, 3), dx_dtheta (P, N, 3)) -> ζ (P, N, 3), θ closed over
ZetaFn = Callable[[jax.Array, jax.Array], jax.Array]


class ExactState(NamedTuple):
    """State of exact propagation after ``step`` steps.

    Attributes:
        x: (N, 3) positions x_t, nm.
        v: (N, 3) half-step velocities v_t, nm/ps.
        dx_dtheta: (P, N, 3) dx_t/dθ, nm/[θ].
        dv_dtheta: (P, N, 3) dv_t/dθ, nm/ps/[θ].
        step: int64 scalar t.
    """

    x: jax.Array
    v: jax.Array
    dx_dtheta: jax.Array
    dv_dtheta: jax.Array
    step: jax.Array


class WindowState(NamedTuple):
    """State of windowed propagation (paper eq. 9) after ``step`` steps.

    Attributes:
        x, v, dx_dtheta, step: as in ``ExactState`` (dx_dtheta is the windowed one).
        dv_dtheta: (P, N, 3) (dx_t - dx_{t-1})/δt of the windowed sensitivities.
        zeta_window: (k, P, N, 3) ring buffer; slot ``i mod k`` holds ζ_i for the last k
            steps i (zeros before they are filled).
        to_fold: (P, N, 3) ζ_{t-k}, the ζ the next step evicts and folds (a copy of ring
            slot ``t mod k``, read after the previous write so that the ring is updated in
            place: reading a slot before overwriting it makes XLA copy the whole ring).
        folded_last: (P, N, 3) ζ_{t-1-k}, the last ζ folded (zeros while nothing has
            been folded); the fold correction needs it once more.
    """

    x: jax.Array
    v: jax.Array
    dx_dtheta: jax.Array
    dv_dtheta: jax.Array
    step: jax.Array
    zeta_window: jax.Array
    to_fold: jax.Array
    folded_last: jax.Array


class WindowCoefficients(NamedTuple):
    """Constants of the window fold for window size k.

    Attributes:
        fold: a^{k+1} / (1 - a) = w_∞ - w_k, the weight a folded ζ gains.
    """

    fold: jax.Array


def window_size(integrator: LangevinIntegrator, tol: float = 1e-8) -> int:
    """Window k = ceil(log(tol) / log(a)) with a = exp(-γ δt): a^k <= tol.

    Raises:
        InputError: γ = 0 (a = 1: the geometric series does not converge, there is no
            window), or tol outside (0, 1).
    """
    _check_window_friction(integrator)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < tol < 1.0:
        raise InputError(f"window_tol must be a number in (0, 1), got {tol!r}")
    gamma_dt = integrator.friction * integrator.dt  # -log(a)
    return max(1, math.ceil(-math.log(tol) / gamma_dt - 1e-9))


def _check_window_friction(integrator: LangevinIntegrator) -> None:
    if integrator.friction == 0.0:
        raise InputError(
            "method='window' needs friction > 0: with LangevinIntegrator.friction = 0 "
            "(a = exp(-γ δt) = 1) the weights w_m = 1 + a + … + a^m grow without bound, so no "
            "window of ζ's converges; use method='exact'"
        )


def window_coefficients(integrator: LangevinIntegrator, k: int) -> WindowCoefficients:
    """The fold weight a^{k+1}/(1 - a), from γ δt without cancellation."""
    _check_window_friction(integrator)
    gamma_dt = integrator.friction * integrator.dt
    fold = math.exp(-(k + 1) * gamma_dt) / -math.expm1(-gamma_dt)
    return WindowCoefficients(fold=jnp.asarray(fold, dtype=jnp.float64))


# --------------------------------------------------------------------------- init


def exact_init(x, v, n_params: int, step=0) -> ExactState:
    """Exact-mode state at ``step`` with dx/dθ = dv/dθ = 0 (x0, v0 do not depend on θ)."""
    x = jnp.asarray(x, dtype=jnp.float64)
    zeros = jnp.zeros((n_params,) + x.shape, dtype=x.dtype)
    return ExactState(x, jnp.asarray(v, dtype=x.dtype), zeros, zeros, jnp.asarray(step, jnp.int64))


def window_init(x, v, n_params: int, k: int, step=0) -> WindowState:
    """Window-mode state at ``step`` with zero sensitivities and an empty ring of k ζ's."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"window must be an integer >= 1 (steps), got {k!r}")
    x = jnp.asarray(x, dtype=jnp.float64)
    zeros = jnp.zeros((n_params,) + x.shape, dtype=x.dtype)
    ring = jnp.zeros((int(k), n_params) + x.shape, dtype=x.dtype)
    return WindowState(
        x,
        jnp.asarray(v, dtype=x.dtype),
        zeros,
        zeros,
        jnp.asarray(step, jnp.int64),
        ring,
        zeros,
        zeros,
    )


# --------------------------------------------------------------------------- equations


def sensitivity_update(coeffs: LangevinCoefficients, dx, dv, source):
    """The exact sensitivity update, eqs. 3-4 differentiated in θ: ``(dx_{t+1}, dv_{t+1})``.

    ``dv_{t+1} = a dv_t - b ∘ s_t``, ``dx_{t+1} = dx_t + δt dv_{t+1}``, where the source
    s_t is ζ_t (eq. 6) in exact mode and :func:`window_source` in window mode.

    Args:
        coeffs: ``LangevinCoefficients`` (b of shape (N,)).
        dx, dv: (P, N, 3) dx_t/dθ (nm/[θ]) and dv_t/dθ (nm/ps/[θ]).
        source: (P, N, 3) s_t, kJ/mol/nm/[θ].
    """
    dv_new = coeffs.a * dv - coeffs.b[None, :, None] * source
    return dx + coeffs.dt * dv_new, dv_new


def window_source(wcoeffs: WindowCoefficients, zeta, to_fold, folded_last):
    """The window update (paper eq. 9): the source of :func:`sensitivity_update` when only
    the last k ζ's are kept, ``ζ_t + c_t - c_{t-1}`` with ``c_t = a^{k+1}/(1-a) ζ_{t-k}``.

    Args:
        wcoeffs: ``WindowCoefficients`` (``fold`` = a^{k+1}/(1-a)).
        zeta: (P, N, 3) ζ_t; to_fold: (P, N, 3) ζ_{t-k}; folded_last: (P, N, 3) ζ_{t-1-k}.
    """
    return zeta + wcoeffs.fold * (to_fold - folded_last)


# --------------------------------------------------------------------------- steps


def _primal(gradient_fn, coeffs, state, seed, replica) -> LangevinState:
    return langevin_step(
        gradient_fn, coeffs, LangevinState(state.x, state.v, state.step), seed, replica
    )


def _primal_and_zeta(gradient_fn, zeta_fn, gradient_and_zeta_fn, coeffs, state, seed, replica):
    """The primal step and ζ_t; from one fused call when ``gradient_and_zeta_fn`` is given
    (the structured ζ gets ∇E almost free from the same pair scalars)."""
    if gradient_and_zeta_fn is None:
        return _primal(gradient_fn, coeffs, state, seed, replica), zeta_fn(state.x, state.dx_dtheta)
    g, zeta = gradient_and_zeta_fn(state.x, state.dx_dtheta)
    return _primal(lambda y: g, coeffs, state, seed, replica), zeta


def exact_step(
    gradient_fn: GradientFn,
    zeta_fn: ZetaFn,
    coeffs: LangevinCoefficients,
    state: ExactState,
    seed,
    replica=0,
    gradient_and_zeta_fn=None,
) -> ExactState:
    """One step of the Langevin scheme and of exact sensitivity propagation.

    ζ_t = zeta_fn(x_t, dx_t); dv_{t+1} = a dv_t - b ∘ ζ_t; dx_{t+1} = dx_t + δt dv_{t+1};
    the primal step is ``langevin_step`` (same noise). ``gradient_and_zeta_fn(x, dx) ->
    (∇E, ζ)``, if given, replaces both ``gradient_fn`` and ``zeta_fn`` with one fused call
    (its ∇E equals ``gradient_fn``'s to round-off, not bitwise). Pure and traceable.
    """
    primal, zeta = _primal_and_zeta(
        gradient_fn, zeta_fn, gradient_and_zeta_fn, coeffs, state, seed, replica
    )
    dx, dv = sensitivity_update(coeffs, state.dx_dtheta, state.dv_dtheta, zeta)
    return ExactState(primal.x, primal.v, dx, dv, primal.step)


def window_step(
    gradient_fn: GradientFn,
    zeta_fn: ZetaFn,
    coeffs: LangevinCoefficients,
    wcoeffs: WindowCoefficients,
    state: WindowState,
    seed,
    replica=0,
    gradient_and_zeta_fn=None,
) -> WindowState:
    """One step with windowed propagation (paper eq. 9); O(P·N) work per step.

    ζ_t goes into ring slot t mod k, evicting ζ_{t-k}, which is folded:
    dv_{t+1} = a dv_t - b ∘ (ζ_t + c_t - c_{t-1}), c_t = a^{k+1}/(1-a) ζ_{t-k}.
    ``gradient_and_zeta_fn`` as in :func:`exact_step`.
    """
    primal, zeta = _primal_and_zeta(
        gradient_fn, zeta_fn, gradient_and_zeta_fn, coeffs, state, seed, replica
    )
    k = state.zeta_window.shape[0]
    ring = jax.lax.dynamic_update_index_in_dim(
        state.zeta_window, zeta, jnp.mod(state.step, k), axis=0
    )
    # ζ_{t+1-k}, evicted by the next step; read from the updated ring (in place, O(P·N))
    upcoming = jax.lax.dynamic_index_in_dim(ring, jnp.mod(state.step + 1, k), 0, keepdims=False)
    source = window_source(wcoeffs, zeta, state.to_fold, state.folded_last)
    dx, dv = sensitivity_update(coeffs, state.dx_dtheta, state.dv_dtheta, source)
    return WindowState(primal.x, primal.v, dx, dv, primal.step, ring, upcoming, state.to_fold)


# --------------------------------------------------------------------------- memory


def state_memory_bytes(state) -> dict:
    """Bytes held by each array of a propagation state, and their ``"total"``.

    Exact mode holds O(P·N) (x, v, dx/dθ, dv/dθ); window mode adds its (k, P, N, 3) ring
    of ζ's and one (P, N, 3) folded ζ: O(k·P·N).
    """
    out = {}
    for name, value in state._asdict().items():
        arr = np.asarray(value) if not hasattr(value, "nbytes") else value
        out[name] = int(arr.nbytes)
    out["total"] = sum(out.values())
    return out


def expected_state_bytes(method: str, n_atoms: int, n_params: int, k: int | None = None):
    """``state_memory_bytes`` of a state that is not allocated yet (float64, int64 step)."""
    vec = 8 * n_atoms * 3
    out = {"x": vec, "v": vec, "dx_dtheta": n_params * vec, "dv_dtheta": n_params * vec, "step": 8}
    if method == "window":
        out["zeta_window"] = int(k) * n_params * vec
        out["to_fold"] = n_params * vec
        out["folded_last"] = n_params * vec
    out["total"] = sum(out.values())
    return out
