"""Gradients of averaged observables d⟨O⟩/dθ: pathwise and thermodynamic, with errors.

Pathwise (the paper's estimator): differentiate every sample through the dynamics,

    d⟨O⟩/dθ ≈ (1/S) Σ_s ∂O/∂x (x_s) · dx_s/dθ,

with x_s the last frames of independent replicas (ensemble average) or reservoir-sampled
frames of one trajectory (time average) and dx_s/dθ their forward sensitivities.

Fluctuation (thermodynamic) estimator, for O that depends on θ only through the
canonical ensemble p(x) ∝ exp(-βE(x; θ)):

    d⟨O⟩/dθ = -β (⟨O ∂E/∂θ⟩ - ⟨O⟩⟨∂E/∂θ⟩),      β = 1/(k_B T).

It needs only equilibrium samples and ∂E/∂θ, not dx/dθ, so it is an independent check of
the pathwise one; ``compare_estimators`` measures their difference in units of the
combined standard error.

Standard errors come from the sample variance (independent samples: replicas), or, with
``blocks=B``, from the scatter of B contiguous block means (correlated samples: frames of
a time series; with M replicas laid out replica by replica, ``blocks=M``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.constants import BOLTZMANN
from timemachine.errors import InputError
from timemachine.fitting.horizon import HorizonChoice, choose_horizon  # noqa: F401 (moved)

__all__ = [
    "EstimatorComparison",
    "GradientEstimate",
    "compare_estimators",
    "fluctuation_gradient",
    "pathwise_gradient",
]


class GradientEstimate(NamedTuple):
    """An estimate of ⟨O⟩ and d⟨O⟩/dθ from S samples; K observable values, P parameters.

    Attributes:
        value: (K,) ⟨O⟩ in the observable's unit.
        value_stderr: (K,) its standard error.
        gradient: (K, P) d⟨O⟩/dθ, unit of O per unit of θ.
        stderr: (K, P) its standard error.
        n_samples: S.
        labels: K observable labels; param_names: P names (may be empty).
        method: "pathwise", "fluctuation" or "hybrid".
        diagnostics: estimator-specific extras (effective sample sizes, horizon, the
            pathwise and score parts of a hybrid estimate), or None.
    """

    value: np.ndarray
    value_stderr: np.ndarray
    gradient: np.ndarray
    stderr: np.ndarray
    n_samples: int
    labels: tuple
    param_names: tuple
    method: str
    diagnostics: dict | None = None


def _mean_and_stderr(samples: np.ndarray, blocks: int | None):
    """Mean over axis 0 and its standard error, from samples or from B block means."""
    s = samples.shape[0]
    mean = samples.mean(axis=0)
    if blocks is None:
        if s < 2:
            return mean, np.full(mean.shape, np.inf)
        return mean, samples.std(axis=0, ddof=1) / np.sqrt(s)
    block_means = np.stack([b.mean(axis=0) for b in np.array_split(samples, blocks)])
    return mean, block_means.std(axis=0, ddof=1) / np.sqrt(blocks)


def _check_blocks(blocks, s):
    if blocks is None:
        return None
    if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 2:
        raise InputError(f"blocks must be an integer >= 2 or None, got {blocks!r}")
    if blocks > s:
        raise InputError(f"blocks = {blocks} but there are only {s} samples")
    return int(blocks)


def _check_frames(x, name="x"):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 3 or x.shape[0] == 0:
        raise InputError(f"{name} must have shape (S, N, 3) nm with S >= 1, got {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(
            f"{name} has non-finite values (sample {np.argwhere(~np.isfinite(x))[0][0]})"
        )
    return x


def _labels(observable, k):
    labels = tuple(getattr(observable, "labels", ()))
    return labels if len(labels) == k else tuple(f"O[{i}]" for i in range(k))


@functools.lru_cache(maxsize=32)
def _pathwise_program(observable, batch_size):
    def one(args):
        x, dx = args
        value, lin = jax.linearize(observable, x)
        return value, jax.vmap(lin)(dx).T  # (K,), (K, P)

    return jax.jit(lambda x, dx: jax.lax.map(one, (x, dx), batch_size=batch_size))


def pathwise_gradient(
    observable, x, dx_dtheta, blocks: int | None = None, param_names=(), batch_size: int = 64
) -> GradientEstimate:
    """d⟨O⟩/dθ ≈ mean over samples of ∂O/∂x · dx/dθ (one linearisation of O per sample).

    Args:
        observable: ``obs(x (N, 3)) -> (K,)``, JAX-traceable (``timemachine.fitting``
            observables).
        x: (S, N, 3) sampled positions, nm.
        dx_dtheta: (S, P, N, 3) their sensitivities, nm per unit of θ.
        blocks: None for independent samples, or B for block-averaged standard errors.
        param_names: P names carried into the result.
        batch_size: samples per vectorised batch (bounds the memory of the tangents).

    Returns:
        ``GradientEstimate`` (method "pathwise").
    """
    x = _check_frames(x)
    dx = np.asarray(dx_dtheta, dtype=np.float64)
    if dx.ndim != 4 or dx.shape[0] != x.shape[0] or dx.shape[2:] != x.shape[1:]:
        raise InputError(
            f"dx_dtheta must have shape (S, P, N, 3) = ({x.shape[0]}, P, {x.shape[1]}, 3) to "
            f"match x, got {dx.shape}"
        )
    blocks = _check_blocks(blocks, x.shape[0])
    values, grads = _pathwise_program(observable, int(min(batch_size, x.shape[0])))(
        jnp.asarray(x), jnp.asarray(dx)
    )
    values, grads = np.asarray(values), np.asarray(grads)
    value, value_se = _mean_and_stderr(values, blocks)
    grad, grad_se = _mean_and_stderr(grads, blocks)
    return GradientEstimate(
        value,
        value_se,
        grad,
        grad_se,
        x.shape[0],
        _labels(observable, value.shape[0]),
        tuple(param_names),
        "pathwise",
    )


@functools.lru_cache(maxsize=32)
def _fluctuation_program(observable, energy, wrt):
    # keyed on the System itself: its energy_fn() is a new object at every call
    energy_fn = energy.energy_fn() if hasattr(energy, "energy_fn") else energy
    grad_theta = jax.grad(energy_fn, argnums=1)

    def one(x, theta):
        return observable(x), grad_theta(x, theta)[np.asarray(wrt)]

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def _frame_batch(n_atoms: int) -> int:
    """Frames per vmapped call of ``_fluctuation_program``: ∂E/∂θ of the all-pairs terms
    keeps ~200 N² bytes of (N, N) intermediates per frame (65 MB for the 582 atoms of
    villin), so all S frames at once would need S times that; batches of at most 1 GiB."""
    return int(max(1, min(64, 2**30 // (200 * n_atoms * n_atoms))))


def _per_frame(program, x, theta):
    """``program(x, θ)`` (vmapped over frames) over the (S, N, 3) frames in fixed-size
    batches, the last one padded with copies of its last frame (dropped): one
    compilation for any S, and memory bounded by the batch, not by S. Its outputs (a
    tuple of arrays, or one array) as numpy arrays with leading axis S."""
    x = np.asarray(x)
    s = x.shape[0]
    b = min(s, _frame_batch(x.shape[1]))
    theta = jnp.asarray(theta)
    outs = []
    for start in range(0, s, b):
        rows = np.minimum(np.arange(start, start + b), s - 1)
        used = min(b, s - start)
        out = program(jnp.asarray(x[rows]), theta)
        outs.append(jax.tree_util.tree_map(lambda a, used=used: np.asarray(a)[:used], out))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)


def fluctuation_gradient(
    observable,
    energy,
    x,
    params=None,
    wrt=None,
    temperature=300.0,
    blocks: int | None = None,
    weights=None,
) -> GradientEstimate:
    """d⟨O⟩/dθ = -β (⟨O ∂E/∂θ⟩ - ⟨O⟩⟨∂E/∂θ⟩) from equilibrium samples x.

    Args:
        observable: ``obs(x (N, 3)) -> (K,)``; it must not depend on θ itself.
        energy: a ``timemachine.System`` or a JAX function ``E(x (N, 3), θ (P_all,))``
            in kJ/mol; ∂E/∂θ comes from ``jax.grad`` with respect to θ.
        x: (S, N, 3) samples of the canonical ensemble at θ and ``temperature``, nm.
        params: (P_all,) θ; default ``system.params`` when ``energy`` is a System.
        wrt: the P parameters: int indices into θ, or (with a System) globs.
        temperature: K.
        blocks: None for independent samples, or B for block-averaged standard errors.
        weights: optional (S,) importance weights ≥ 0 (``reweighting_weights``: samples
            drawn at another θ, reweighted to this one); averages and the covariance are
            then weighted, and errors come from the linearised (delta-method) influence of
            each sample, block-averaged like the unweighted case.

    Returns:
        ``GradientEstimate`` (method "fluctuation"); the unweighted covariance uses the
        unbiased S/(S-1) normalisation; ``diagnostics`` holds ``kish_ess`` with weights.
    """
    from timemachine.system import System

    x = _check_frames(x)
    blocks = _check_blocks(blocks, x.shape[0])
    if x.shape[0] < 2:
        raise InputError("fluctuation_gradient needs at least 2 samples (a covariance)")
    if not (isinstance(temperature, (int, float, np.floating)) and temperature > 0):
        raise InputError(f"temperature must be a number > 0 (K), got {temperature!r}")
    if isinstance(energy, System):
        theta = energy.resolve_params(params)
        wrt = energy.resolve_wrt("*" if wrt is None else wrt)
        names = tuple(energy.param_names[i] for i in wrt)
    elif callable(energy):
        if params is None or wrt is None:
            raise InputError("fluctuation_gradient with an energy function needs params and wrt")
        theta = np.asarray(params, dtype=np.float64)
        wrt = np.atleast_1d(np.asarray(wrt))
        if not np.issubdtype(wrt.dtype, np.integer) or wrt.ndim != 1:
            raise InputError(f"wrt must be int indices into params, got {wrt!r}")
        names = ()
    else:
        raise InputError(
            f"energy must be a timemachine.System or a function E(x, θ), got {energy!r}"
        )
    program = _fluctuation_program(observable, energy, tuple(int(i) for i in wrt))
    o, de = _per_frame(program, x, theta)
    s = x.shape[0]
    beta = 1.0 / (BOLTZMANN * temperature)
    if weights is not None:
        return _weighted_fluctuation(
            o, de, _check_weights(weights, s), beta, blocks, observable, names
        )
    # -β (O - Ō)(∂E/∂θ - mean) per sample: its mean is the estimate, its scatter the error
    u = -beta * (o - o.mean(0))[:, :, None] * (de - de.mean(0))[:, None, :] * (s / (s - 1))
    value, value_se = _mean_and_stderr(o, blocks)
    grad, grad_se = _mean_and_stderr(u, blocks)
    return GradientEstimate(
        value, value_se, grad, grad_se, s, _labels(observable, o.shape[1]), names, "fluctuation"
    )


class EstimatorComparison(NamedTuple):
    """How far two gradient estimates are apart, entry by entry.

    Attributes:
        difference: (K, P) a - b.
        combined_stderr: (K, P) sqrt(se_a² + se_b²).
        z: (K, P) difference / combined_stderr.
        max_abs_z: the largest |z|.
        threshold: |z| beyond which an entry counts as disagreeing (Bonferroni, 1 %
            family-wise over K·P entries).
        consistent: max_abs_z <= threshold.
        summary: human-readable report.
    """

    difference: np.ndarray
    combined_stderr: np.ndarray
    z: np.ndarray
    max_abs_z: float
    threshold: float
    consistent: bool
    summary: str


def compare_estimators(a: GradientEstimate, b: GradientEstimate, alpha: float = 0.01):
    """Compare two ``GradientEstimate`` (pathwise vs fluctuation) in units of their error.

    Returns:
        ``EstimatorComparison``; ``summary`` lists the worst entries by |z|.
    """
    from scipy.stats import norm

    if a.gradient.shape != b.gradient.shape:
        raise InputError(
            f"cannot compare gradients of shapes {a.gradient.shape} ({a.method}) and "
            f"{b.gradient.shape} ({b.method})"
        )
    diff = a.gradient - b.gradient
    se = np.sqrt(a.stderr**2 + b.stderr**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, diff / se, np.where(diff == 0, 0.0, np.inf))
    k, p = diff.shape
    threshold = float(norm.isf(alpha / (2 * k * p)))
    max_abs_z = float(np.abs(z).max())
    labels = a.labels or b.labels or tuple(f"O[{i}]" for i in range(k))
    names = a.param_names or b.param_names or tuple(f"θ[{j}]" for j in range(p))
    verdict = "consistent" if max_abs_z <= threshold else "INCONSISTENT"
    lines = [
        f"{a.method} ({a.n_samples} samples) vs {b.method} ({b.n_samples} samples) over "
        f"{k}×{p} entries: max |z| = {max_abs_z:.2f}, {verdict} at the {alpha:g} level "
        f"(|z| <= {threshold:.2f}); {int((np.abs(z) > 2).sum())} entries beyond 2σ",
    ]
    order = np.argsort(-np.abs(z), axis=None)[: min(5, k * p)]
    for flat in order:
        i, j = divmod(int(flat), p)
        lines.append(
            f"  {labels[i]} / {names[j]}: {a.gradient[i, j]:.4g} ± {a.stderr[i, j]:.2g} vs "
            f"{b.gradient[i, j]:.4g} ± {b.stderr[i, j]:.2g}  (z = {z[i, j]:+.2f})"
        )
    return EstimatorComparison(
        diff, se, z, max_abs_z, threshold, max_abs_z <= threshold, "\n".join(lines)
    )


# --------------------------------------------------------------------------- weighted samples


def _check_weights(weights, s):
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (s,):
        raise InputError(f"weights must have shape ({s},) (one per sample), got {w.shape}")
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise InputError("weights must be finite, >= 0 and not all zero")
    return w / w.sum()


def kish_effective_sample_size(weights) -> float:
    """Kish's effective sample size (Σw)² / Σw² of importance weights (S,)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / np.sum(w * w)) if w.size and w.sum() > 0 else 0.0


