"""The equilibrium fit's samples at θ: stored frames reweighted, or fresh chain segments.

Step 1 of every epoch of ``fit_equilibrium`` (``timemachine.fitting.equilibrium``).
``EpochSampler.at(θ)`` first tries the frames stored from an earlier θ₀: importance
weights exp(-β(E(x;θ) - E(x;θ₀))) (``reweighting_weights``) whose Kish effective sample
size is at least ``reweight_threshold`` of their number carry them to θ, for at most
``max_reuse`` epochs in a row. Otherwise the persistent chains (``EquilibriumChains``)
continue at θ: ``decorrelation_steps`` discarded, then production segments of
``sample_steps`` (``EquilibriumChains.sample_until``) until every observable has
``min_ess`` effective samples, and their frames go through a reservoir (Algorithm R,
seeded by (integrator seed, epoch)) to become the new stored frames.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from timemachine.errors import InputError
from timemachine.fitting.estimators import _values_program, reweighting_weights
from timemachine.fitting.sampling import (
    EquilibriumChains,
    potential_scale_reduction,
    reservoir_frames,
)

__all__ = ["EpochSample", "EpochSampler", "observable_values"]


def observable_values(observable, x) -> np.ndarray:
    """The K values of ``observable`` on every frame of x (F, N, 3) nm: (F, K)."""
    return np.asarray(_values_program(observable)(x))


class EpochSample(NamedTuple):
    """The frames one epoch estimates from.

    Attributes:
        x: (R, N, 3) frames, nm.
        weights: (R,) importance weights (sum 1) that carry them to the epoch's θ, or
            None when they were sampled at it.
        record: the epoch record's sampling entries (``sampled``, the ESS per observable
            and R̂ or the reweighted Kish ESS, ``reweight_ess``).
    """

    x: np.ndarray
    weights: np.ndarray | None
    record: dict


class EpochSampler:
    """Frames at the θ of each epoch, from the stored ones or the chains.

    Args:
        chains: the fit's persistent ``EquilibriumChains`` (their integrator gives the
            temperature and the reservoir's seed).
        observable: the targets' observable (K values per frame).
        labels: its K labels (for the error on too few effective samples).
        sample_steps: production steps per chain and segment; decorrelation_steps: steps
            discarded after each change of θ; reservoir_size: frames kept.
        min_ess: the effective sample size every observable must reach; max_extend: the
            most extra production segments before giving up.
        reweight_threshold: the Kish ESS fraction stored frames need to be reused;
            max_reuse: the most consecutive epochs one sample is reweighted for.

    Attributes:
        stored: (x (R, N, 3) nm, params (P_all,)) the frames of the last fresh sample and
            the θ they were drawn at, or None before the first.
        reused: epochs in a row the stored frames have been reweighted for.
    """

    def __init__(
        self,
        chains: EquilibriumChains,
        observable,
        labels,
        *,
        sample_steps: int,
        decorrelation_steps: int,
        reservoir_size: int,
        min_ess: float,
        max_extend: int,
        reweight_threshold: float,
        max_reuse: int,
    ):
        self.chains, self.observable, self.labels = chains, observable, labels
        self.sample_steps, self.decorrelation_steps = sample_steps, decorrelation_steps
        self.reservoir_size, self.min_ess, self.max_extend = reservoir_size, min_ess, max_extend
        self.reweight_threshold, self.max_reuse = reweight_threshold, max_reuse
        self.stored = None
        self.reused = 0

    def at(self, params, epoch: int, must_sample: bool) -> EpochSample:
        """The frames of epoch ``epoch`` at θ = ``params`` (P_all,).

        ``must_sample`` (the last epoch, or a verdict that needs fresh samples) forbids
        reweighting the stored frames.

        Raises:
            InputError: an observable still has fewer than ``min_ess`` effective samples
                after ``max_extend`` extensions.
        """
        weights, ess_w = None, None
        reuse_ok = self.reused < self.max_reuse and not must_sample
        if self.stored is not None and self.reweight_threshold <= 1.0 and reuse_ok:
            w, ess_w = reweighting_weights(
                self.chains.system,
                self.stored[0],
                self.stored[1],
                params,
                self.chains.integrator.temperature,
            )
            if ess_w >= self.reweight_threshold * w.shape[0]:
                weights = w
        if weights is None:
            record = self._sample(params, epoch)
            ess_w = float(self.stored[0].shape[0])
            self.reused = 0
        else:
            self.reused += 1
            record = {"sampled": False, "reweighted_ess": ess_w}
        record["reweight_ess"] = ess_w
        return EpochSample(self.stored[0], weights, record)

    def _sample(self, params, epoch):
        """Run the chains at θ, store the reservoir's frames; the record's entries."""
        chains = self.chains
        chains.decorrelate(params, self.decorrelation_steps)
        segment, series, ess, extended = chains.sample_until(
            params,
            self.sample_steps,
            lambda x: observable_values(self.observable, x),
            self.min_ess,
            self.max_extend,
        )
        frames_x, _origin = reservoir_frames(
            segment, self.reservoir_size, (chains.integrator.seed, epoch)
        )
        self.stored = (frames_x, params.copy())
        record = {
            "sampled": True,
            "ess": ess.tolist(),
            "ess_min": float(ess.min()),
            "production_steps": int(segment.x.shape[1] * chains.save_every),
        }
        if chains.n_chains > 1:
            rhat = potential_scale_reduction(series)
            record.update(rhat=rhat.tolist(), rhat_max=float(rhat.max()))
        worst = int(np.argmin(ess))
        if ess[worst] < self.min_ess:
            mixing = ""
            if chains.n_chains > 1:
                mixing = (
                    f"; the chains disagree on it (Gelman-Rubin R = "
                    f"{record['rhat'][worst]:.3f}), so they have not crossed between "
                    "its conformations often enough"
                )
            raise InputError(
                f"epoch {epoch}: the effective sample size of {self.labels[worst]} is "
                f"{ess[worst]:.1f} < min_ess = {self.min_ess:g} ({segment.x.shape[1]} frames "
                f"per chain × {chains.n_chains} chains, after {extended} extensions)"
                f"{mixing}: too few independent samples to estimate a gradient; raise "
                "sample_steps, n_chains or max_extend"
            )
        return record
