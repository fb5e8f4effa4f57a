"""Fitting equilibrium averages: chains at the current θ, an estimator, a trust-region step.

An experiment measures ⟨O⟩_θ, the average over p_θ(x) ∝ exp(-βE(x; θ)), so each epoch of
``fit_equilibrium``:

1. **samples at θ.** If the frames stored from an earlier θ₀ still carry enough weight
   at θ (importance weights exp(-β(E(x;θ) - E(x;θ₀))) with a Kish effective sample size
   of at least ``reweight_threshold`` of their number), they are reweighted and no
   dynamics run. Otherwise the persistent chains (``EquilibriumChains``) continue at θ:
   ``decorrelation_steps`` discarded, then ``sample_steps`` whose frames go through a
   reservoir (Algorithm R). The effective sample size of every observable on the chains
   (integrated autocorrelation time) is measured and must reach ``min_ess``.
2. **estimates** ⟨O⟩ and the Jacobian J = d⟨O⟩/dθ with standard errors from block
   averages: ``estimator="fluctuation"`` (-β cov(O, ∂E/∂θ) on the frames) or ``"hybrid"``
   (M sensitivity replicas of horizon n started from reservoir frames, plus the score of
   their start; n bounded from the measured growth of dx/dθ, ``choose_horizon``).
3. **steps.** χ² = (1/K) Σ w_k ((⟨O_k⟩ - y_k)/σ_k)², its gradient 2/K Σ w r/σ J, and
   either a Gauss–Newton step inside a trust region (``optimizer="gauss-newton"``, the
   default; the Levenberg–Marquardt step with ‖δu‖ ≤ Δ, as ForceBalance takes) or an optax
   step (``"adam"``). A Gauss–Newton trial whose χ² is worse than the accepted one by more
   than ``tolerance_sigma`` standard errors is rejected: θ goes back and Δ halves.
4. **stops** when the change in χ² is within ``tolerance_sigma`` of its standard error and,
   for Gauss–Newton, the model's predicted decrease is below one standard error, for
   ``patience`` epochs in a row.

The optimiser works on u with θ = θ₀(1 + u) ("relative", default), θ₀ eᵘ ("log") or u.
After each epoch a checkpoint (u, the optimiser, the chains, the stored frames, the
history) is written atomically to ``out_dir``; ``resume=True`` continues from it and
reproduces the uninterrupted fit's numbers (the noise of chain c at step t is a pure
function of (seed, t, c); reservoir and replica choices are seeded by the epoch).

This module holds the loop, the settings, the optimiser steps and the stopping rules;
step 1 lives in ``equilibrium_samples`` (``EpochSampler``), step 2 and the loss in
``equilibrium_estimate``, the trust region in ``trust_region``, the checkpoint format in
``equilibrium_checkpoint``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from timemachine.checkpoints import array_sha256, check_settings, jsonable, system_record
from timemachine.checks import check_int, check_real
from timemachine.errors import InputError, SimulationError
from timemachine.files import atomic_write_text
from timemachine.fitting.chi2 import chi2_with_error
from timemachine.fitting.equilibrium_checkpoint import (
    HISTORY,
    load_checkpoint,
    save_checkpoint,
)
from timemachine.fitting.equilibrium_estimate import (
    HybridSettings,
    estimate_at,
    least_squares_form,
    loss_and_gradient,
)
from timemachine.fitting.equilibrium_samples import EpochSampler
from timemachine.fitting.executor import Executor, check_executor, open_executor, runs_on_dask
from timemachine.fitting.loss import check_prior_sigma, target_vector
from timemachine.fitting.openmm_sampler import OpenMMSampler, check_sampled_parameters
from timemachine.fitting.result import (
    Parametrization,
    kept_note,
    make_optimizer,
    make_result,
    settings_fingerprint,
)
from timemachine.fitting.sampling import EquilibriumChains
from timemachine.fitting.systems import Member, combine_estimates, combine_targets, fit_members
from timemachine.fitting.trust_region import trust_region_step
from timemachine.integrator.langevin import LangevinIntegrator, LangevinState
from timemachine.precision import check_precision
from timemachine.sensitivity.diagnosis import annotate
from timemachine.sensitivity.options import check_max_sensitivity
from timemachine.system import System

__all__ = ["EQUILIBRIUM_ESTIMATORS", "OPTIMIZERS", "chi2_with_error", "fit_equilibrium"]

EQUILIBRIUM_ESTIMATORS = ("fluctuation", "hybrid")
OPTIMIZERS = ("gauss-newton", "adam")


def fit_equilibrium(
    system: System,
    x0,
    integrator: LangevinIntegrator,
    targets,
    wrt="torsion/*/k*",
    *,
    estimator: str = "fluctuation",
    epochs: int = 10,
    n_chains: int = 2,
    sample_steps: int = 100_000,
    decorrelation_steps: int = 10_000,
    save_every: int = 250,
    reservoir_size: int = 2000,
    blocks: int = 10,
    min_ess: float = 20.0,
    reweight_threshold: float = 0.5,
    max_reuse: int = 3,
    max_extend: int = 3,
    optimizer: str = "gauss-newton",
    learning_rate: float = 0.1,
    trust_radius: float = 0.2,
    max_trust_radius: float = 1.0,
    parametrization: str = "relative",
    prior_sigma=None,
    n_replicas: int = 32,
    horizon="auto",
    max_horizon: int = 500,
    horizon_cap: float = 0.05,
    max_sensitivity: float | None = 1e8,
    tolerance_sigma: float = 2.0,
    patience: int = 2,
    stop_chi2: float | None = None,
    params=None,
    out_dir=None,
    resume: bool = False,
    progress: bool | None = None,
    callback: Callable | None = None,
    precision: str = "float64",
    executor="in-process",
    n_workers: int | None = None,
    sampler="jax",
):
    """Fit θ[wrt] so that equilibrium averages ⟨O⟩_θ match experimental targets.

    Args:
        system: a ``timemachine.System``; or a list of ``FitSystem`` (system, x0,
            targets, name) for one fit over several systems that share the fitted
            parameters by name (``timemachine.fitting.systems``), with x0 and targets None.
        x0: (N, 3) or (C, N, 3) starting positions of the chains, nm.
        integrator: ``LangevinIntegrator``; its seed fixes every chain's noise.
        targets: list of ``Target`` (``timemachine.fitting.targets``) or a target-file path.
        wrt: the fitted parameters (globs or int indices; globs only for several
            systems: each system fits the matching parameters it has).
        estimator: "fluctuation" (default) or "hybrid"; see the module docstring.
        epochs: the most epochs (a resumed fit runs the missing ones); the fit stops
            earlier once converged.
        n_chains: C persistent chains; sample_steps: production steps per chain and
            epoch; decorrelation_steps: steps discarded after each change of θ;
            save_every: steps between frames; reservoir_size: frames kept (Algorithm R).
        blocks: B block averages for every standard error.
        min_ess: the smallest effective sample size (per observable, autocorrelation
            estimate) an epoch accepts; fewer raises with what to change.
        reweight_threshold: stored frames are reused at a new θ while their Kish ESS
            fraction is at least this (0 never samples again after the first epoch,
            values > 1 always sample).
        max_extend: an epoch whose ESS is below ``min_ess`` samples up to this many more
            production segments before it gives up with an error.
        max_reuse: the most consecutive epochs one sample is reweighted for; the last
            epoch, and an epoch after a reweighted one that looked converged, always
            sample afresh.
        optimizer: "gauss-newton" (trust region) or "adam" (``learning_rate``).
        trust_radius, max_trust_radius: the initial and largest ‖δu‖.
        parametrization: "relative", "log" or "absolute" (as in ``fit``).
        prior_sigma: widths (θ's units) of a Gaussian prior on θ - θ₀, or None.
        n_replicas, horizon, max_horizon, horizon_cap: the hybrid estimator's M replicas
            and horizon n ("auto": ``choose_horizon`` on a pilot of ``max_horizon`` steps,
            cap ``horizon_cap`` nm per relative change).
        max_sensitivity: a |dx/dθ| above this (nm per unit of θ_p) in a hybrid replica
            stops the fit, naming the epoch, replica, step, parameter and atom (None:
            only non-finite dx/dθ does). The pilot that chooses the horizon measures the
            growth and is not limited. A guard, not a setting: a resume may change it.
        tolerance_sigma, patience: the stopping rule (module docstring).
        stop_chi2: also stop at the first freshly sampled epoch after a step whose χ²/N
            is below this by more than ``tolerance_sigma`` standard errors (1.0: the
            discrepancy principle, the model fits the data within their uncertainties);
            None (default) fits until the χ² stops changing.
        params: (P_all,) starting θ (default ``system.params``); for several systems a
            list of one per system, or None.
        out_dir: folder for the checkpoint (``checkpoint.npz`` with its SHA-256 record
            ``checkpoint.json``, the previous pair kept as ``checkpoint.prev.*``) and
            ``history.json``; None keeps memory only.
        resume: continue from ``out_dir``'s checkpoint, chains and stored frames included
            (same settings only: a ``CheckpointError`` names each that differs); when the
            last checkpoint fails its checksums the previous one is used, with a
            ``CheckpointFallbackWarning``. A resumed fit reproduces the uninterrupted
            one bit for bit.
        progress: tqdm bar over epochs; None shows it when stderr is a terminal.
        callback: ``callback(record)`` after every epoch.
        precision: "float64" (default) or "float32" (``timemachine.precision``): the
            chains' (and the hybrid replicas') dynamics in single precision; ⟨O⟩, ∂E/∂θ
            on the frames, the estimators and the optimiser stay float64.
        executor: where the chains and the hybrid replicas run
            (``timemachine.fitting.executor``): "in-process" (default), "dask" (a local
            cluster of ``n_workers`` processes, started once for the fit and stopped
            after it), a scheduler address, a ``distributed.Client`` or an open
            ``Executor``. Each task is a group of chains (or replicas); their frames come
            back in chain order and every estimate is reduced from them in that order, so
            the fit does not depend on the executor (to round-off) and may resume on
            another one.
        n_workers: workers of the local cluster (executor "dask"); default 2.
        sampler: where the chains run. "jax" (default): the engine's Langevin dynamics
            (``EquilibriumChains``). "openmm": the same System in OpenMM
            (``OpenMMSampler.for_system``). An ``OpenMMSampler``: chains in OpenMM on
            its OpenMM System (explicit water, PME, constraints, any platform), of which
            ``system`` is the solute (its first atoms) and ``x0`` may be None
            (``timemachine.fitting.openmm_sampler``). With OpenMM only the fluctuation
            estimator, in-process and float64, and only torsion parameters (their
            barriers and phases, set in OpenMM each epoch) are fitted.

    Returns:
        ``timemachine.fitting.FitResult``; ``info`` holds the estimator, the stop reason,
        the accepted θ's χ² with its error, and the hybrid horizon.

    Raises:
        InputError: bad settings, a checkpoint of another fit, or too few effective samples.
        SimulationError: a chain or replica blew up, detected at its first bad saved
            frame (non-finite coordinates or velocities, an overflowing energy, non-finite
            dx/dθ, |dx/dθ| > ``max_sensitivity``): the epoch, chain or replica, step,
            atom and parameter are named (``.epoch``, ``.replica``, ``.step``, ``.atom``,
            ``.parameter``), with what to try. The failed epoch writes nothing: the
            checkpoint and history.json in ``out_dir`` stay those of the epoch before.
    """
    from timemachine.fitting.targets import load_targets

    s = _check_settings(
        system,
        integrator,
        estimator,
        optimizer,
        epochs=epochs,
        n_chains=n_chains,
        sample_steps=sample_steps,
        decorrelation_steps=decorrelation_steps,
        save_every=save_every,
        reservoir_size=reservoir_size,
        blocks=blocks,
        min_ess=min_ess,
        reweight_threshold=reweight_threshold,
        max_reuse=max_reuse,
        max_extend=max_extend,
        learning_rate=learning_rate,
        trust_radius=trust_radius,
        max_trust_radius=max_trust_radius,
        tolerance_sigma=tolerance_sigma,
        patience=patience,
        stop_chi2=stop_chi2,
        hybrid=HybridSettings(n_replicas, horizon, max_horizon, horizon_cap),
        precision=check_precision(precision).name,
    )
    check_max_sensitivity(max_sensitivity)
    if not isinstance(executor, Executor):
        check_executor(executor)
    several = isinstance(system, (list, tuple))
    if several:
        if x0 is not None or targets is not None:
            raise InputError(
                "a fit over several systems takes x0 and targets from each FitSystem: "
                "pass x0=None and targets=None"
            )
        members, names, theta0 = fit_members(system, wrt, params)
        target = combine_targets(members)
    else:
        if isinstance(targets, (str, os.PathLike)):
            targets = load_targets(targets, system.topology)
        target = target_vector(targets)
        wrt = system.resolve_wrt(wrt)
        names = tuple(system.param_names[i] for i in wrt)
        full0 = np.array(system.resolve_params(params), dtype=np.float64)
        theta0 = full0[wrt].copy()
        members = [Member("system", system, x0, target, wrt, np.arange(wrt.size), full0)]
    param = Parametrization(parametrization, theta0, names)
    opt = make_optimizer("adam", learning_rate, None) if optimizer == "adam" else None
    width = None  # (P,) the prior's widths, θ's units
    if prior_sigma is not None:
        width = check_prior_sigma(prior_sigma, theta0.shape[0], names)

    openmm = _check_sampler(sampler, estimator, several, executor, s.precision)
    if openmm is not None:
        check_sampled_parameters(members[0].system, members[0].wrt, "wrt")
    samplers = []
    for i, m in enumerate(members):
        # system i's chains draw the noise streams i·C … i·C + C - 1
        if openmm is None:
            chains = EquilibriumChains(
                m.system, m.x0, integrator, n_chains=n_chains, save_every=save_every,
                first_replica=i * s.n_chains, precision=s.precision, params=m.full0,
            )  # fmt: skip
        else:
            if openmm == "openmm":
                if m.x0 is None:
                    raise InputError('sampler="openmm" needs x0, the (N, 3) start (nm)')
                openmm = OpenMMSampler.for_system(m.system, m.x0)
            chains = openmm.chains(m.system, integrator, n_chains, save_every,
                                   first_replica=i * s.n_chains, params=m.full0)  # fmt: skip
        samplers.append(
            EpochSampler(
                chains,
                m.target.observable,
                m.target.labels,
                sample_steps=s.sample_steps,
                decorrelation_steps=s.decorrelation_steps,
                reservoir_size=s.reservoir_size,
                min_ess=s.min_ess,
                max_extend=s.max_extend,
                reweight_threshold=s.reweight_threshold,
                max_reuse=s.max_reuse,
            )
        )
    settings = _settings_record(
        s, estimator, names, theta0, integrator, members, samplers, parametrization, prior_sigma
    )
    u = param.initial()
    state = _FitState(u, opt.init(u) if opt is not None else None, s.trust_radius)
    state.horizon_steps = [None] * len(members)
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        if resume:
            _resume(out_dir, settings, state, samplers, s.epochs)
    elif resume:
        raise InputError("resume=True needs out_dir (where the checkpoint lives)")

    def result(u=None):
        best = state.accepted
        info = {
            "estimator": estimator,
            "stop_reason": state.stop_reason,
            "accepted": None if best is None else {"loss": best["loss"], "stderr": best["se"]},
            "horizon_steps": state.horizon_steps if several else state.horizon_steps[0],
        }
        u, history = state.u if u is None else u, state.history
        first = members[0]
        fitted = make_result(
            first.full0, first.wrt, names, param, u, theta0, history, target, out_dir, info
        )
        if not several:
            return fitted
        theta = param.theta(np.asarray(u, dtype=np.float64))
        info["systems"] = [m.name for m in members]
        return fitted._replace(
            params=first.full(theta),
            system_params={m.name: m.full(theta) for m in members},
        )

    bar = _progress_bar(progress, s.epochs, state.start)
    converged = state.converged  # a resumed fit that had converged runs no epoch
    pool = contextlib.ExitStack()
    try:
        if isinstance(executor, Executor):
            ex = executor
        elif state.start < s.epochs:
            ex = pool.enter_context(open_executor(executor, n_workers))
        else:
            ex = None  # nothing to run: no cluster started
        for sampler in samplers:
            sampler.chains.executor = ex
        for epoch in range(state.start, s.epochs):
            t0 = time.perf_counter()
            theta = param.theta(state.u)
            fulls = [m.full(theta) for m in members]
            record = {"epoch": epoch, "params": theta.tolist(), "estimator": estimator}

            # ---- 1. samples at θ: the stored frames reweighted, or the chains run on;
            # ---- 2. estimate ⟨O⟩, J = d⟨O⟩/dθ and the loss, system by system
            last = epoch == s.epochs - 1
            must = last or _looked_converged_reweighted(state.history)
            samples = _each_member(
                ex,
                [m.name if several else None for m in members],
                lambda i, fulls=fulls, epoch=epoch, must=must: samplers[i].at(
                    fulls[i], epoch, must
                ),
                epoch,
                out_dir,
            )
            estimates = []
            for i, m in enumerate(members):
                try:
                    estimates.append(
                        estimate_at(
                            m.target.observable,
                            m.system,
                            samples[i],
                            fulls[i],
                            m.wrt,
                            integrator,
                            blocks=s.blocks,
                            epoch=epoch,
                            hybrid=s.hybrid,
                            horizon_steps=state.horizon_steps[i],
                            max_sensitivity=max_sensitivity,
                            executor=ex,
                        )
                    )
                except SimulationError as e:  # a replica blew up: name the epoch
                    where = f"epoch {epoch}: " + (f"system {m.name!r}: " if several else "")
                    raise annotate(e, where, kept_note(out_dir, epoch), epoch=epoch) from None
                state.horizon_steps[i] = estimates[i].horizon_steps
            if several:
                record.update(_members_record(members, samples, estimates))
                est = combine_estimates(estimates, members, theta.size, target.labels, names)
            else:
                record.update(samples[0].record)
                est = estimates[0]
                record.update(est.record)
            loss = loss_and_gradient(est, target, theta, theta0, width)
            record.update(_loss_record(loss, est))
            if not (np.isfinite(loss.chi2) and np.isfinite(loss.gradient).all()):
                raise SimulationError(
                    f"epoch {epoch}: χ² = {loss.chi2} or its gradient is not finite; an "
                    "observable is NaN on a sampled frame or the energies overflowed"
                    + kept_note(out_dir, epoch)
                )

            # ---- 3. accept or reject (Gauss-Newton), then step
            fresh = record["sampled"]
            jac_u = param.jacobian(state.u)
            if optimizer == "gauss-newton":
                rr, JJ = least_squares_form(
                    loss, est.gradient.gradient, jac_u, theta, theta0, width
                )
                u_next, entries = _gauss_newton_step(state, loss, rr, JJ, fresh, s)
            else:
                u_next, entries = _adam_step(opt, state, loss, jac_u, fresh, s.tolerance_sigma)
            record.update(entries)

            # ---- 4. stop: statistically converged, or fits the data (stop_chi2)
            converged = state.quiet_epochs >= s.patience
            fits_data = _fits_data(record, loss, s)
            record["wall_s"] = time.perf_counter() - t0
            record["converged"] = converged or fits_data
            state.history.append(record)
            if fits_data and not converged:
                converged = True
                state.stop_reason = _fits_data_reason(loss, s)
                u_next = state.u  # the θ just sampled, not an untested step beyond it
            state.u = np.asarray(u_next, dtype=np.float64)
            if converged and not fits_data:
                state.stop_reason = _converged_reason(s)
                # the result is the last accepted point, not an untested trial step
                if optimizer == "gauss-newton":
                    state.u = np.asarray(state.accepted["u"], dtype=np.float64)

            if out_dir is not None:  # history.json's θ is the one the fit would return now
                reported = result(_reported_u(state, optimizer, converged))
                fresh = epoch == state.start and not state.resumed
                _save(out_dir, settings, epoch, state, samplers, converged, reported, fresh)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(chi2=f"{loss.chi2:.3g}±{loss.chi2_stderr:.2g}")
            if callback is not None:
                callback(record)
            if converged:
                break
    finally:
        for sampler in samplers:
            sampler.chains.executor = None
        pool.close()
        if bar is not None:
            bar.close()
    state.u = _reported_u(state, optimizer, converged)
    final = result()
    if out_dir is not None and state.history and state.start >= s.epochs:
        # a resumed fit with no epoch left (killed between its last checkpoint and this
        # file, or already converged) writes what its last epoch would have
        _write_history(out_dir, final)
    return final


def _reported_u(state, optimizer, converged):
    """The u a fit stopped now returns: once converged, ``state.u`` (already the θ that
    was sampled or accepted); otherwise, for Gauss-Newton, the last accepted point, since
    the step beyond it was never sampled."""
    if optimizer == "gauss-newton" and state.accepted is not None and not converged:
        return np.asarray(state.accepted["u"], dtype=np.float64)
    return state.u


# --------------------------------------------------------------------------- settings


class _Settings(NamedTuple):
    """The checked settings of ``fit_equilibrium`` (its Args); ``hybrid`` is None for
    the fluctuation estimator."""

    epochs: int
    n_chains: int
    sample_steps: int
    decorrelation_steps: int
    save_every: int
    reservoir_size: int
    blocks: int
    min_ess: float
    reweight_threshold: float
    max_reuse: int
    max_extend: int
    optimizer: str
    learning_rate: float
    trust_radius: float
    max_trust_radius: float
    tolerance_sigma: float
    patience: int
    stop_chi2: float | None
    hybrid: HybridSettings | None
    precision: str


def _check_settings(system, integrator, estimator, optimizer, **kw) -> _Settings:
    """InputError on a bad setting of ``fit_equilibrium`` (before anything runs); the
    checked settings. ``kw`` are ``_Settings``' fields but ``optimizer``. A list of
    systems is checked by ``fit_members``."""
    if not isinstance(system, (System, list, tuple)):
        raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
    if not isinstance(integrator, LangevinIntegrator):
        raise InputError(
            f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
        )
    if estimator not in EQUILIBRIUM_ESTIMATORS:
        raise InputError(
            f"estimator {estimator!r} unknown for an equilibrium fit; use one of "
            f"{EQUILIBRIUM_ESTIMATORS} (or 'pathwise' in fit, the protocol average)"
        )
    if optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer {optimizer!r} unknown; use one of {OPTIMIZERS}")
    for name, minimum in (
        ("epochs", 1),
        ("n_chains", 1),
        ("sample_steps", 1),
        ("decorrelation_steps", 0),
        ("save_every", 1),
        ("reservoir_size", 2),
        ("blocks", 2),
        ("patience", 1),
        ("max_reuse", 0),
        ("max_extend", 0),
    ):
        kw[name] = check_int(kw[name], name, minimum=minimum)
    n_chains, sample_steps, save_every = kw["n_chains"], kw["sample_steps"], kw["save_every"]
    reservoir_size, blocks = kw["reservoir_size"], kw["blocks"]
    if sample_steps % save_every:
        raise InputError(
            f"sample_steps = {sample_steps} must be a multiple of save_every = {save_every}"
        )
    n_frames = n_chains * (sample_steps // save_every)
    if min(n_frames, reservoir_size) < 2 * blocks:
        raise InputError(
            f"an epoch keeps {min(n_frames, reservoir_size)} frames (n_chains {n_chains} × "
            f"sample_steps {sample_steps} / save_every {save_every}, reservoir_size "
            f"{reservoir_size}); {blocks} blocks need at least {2 * blocks}"
        )
    kw["min_ess"] = check_real(kw["min_ess"], "min_ess")
    kw["reweight_threshold"] = check_real(
        kw["reweight_threshold"], "reweight_threshold", allow_zero=True
    )
    for name in ("trust_radius", "max_trust_radius", "tolerance_sigma"):
        kw[name] = check_real(kw[name], name)
    if kw["stop_chi2"] is not None:
        kw["stop_chi2"] = check_real(kw["stop_chi2"], "stop_chi2")
    hybrid = kw.pop("hybrid")
    if estimator == "hybrid":
        n_replicas = check_int(hybrid.n_replicas, "n_replicas", minimum=2)
        max_horizon = check_int(hybrid.max_horizon, "max_horizon", minimum=1)
        horizon = hybrid.horizon
        if horizon != "auto":
            horizon = check_int(horizon, "horizon", minimum=1)
        horizon_cap = check_real(hybrid.horizon_cap, "horizon_cap", unit="nm")
        hybrid = HybridSettings(n_replicas, horizon, max_horizon, horizon_cap, kw["precision"])
    else:
        hybrid = None
    return _Settings(optimizer=optimizer, hybrid=hybrid, **kw)


def _settings_record(s, estimator, names, theta0, integrator, members, samplers, param, prior):
    """The settings a checkpoint must carry to be resumed by this fit, by name (a resume
    that differs is refused naming each field: ``checkpoints.check_settings``); a fit over
    several systems has one ``systems`` entry per system instead of ``system``,
    ``targets`` and ``x0_sha256``."""

    def of(m, sampler):
        return dict(
            system=system_record(m.system),
            targets=dict(
                labels=list(m.target.labels),
                value=m.target.value.tolist(),
                sigma=m.target.uncertainty.tolist(),
            ),
            x0_sha256=array_sha256(sampler.chains.state.x),
        )

    per = [of(m, sampler) for m, sampler in zip(members, samplers, strict=True)]
    common = dict(per[0]) if len(members) == 1 else dict(
        systems=[dict(name=m.name, **p) for m, p in zip(members, per, strict=True)]
    )  # fmt: skip
    return jsonable(
        dict(
            **common,
            parameters=dict(zip(names, theta0.tolist(), strict=True)),
            integrator=dict(
                temperature=integrator.temperature,
                friction=integrator.friction,
                dt=integrator.dt,
                seed=integrator.seed,
            ),
            estimator=estimator,
            n_chains=s.n_chains,
            sample_steps=s.sample_steps,
            decorrelation_steps=s.decorrelation_steps,
            save_every=s.save_every,
            reservoir_size=s.reservoir_size,
            blocks=s.blocks,
            optimizer=s.optimizer,
            learning_rate=s.learning_rate,
            trust_radius=s.trust_radius,
            parametrization=param,
            reweight_threshold=s.reweight_threshold,
            max_reuse=s.max_reuse,
            min_ess=s.min_ess,
            max_extend=s.max_extend,
            tolerance_sigma=s.tolerance_sigma,
            patience=s.patience,
            stop_chi2=s.stop_chi2,
            hybrid=None if s.hybrid is None else s.hybrid._asdict(),
            prior_sigma=None if prior is None else np.asarray(prior).tolist(),
            precision=s.precision,
            # (absent for the engine's chains, as in checkpoints written before it)
            **_sampler_record(samplers[0].chains),
        )
    )


def _sampler_record(chains) -> dict:
    """Where the chains run, for the checkpoint: nothing for the engine's chains, else
    ``sampler``: "openmm" with the platform."""
    sampler = getattr(chains, "sampler", None)
    return {} if sampler is None else {"sampler": f"openmm ({sampler.platform})"}


def _check_sampler(sampler, estimator, several, executor, precision):
    """None for the engine's chains; "openmm" or the ``OpenMMSampler`` given, once the
    settings it cannot honour are refused."""
    if sampler is None or (isinstance(sampler, str) and sampler == "jax"):
        return None
    if not (isinstance(sampler, OpenMMSampler) or sampler == "openmm"):
        raise InputError(f'sampler must be "jax", "openmm" or an OpenMMSampler, got {sampler!r}')
    why = None
    if estimator != "fluctuation":
        why = (
            f"estimator={estimator!r}: the OpenMM sampler gives frames, not the engine's "
            'dynamics the hybrid estimator differentiates; use estimator="fluctuation"'
        )
    elif several:
        why = "a fit over several systems: give each its engine chains (sampler='jax')"
    elif runs_on_dask(executor):
        why = f"executor={executor!r}: the OpenMM chains run in this process"
    elif precision != "float64":
        why = f"precision={precision!r}: set OpenMM's own precision in the platform properties"
    if why:
        raise InputError(f"sampler={sampler!r} cannot run {why}")
    return sampler


@dataclass
class _FitState:
    """What the epochs change (the sampler keeps the chains and the stored frames).

    Attributes:
        u: (P,) the optimiser's coordinates of the next trial θ.
        opt_state: the optax state (Adam), or None.
        radius: the trust radius, ‖δu‖.
        history: the epoch records.
        accepted: the last accepted point (``TrustRegionStep.accepted``), or None.
        quiet_epochs: freshly sampled epochs in a row that met the stopping rule.
        start: the first epoch to run (``epochs`` once a resumed fit had converged).
        horizon_steps: per system, the hybrid horizon n, once chosen (None before).
        stop_reason: why the fit stopped ("epochs" until it converges).
        resumed: whether a checkpoint was loaded.
        converged: whether the loaded checkpoint's fit had converged.
    """

    u: np.ndarray
    opt_state: object
    radius: float
    history: list = field(default_factory=list)
    accepted: dict | None = None
    quiet_epochs: int = 0
    start: int = 0
    horizon_steps: list | None = None
    stop_reason: str = "epochs"
    resumed: bool = False
    converged: bool = False


def _resume(out_dir, settings, state: _FitState, samplers, epochs) -> None:
    """Load ``out_dir``'s checkpoint, if any, into the state, each system's chains and
    sampler; CheckpointError naming what differs if it is another fit's."""
    ckpt = load_checkpoint(out_dir)
    if ckpt is None:
        return
    check_settings(
        ckpt["path"],
        ckpt["settings"],
        settings,
        "Resume it with the same settings, or use another out_dir",
    )
    state.resumed = True
    state.u, state.radius, state.history = ckpt["u"], ckpt["radius"], ckpt["history"]
    state.start, state.accepted = ckpt["epoch"], ckpt["accepted"]
    state.quiet_epochs, state.horizon_steps = ckpt["quiet_epochs"], list(ckpt["horizon"])
    for sampler, saved in zip(samplers, ckpt["systems"], strict=True):
        x, v, step = saved["chain_x"], saved["chain_v"], saved["chain_step"]
        sampler.chains.state = LangevinState(x, v, step)
        sampler.stored = saved["stored"]
        sampler.reused = saved["reused"]
    if state.opt_state is not None:
        import jax

        treedef = jax.tree_util.tree_structure(state.opt_state)
        state.opt_state = jax.tree_util.tree_unflatten(treedef, ckpt["opt_leaves"])
    if ckpt["converged"]:
        state.start, state.stop_reason = epochs, ckpt["stop_reason"]
        state.converged = True


