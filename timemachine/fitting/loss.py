"""The fitting loss: χ² against experimental targets, an ergodicity regulariser, a prior.

With K target values y_k (uncertainties σ_k, weights w_k) and simulated averages ⟨O_k⟩::

    χ²   = Σ_k w_k ((⟨O_k⟩ - y_k) / σ_k)² / K
    erg  = λ Σ_k w_k ((⟨O_k⟩_time - ⟨O_k⟩_ens) / σ_k)² / K       (paper: ergodicity)
    prior = Σ_p ((θ_p - θ_ref,p) / s_p)² / P
    loss = χ² + erg + prior

``⟨O⟩_ens`` averages the last frames of M replicas, ``⟨O⟩_time`` a reservoir sample of
frames along trajectories; for an ergodic system both estimate the same ensemble average,
and ``erg`` pulls them together. Gradients come by the chain rule from the pathwise
observable gradients dO(x)/dθ = ∂O/∂x · dx/dθ averaged over the same samples
(docs/design.md, "Observable gradients").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError

__all__ = [
    "LossResult",
    "SampleSet",
    "TargetVector",
    "loss_and_gradient",
    "observable_samples",
    "target_vector",
]


class TargetVector(NamedTuple):
    """All targets as one vector observable.

    Attributes:
        observable: ``fn(x (N, 3)) -> (K,)`` concatenating every target's observable.
        value, uncertainty, weight: (K,) float64.
        labels: K strings ``target:label``.
        slices: per target, the slice of the K values it owns.
    """

    observable: object
    value: np.ndarray
    uncertainty: np.ndarray
    weight: np.ndarray
    labels: tuple
    slices: tuple


def target_vector(targets) -> TargetVector:
    """Stack a list of ``Target`` into one (K,) observable with values and σ's."""
    from timemachine.fitting.targets import Target

    try:
        targets = list(targets)
    except TypeError:
        raise InputError(
            f"targets must be a list of Target (make_target, load_targets) or a target-file "
            f"path, got {targets!r}"
        ) from None
    if not targets:
        raise InputError("at least one target is needed for a loss")
    for i, t in enumerate(targets):
        if not isinstance(t, Target):
            raise InputError(
                f"targets[{i}] = {t!r} is not a Target: build one with make_target or "
                f"load_targets (a target-file path may stand for the whole list)"
            )
    observables = [t.observable for t in targets]

    def observable(x):
        return jnp.concatenate([jnp.atleast_1d(o(x)) for o in observables])

    slices, start = [], 0
    for t in targets:
        slices.append(slice(start, start + t.n_values))
        start += t.n_values
    return TargetVector(
        observable,
        np.concatenate([t.value for t in targets]),
        np.concatenate([t.uncertainty for t in targets]),
        np.concatenate([np.full(t.n_values, t.weight) for t in targets]),
        tuple(lab for t in targets for lab in t.labels),
        tuple(slices),
    )


def check_prior_sigma(prior_sigma, n_params, names=None) -> np.ndarray:
    """The prior's (P,) widths from a scalar or P numbers, each finite and > 0 (θ's
    units); InputError naming the bad entry and its parameter otherwise."""
    try:
        width = np.asarray(prior_sigma, dtype=np.float64)
        width = np.broadcast_to(width, (n_params,)) if width.ndim <= 1 else None
    except (TypeError, ValueError):
        width = None
    if width is None:
        raise InputError(
            f"prior_sigma must be a number or {n_params} numbers (one per fitted parameter), "
            f"got {prior_sigma!r}"
        )
    bad = np.flatnonzero(~(np.isfinite(width) & (width > 0)))
    if bad.size:
        i = int(bad[0])
        which = f" ({names[i]})" if names is not None else ""
        raise InputError(
            f"prior_sigma[{i}]{which} = {float(width[i])!r}: every prior width must be a "
            f"finite number > 0 (θ's units)"
        )
    return width


class SampleSet(NamedTuple):
    """Observables and their pathwise derivatives on S sampled frames.

    Attributes:
        values: (S, K) O(x_s).
        gradients: (S, K, P) dO(x_s)/dθ = ∂O/∂x · dx_s/dθ.
    """

    values: np.ndarray
    gradients: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.values.mean(axis=0)

    @property
    def gradient_mean(self) -> np.ndarray:
        return self.gradients.mean(axis=0)

    @property
    def standard_error(self) -> np.ndarray:
        s = self.values.shape[0]
        return self.values.std(axis=0, ddof=1) / np.sqrt(s) if s > 1 else np.zeros_like(self.mean)


_SAMPLERS = {}


def _sampler(observable):
    key = id(observable)
    hit = _SAMPLERS.get(key)
    if hit is not None and hit[0] is observable:
        return hit[1]

    def one(x, dx):
        def jvp(d):
            return jax.jvp(observable, (x,), (d,))[1]

        return observable(x), jax.vmap(jvp)(dx).T

    fn = jax.jit(jax.vmap(one))
    _SAMPLERS[key] = (observable, fn)
    return fn


