"""The equilibrium fit's estimates at θ: ⟨O⟩, J = d⟨O⟩/dθ, and the loss with its gradient.

Step 2 of every epoch of ``fit_equilibrium`` (``timemachine.fitting.equilibrium``), on the
frames of step 1 (``timemachine.fitting.equilibrium_samples``):

- ⟨O⟩ and its covariance from block means (``block_mean_cov``, importance-weighted when
  the frames were reweighted);
- J from ``estimator="fluctuation"`` (-β cov(O, ∂E/∂θ) on the frames) or ``"hybrid"`` (M
  sensitivity replicas of horizon n started from frames picked with seed (integrator
  seed, epoch, 7), plus the score of their start; n from ``choose_horizon`` on a pilot
  run, once per fit, unless fixed);
- the loss χ² + prior, χ² = (1/K) Σ w_k ((⟨O_k⟩ - y_k)/σ_k)² (``chi2_with_error``) and the
  prior (1/P) Σ ((θ - θ₀)/s)², with its gradient in θ and its least-squares form
  (residual r and dr/du) for the Gauss–Newton step.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from timemachine.fitting.chi2 import block_mean_cov, chi2_with_error
from timemachine.fitting.equilibrium_samples import EpochSample, observable_values
from timemachine.fitting.estimators import fluctuation_gradient, hybrid_gradient
from timemachine.fitting.horizon import choose_horizon

__all__ = [
    "Estimate",
    "HybridSettings",
    "Loss",
    "estimate_at",
    "least_squares_form",
    "loss_and_gradient",
]


class HybridSettings(NamedTuple):
    """The hybrid estimator's M replicas and horizon n ("auto" or steps); the pilot's
    ``max_horizon`` steps and the ``horizon_cap`` nm per relative change of θ; the
    replicas' ``precision`` (``timemachine.precision``)."""

    n_replicas: int
    horizon: int | str
    max_horizon: int
    horizon_cap: float
    precision: str = "float64"


class Estimate(NamedTuple):
    """⟨O⟩ at θ and its Jacobian.

    Attributes:
        mean: (K,) ⟨O⟩; cov: (K, K) its covariance (block means).
        gradient: the ``GradientEstimate`` of J (K, P) with its standard errors.
        horizon_steps: the hybrid horizon n (None for the fluctuation estimator).
        record: the epoch record's horizon entries (hybrid only).
    """

    mean: np.ndarray
    cov: np.ndarray
    gradient: object
    horizon_steps: int | None
    record: dict


def estimate_at(
    observable,
    system,
    sample: EpochSample,
    params,
    wrt,
    integrator,
    *,
    blocks: int,
    epoch: int,
    hybrid: HybridSettings | None = None,
    horizon_steps: int | None = None,
    max_sensitivity: float | None = 1e8,
    executor=None,
) -> Estimate:
    """⟨O⟩ and J = d⟨O⟩/dθ[wrt] at θ = ``params`` (P_all,) from an epoch's frames.

    ``hybrid`` None uses the fluctuation estimator; otherwise the hybrid one, with the
    horizon ``horizon_steps`` chosen earlier in the fit, or chosen now when None; its
    replicas stop with a ``SimulationError`` once a |dx/dθ| exceeds ``max_sensitivity``
    (``run_replicas``), and the record gets ``dx_dtheta_max``, the largest |dx/dθ_p| over
    the replicas' last frames per parameter (nm per unit of θ_p). The replicas run on
    ``executor`` (an open ``Executor``; None: in this process).
    """
    values = observable_values(observable, sample.x)
    mean, cov = block_mean_cov(values, sample.weights, blocks)
    if hybrid is None:
        est = fluctuation_gradient(
            observable,
            system,
            sample.x,
            params=params,
            wrt=wrt,
            temperature=integrator.temperature,
            blocks=blocks,
            weights=sample.weights,
        )
        return Estimate(mean, cov, est, horizon_steps, {})
    est, horizon_steps, record = _hybrid_estimate(
        observable,
        system,
        sample,
        params,
        wrt,
        integrator,
        epoch,
        hybrid,
        horizon_steps,
        max_sensitivity,
        executor or "in-process",
    )
    return Estimate(mean, cov, est, horizon_steps, record)


