"""The hybrid estimator's horizon: how many steps its sensitivity replicas may run before
the pathwise term's variance explodes, from the measured growth of dx/dθ on a pilot run
(``choose_horizon``)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from timemachine.errors import InputError

__all__ = ["HorizonChoice", "choose_horizon"]


class HorizonChoice(NamedTuple):
    """The hybrid estimator's horizon, chosen from the measured sensitivity growth.

    Attributes:
        n_steps: the chosen horizon n (a multiple of the pilot's save spacing).
        growth_rate: λ in 1/ps, the least-squares slope of log s(t) over the pilot, with
            s(t) = median over replicas of max_p |θ_p| · max |dx/dθ_p| (nm per relative
            change of θ_p); sensitivities of a chaotic trajectory grow as e^{λt}.
        steps: (F,) pilot steps; growth: (F,) s(t) at those steps, nm.
        cap: the bound on s(t) the horizon respects, nm.
    """

    n_steps: int
    growth_rate: float
    steps: np.ndarray
    growth: np.ndarray
    cap: float


def choose_horizon(steps, dx_dtheta, theta, dt, cap: float = 0.05) -> HorizonChoice:
    """Bound the hybrid horizon where the sensitivities start to explode.

    The variance of the pathwise term grows as |dx/dθ|², and along a chaotic trajectory
    |dx/dθ| grows exponentially (trialanine at 300 K: 0.016 at 0.2 ps, 7 at 1 ps, 1e9 at
    5 ps). The horizon is the last pilot step at which the relative sensitivity s(t) is
    still below ``cap`` (nm per 100 % change of a parameter): beyond it the pathwise term
    costs more variance than the score term it replaces.

    Args:
        steps: (F,) increasing step indices of the pilot frames.
        dx_dtheta: (M, F, P, N, 3) pilot sensitivities (``run_replicas(...,
            save_every=...).frames_dx_dtheta``).
        theta: (P,) the parameter values (for the relative scale).
        dt: time step, ps.
        cap: bound on s(t), nm.

    Returns:
        ``HorizonChoice``.
    """
    steps = np.asarray(steps, dtype=np.int64)
    dx = np.asarray(dx_dtheta, dtype=np.float64)
    if dx.ndim != 5 or dx.shape[1] != steps.shape[0] or steps.shape[0] == 0:
        raise InputError(
            f"dx_dtheta must be (M, F, P, N, 3) with F = {steps.shape[0]} pilot frames, "
            f"got {dx.shape}"
        )
    scale = np.abs(np.asarray(theta, dtype=np.float64))
    if scale.shape != (dx.shape[2],):
        raise InputError(f"theta must have shape ({dx.shape[2]},), got {scale.shape}")
    if not (isinstance(cap, (int, float)) and cap > 0):
        raise InputError(f"cap must be a number > 0 (nm), got {cap!r}")
    per = np.abs(dx).max(axis=(3, 4)) * scale[None, None, :]  # (M, F, P)
    growth = np.median(per.max(axis=2), axis=0)  # (F,)
    growth = np.where(np.isfinite(growth), growth, np.inf)
    t = steps * dt
    ok = np.isfinite(growth) & (growth > 0)
    rate = float(np.polyfit(t[ok], np.log(growth[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
    below = np.flatnonzero(growth <= cap)
    if below.size == 0:
        n = int(steps[0])
    else:
        # the last step before s(t) first exceeds the cap
        first_above = np.flatnonzero(growth > cap)
        last = below[below < first_above[0]] if first_above.size else below
        n = int(steps[last[-1]]) if last.size else int(steps[0])
    return HorizonChoice(n, rate, steps, growth, float(cap))