def observable_samples(observable, x, dx_dtheta) -> SampleSet:
    """O and dO/dθ on each of S frames.

    Args:
        observable: ``fn(x (N, 3)) -> (K,)`` (JAX-traceable).
        x: (S, N, 3) positions, nm.
        dx_dtheta: (S, P, N, 3) sensitivities, nm/[θ].

    Returns:
        ``SampleSet`` with values (S, K) and gradients (S, K, P).
    """
    x = np.asarray(x, dtype=np.float64)
    dx = np.asarray(dx_dtheta, dtype=np.float64)
    if x.ndim != 3 or dx.ndim != 4 or dx.shape[0] != x.shape[0] or dx.shape[2:] != x.shape[1:]:
        raise InputError(
            f"samples need x (S, N, 3) and dx_dtheta (S, P, N, 3), got {x.shape} and {dx.shape}"
        )
    values, grads = _sampler(observable)(jnp.asarray(x), jnp.asarray(dx))
    return SampleSet(np.asarray(values), np.asarray(grads))


class LossResult(NamedTuple):
    """The loss, its parts and its gradient with respect to θ[wrt].

    Attributes:
        loss: total, dimensionless.
        chi2, ergodicity, prior: its parts.
        gradient: (P,) dloss/dθ.
        average: (K,) the ⟨O⟩ the χ² used; average_error: (K,) its standard error.
        ensemble_average, time_average: (K,) each, or None when not sampled.
    """

    loss: float
    chi2: float
    ergodicity: float
    prior: float
    gradient: np.ndarray
    average: np.ndarray
    average_error: np.ndarray
    ensemble_average: np.ndarray | None
    time_average: np.ndarray | None


def loss_and_gradient(
    target: TargetVector,
    ensemble: SampleSet | None = None,
    time: SampleSet | None = None,
    average: str = "auto",
    ergodicity_weight: float = 0.0,
    theta=None,
    theta_ref=None,
    prior_sigma=None,
) -> LossResult:
    """χ² loss (+ ergodicity regulariser + Gaussian prior) and its gradient in θ.

    Args:
        target: ``target_vector(targets)``.
        ensemble: samples from the last frames of replicas, or None.
        time: reservoir samples along trajectories, or None.
        average: which ⟨O⟩ enters χ²: "ensemble", "time", "both" (all samples pooled),
            or "auto" (ensemble if given, else time).
        ergodicity_weight: λ ≥ 0; needs both sample sets when > 0.
        theta, theta_ref: (P,) current and reference θ[wrt] for the prior.
        prior_sigma: scalar or (P,) widths s_p > 0 (θ's units), or None for no prior.

    Returns:
        ``LossResult``.
    """
    if ensemble is None and time is None:
        raise InputError("loss_and_gradient needs ensemble and/or time samples")
    if average == "auto":
        average = "ensemble" if ensemble is not None else "time"
    if average not in ("ensemble", "time", "both"):
        raise InputError(f"average must be 'ensemble', 'time', 'both' or 'auto', got {average!r}")
    if average in ("ensemble", "both") and ensemble is None:
        raise InputError(f"average={average!r} needs ensemble samples (replicas)")
    if average in ("time", "both") and time is None:
        raise InputError(f"average={average!r} needs time samples (a reservoir)")
    if ergodicity_weight < 0:
        raise InputError(f"ergodicity_weight must be >= 0, got {ergodicity_weight!r}")
    if ergodicity_weight > 0 and (ensemble is None or time is None):
        raise InputError("the ergodicity regulariser needs both ensemble and time samples")

    if average == "both":
        pooled = SampleSet(
            np.concatenate([ensemble.values, time.values]),
            np.concatenate([ensemble.gradients, time.gradients]),
        )
    else:
        pooled = ensemble if average == "ensemble" else time
    k = target.value.shape[0]
    if pooled.values.shape[1] != k:
        raise InputError(f"samples have {pooled.values.shape[1]} observables, targets {k}")
    mean, dmean = pooled.mean, pooled.gradient_mean
    w, s = target.weight, target.uncertainty

    resid = (mean - target.value) / s
    chi2 = float(np.sum(w * resid**2) / k)
    grad = 2.0 / k * np.einsum("k,kp->p", w * resid / s, dmean)

    erg = 0.0
    if ergodicity_weight > 0:
        gap = (time.mean - ensemble.mean) / s
        erg = float(ergodicity_weight * np.sum(w * gap**2) / k)
        dgap = time.gradient_mean - ensemble.gradient_mean
        grad = grad + 2.0 * ergodicity_weight / k * np.einsum("k,kp->p", w * gap / s, dgap)

    prior = 0.0
    if prior_sigma is not None:
        if theta is None or theta_ref is None:
            raise InputError("a prior needs theta and theta_ref")
        theta = np.asarray(theta, dtype=np.float64)
        width = check_prior_sigma(prior_sigma, theta.shape[0])
        z = (theta - np.asarray(theta_ref, dtype=np.float64)) / width
        prior = float(np.sum(z**2) / theta.size)
        grad = grad + 2.0 / theta.size * z / width

    return LossResult(
        loss=chi2 + erg + prior,
        chi2=chi2,
        ergodicity=erg,
        prior=prior,
        gradient=np.asarray(grad, dtype=np.float64),
        average=mean,
        average_error=pooled.standard_error,
        ensemble_average=None if ensemble is None else ensemble.mean,
        time_average=None if time is None else time.mean,
    )