def _save(out_dir, settings, epoch, state: _FitState, samplers, converged, result, fresh) -> None:
    """Write the checkpoint after ``epoch`` and ``result``'s history, atomically; ``fresh``
    (the first epoch of a fit not resumed) drops the checkpoints of an earlier fit."""
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(
        out_dir,
        fingerprint=settings_fingerprint(**settings),
        settings=settings,
        keep_previous=not fresh,
        epoch=epoch + 1,
        u=state.u,
        radius=state.radius,
        history=state.history,
        samplers=samplers,
        accepted=state.accepted,
        quiet_epochs=state.quiet_epochs,
        horizon=state.horizon_steps,
        opt_state=state.opt_state,
        converged=converged,
        stop_reason=state.stop_reason,
    )
    _write_history(out_dir, result)


def _write_history(out_dir, result) -> None:
    atomic_write_text(os.path.join(out_dir, HISTORY), json.dumps(result.history_dict(), indent=1))


def _progress_bar(progress, epochs, start):
    """A tqdm bar over epochs, or None (``progress`` None: when stderr is a terminal)."""
    show = progress if progress is not None else __import__("sys").stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, initial=min(start, epochs), unit="epoch", desc="fit")


# --------------------------------------------------------------------------- epoch


def _looked_converged_reweighted(history) -> bool:
    """Whether the last epoch looked converged on reweighted frames (the model predicted
    less than one standard error): its verdict needs fresh samples, since frames reused at
    many θ get over-fitted."""
    return (
        bool(history)
        and not history[-1].get("sampled", True)
        and (history[-1].get("model_decrease", np.inf) < history[-1]["chi2_stderr"])
    )