def _hybrid_estimate(
    observable, system, sample, params, wrt, integrator, epoch, hybrid, n, max_sensitivity, ex
):
    """The hybrid J from M replicas started from frames of ``sample``; (estimate, the
    horizon n in steps, the record's horizon and ``dx_dtheta_max`` entries). The pilot
    that measures the growth of dx/dθ runs without ``max_sensitivity``."""
    from timemachine.fitting.replicas import run_replicas

    m = hybrid.n_replicas
    rng = np.random.default_rng((integrator.seed, epoch, 7))
    p = sample.weights
    pick = rng.choice(sample.x.shape[0], size=m, replace=p is not None, p=p)
    starts = sample.x[pick]
    replicas = 1_000_000 + epoch * m + np.arange(m)
    record = {}
    if n is None:
        if hybrid.horizon == "auto":
            spacing = max(1, hybrid.max_horizon // 20)
            pilot = run_replicas(
                system,
                starts,
                integrator,
                (hybrid.max_horizon // spacing) * spacing,
                wrt=wrt,
                replicas=replicas,
                params=params,
                save_every=spacing,
                precision=hybrid.precision,
                max_sensitivity=None,
                executor=ex,
            )
            choice = choose_horizon(
                pilot.steps,
                pilot.frames_dx_dtheta,
                params[wrt],
                integrator.dt,
                hybrid.horizon_cap,
            )
            n = choice.n_steps
            record["horizon_growth_rate_per_ps"] = choice.growth_rate
        else:
            n = int(hybrid.horizon)
    res = run_replicas(
        system, starts, integrator, n, wrt=wrt, replicas=replicas, params=params,
        precision=hybrid.precision, max_sensitivity=max_sensitivity, executor=ex,
    )  # fmt: skip
    est = hybrid_gradient(
        observable,
        system,
        starts,
        res.x,
        res.dx_dtheta,
        params=params,
        wrt=wrt,
        temperature=integrator.temperature,
        horizon=n,
    )
    record["horizon_steps"] = n
    record["dx_dtheta_max"] = np.abs(res.dx_dtheta).max(axis=(0, 2, 3)).tolist()
    return est, n, record


class Loss(NamedTuple):
    """The loss χ² + prior at θ and its gradient.

    Attributes:
        chi2, chi2_stderr, chi2_noise_bias: χ²/N with its standard error and the bias the
            noise of ⟨O⟩ adds (``chi2_with_error``).
        prior: (1/P) Σ ((θ - θ₀)/s)², 0 without a prior.
        scale: (K,) sqrt(w_k / K) / σ_k; resid: (K,) scale · (⟨O⟩ - y), so χ² ≈ ‖resid‖².
        gradient, gradient_stderr: (P,) d(χ² + prior)/dθ and its standard error (from
            J's).
    """

    chi2: float
    chi2_stderr: float
    chi2_noise_bias: float
    prior: float
    scale: np.ndarray
    resid: np.ndarray
    gradient: np.ndarray
    gradient_stderr: np.ndarray

    @property
    def value(self) -> float:
        return self.chi2 + self.prior


def loss_and_gradient(estimate: Estimate, target, theta, theta0, prior_width=None) -> Loss:
    """χ² of ``estimate`` against ``target`` (a ``TargetVector``), the prior on θ (P,)
    with widths ``prior_width`` (P,) about θ₀ (None: no prior), and the gradient
    2/K Σ w r/σ J + 2/P (θ - θ₀)/s²."""
    mean, J, J_se = estimate.mean, estimate.gradient.gradient, estimate.gradient.stderr
    chi2, chi2_se, chi2_bias = chi2_with_error(
        mean, estimate.cov, target.value, target.uncertainty, target.weight
    )
    sw = np.sqrt(target.weight / target.value.shape[0]) / target.uncertainty
    resid = sw * (mean - target.value)
    grad_theta = 2.0 * (sw * resid) @ J
    grad_se = 2.0 * np.sqrt(((sw * resid)[:, None] ** 2 * J_se**2).sum(axis=0))
    prior = 0.0
    if prior_width is not None:
        z = (theta - theta0) / prior_width
        prior = float(np.sum(z * z) / theta.size)
        grad_theta = grad_theta + 2.0 / theta.size * z / prior_width
    return Loss(chi2, chi2_se, chi2_bias, prior, sw, resid, grad_theta, grad_se)


def least_squares_form(loss: Loss, J, jac_u, theta, theta0, prior_width=None):
    """The loss as ‖r‖² with r linear in u near θ: (r (K [+ P],), dr/du (K [+ P], P)), the
    prior's rows appended; J (K, P) is d⟨O⟩/dθ, ``jac_u`` (P,) dθ/du."""
    Ju = (loss.scale[:, None] * J) * jac_u[None, :]
    if prior_width is None:
        return loss.resid, Ju
    rr = np.concatenate([loss.resid, (theta - theta0) / prior_width / np.sqrt(theta.size)])
    JJ = np.vstack([Ju, np.diag(jac_u / prior_width / np.sqrt(theta.size))])
    return rr, JJ