def reweighting_weights(energy, x, params_from, params_to, temperature=300.0):
    """Importance weights that carry samples of p_θ₀ to p_θ₁: w ∝ exp(-β (E(x;θ₁) - E(x;θ₀))).

    Args:
        energy: a ``timemachine.System`` or a JAX function ``E(x (N, 3), θ (P_all,))``.
        x: (S, N, 3) samples drawn at θ₀ = ``params_from``, nm.
        params_from, params_to: (P_all,) θ₀ and θ₁.
        temperature: K.

    Returns:
        (weights (S,) normalised to sum 1, Kish effective sample size). Computed in log
        space (the largest log weight is subtracted), so large ΔE cannot overflow.
    """
    x = _check_frames(x)
    if not (isinstance(temperature, (int, float, np.floating)) and temperature > 0):
        raise InputError(f"temperature must be a number > 0 (K), got {temperature!r}")
    batched = _energy_program(energy)
    a = jnp.asarray(np.asarray(params_from, dtype=np.float64))
    b = jnp.asarray(np.asarray(params_to, dtype=np.float64))
    de = _per_frame(batched, x, b) - _per_frame(batched, x, a)
    log_w = -de / (BOLTZMANN * temperature)
    if not np.isfinite(log_w).all():
        bad = int(np.argmax(~np.isfinite(log_w)))
        raise InputError(f"the energy difference of sample {bad} is {de[bad]}; cannot reweight")
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    return w, kish_effective_sample_size(w)


