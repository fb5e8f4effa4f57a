"""Central finite differences of a seeded trajectory: the check on analytic dx/dθ.

``finite_difference`` runs plain Langevin dynamics — the integrator's ``langevin_step``
with its ``noise(seed, t, N, replica)``, exactly what ``timemachine.integrator.run``
does — at θ ± h_p e_p for every chosen parameter p, from the same x0 and the same
explicitly fixed v0, with the same seed: common random numbers, so the noise cancels
and (x_t(θ + h e_p) - x_t(θ - h e_p)) / 2h → dx_t/dθ_p, with an O(h²) truncation error
and an O(ε/h) round-off error. The 2P perturbed runs are vmapped in batches: one
compiled ``lax.scan`` per batch.

``compare`` tabulates ‖analytic - FD‖ / ‖FD‖ per parameter; ``plot_comparison`` draws
analytic against FD.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.checks import check_int, check_vectors
from timemachine.errors import InputError
from timemachine.integrator.langevin import (
    LangevinIntegrator,
    LangevinState,
    _check_replica,
    langevin_step,
    maxwell_boltzmann_velocities,
)
from timemachine.sensitivity.frames import SensitivityTrajectory
from timemachine.structured import gradient_fn
from timemachine.system import System

__all__ = [
    "ComparisonTable",
    "FiniteDifferenceResult",
    "compare",
    "finite_difference",
    "plot_comparison",
]

# vmapped runs of one batch may use about this much memory (a rough per-run estimate of
# an all-pairs gradient's (N, N) intermediates decides the batch size)
_BATCH_BYTES = 1 * 2**30
# the floor of the relative step: h_p = h max(|θ_p|, _H_FLOOR), for parameters near 0
_H_FLOOR = 1e-2


@dataclasses.dataclass(frozen=True)
class FiniteDifferenceResult:
    """Central-difference dx/dθ of a seeded trajectory.

    Attributes:
        dx_dtheta: (P, N, 3) at the final step, or (F, P, N, 3) at ``steps`` when the
            run saved frames; nm per unit of each parameter.
        steps: (F,) int64 steps of the frames (F = 1, the final step, without save_every).
        param_names: P names; wrt: (P,) indices into ``system.params``.
        h: (P,) the half-steps actually used, ((θ_p + h_p) - (θ_p - h_p)) / 2 in floats.
        params: (P_all,) the θ differentiated at.
        final_only: True when ``dx_dtheta`` is the final frame only.
    """

    dx_dtheta: np.ndarray
    steps: np.ndarray
    param_names: tuple
    wrt: np.ndarray
    h: np.ndarray
    params: np.ndarray
    final_only: bool

    def frames(self) -> np.ndarray:
        """dx/dθ as (F, P, N, 3) whatever ``final_only`` is."""
        return self.dx_dtheta[None] if self.final_only else self.dx_dtheta


@functools.lru_cache(maxsize=8)
def _runs_program(system):
    """Jitted ``runs(n_blocks, save_every, thetas (B, P_all), x, v, coeffs, seed, replica)``
    -> positions (B, F, N, 3): B independent plain runs, vmapped over θ."""
    grad = gradient_fn(system)  # closed form, as the sensitivity runs' primal step

    def runs(n_blocks, save_every, thetas, x, v, coeffs, seed, replica):
        def one(theta):
            def gradient_fn(y):
                return grad(y, theta)

            def step(s, _):
                return langevin_step(gradient_fn, coeffs, s, seed, replica), None

            def block(s, _):
                s, _ = jax.lax.scan(step, s, None, length=save_every)
                return s, s.x

            start = LangevinState(x, v, jnp.asarray(0, dtype=jnp.int64))
            _, xs = jax.lax.scan(block, start, None, length=n_blocks)
            return xs

        return jax.vmap(one)(thetas)

    return jax.jit(runs, static_argnums=(0, 1))


def perturbed_runs(
    system, thetas, x0, v0, integrator, n_steps, save_every, replica=0, batch_size=None
):
    """Positions (B, F, N, 3) of plain Langevin runs at each θ of ``thetas`` (B, P_all).

    Every run starts at (x0, v0) at step 0 and draws the same noise: only θ differs.
    Runs are vmapped ``batch_size`` at a time (the last batch padded, so one compile).
    """
    thetas = np.asarray(thetas, dtype=np.float64)
    n_runs = thetas.shape[0]
    n = system.n_atoms
    if batch_size is None:
        per_run = 8 * (64 * n * n + 256 * n) + 8 * (n_steps // save_every) * n * 3
        batch_size = max(1, min(n_runs, _BATCH_BYTES // per_run))
    batch_size = min(check_int(batch_size, "batch_size", minimum=1), n_runs)
    n_batches = -(-n_runs // batch_size)
    batch_size = -(-n_runs // n_batches)  # as even as possible: little padding
    program = _runs_program(system)
    coeffs = integrator.coefficients(system.masses)
    seed = jnp.asarray(integrator.seed, dtype=jnp.int64)
    rep = jnp.asarray(replica, dtype=jnp.int64)
    out = []
    for start in range(0, n_runs, batch_size):
        batch = thetas[start : start + batch_size]
        pad = batch_size - batch.shape[0]
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
        xs = program(
            n_steps // save_every,
            save_every,
            jnp.asarray(batch),
            jnp.asarray(x0),
            jnp.asarray(v0),
            coeffs,
            seed,
            rep,
        )
        out.append(np.asarray(xs)[: batch_size - pad])
    return np.concatenate(out)


def _steps_h(h, theta_sel):
    if isinstance(h, numbers.Real) and not isinstance(h, bool):
        if not (np.isfinite(h) and h > 0):
            raise InputError(f"h must be a finite number > 0 (relative step), got {h!r}")
        return float(h) * np.maximum(np.abs(theta_sel), _H_FLOOR)
    try:
        arr = np.asarray(h, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"h must be a number or an array of P absolute steps, got {h!r}") from exc
    if arr.shape != theta_sel.shape:
        raise InputError(
            f"h as an array gives one absolute step per parameter: expected shape "
            f"{theta_sel.shape}, got {arr.shape}"
        )
    bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
    if bad.size:
        raise InputError(f"h[{bad[0]}] = {arr[bad[0]]!r}: every step must be finite and > 0")
    return arr


def finite_difference(
    system: System,
    x0,
    integrator: LangevinIntegrator,
    n_steps: int,
    wrt="torsion*",
    h=1e-4,
    save_every: int | None = None,
    v0=None,
    replica: int = 0,
    params=None,
    batch_size: int | None = None,
) -> FiniteDifferenceResult:
    """dx/dθ by central differences of one seeded trajectory (common random numbers).

    For each chosen parameter p, plain dynamics (eqs. 3-4, the integrator's step and
    noise) runs from (x0, v0) at θ + h_p e_p and θ - h_p e_p with the same seed and
    replica, and dx_t/dθ_p ≈ (x_t⁺ - x_t⁻) / (θ_p⁺ - θ_p⁻).

    Args:
        system, x0, integrator, n_steps, wrt, replica, params: as in ``simulate``
            (x0 must be an (N, 3) array: dx_0/dθ = 0 there).
        h: a number — the relative step, h_p = h max(|θ_p|, 1e-2) — or an array of P
            absolute steps.
        save_every: differences at every ``save_every`` steps; None: the final step only.
        v0: (N, 3) initial velocities, nm/ps. Default: Maxwell-Boltzmann at the
            integrator's temperature, seed and replica, drawn once — exactly
            ``simulate``'s default — and shared by all 2P runs.
        batch_size: runs vmapped together; default from a memory estimate.

    Returns:
        ``FiniteDifferenceResult``.
    """
    if not isinstance(system, System):
        raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
    if not isinstance(integrator, LangevinIntegrator):
        raise InputError(
            f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
        )
    n_steps = check_int(n_steps, "n_steps", minimum=1)
    final_only = save_every is None
    save_every = n_steps if final_only else check_int(save_every, "save_every", minimum=1)
    if n_steps % save_every:
        raise InputError(f"n_steps = {n_steps} must be a multiple of save_every = {save_every}")
    replica = _check_replica(replica)
    wrt = system.resolve_wrt(wrt)
    theta = system.resolve_params(params)
    x0 = check_vectors(x0, "x0", system.n_atoms)
    if v0 is None:
        v0 = maxwell_boltzmann_velocities(
            system.masses, integrator.temperature, integrator.seed, replica
        )
    v0 = check_vectors(v0, "v0", system.n_atoms, unit="nm/ps")
    hp = _steps_h(h, theta[wrt])

    p = wrt.size
    thetas = np.repeat(theta[None], 2 * p, axis=0)
    rows = np.arange(p)
    thetas[2 * rows, wrt] += hp
    thetas[2 * rows + 1, wrt] -= hp
    denom = thetas[2 * rows, wrt] - thetas[2 * rows + 1, wrt]

    xs = perturbed_runs(
        system, thetas, x0, v0, integrator, n_steps, save_every, replica, batch_size
    )  # (2P, F, N, 3)
    plus, minus = xs[0::2], xs[1::2]
    dx = (plus - minus) / denom[:, None, None, None]  # (P, F, N, 3)
    dx = np.transpose(dx, (1, 0, 2, 3))
    steps = np.arange(1, n_steps // save_every + 1, dtype=np.int64) * save_every
    return FiniteDifferenceResult(
        dx_dtheta=dx[-1] if final_only else dx,
        steps=steps,
        param_names=tuple(system.param_names[i] for i in wrt),
        wrt=wrt,
        h=denom / 2,
        params=theta,
        final_only=final_only,
    )


# --------------------------------------------------------------------------- comparison


class ComparisonTable(list):
    """Rows (dicts) ``name, rel_error = ‖analytic - FD‖/‖FD‖, fd_norm, analytic_norm``, one
    per parameter, over all compared frames; ``str()`` is a markdown table."""

    @property
    def max_rel_error(self) -> float:
        return max(row["rel_error"] for row in self)

    def markdown(self) -> str:
        lines = [
            "| parameter | rel. error | ‖FD‖ | ‖analytic‖ |",
            "|---|---:|---:|---:|",
        ]
        for row in self:
            lines.append(
                f"| {row['name']} | {row['rel_error']:.3e} | {row['fd_norm']:.4e} | "
                f"{row['analytic_norm']:.4e} |"
            )
        return "\n".join(lines)

    def __str__(self):
        return self.markdown()


def _aligned(analytic, fd: FiniteDifferenceResult) -> np.ndarray:
    """The analytic dx/dθ as (F, P, N, 3), on fd's frames and in fd's parameter order."""
    want = fd.frames()
    if isinstance(analytic, SensitivityTrajectory):
        index = {name: i for i, name in enumerate(analytic.param_names)}
        missing = [name for name in fd.param_names if name not in index]
        if missing:
            raise InputError(f"the analytic trajectory has no sensitivity to {missing[:3]}")
        cols = np.array([index[name] for name in fd.param_names])
        step_of = {int(s): f for f, s in enumerate(analytic.steps)}
        lacking = [int(s) for s in fd.steps[-want.shape[0] :] if int(s) not in step_of]
        if lacking:
            raise InputError(
                f"the analytic trajectory has no frame at step(s) {lacking[:3]} "
                f"(its steps: {analytic.steps[:3].tolist()}…)"
            )
        frames = [step_of[int(s)] for s in fd.steps[-want.shape[0] :]]
        return np.stack([np.asarray(analytic.dx_dtheta[f])[cols] for f in frames])
    arr = np.asarray(analytic, dtype=np.float64)
    if arr.shape == want.shape[1:] and fd.final_only:
        arr = arr[None]
    if arr.shape != want.shape:
        raise InputError(
            f"analytic dx/dθ has shape {arr.shape}, the finite differences {fd.dx_dtheta.shape}"
        )
    return arr


def compare(analytic, fd: FiniteDifferenceResult) -> ComparisonTable:
    """Per-parameter relative error of analytic dx/dθ against finite differences.

    Args:
        analytic: a ``SensitivityTrajectory`` (its frames at fd's steps are used, by
            parameter name) or an array shaped like ``fd.dx_dtheta``.
        fd: a ``FiniteDifferenceResult``.

    Returns:
        ``ComparisonTable``: one dict per parameter with ``name``, ``rel_error``
        (‖analytic - FD‖ / ‖FD‖ over all frames), ``fd_norm``, ``analytic_norm``.
    """
    a = _aligned(analytic, fd)
    f = fd.frames()
    table = ComparisonTable()
    for p, name in enumerate(fd.param_names):
        fd_norm = float(np.linalg.norm(f[:, p]))
        diff = float(np.linalg.norm(a[:, p] - f[:, p]))
        table.append(
            {
                "name": name,
                "rel_error": diff / fd_norm if fd_norm > 0 else (0.0 if diff == 0 else np.inf),
                "fd_norm": fd_norm,
                "analytic_norm": float(np.linalg.norm(a[:, p])),
            }
        )
    return table


def plot_comparison(analytic, fd: FiniteDifferenceResult, path, title=None):
    """Write a PNG: analytic against FD dx/dθ (every component, one colour per parameter)
    and the relative error of each parameter. Uses matplotlib's Agg canvas (no display);
    the file is written atomically.

    Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = _aligned(analytic, fd)
    f = fd.frames()
    table = compare(analytic, fd)
    fig = Figure(figsize=(11, 4.8))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for p, _ in enumerate(fd.param_names):
        color = cmap(p / max(1, len(fd.param_names) - 1))
        ax.scatter(f[:, p].ravel(), a[:, p].ravel(), s=4, alpha=0.6, color=color)
    lim = float(max(np.abs(f).max(), np.abs(a).max(), 1e-300))
    ax.plot([-lim, lim], [-lim, lim], "k-", lw=0.8)
    ax.set_xlabel("finite difference dx/dθ")
    ax.set_ylabel("analytic dx/dθ")
    ax.set_title(title or f"{len(fd.param_names)} parameters, step {int(fd.steps[-1])}")
    errs = np.array([max(row["rel_error"], 1e-17) for row in table])
    bx.bar(np.arange(len(errs)), errs)
    bx.set_yscale("log")
    bx.set_xticks(np.arange(len(errs)))
    bx.set_xticklabels([row["name"] for row in table], rotation=90, fontsize=6)
    bx.set_ylabel("‖analytic − FD‖ / ‖FD‖")
    fig.tight_layout()
    from timemachine.files import atomic_savefig

    return atomic_savefig(fig, path, dpi=120)