def _loss_record(loss, est) -> dict:
    """The epoch record's entries for the loss, ⟨O⟩ and J."""
    return dict(
        chi2=loss.chi2,
        chi2_stderr=loss.chi2_stderr,
        chi2_noise_bias=loss.chi2_noise_bias,
        prior=loss.prior,
        loss=loss.value,
        observables=est.mean.tolist(),
        observable_errors=np.sqrt(np.diag(est.cov)).tolist(),
        gradient=loss.gradient.tolist(),
        gradient_stderr=loss.gradient_stderr.tolist(),
        jacobian=est.gradient.gradient.tolist(),
        jacobian_stderr=est.gradient.stderr.tolist(),
    )


def _gauss_newton_step(state: _FitState, loss, residual, jacobian, fresh, s: _Settings):
    """Accept or reject this trial and take the trust-region step (``trust_region_step``)
    on the residual (R,) and its Jacobian (R, P) in u; updates the state's accepted point,
    radius and quiet epochs. Returns (the next u (P,), the record's entries)."""
    step = trust_region_step(
        state.accepted,
        state.u,
        loss.value,
        loss.chi2_stderr,
        fresh,
        residual,
        jacobian,
        state.radius,
        s.max_trust_radius,
        s.tolerance_sigma,
    )
    state.accepted, state.radius = step.accepted, step.radius
    entries = dict(step.decreases)
    entries["accepted"] = step.ok
    entries.update(trust_radius=state.radius, model_decrease=step.predicted)
    small_model = step.predicted < max(state.accepted["se"], 1e-12)
    # only freshly sampled epochs count: reweighted frames can be over-fitted
    quiet = step.converging and small_model and step.ok and fresh
    state.quiet_epochs = state.quiet_epochs + 1 if quiet else 0
    return step.u_next, entries