@functools.lru_cache(maxsize=32)
def _values_program(observable):
    return jax.jit(jax.vmap(observable))


@functools.lru_cache(maxsize=32)
def _energy_program(energy):
    energy_fn = energy.energy_fn() if hasattr(energy, "energy_fn") else energy
    return jax.jit(jax.vmap(energy_fn, in_axes=(0, None)))


def _weighted_fluctuation(o, de, w, beta, blocks, observable, names):
    s = o.shape[0]
    o_bar, d_bar = w @ o, w @ de
    do, dd = o - o_bar, de - d_bar
    a = -beta * do[:, :, None] * dd[:, None, :]  # (S, K, P)
    grad = np.einsum("s,skp->kp", w, a)
    # delta-method influence of each sample on the ratio estimators Σ w a / Σ w
    inf_g = s * w[:, None, None] * (a - grad)
    inf_o = s * w[:, None] * do
    _, grad_se = _mean_and_stderr(inf_g, blocks)
    _, value_se = _mean_and_stderr(inf_o, blocks)
    ess = kish_effective_sample_size(w)
    return GradientEstimate(
        o_bar,
        value_se,
        grad,
        grad_se,
        s,
        _labels(observable, o.shape[1]),
        names,
        "fluctuation",
        {"kish_ess": ess},
    )


