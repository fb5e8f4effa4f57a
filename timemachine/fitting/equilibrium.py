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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable

import numpy as np

from timemachine.checks import check_int, check_real
from timemachine.errors import InputError, SimulationError
from timemachine.files import atomic_write_text
from timemachine.fitting.chi2 import block_mean_cov, chi2_with_error
from timemachine.fitting.equilibrium_checkpoint import (
    CHECKPOINT,
    HISTORY,
    load_checkpoint,
    save_checkpoint,
)
from timemachine.fitting.estimators import (
    fluctuation_gradient,
    hybrid_gradient,
    reweighting_weights,
)
from timemachine.fitting.horizon import choose_horizon
from timemachine.fitting.loss import target_vector
from timemachine.fitting.result import (
    Parametrization,
    check_fingerprint,
    make_optimizer,
    make_result,
    settings_fingerprint,
)
from timemachine.fitting.sampling import (
    ChainSamples,
    EquilibriumChains,
    effective_sample_size,
    potential_scale_reduction,
    reservoir_frames,
)
from timemachine.fitting.trust_region import trust_region_step
from timemachine.integrator.langevin import LangevinIntegrator, LangevinState
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
    tolerance_sigma: float = 2.0,
    patience: int = 2,
    stop_chi2: float | None = None,
    params=None,
    out_dir=None,
    resume: bool = False,
    progress: bool | None = None,
    callback: Callable | None = None,
):
    """Fit θ[wrt] so that equilibrium averages ⟨O⟩_θ match experimental targets.

    Args:
        system: a ``timemachine.System``.
        x0: (N, 3) or (C, N, 3) starting positions of the chains, nm.
        integrator: ``LangevinIntegrator``; its seed fixes every chain's noise.
        targets: list of ``Target`` (``timemachine.fitting.targets``) or a target-file path.
        wrt: the fitted parameters (globs or int indices).
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
        tolerance_sigma, patience: the stopping rule (module docstring).
        stop_chi2: also stop at the first freshly sampled epoch after a step whose χ²/N
            is below this by more than ``tolerance_sigma`` standard errors (1.0: the
            discrepancy principle, the model fits the data within their uncertainties);
            None (default) fits until the χ² stops changing.
        params: (P_all,) starting θ (default ``system.params``).
        out_dir: folder for ``checkpoint.npz`` and ``history.json``; None keeps memory only.
        resume: continue from ``out_dir``'s checkpoint (same settings only).
        progress: tqdm bar over epochs; None shows it when stderr is a terminal.
        callback: ``callback(record)`` after every epoch.

    Returns:
        ``timemachine.fitting.FitResult``; ``info`` holds the estimator, the stop reason,
        the accepted θ's χ² with its error, and the hybrid horizon.

    Raises:
        InputError: bad settings, a checkpoint of another fit, or too few effective samples.
        SimulationError: a chain or replica went non-finite.
    """
    from timemachine.fitting.replicas import run_replicas
    from timemachine.fitting.targets import load_targets

    if not isinstance(system, System):
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
    epochs = check_int(epochs, "epochs", minimum=1)
    sample_steps = check_int(sample_steps, "sample_steps", minimum=1)
    decorrelation_steps = check_int(decorrelation_steps, "decorrelation_steps", minimum=0)
    save_every = check_int(save_every, "save_every", minimum=1)
    reservoir_size = check_int(reservoir_size, "reservoir_size", minimum=2)
    blocks = check_int(blocks, "blocks", minimum=2)
    patience = check_int(patience, "patience", minimum=1)
    max_reuse = check_int(max_reuse, "max_reuse", minimum=0)
    max_extend = check_int(max_extend, "max_extend", minimum=0)
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
    min_ess = check_real(min_ess, "min_ess")
    reweight_threshold = check_real(reweight_threshold, "reweight_threshold", allow_zero=True)
    trust_radius = check_real(trust_radius, "trust_radius")
    max_trust_radius = check_real(max_trust_radius, "max_trust_radius")
    tolerance_sigma = check_real(tolerance_sigma, "tolerance_sigma")
    if stop_chi2 is not None:
        stop_chi2 = check_real(stop_chi2, "stop_chi2")
    if estimator == "hybrid":
        n_replicas = check_int(n_replicas, "n_replicas", minimum=2)
        max_horizon = check_int(max_horizon, "max_horizon", minimum=1)
        if horizon != "auto":
            horizon = check_int(horizon, "horizon", minimum=1)
    if isinstance(targets, (str, os.PathLike)):
        targets = load_targets(targets, system.topology)
    target = target_vector(targets)
    wrt = system.resolve_wrt(wrt)
    names = tuple(system.param_names[i] for i in wrt)
    full0 = np.array(system.resolve_params(params), dtype=np.float64)
    theta0 = full0[wrt].copy()
    param = Parametrization(parametrization, theta0, names)
    opt = make_optimizer("adam", learning_rate, None) if optimizer == "adam" else None
    k = target.value.shape[0]

    chains = EquilibriumChains(system, x0, integrator, n_chains=n_chains, save_every=save_every)
    fingerprint = settings_fingerprint(
        names=names,
        theta0=theta0.tolist(),
        labels=target.labels,
        value=target.value.tolist(),
        sigma=target.uncertainty.tolist(),
        integrator=[integrator.temperature, integrator.friction, integrator.dt, integrator.seed],
        x0=hashlib.sha256(np.ascontiguousarray(chains.state.x).tobytes()).hexdigest(),
        settings=[estimator, n_chains, sample_steps, decorrelation_steps, save_every],
        more=[reservoir_size, blocks, optimizer, learning_rate, trust_radius, parametrization],
        reuse=[reweight_threshold, max_reuse, min_ess, max_extend],
        stop=[tolerance_sigma, patience, stop_chi2],
        hybrid=[n_replicas, horizon, max_horizon, horizon_cap] if estimator == "hybrid" else None,
        prior=None if prior_sigma is None else np.asarray(prior_sigma).tolist(),
    )

    # ---- state of the fit
    u = param.initial()
    opt_state = opt.init(u) if opt is not None else None
    radius = trust_radius
    history: list = []
    stored = None  # (x (R, N, 3), params (P_all,)) frames and the θ they were drawn at
    accepted = None  # dict: u, chi2, se, mean, J, cov of the last accepted point
    quiet_epochs, start, n_horizon, stop_reason, reused = 0, 0, None, "epochs", 0
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        ckpt = load_checkpoint(out_dir) if resume else None
        if ckpt is not None:
            check_fingerprint(
                os.path.join(out_dir, CHECKPOINT),
                ckpt["fingerprint"],
                fingerprint,
                "parameters, targets, chains, steps or integrator",
            )
            u, radius, history, start = ckpt["u"], ckpt["radius"], ckpt["history"], ckpt["epoch"]
            chains.state = LangevinState(ckpt["chain_x"], ckpt["chain_v"], ckpt["chain_step"])
            stored = (ckpt["stored_x"], ckpt["stored_params"])
            accepted = ckpt["accepted"]
            quiet_epochs, n_horizon = ckpt["quiet_epochs"], ckpt["horizon"]
            reused = ckpt["reused"]
            if opt is not None:
                import jax

                treedef = jax.tree_util.tree_structure(opt_state)
                opt_state = jax.tree_util.tree_unflatten(treedef, ckpt["opt_leaves"])
            if ckpt["converged"]:
                start, stop_reason = epochs, ckpt["stop_reason"]
    elif resume:
        raise InputError("resume=True needs out_dir (where the checkpoint lives)")

    def result():
        best = None if accepted is None else {"loss": accepted["loss"], "stderr": accepted["se"]}
        info = {
            "estimator": estimator,
            "stop_reason": stop_reason,
            "accepted": best,
            "horizon_steps": n_horizon,
        }
        return make_result(full0, wrt, names, param, u, theta0, history, target, out_dir, info)

    show = progress if progress is not None else __import__("sys").stderr.isatty()
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=min(start, epochs), unit="epoch", desc="fit")
    converged = False
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            theta = param.theta(u)
            full = full0.copy()
            full[wrt] = theta
            record = {"epoch": epoch, "params": theta.tolist(), "estimator": estimator}

            # ---- 1. samples at θ
            weights, ess_w = None, None
            # reweight stored frames unless: they were reused max_reuse times already, this
            # is the last epoch, or the last epoch looked converged on reweighted frames
            # (both verdicts need fresh samples: frames reused at many θ get over-fitted)
            verify = (
                bool(history)
                and not history[-1].get("sampled", True)
                and (history[-1].get("model_decrease", np.inf) < history[-1]["chi2_stderr"])
            )
            reuse_ok = reused < max_reuse and epoch < epochs - 1 and not verify
            if stored is not None and reweight_threshold <= 1.0 and reuse_ok:
                w, ess_w = reweighting_weights(
                    system, stored[0], stored[1], full, integrator.temperature
                )
                if ess_w >= reweight_threshold * w.shape[0]:
                    weights = w
            if weights is None:
                chains.decorrelate(full, decorrelation_steps)
                # production, extended segment by segment (up to max_extend more) until
                # every observable has min_ess effective samples: slow conformational
                # exchange at some θ needs longer runs, not a crash
                segment = chains.sample(full, sample_steps)
                series = np.stack([_values(target.observable, c) for c in segment.x])
                ess = effective_sample_size(series)
                extended = 0
                while ess.min() < min_ess and extended < max_extend:
                    more = chains.sample(full, sample_steps)
                    segment = ChainSamples(
                        np.concatenate([segment.x, more.x], axis=1),
                        np.concatenate([segment.steps, more.steps], axis=1),
                        full,
                    )
                    series = np.concatenate(
                        [series, np.stack([_values(target.observable, c) for c in more.x])],
                        axis=1,
                    )
                    ess = effective_sample_size(series)
                    extended += 1
                frames_x, _origin = reservoir_frames(
                    segment, reservoir_size, (integrator.seed, epoch)
                )
                stored = (frames_x, full.copy())
                record.update(
                    sampled=True,
                    ess=ess.tolist(),
                    ess_min=float(ess.min()),
                    production_steps=int(segment.x.shape[1] * save_every),
                )
                if n_chains > 1:
                    rhat = potential_scale_reduction(series)
                    record.update(rhat=rhat.tolist(), rhat_max=float(rhat.max()))
                worst = int(np.argmin(ess))
                if ess[worst] < min_ess:
                    mixing = ""
                    if n_chains > 1:
                        mixing = (
                            f"; the chains disagree on it (Gelman-Rubin R = "
                            f"{record['rhat'][worst]:.3f}), so they have not crossed between "
                            "its conformations often enough"
                        )
                    raise InputError(
                        f"epoch {epoch}: the effective sample size of {target.labels[worst]} is "
                        f"{ess[worst]:.1f} < min_ess = {min_ess:g} ({segment.x.shape[1]} frames "
                        f"per chain × {n_chains} chains, after {extended} extensions)"
                        f"{mixing}: too few independent samples to estimate a gradient; raise "
                        "sample_steps, n_chains or max_extend"
                    )
                ess_w = float(stored[0].shape[0])
                reused = 0
            else:
                reused += 1
                record.update(sampled=False, reweighted_ess=ess_w)
            record["reweight_ess"] = ess_w
            x_res = stored[0]

            # ---- 2. estimate ⟨O⟩ and J = d⟨O⟩/dθ
            values = _values(target.observable, x_res)
            mean, cov = block_mean_cov(values, weights, blocks)
            if estimator == "fluctuation":
                est = fluctuation_gradient(
                    target.observable,
                    system,
                    x_res,
                    params=full,
                    wrt=wrt,
                    temperature=integrator.temperature,
                    blocks=blocks,
                    weights=weights,
                )
            else:
                rng = np.random.default_rng((integrator.seed, epoch, 7))
                p = None if weights is None else weights
                pick = rng.choice(x_res.shape[0], size=n_replicas, replace=p is not None, p=p)
                starts = x_res[pick]
                replicas = 1_000_000 + epoch * n_replicas + np.arange(n_replicas)
                if n_horizon is None:
                    if horizon == "auto":
                        spacing = max(1, max_horizon // 20)
                        pilot = run_replicas(
                            system,
                            starts,
                            integrator,
                            (max_horizon // spacing) * spacing,
                            wrt=wrt,
                            replicas=replicas,
                            params=full,
                            save_every=spacing,
                        )
                        choice = choose_horizon(
                            pilot.steps, pilot.frames_dx_dtheta, theta, integrator.dt, horizon_cap
                        )
                        n_horizon = choice.n_steps
                        record["horizon_growth_rate_per_ps"] = choice.growth_rate
                    else:
                        n_horizon = int(horizon)
                res = run_replicas(
                    system, starts, integrator, n_horizon, wrt=wrt, replicas=replicas, params=full
                )
                est = hybrid_gradient(
                    target.observable,
                    system,
                    starts,
                    res.x,
                    res.dx_dtheta,
                    params=full,
                    wrt=wrt,
                    temperature=integrator.temperature,
                    horizon=n_horizon,
                )
                record["horizon_steps"] = n_horizon
            J, J_se = est.gradient, est.stderr
            chi2, chi2_se, chi2_bias = chi2_with_error(
                mean, cov, target.value, target.uncertainty, target.weight
            )
            sw = np.sqrt(target.weight / k) / target.uncertainty
            resid = sw * (mean - target.value)
            grad_theta = 2.0 * (sw * resid) @ J
            grad_se = 2.0 * np.sqrt(((sw * resid)[:, None] ** 2 * J_se**2).sum(axis=0))
            prior = 0.0
            if prior_sigma is not None:
                width = np.broadcast_to(np.asarray(prior_sigma, dtype=np.float64), theta.shape)
                z = (theta - theta0) / width
                prior = float(np.sum(z * z) / theta.size)
                grad_theta = grad_theta + 2.0 / theta.size * z / width
            record.update(
                chi2=chi2,
                chi2_stderr=chi2_se,
                chi2_noise_bias=chi2_bias,
                prior=prior,
                loss=chi2 + prior,
                observables=mean.tolist(),
                observable_errors=np.sqrt(np.diag(cov)).tolist(),
                gradient=grad_theta.tolist(),
                gradient_stderr=grad_se.tolist(),
                jacobian=J.tolist(),
                jacobian_stderr=J_se.tolist(),
            )
            if not (np.isfinite(chi2) and np.isfinite(grad_theta).all()):
                raise SimulationError(
                    f"epoch {epoch}: χ² = {chi2} or its gradient is not finite; an observable "
                    "is NaN on a sampled frame or the energies overflowed"
                )

            # ---- 3. accept or reject (Gauss-Newton), then step
            jac_u = param.jacobian(u)
            if optimizer == "gauss-newton":
                fresh = bool(record.get("sampled"))
                Ju = (sw[:, None] * J) * jac_u[None, :]
                rr, JJ = resid, Ju
                if prior_sigma is not None:
                    width = np.broadcast_to(np.asarray(prior_sigma, dtype=np.float64), theta.shape)
                    rr = np.concatenate([resid, (theta - theta0) / width / np.sqrt(theta.size)])
                    JJ = np.vstack([Ju, np.diag(jac_u / width / np.sqrt(theta.size))])
                step = trust_region_step(
                    accepted,
                    u,
                    chi2 + prior,
                    chi2_se,
                    fresh,
                    rr,
                    JJ,
                    radius,
                    max_trust_radius,
                    tolerance_sigma,
                )
                accepted, radius, ok = step.accepted, step.radius, step.ok
                u_next, predicted, converging = step.u_next, step.predicted, step.converging
                record.update(step.decreases)
                record["accepted"] = ok
                record.update(trust_radius=radius, model_decrease=predicted)
                small_model = predicted < max(accepted["se"], 1e-12)
                # only freshly sampled epochs count: reweighted frames can be over-fitted
                quiet_epochs = (
                    quiet_epochs + 1 if (converging and small_model and ok and fresh) else 0
                )
            else:
                import optax

                grad_u = grad_theta * jac_u
                updates, opt_state = opt.update(grad_u, opt_state, u)
                u_next = np.asarray(optax.apply_updates(u, updates), dtype=np.float64)
                if history:
                    prev = history[-1]
                    se = math.hypot(chi2_se, prev["chi2_stderr"])
                    quiet = abs(prev["loss"] - (chi2 + prior)) <= tolerance_sigma * se
                    fresh = record.get("sampled", False)
                    quiet_epochs = quiet_epochs + 1 if (quiet and fresh) else 0
                record["accepted"] = True
            converged = quiet_epochs >= patience
            # the discrepancy principle: a fresh χ²/N below stop_chi2 by more than its error
            # means the model already fits the data within their uncertainties; steps beyond
            # it fit the noise, and whatever the chains have not sampled
            fits_data = (
                stop_chi2 is not None
                and epoch > 0
                and record.get("sampled", False)
                and record["accepted"]
                and chi2 + tolerance_sigma * chi2_se <= stop_chi2
            )
            record["wall_s"] = time.perf_counter() - t0
            record["converged"] = converged or fits_data
            history.append(record)
            if fits_data and not converged:
                converged = True
                stop_reason = (
                    f"fits the data: χ²/N = {chi2:.3g} ± {chi2_se:.2g} is below {stop_chi2:g} "
                    f"by more than {tolerance_sigma:g} standard errors (discrepancy principle)"
                )
                u_next = u  # the θ just sampled, not an untested step beyond it
            u = np.asarray(u_next, dtype=np.float64)
            if converged and not fits_data:
                stop_reason = (
                    f"converged: χ² changed by less than {tolerance_sigma:g} standard errors for "
                    f"{patience} epochs"
                    + (
                        " and the model predicts no gain beyond the noise"
                        if optimizer == "gauss-newton"
                        else ""
                    )
                )
                # the result is the last accepted point, not an untested trial step
                if optimizer == "gauss-newton":
                    u = np.asarray(accepted["u"], dtype=np.float64)
            if out_dir is not None:
                os.makedirs(out_dir, exist_ok=True)
                save_checkpoint(
                    out_dir,
                    fingerprint=fingerprint,
                    epoch=epoch + 1,
                    u=u,
                    radius=radius,
                    history=history,
                    chains=chains,
                    stored=stored,
                    accepted=accepted,
                    quiet_epochs=quiet_epochs,
                    reused=reused,
                    horizon=n_horizon,
                    opt_state=opt_state,
                    converged=converged,
                    stop_reason=stop_reason,
                )
                atomic_write_text(
                    os.path.join(out_dir, HISTORY), json.dumps(result().history_dict(), indent=1)
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(chi2=f"{chi2:.3g}±{chi2_se:.2g}")
            if callback is not None:
                callback(record)
            if converged:
                break
    finally:
        if bar is not None:
            bar.close()
    if optimizer == "gauss-newton" and accepted is not None and not converged:
        # the last step was never sampled: report the last accepted θ
        u = np.asarray(accepted["u"], dtype=np.float64)
    return result()


def _values(observable, x):
    from timemachine.fitting.estimators import _values_program

    return np.asarray(_values_program(observable)(x))
