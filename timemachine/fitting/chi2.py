"""χ² of averaged observables against targets, with standard errors from block averages.

``block_mean_cov`` turns per-frame values (optionally importance-weighted) into the mean and
the covariance of that mean from B contiguous blocks; ``chi2_with_error`` propagates it to
χ² = (1/K) Σ w_k ((⟨O_k⟩ - y_k)/σ_k)² by the delta method. The equilibrium fit
(``timemachine.fitting.equilibrium``) compares and stops on these numbers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["block_mean_cov", "chi2_with_error"]


def chi2_with_error(mean, cov, value, sigma, weight=None):
    """χ² = (1/K) Σ w_k ((⟨O_k⟩ - y_k)/σ_k)² and its standard error (delta method).

    Args:
        mean: (K,) ⟨O⟩; cov: (K, K) covariance of that estimate (from block means).
        value, sigma: (K,) targets and their uncertainties; weight: (K,) or None.

    Returns:
        (χ², standard error of χ², noise bias Σ w C_kk/σ_k² / K: the amount by which the
        sampling noise of ⟨O⟩ inflates the expected χ²).
    """
    mean, value, sigma = (np.asarray(a, dtype=np.float64) for a in (mean, value, sigma))
    k = mean.shape[0]
    w = np.ones(k) if weight is None else np.asarray(weight, dtype=np.float64)
    r = (mean - value) / sigma
    chi2 = float(np.sum(w * r * r) / k)
    g = 2.0 * w * r / sigma / k
    cov = np.asarray(cov, dtype=np.float64)
    se = float(np.sqrt(max(g @ cov @ g, 0.0)))
    bias = float(np.sum(w * np.diag(cov) / sigma**2) / k)
    return chi2, se, bias


def block_mean_cov(values, weights, blocks):
    """Mean (K,) and covariance of the mean (K, K) from B contiguous blocks of the
    per-sample influence (weighted: the delta method of the ratio estimator)."""
    s = values.shape[0]
    w = np.full(s, 1.0 / s) if weights is None else weights
    mean = w @ values
    infl = s * w[:, None] * (values - mean)
    means = np.stack([b.mean(axis=0) for b in np.array_split(infl, blocks)])
    return mean, np.atleast_2d(np.cov(means, rowvar=False, ddof=1)) / blocks