# --------------------------------------------------------------------------- hybrid


def hybrid_gradient(
    observable,
    energy,
    x_start,
    x_end,
    dx_end,
    params=None,
    wrt=None,
    temperature=300.0,
    blocks: int | None = None,
    horizon: int | None = None,
) -> GradientEstimate:
    """d⟨O⟩/dθ from M short sensitivity replicas started at equilibrium (unbiased for any n).

    With x_0 ~ p_θ (fresh Maxwell-Boltzmann velocities, fresh noise, dx_0/dθ = 0) and x_n
    the replica after n steps, stationarity gives ⟨O⟩_θ = E[O(x_n)], and differentiating
    through both the dynamics and the start distribution (docs/design.md, "hybrid"):

        d⟨O⟩/dθ = E[∂O/∂x(x_n) · dx_n/dθ]                                  (pathwise)
                  - β E[(O(x_n) - ⟨O⟩)(∂E/∂θ(x_0) - ⟨∂E/∂θ⟩)]                (score of x_0)

    The centring makes the score term's expectation the covariance and cuts its variance;
    both means are the replicas' own, with the M/(M-1) correction. n = 0 is the fluctuation
    estimator; the pathwise term alone (``pathwise_gradient``) is the gradient of the
    n-step protocol average, biased for ⟨O⟩.

    Args:
        observable: ``obs(x (N, 3)) -> (K,)``.
        energy: the ``timemachine.System`` (or ``E(x, θ)`` with ``params`` and int ``wrt``).
        x_start: (M, N, 3) equilibrium starting frames, nm.
        x_end: (M, N, 3) the replicas after n steps; dx_end: (M, P, N, 3) their dx/dθ.
        params, wrt, temperature: as in ``fluctuation_gradient`` (``wrt`` must be the
            parameters dx_end was carried for, in the same order).
        blocks: None (independent replicas) or B.
        horizon: n, recorded in ``diagnostics``.

    Returns:
        ``GradientEstimate`` (method "hybrid"); ``diagnostics`` has the two parts
        ("pathwise", "score", each (K, P)) and their standard errors.
    """
    x0 = _check_frames(x_start, "x_start")
    xn = _check_frames(x_end, "x_end")
    if x0.shape != xn.shape:
        raise InputError(f"x_start {x0.shape} and x_end {xn.shape} must have the same shape")
    if x0.shape[0] < 2:
        raise InputError("hybrid_gradient needs at least 2 replicas (a covariance)")
    dx = np.asarray(dx_end, dtype=np.float64)
    if dx.ndim != 4 or dx.shape[0] != xn.shape[0] or dx.shape[2:] != xn.shape[1:]:
        raise InputError(f"dx_end must have shape (M, P, N, 3) to match x_end, got {dx.shape}")
    if not (isinstance(temperature, (int, float, np.floating)) and temperature > 0):
        raise InputError(f"temperature must be a number > 0 (K), got {temperature!r}")
    blocks = _check_blocks(blocks, x0.shape[0])
    idx = tuple(int(i) for i in _wrt_indices(energy, wrt))
    if len(idx) != dx.shape[1]:
        raise InputError(f"wrt names {len(idx)} parameters but dx_end carries {dx.shape[1]}")
    names = tuple(energy.param_names[i] for i in idx) if hasattr(energy, "param_names") else ()
    program = _fluctuation_program(observable, energy, idx)
    theta = _theta_of(energy, params)
    o_end, _ = _per_frame(program, xn, theta)
    _, de0 = _per_frame(program, x0, theta)
    m = x0.shape[0]
    beta = 1.0 / (BOLTZMANN * temperature)
    u_score = (
        -beta
        * (o_end - o_end.mean(0))[:, :, None]
        * (de0 - de0.mean(0))[:, None, :]
        * (m / (m - 1))
    )
    values, grads = _pathwise_program(observable, int(min(64, m)))(jnp.asarray(xn), jnp.asarray(dx))
    u_path = np.asarray(grads)
    u = u_path + u_score
    grad, grad_se = _mean_and_stderr(u, blocks)
    value, value_se = _mean_and_stderr(np.asarray(values), blocks)
    p_mean, p_se = _mean_and_stderr(u_path, blocks)
    s_mean, s_se = _mean_and_stderr(u_score, blocks)
    return GradientEstimate(
        value,
        value_se,
        grad,
        grad_se,
        m,
        _labels(observable, o_end.shape[1]),
        names,
        "hybrid",
        {
            "horizon_steps": horizon,
            "pathwise": p_mean,
            "pathwise_stderr": p_se,
            "score": s_mean,
            "score_stderr": s_se,
        },
    )


def _theta_of(energy, params):
    from timemachine.system import System

    if isinstance(energy, System):
        return energy.resolve_params(params)
    return np.asarray(params, dtype=np.float64)


def _wrt_indices(energy, wrt):
    from timemachine.system import System

    if isinstance(energy, System):
        return energy.resolve_wrt("*" if wrt is None else wrt)
    return np.atleast_1d(np.asarray(wrt))


ESTIMATORS = ("fluctuation", "hybrid", "pathwise")
