"""The fitting loop: simulate with sensitivities, score against targets, take an optax step.

Each epoch runs M replicas (``run_replicas``) at the current θ, carrying dx/dθ for the
fitted parameters θ[wrt]; their last frames give the ensemble average and, optionally, a
reservoir sample of frames along them gives the time average. The loss
(``timemachine.fitting.loss``) and its gradient by the chain rule, plus an optional
force-matching loss, drive one optax step. The optimiser works on u, with θ = θ₀(1 + u)
("relative", the default), θ = θ₀ exp(u) ("log") or θ = u ("absolute"), so torsion
barriers of different size move by similar fractions per step.

After every epoch a checkpoint (u, the optax state, the history, the epoch) is written
atomically to ``out_dir``, with SHA-256 records and the previous one kept
(``timemachine.checkpoints``); ``resume=True`` continues from it. The noise of epoch e is a
pure function of (integrator seed, e, replica), so a resumed fit reproduces the epochs an
uninterrupted one would have run, bit for bit; a fit killed mid-epoch loses that epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable

import numpy as np

from timemachine.backends import check_backend
from timemachine.checkpoints import (
    array_sha256,
    check_settings,
    jsonable,
    read_checkpoint,
    system_record,
    write_checkpoint,
)
from timemachine.checks import check_int
from timemachine.errors import InputError, SimulationError
from timemachine.files import atomic_write_text
from timemachine.fitting.executor import Executor, open_executor
from timemachine.fitting.loss import (
    check_prior_sigma,
    loss_and_gradient,
    observable_samples,
    target_vector,
)
from timemachine.fitting.replicas import run_replicas
from timemachine.fitting.reservoir import Reservoir
from timemachine.fitting.result import (
    FitResult,
    Parametrization,
    kept_note,
    make_optimizer,
    make_result,
    settings_fingerprint,
)
from timemachine.integrator.langevin import LangevinIntegrator
from timemachine.precision import check_precision
from timemachine.sensitivity.diagnosis import annotate
from timemachine.sensitivity.options import check_max_sensitivity
from timemachine.start_checks import check_start
from timemachine.system import System

__all__ = ["FitResult", "atomic_write_text", "fit", "load_checkpoint"]

CHECKPOINT = "checkpoint.npz"
CHECKPOINT_BASE = "checkpoint"  # checkpoint.npz + checkpoint.json (timemachine.checkpoints)
HISTORY = "history.json"
_FORMAT = "timemachine.fit-checkpoint"


# --------------------------------------------------------------------------- pieces


def _time_samples(result, capacity, seed):
    """Reservoir sample of the replicas' saved frames, streamed in time order."""
    reservoir = Reservoir(capacity, seed)
    fx, fdx = result.frames_x, result.frames_dx_dtheta
    for f in range(fx.shape[1]):
        for r in range(fx.shape[0]):
            slot = reservoir.next_slot()
            if slot is not None:
                reservoir.put(slot, (f, r))
    held = sorted(reservoir.items)
    return (
        np.stack([fx[r, f] for f, r in held]),
        np.stack([fdx[r, f] for f, r in held]),
    )


def _diagnose(epoch, names, loss, grad, result, samples):
    """A SimulationError that says what went non-finite or exploded, and where; its
    ``.parameter`` is that of the largest |dx/dθ| over the replicas."""
    lines = [f"epoch {epoch}: "]
    dx = np.abs(result.dx_dtheta)
    worst = [
        float(dx[:, p].max()) if np.isfinite(dx[:, p]).all() else math.inf
        for p in range(len(names))
    ]
    bad_values = [s for s in samples if not np.isfinite(s.values).all()]
    if not np.isfinite(loss) or bad_values:
        lines.append("the loss is not finite: an observable is NaN/inf on a sampled frame")
    else:
        p = int(np.nanargmax(np.where(np.isfinite(grad), np.abs(grad), math.inf)))
        lines.append(
            f"the loss gradient is {'not finite' if not np.isfinite(grad).all() else 'exploding'} "
            f"(|dL/d{names[p]}| = {abs(grad[p]):.3g})"
        )
    p = int(np.argmax(worst))
    lines.append(
        f"; largest |dx/dθ| over the replicas is {worst[p]:.3g} nm per unit of {names[p]} "
        "(sensitivities grow along chaotic trajectories). Use fewer steps per epoch, more "
        "friction, method='window', a smaller learning rate or dt."
    )
    err = SimulationError("".join(lines))
    err.parameter = names[p]  # the parameter of the largest |dx/dθ|
    return err