def _adam_step(opt, state: _FitState, loss, jac_u, fresh, tolerance_sigma):
    """An optax step on the gradient in u, dθ/du = ``jac_u`` (P,); a freshly sampled loss
    within ``tolerance_sigma`` standard errors of the last one is a quiet epoch. Returns
    (the next u (P,), the record's entries)."""
    import optax

    grad_u = loss.gradient * jac_u
    updates, state.opt_state = opt.update(grad_u, state.opt_state, state.u)
    u_next = np.asarray(optax.apply_updates(state.u, updates), dtype=np.float64)
    if state.history:
        prev = state.history[-1]
        se = math.hypot(loss.chi2_stderr, prev["chi2_stderr"])
        quiet = abs(prev["loss"] - loss.value) <= tolerance_sigma * se
        state.quiet_epochs = state.quiet_epochs + 1 if (quiet and fresh) else 0
    return u_next, {"accepted": True}


def _fits_data(record, loss, s: _Settings):
    """The discrepancy principle: a fresh, accepted χ²/N below ``stop_chi2`` by more than
    ``tolerance_sigma`` standard errors means the model already fits the data within
    their uncertainties; steps beyond it fit the noise, and whatever the chains have not
    sampled."""
    return (
        s.stop_chi2 is not None
        and record["epoch"] > 0
        and record.get("sampled", False)
        and record["accepted"]
        and loss.chi2 + s.tolerance_sigma * loss.chi2_stderr <= s.stop_chi2
    )


