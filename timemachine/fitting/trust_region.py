"""The Gauss–Newton trust-region step of the equilibrium fit.

``lm_step`` is the Levenberg–Marquardt step that minimises the linearised residual inside
‖δu‖ ≤ Δ (as ForceBalance takes). ``trust_region_step`` is one epoch's decision: a trial
whose χ² is worse than the last accepted point's by more than ``tolerance_sigma`` standard
errors is rejected (u goes back to the accepted point along a shorter step), the radius
halves on a rejection or a poor model and doubles on a good model whose step reached the
boundary, and an accepted trial takes a new step from its own model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["TrustRegionStep", "lm_step", "trust_region_step"]


def lm_step(J, r, radius):
    """Levenberg–Marquardt step δ minimising ‖r + J δ‖² with ‖δ‖ ≤ radius.

    Returns (δ, predicted decrease ‖r‖² - ‖r + Jδ‖², λ)."""
    U, s, Vt = np.linalg.svd(J, full_matrices=False)
    ur = U.T @ r

    def delta(lam):
        return -(Vt.T @ (s / (s * s + lam) * ur))

    d = delta(1e-12 * (s.max() ** 2 if s.size else 1.0))
    lam = 0.0
    if np.linalg.norm(d) > radius:
        lo, hi = 0.0, max(1.0, float(s.max() ** 2) * 1e6)
        while np.linalg.norm(delta(hi)) > radius:
            hi *= 10
        for _ in range(100):
            lam = 0.5 * (lo + hi)
            if np.linalg.norm(delta(lam)) > radius:
                lo = lam
            else:
                hi = lam
        lam = hi
        d = delta(lam)
    predicted = float(r @ r - np.sum((r + J @ d) ** 2))
    return d, predicted, lam


class TrustRegionStep(NamedTuple):
    """What ``trust_region_step`` decided.

    Attributes:
        u_next: the next trial u.
        accepted: the last accepted point (a dict: u, loss, se, fresh, fresh_loss,
            fresh_se, predicted, step_norm, radius, delta), this trial's if ``ok``.
        radius: the trust radius for the next step.
        ok: whether this trial was accepted.
        converging: the change in loss is within ``tolerance_sigma`` standard errors.
        predicted: the model's predicted decrease of the step to ``u_next``.
        decreases: ``predicted_decrease`` and ``actual_decrease`` of this trial against
            the accepted point (empty for the first one).
    """

    u_next: np.ndarray
    accepted: dict
    radius: float
    ok: bool
    converging: bool
    predicted: float
    decreases: dict


def trust_region_step(
    accepted, u, loss, loss_se, fresh, residual, jacobian, radius, max_radius, tolerance_sigma
) -> TrustRegionStep:
    """Accept or reject the trial u (loss ± loss_se), resize the radius, and step.

    Args:
        accepted: the last accepted point (``TrustRegionStep.accepted``), or None at the
            first trial; a rejection shortens its step in place.
        u: the trial's (P,) optimiser coordinates; loss, loss_se: its χ² (+ prior) and
            standard error; fresh: whether its frames were freshly sampled.
        residual, jacobian: the weighted residual (R,) and its Jacobian (R, P) in u at the
            trial, for the next Levenberg–Marquardt step.
        radius, max_radius: the trust radius and its largest value.
        tolerance_sigma: standard errors by which a trial may be worse and still pass.
    """
    ok = True
    decreases = {}
    if accepted is not None:
        # compare like with like: a fresh sample against the last freshly
        # sampled accepted point (reweighted estimates share frames with the
        # steps fitted on them, and are optimistic), reweighted against the
        # accepted estimate on the same frames
        against_fresh = fresh and not accepted.get("fresh", True)
        ref_loss = accepted["fresh_loss"] if against_fresh else accepted["loss"]
        ref_se = accepted["fresh_se"] if against_fresh else accepted["se"]
        se = math.hypot(loss_se, ref_se)
        if loss > ref_loss + tolerance_sigma * se:
            ok = False
        predicted = accepted["predicted"]
        actual = ref_loss - loss
        ratio = actual / predicted if predicted > 0 else 0.0
        decreases = dict(predicted_decrease=predicted, actual_decrease=actual)
        if not ok or (ratio < 0.25 and not against_fresh):
            radius *= 0.5
        elif (
            ratio > 0.75 and not against_fresh and accepted["step_norm"] >= 0.9 * accepted["radius"]
        ):
            radius = min(2.0 * radius, max_radius)
        converging = abs(actual) <= tolerance_sigma * se
    else:
        converging = False
    if ok:
        delta, predicted, _lam = lm_step(jacobian, residual, radius)
        last_fresh = (
            (loss, loss_se)
            if fresh or accepted is None
            else (accepted["fresh_loss"], accepted["fresh_se"])
        )
        accepted = {
            "u": u.copy(),
            "loss": loss,
            "se": loss_se,
            "fresh": fresh,
            "fresh_loss": last_fresh[0],
            "fresh_se": last_fresh[1],
            "predicted": predicted,
            "step_norm": float(np.linalg.norm(delta)),
            "radius": radius,
            "delta": delta,
        }
        u_next = u + delta
    else:
        # back to the accepted point: a shorter step along its own model
        acc_u = np.asarray(accepted["u"])
        d = np.asarray(accepted["delta"])
        scale = min(1.0, radius / max(np.linalg.norm(d), 1e-300))
        accepted["delta"] = d * scale
        accepted["step_norm"] = float(np.linalg.norm(d * scale))
        accepted["predicted"] = accepted["predicted"] * scale  # first order
        accepted["radius"] = radius
        u_next = acc_u + d * scale
        predicted = accepted["predicted"]
    return TrustRegionStep(u_next, accepted, radius, ok, converging, predicted, decreases)