def _save_checkpoint(out_dir, epoch, u, opt_state, history, settings, keep_previous=True):
    """Write the fit's checkpoint after ``epoch`` epochs (``timemachine.checkpoints``:
    ``checkpoint.npz`` with ``checkpoint.json``, the previous pair kept)."""
    import jax

    leaves = jax.tree_util.tree_leaves(opt_state)
    arrays = {f"opt_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["u"] = np.asarray(u, dtype=np.float64)
    meta = {
        "fingerprint": settings_fingerprint(**settings),
        "settings": settings,
        "epoch": int(epoch),
        "n_opt": len(leaves),
        "history": history,
    }
    write_checkpoint(os.path.join(out_dir, CHECKPOINT_BASE), arrays, meta, _FORMAT, keep_previous)


def load_checkpoint(out_dir) -> dict | None:
    """The last good checkpoint of a pathwise fit in ``out_dir``, verified against its
    SHA-256 record; None if there is none.

    Returns:
        dict with ``epoch`` (epochs done), ``u`` (P,), ``opt_leaves`` (the optax state's
        leaves), ``history`` (epoch records), ``fingerprint`` and ``settings`` (what the
        fit was run with), ``path`` (the npz read) and ``previous`` (True when the last
        checkpoint was unusable and the kept previous one was read: a
        ``CheckpointFallbackWarning`` says so).

    Raises:
        CorruptCheckpointError: no copy passes its checksums (names the file).
        CheckpointError: the folder holds another kind of checkpoint.
    """
    ckpt = read_checkpoint(os.path.join(os.fspath(out_dir), CHECKPOINT_BASE), _FORMAT)
    if ckpt is None:
        return None
    meta = ckpt.meta
    return {
        "epoch": int(meta["epoch"]),
        "u": ckpt["u"],
        "opt_leaves": [ckpt[f"opt_{i}"] for i in range(int(meta["n_opt"]))],
        "history": meta["history"],
        "fingerprint": meta["fingerprint"],
        "settings": meta["settings"],
        "path": ckpt.path,
        "previous": ckpt.previous,
    }


# --------------------------------------------------------------------------- fit


def fit(
    system: System,
    x0,
    integrator: LangevinIntegrator,
    targets,
    wrt="torsion/*/k*",
    *,
    epochs: int = 20,
    n_replicas: int | None = None,
    n_steps: int = 1000,
    time_samples: int = 0,
    save_every: int | None = None,
    optimizer=None,
    learning_rate: float = 0.05,
    clip_norm: float | None = 1.0,
    parametrization: str = "relative",
    average: str = "auto",
    ergodicity_weight: float = 0.0,
    prior_sigma=None,
    fresh_noise: bool = True,
    params=None,
    method: str = "exact",
    force_matching=None,
    force_matching_weight: float = 1.0,
    max_gradient_norm: float = 1e6,
    max_sensitivity: float | None = 1e8,
    out_dir=None,
    resume: bool = False,
    progress: bool | None = None,
    callback: Callable | None = None,
    backend: str = "jax",
    estimator: str = "fluctuation",
    precision: str = "float64",
    executor="in-process",
    n_workers: int | None = None,
    **equilibrium_options,
) -> FitResult:
    """Fit force-field parameters θ[wrt] so that simulated averages match targets.

    ``estimator`` chooses what is fitted. ``"fluctuation"`` and ``"hybrid"`` fit
    equilibrium averages ⟨O⟩_θ, what an experiment measures: the work is done by
    ``timemachine.fitting.equilibrium.fit_equilibrium`` (persistent chains, reweighting, a
    trust-region Gauss–Newton step by default), to which ``epochs``, ``n_replicas``
    (hybrid), ``optimizer`` ("gauss-newton" or "adam"), ``learning_rate``,
    ``parametrization``, ``prior_sigma``, ``params``, ``out_dir``, ``resume``,
    ``progress``, ``callback``, ``max_sensitivity`` and every keyword in
    ``equilibrium_options``
    (``sample_steps``, ``n_chains``, ``decorrelation_steps``, ``save_every``,
    ``reservoir_size``, ``blocks``, ``min_ess``, ``reweight_threshold``, ``trust_radius``,
    ``horizon``, ...) pass through; "fluctuation" is the default (README: it gives the
    smallest error per CPU second). ``"pathwise"`` (the paper's estimator, and the loop
    below; also what a force-matching-only fit with ``targets=None`` runs) fits the
    average of a fixed protocol: M replicas of ``n_steps`` from ``x0``. That is the right
    target for protocol-defined and dynamical observables, but its gradient is not that
    of the equilibrium average (it misses the dependence of the start distribution on
    θ), so do not use it for NMR data.

    Args:
        system: a ``timemachine.System``; or, for the equilibrium estimators, a list of
            ``FitSystem`` fitted together, sharing the parameters by name (x0 and
            targets None: each system brings its own; ``fit_equilibrium``).
        x0: (N, 3) or (M, N, 3) starting positions (nm) of the replicas, every epoch.
        integrator: ``LangevinIntegrator``; its seed fixes the noise of every epoch.
        targets: list of ``Target`` (``timemachine.fitting.targets``) or a target-file path
            (read with ``system.topology``).
        wrt: the fitted parameters: a glob, a list of globs, or int indices into θ.
        epochs: total epochs (a resumed fit runs the missing ones).
        n_replicas: M replicas per epoch (default 8; 32 for the hybrid estimator); their
            last frames give the ensemble average.
        n_steps: Langevin steps per replica per epoch.
        time_samples: R > 0 also draws R frames (reservoir sampling, every ``save_every``
            steps of every replica) for the time average.
        save_every: spacing of the frames the reservoir sees (default n_steps // 10).
        optimizer: "adam" (default; "gauss-newton" for the equilibrium estimators),
            "sgd", "adamw", "rmsprop", or any optax GradientTransformation (then
            ``learning_rate`` is not used).
        learning_rate: step size in u (relative/log: a fraction of θ₀).
        clip_norm: ``optax.clip_by_global_norm`` of the u-gradient; None for none.
        parametrization: "relative" θ = θ₀(1+u), "log" θ = θ₀eᵘ, or "absolute" θ = u.
        average: which average enters χ² ("auto", "ensemble", "time", "both").
        ergodicity_weight: λ of the time-vs-ensemble regulariser (needs time_samples).
        prior_sigma: widths (θ's units; scalar or (P,)) of a Gaussian prior on θ - θ₀.
        fresh_noise: True gives epoch e the replica indices e·M … e·M+M-1 (new noise and
            velocities); False reuses the same M every epoch (common random numbers: the
            loss is then a deterministic function of θ).
        params: (P_all,) starting θ (default ``system.params``); θ₀ = params[wrt].
        method: "exact" or "window" sensitivity propagation.
        force_matching: a ``ForceMatchingLoss`` (``timemachine.fitting.force_matching``)
            added to the loss with ``force_matching_weight``; with ``targets=None`` it is
            the whole loss and no dynamics run.
        max_gradient_norm: a u-gradient norm above this stops the fit with a diagnosis.
        max_sensitivity: a |dx/dθ| above this (nm per unit of θ_p) in any replica's
            saved frame stops the epoch with a diagnosis naming the replica, step,
            parameter and atom (``run_replicas``); None: only non-finite dx/dθ stops it.
            A guard, not a setting of the fit: a resume may change it.
        out_dir: folder for the checkpoint (``checkpoint.npz`` with its SHA-256 record
            ``checkpoint.json``, the previous pair kept as ``checkpoint.prev.*``;
            ``timemachine.checkpoints``) and ``history.json``, written atomically after
            every epoch; None keeps everything in memory.
        resume: continue from ``out_dir``'s checkpoint when there is one (it must come from
            the same settings: a ``CheckpointError`` names every one that differs); a
            last checkpoint that fails its checksums is replaced by the previous one, with
            a ``CheckpointFallbackWarning``. False starts over.
        progress: tqdm bar over epochs; None shows it when stderr is a terminal.
        callback: ``callback(epoch_record)`` after every epoch.
        backend: where the replicas run, as in ``run_replicas``: "jax" or "cuda" (the
            CUDA kernels through CuPy; its own noise stream, so a fit resumes only on the
            backend it started on).
        precision: "float64" (default) or "float32" (``timemachine.precision``): the
            replicas' (pathwise) or the chains' (equilibrium) dynamics in single
            precision; observables, estimators, losses and the optimiser stay float64.
            Its accuracy against float64 is in docs/float32.md.
        executor: where the replicas (pathwise, hybrid) and the chains (equilibrium)
            run (``timemachine.fitting.executor``): "in-process" (default), "dask" (a
            local cluster of ``n_workers`` processes, started once for the fit and
            stopped after it), a scheduler address, a ``distributed.Client`` or an open
            ``Executor``. The epoch's gradient is reduced from the replicas (chains) in
            their order, so it does not depend on the executor (to round-off) and a fit
            may resume on another one.
        n_workers: workers of the local cluster (executor "dask"); default 2.

    Returns:
        ``FitResult``.

    Raises:
        InputError: invalid settings.
        CheckpointError: (an InputError) a checkpoint from a different fit, naming what
            differs; ``CorruptCheckpointError`` when no copy of it passes its checksums.
        SimulationError: a replica blew up (non-finite coordinates, an overflowing
            energy, non-finite dx/dθ or |dx/dθ| > ``max_sensitivity``: the epoch, replica,
            step, atom and parameter are named, and carried as ``.epoch``, ``.replica``,
            ``.step``, ``.atom``, ``.parameter``), or a non-finite or exploding
            loss/gradient, with a diagnosis. The epoch that failed writes nothing: the
            checkpoint and history.json in ``out_dir`` stay those of the epoch before.
    """
    import jax
    import optax

    from timemachine.fitting.equilibrium import EQUILIBRIUM_ESTIMATORS, fit_equilibrium

    several = isinstance(system, (list, tuple))
    if estimator in EQUILIBRIUM_ESTIMATORS and (targets is not None or several):
        pathwise_only = {
            "time_samples": (time_samples, 0),
            "average": (average, "auto"),
            "ergodicity_weight": (ergodicity_weight, 0.0),
            "method": (method, "exact"),
            "force_matching": (force_matching, None),
            "backend": (backend, "jax"),
        }
        given = [name for name, (v, default) in pathwise_only.items() if v != default]
        if given:
            raise InputError(
                f"estimator={estimator!r} does not take {', '.join(given)} "
                "(options of the pathwise protocol fit)"
            )
        if save_every is not None:
            equilibrium_options.setdefault("save_every", save_every)
        return fit_equilibrium(
            system,
            x0,
            integrator,
            targets,
            wrt,
            estimator=estimator,
            epochs=epochs,
            n_replicas=32 if n_replicas is None else n_replicas,
            optimizer="gauss-newton" if optimizer is None else optimizer,
            learning_rate=learning_rate,
            parametrization=parametrization,
            prior_sigma=prior_sigma,
            params=params,
            out_dir=out_dir,
            resume=resume,
            progress=progress,
            callback=callback,
            precision=precision,
            max_sensitivity=max_sensitivity,
            executor=executor,
            n_workers=n_workers,
            **equilibrium_options,
        )
    from timemachine.fitting.estimators import ESTIMATORS

    if isinstance(system, (list, tuple)):
        raise InputError(
            f"a fit over several systems (a list of FitSystem) needs an equilibrium "
            f"estimator ({EQUILIBRIUM_ESTIMATORS}), got estimator={estimator!r}"
        )
    if estimator not in ESTIMATORS and targets is not None:
        raise InputError(f"estimator {estimator!r} unknown; use one of {ESTIMATORS}")
    if equilibrium_options:
        raise InputError(
            f"fit got unexpected keyword(s) {sorted(equilibrium_options)}: they are options of "
            "the equilibrium estimators (estimator='fluctuation' or 'hybrid')"
        )
    if optimizer is None:
        optimizer = "adam"
    if n_replicas is None:
        n_replicas = 8
    check_backend(backend)
    precision = check_precision(precision).name
    if not isinstance(system, System):
        raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
    if targets is not None and not isinstance(integrator, LangevinIntegrator):
        raise InputError(
            f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
        )
    epochs = check_int(epochs, "epochs", minimum=1)
    n_replicas = check_int(n_replicas, "n_replicas", minimum=1)
    check_max_sensitivity(max_sensitivity)
    n_steps = check_int(n_steps, "n_steps", minimum=1)
    time_samples = check_int(time_samples, "time_samples", minimum=0)
    if isinstance(targets, (str, os.PathLike)):
        from timemachine.fitting.targets import load_targets

        targets = load_targets(targets, system.topology)
    if targets is None and force_matching is None:
        raise InputError("fit needs targets, a force_matching loss, or both")
    if save_every is None:
        save_every = max(1, n_steps // 10)
    if time_samples and n_steps % save_every:
        raise InputError(f"n_steps = {n_steps} must be a multiple of save_every = {save_every}")
    if ergodicity_weight and not time_samples:
        raise InputError("ergodicity_weight > 0 needs time_samples > 0 (a time average)")

    wrt = system.resolve_wrt(wrt)
    names = tuple(system.param_names[i] for i in wrt)
    full0 = np.array(system.resolve_params(params), dtype=np.float64)
    theta0 = full0[wrt]
    param = Parametrization(parametrization, theta0, names)
    if prior_sigma is not None:
        check_prior_sigma(prior_sigma, theta0.shape[0], names)
    opt = make_optimizer(optimizer, learning_rate, clip_norm)
    target = target_vector(targets) if targets is not None else None
    if target is not None:
        # evaluate once on x0 so that a shape error surfaces before any simulation
        x_check = np.asarray(x0, dtype=np.float64)
        x_check = x_check if x_check.ndim == 2 else x_check[0]
        system.check_positions(x_check, "x0")
        # atoms too close or an overflowing start refused before anything is written
        starts = np.asarray(x0, dtype=np.float64)
        for r, x_r in enumerate([starts] if starts.ndim == 2 else starts):
            check_start(system, x_r, full0, "x0" if starts.ndim == 2 else f"x0[{r}]")
        got = np.asarray(target.observable(x_check)).shape
        if got != target.value.shape:
            raise InputError(
                f"targets' observables return {got} values, targets have {target.value.shape}"
            )

    settings = jsonable(
        dict(
            system=system_record(system),
            x0_sha256=array_sha256(np.asarray(x0, dtype=np.float64)),
            wrt=[int(i) for i in wrt],
            parameters=dict(zip(names, theta0.tolist(), strict=True)),
            n_replicas=n_replicas,
            n_steps=n_steps,
            time_samples=time_samples,
            save_every=save_every,
            parametrization=parametrization,
            integrator=None
            if integrator is None
            else [integrator.temperature, integrator.friction, integrator.dt, integrator.seed],
            labels=None if target is None else list(target.labels),
            fresh_noise=fresh_noise,
            method=method,
            average=average,
            backend=backend,
            precision=precision,
        )
    )

    u = param.initial()
    opt_state = opt.init(u)
    history, start, resumed = [], 0, False
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        ckpt = load_checkpoint(out_dir) if resume else None
        if ckpt is not None:
            check_settings(
                ckpt["path"],
                ckpt["settings"],
                settings,
                "Resume it with the same settings, or use another out_dir",
            )
            u = ckpt["u"]
            treedef = jax.tree_util.tree_structure(opt_state)
            opt_state = jax.tree_util.tree_unflatten(
                treedef, [np.asarray(a) for a in ckpt["opt_leaves"]]
            )
            history, start, resumed = ckpt["history"], ckpt["epoch"], True
    elif resume:
        raise InputError("resume=True needs out_dir (where the checkpoint lives)")

    show = progress if progress is not None else __import__("sys").stderr.isatty()
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=min(start, epochs), unit="epoch", desc="fit")
    pool = contextlib.ExitStack()
    try:
        if isinstance(executor, Executor):
            ex = executor
        else:
            ex = pool.enter_context(open_executor(executor, n_workers))
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            theta = param.theta(u)
            full = full0.copy()
            full[wrt] = theta
            record = {"epoch": epoch, "params": [float(v) for v in theta]}
            total = 0.0
            grad_theta = np.zeros_like(theta)
            if target is not None:
                replicas = np.arange(n_replicas) + (epoch * n_replicas if fresh_noise else 0)
                try:
                    result = run_replicas(
                        system,
                        x0,
                        integrator,
                        n_steps,
                        wrt=wrt,
                        replicas=replicas,
                        params=full,
                        save_every=save_every if time_samples else None,
                        method=method,
                        backend=backend,
                        precision=precision,
                        max_sensitivity=max_sensitivity,
                        executor=ex,
                    )
                except SimulationError as e:
                    raise annotate(
                        e, f"epoch {epoch}: ", kept_note(out_dir, epoch), epoch=epoch
                    ) from None
                ensemble = observable_samples(target.observable, result.x, result.dx_dtheta)
                time_set = None
                if time_samples:
                    tx, tdx = _time_samples(result, time_samples, (integrator.seed, epoch))
                    time_set = observable_samples(target.observable, tx, tdx)
                use_ensemble = average in ("auto", "ensemble", "both") or ergodicity_weight > 0
                lr = loss_and_gradient(
                    target,
                    ensemble=ensemble if use_ensemble else None,
                    time=time_set,
                    average=average,
                    ergodicity_weight=ergodicity_weight,
                    theta=theta,
                    theta_ref=theta0,
                    prior_sigma=prior_sigma,
                )
                total, grad_theta = lr.loss, lr.gradient
                samples = [s for s in (ensemble, time_set) if s is not None]
                record.update(
                    chi2=lr.chi2,
                    ergodicity=lr.ergodicity,
                    prior=lr.prior,
                    observables=lr.average.tolist(),
                    observable_errors=lr.average_error.tolist(),
                    ensemble_average=None
                    if lr.ensemble_average is None
                    else lr.ensemble_average.tolist(),
                    time_average=None if lr.time_average is None else lr.time_average.tolist(),
                )
            else:
                result, samples = None, []
            if force_matching is not None:
                fm_value, fm_grad = force_matching.loss_and_gradient(full, wrt)
                total += force_matching_weight * fm_value
                grad_theta = grad_theta + force_matching_weight * fm_grad
                record["force_matching"] = float(fm_value)
            grad_u = grad_theta * param.jacobian(u)
            gnorm = float(np.linalg.norm(grad_u))
            if not (
                np.isfinite(total) and np.isfinite(grad_u).all() and gnorm <= max_gradient_norm
            ):
                if result is None:
                    raise SimulationError(
                        f"epoch {epoch}: force-matching loss {total} / gradient norm {gnorm} "
                        f"is not usable{kept_note(out_dir, epoch)}"
                    )
                err = _diagnose(epoch, names, total, grad_theta, result, samples)
                raise annotate(err, suffix=kept_note(out_dir, epoch), epoch=epoch)
            record.update(loss=float(total), gradient=grad_theta.tolist(), gradient_norm=gnorm)
            updates, opt_state = opt.update(grad_u, opt_state, u)
            u = np.asarray(optax.apply_updates(u, updates), dtype=np.float64)
            record["wall_s"] = time.perf_counter() - t0
            history.append(record)
            if out_dir is not None:
                # a fit started afresh drops the checkpoints of whatever ran here before
                fresh = epoch == start and not resumed
                _save_checkpoint(
                    out_dir, epoch + 1, u, opt_state, history, settings, keep_previous=not fresh
                )
                _write_history(
                    out_dir,
                    make_result(full0, wrt, names, param, u, theta0, history, target, out_dir),
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4g}")
            if callback is not None:
                callback(record)
    finally:
        pool.close()
        if bar is not None:
            bar.close()
    final = make_result(full0, wrt, names, param, u, theta0, history, target, out_dir)
    if out_dir is not None and history and start >= epochs:
        # a resumed fit with no epoch left (killed between its last checkpoint and this
        # file) writes what its last epoch would have
        _write_history(out_dir, final)
    return final


def _write_history(out_dir, result):
    atomic_write_text(os.path.join(out_dir, HISTORY), json.dumps(result.history_dict(), indent=1))