def _fits_data_reason(loss, s: _Settings) -> str:
    return (
        f"fits the data: χ²/N = {loss.chi2:.3g} ± {loss.chi2_stderr:.2g} is below "
        f"{s.stop_chi2:g} by more than {s.tolerance_sigma:g} standard errors (discrepancy "
        "principle)"
    )


def _converged_reason(s: _Settings) -> str:
    return (
        f"converged: χ² changed by less than {s.tolerance_sigma:g} standard errors for "
        f"{s.patience} epochs"
        + (
            " and the model predicts no gain beyond the noise"
            if s.optimizer == "gauss-newton"
            else ""
        )
    )


def _each_member(ex, names, fn, epoch, out_dir):
    """``[fn(i) for i in range(len(names))]``, the systems' sampling; on Dask the systems
    run at once (one thread each here, their chain tasks interleaved on the cluster), the
    results in system order. A SimulationError names the epoch and (``names[i]`` not
    None) the system."""

    def run(i):
        try:
            return fn(i)
        except SimulationError as e:  # a chain blew up: name the epoch
            where = f"epoch {epoch}: " + (f"system {names[i]!r}: " if names[i] else "")
            raise annotate(e, where, kept_note(out_dir, epoch), epoch=epoch) from None

    if ex is None or ex.kind == "in-process" or len(names) == 1:
        return [run(i) for i in range(len(names))]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(names)) as pool:
        futures = [pool.submit(run, i) for i in range(len(names))]
        return [f.result() for f in futures]


def _members_record(members, samples, estimates) -> dict:
    """The epoch record's sampling entries of a fit over several systems: ``sampled``
    (every system sampled afresh), the smallest ESS and reweighting ESS and the largest R̂
    over the systems, and each system's own entries under ``systems``."""
    per = {}
    for m, sample, est in zip(members, samples, estimates, strict=True):
        per[m.name] = {**sample.record, **est.record}
    recs = list(per.values())
    out = {"sampled": all(r["sampled"] for r in recs), "systems": per}
    out["reweight_ess"] = min(r["reweight_ess"] for r in recs)
    ess = [r["ess_min"] for r in recs if "ess_min" in r]
    if ess:
        out["ess_min"] = min(ess)
    rhat = [r["rhat_max"] for r in recs if "rhat_max" in r]
    if rhat:
        out["rhat_max"] = max(rhat)
    return out
