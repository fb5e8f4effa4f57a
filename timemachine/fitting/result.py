"""What every fit shares: its result, the optimiser's variable u and θ(u), the optax optimiser,
and the settings fingerprint that a checkpoint must match to be resumed."""

from __future__ import annotations

import hashlib
import json
import numbers
from typing import NamedTuple

import numpy as np

from timemachine.errors import InputError

PARAMETRIZATIONS = ("relative", "log", "absolute")


class FitResult(NamedTuple):
    """The outcome of ``fit``.

    Attributes:
        params: (P_all,) the fitted full θ (θ[wrt] after the last step).
        theta: (P,) the fitted θ[wrt]; theta_initial: (P,) where the fit started.
        param_names: P names of θ[wrt]; wrt: (P,) int indices into ``system.params``.
        history: one dict per epoch: ``epoch``, ``loss``, ``chi2``, ``ergodicity``,
            ``prior``, ``force_matching``, ``gradient_norm``, ``observables`` (K,),
            ``observable_errors`` (K,), ``ensemble_average``, ``time_average``,
            ``params`` (P, θ[wrt] the epoch was simulated at), ``gradient`` (P,),
            ``wall_s``.
        labels: K observable labels; target_values, target_uncertainties: (K,).
        out_dir: where checkpoint and history live, or None.
        info: for an equilibrium fit (``fit_equilibrium``): the estimator, why it
            stopped, the accepted χ² with its error; None for a pathwise fit.
        system_params: a fit over several systems (``FitSystem``): each system's name →
            its fitted full θ (P_all_s,); ``params`` and ``wrt`` are then the first
            system's, ``theta`` and ``param_names`` the shared parameters'. None for a
            fit of one system.
    """

    params: np.ndarray
    theta: np.ndarray
    theta_initial: np.ndarray
    param_names: tuple
    wrt: np.ndarray
    history: list
    labels: tuple
    target_values: np.ndarray
    target_uncertainties: np.ndarray
    out_dir: str | None
    info: dict | None = None
    system_params: dict | None = None

    def history_dict(self) -> dict:
        """A JSON-ready dict of the whole fit (what ``history.json`` holds)."""
        return {
            "param_names": list(self.param_names),
            "theta_initial": [float(v) for v in self.theta_initial],
            "theta_final": [float(v) for v in self.theta],
            "labels": list(self.labels),
            "target_values": [float(v) for v in self.target_values],
            "target_uncertainties": [float(v) for v in self.target_uncertainties],
            "info": self.info,
            "epochs": self.history,
        }


def make_optimizer(optimizer, learning_rate, clip_norm):
    """An optax transformation from a name ("adam", "sgd", "adamw", "rmsprop") and a learning
    rate, or an optax transformation as given; optionally clipped by global norm."""
    import optax

    if isinstance(optimizer, str):
        makers = {
            "adam": optax.adam,
            "sgd": optax.sgd,
            "adamw": optax.adamw,
            "rmsprop": optax.rmsprop,
        }
        if optimizer not in makers:
            raise InputError(
                f"optimizer {optimizer!r} unknown; use one of {sorted(makers)} "
                "or an optax transformation"
            )
        if not (isinstance(learning_rate, numbers.Real) and learning_rate > 0):
            raise InputError(f"learning_rate must be a number > 0, got {learning_rate!r}")
        opt = makers[optimizer](learning_rate)
    elif hasattr(optimizer, "init") and hasattr(optimizer, "update"):
        opt = optimizer
    else:
        raise InputError(
            f"optimizer must be a name or an optax GradientTransformation, got {optimizer!r}"
        )
    if clip_norm is not None:
        if not (isinstance(clip_norm, numbers.Real) and clip_norm > 0):
            raise InputError(f"clip_norm must be a number > 0 or None, got {clip_norm!r}")
        opt = optax.chain(optax.clip_by_global_norm(float(clip_norm)), opt)
    return opt


class Parametrization:
    """θ(u) and dθ/du for the optimiser's variable u."""

    def __init__(self, kind, theta0, names):
        if kind not in PARAMETRIZATIONS:
            raise InputError(f"parametrization must be one of {PARAMETRIZATIONS}, got {kind!r}")
        zero = np.flatnonzero(theta0 == 0)
        if kind != "absolute" and zero.size:
            raise InputError(
                f"parametrization={kind!r} scales by the starting value, but {names[zero[0]]} "
                "starts at 0; use parametrization='absolute'"
            )
        self.kind, self.theta0 = kind, np.asarray(theta0, dtype=np.float64)

    def initial(self):
        return self.theta0.copy() if self.kind == "absolute" else np.zeros_like(self.theta0)

    def theta(self, u):
        if self.kind == "relative":
            return self.theta0 * (1.0 + u)
        if self.kind == "log":
            return self.theta0 * np.exp(u)
        return np.array(u, dtype=np.float64)

    def jacobian(self, u):
        if self.kind == "relative":
            return self.theta0.copy()
        if self.kind == "log":
            return self.theta0 * np.exp(u)
        return np.ones_like(u)


def kept_note(out_dir, epoch) -> str:
    """What a fit whose ``epoch`` failed leaves in ``out_dir``, as the last words of the
    error: the failed epoch writes nothing, so the checkpoint of the epochs before it
    stands ("" without ``out_dir`` or before any epoch finished)."""
    if out_dir is None or epoch == 0:
        return ""
    done = "epoch 0" if epoch == 1 else f"epochs 0-{epoch - 1}"
    return f"; the checkpoint in {out_dir!r} ({done}) is intact: resume=True continues from it"


def settings_fingerprint(**config) -> str:
    """16 hex digits of the SHA-256 of the settings as sorted JSON."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_result(full0, wrt, names, param, u, theta0, history, target, out_dir, info=None):
    """The ``FitResult`` at the optimiser's u: the full (P_all,) θ with θ[wrt] = θ(u)."""
    theta = param.theta(np.asarray(u, dtype=np.float64))
    full = full0.copy()
    full[wrt] = theta
    return FitResult(
        params=full,
        theta=theta,
        theta_initial=theta0,
        param_names=names,
        wrt=np.asarray(wrt),
        history=list(history),
        labels=() if target is None else target.labels,
        target_values=np.zeros(0) if target is None else target.value,
        target_uncertainties=np.zeros(0) if target is None else target.uncertainty,
        out_dir=out_dir,
        info=info,
    )
