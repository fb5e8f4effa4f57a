"""Equilibrium sampling inside a fit: persistent plain-MD chains, a reservoir, and ESS.

An NMR coupling or an Rg is an equilibrium average ⟨O⟩_θ over p_θ(x) ∝ exp(-βE(x; θ))
(docs/design.md, "Gradients of equilibrium averages"). ``EquilibriumChains`` keeps C plain
Langevin chains that persist across the epochs of a fit: each epoch continues them at the
current θ, first for a decorrelation segment whose frames are discarded (the chains relax
from the previous θ's ensemble to the new one), then for a production segment whose
frames are streamed, in time order, through a ``Reservoir`` (Algorithm R, the paper's
time average). Chain c draws its noise from ``noise(seed, t, N, first_replica + c)`` with
a step counter t that keeps counting across epochs, so no noise is ever reused and a run
is a pure function of (seed, θ per epoch, segment lengths).

The effective number of independent samples of a correlated series is n / (2 τ_int),
with τ_int the integrated autocorrelation time (Sokal's automatic window, c = 5), or the
block-analysis estimate n s² / (B s_B²) (``effective_sample_size``).

All chains of a segment are one compiled program, with θ a traced argument: a new θ does
not recompile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine import neighbours
from timemachine.checks import check_int, check_vectors
from timemachine.errors import InputError
from timemachine.fitting.executor import Executor, content_key, device_sharding, worker_copy
from timemachine.fitting.reservoir import Reservoir
from timemachine.integrator.langevin import (
    LangevinIntegrator,
    LangevinState,
    langevin_step,
    maxwell_boltzmann_velocities,
)
from timemachine.precision import cast_floats, cast_system, check_precision
from timemachine.sensitivity.diagnosis import check_batch
from timemachine.start_checks import check_start
from timemachine.structured import gradient_fn
from timemachine.system import System

__all__ = [
    "ChainSampler",
    "ChainSamples",
    "EquilibriumChains",
    "autocorrelation_time",
    "effective_sample_size",
    "potential_scale_reduction",
]


# --------------------------------------------------------------------------- ESS


def autocorrelation_time(series, c: float = 5.0) -> np.ndarray:
    """Integrated autocorrelation time τ_int (in frames) of each column of a series.

    τ_int = 1/2 + Σ_{t=1}^{W} ρ(t), with W the smallest window with W ≥ c τ_int(W)
    (Sokal's automatic windowing; A. D. Sokal, Monte Carlo Methods in Statistical
    Mechanics, 1996), ρ from the FFT autocovariance. With C chains, ρ(t) = 1 - (W_var -
    ⟨acov_c(t)⟩)/var⁺ with var⁺ = (F-1)/F W_var + B/F (the pooled variance that includes
    the spread of the chain means B, as Stan's multi-chain ESS does), so chains stuck in
    different basins give a long τ, not a short one. The effective sample size of n frames
    is n / (2 τ_int); τ_int = 1/2 for independent frames.

    Args:
        series: (F,) or (F, K) values in time order; or (C, F, K): C chains.
        c: the window constant.

    Returns:
        (K,) τ_int ≥ 1/2 (a constant column gives 1/2).
    """
    s = np.asarray(series, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :, None]
    elif s.ndim == 2:
        s = s[None]
    if s.ndim != 3 or s.shape[1] < 2:
        raise InputError(f"series must be (F,), (F, K) or (C, F, K) with F >= 2, got {s.shape}")
    n_chains, f = s.shape[0], s.shape[1]
    d = s - s.mean(axis=1, keepdims=True)
    n_fft = 1 << int(2 * f - 1).bit_length()
    spec = np.fft.rfft(d, n=n_fft, axis=1)
    acov = np.fft.irfft(spec * np.conj(spec), n=n_fft, axis=1)[:, :f] / f  # (C, F, K)
    mean_acov = acov.mean(axis=0)
    within = (acov[:, 0] * f / (f - 1)).mean(axis=0)  # W: mean unbiased chain variance
    if n_chains > 1:
        between = s.mean(axis=1).var(axis=0, ddof=1)  # B / F
        var_plus = (f - 1) / f * within + between
    else:
        var_plus = mean_acov[0]
    tau = np.full(s.shape[2], 0.5)
    for k in range(s.shape[2]):
        if var_plus[k] <= 0:
            continue
        rho = 1.0 - (within[k] - mean_acov[:, k]) / var_plus[k]
        rho[0] = 1.0
        cum = 2.0 * np.cumsum(rho) - 1.0  # 2 τ_int(W) for W = 0, 1, ...
        window = np.arange(f)
        ok = np.flatnonzero(window >= c * cum / 2.0)
        w = int(ok[0]) if ok.size else f - 1
        tau[k] = max(0.5, cum[w] / 2.0)
    return tau


def potential_scale_reduction(series) -> np.ndarray:
    """Gelman–Rubin R̂ of each column over C ≥ 2 chains: sqrt(var⁺ / W), 1 at convergence.

    Args:
        series: (C, F, K).

    Returns:
        (K,) R̂; values above ~1.05 say the chains have not mixed (e.g. stuck in
        different conformational basins).
    """
    s = np.asarray(series, dtype=np.float64)
    if s.ndim != 3 or s.shape[0] < 2 or s.shape[1] < 2:
        raise InputError(f"series must be (C >= 2, F >= 2, K), got {s.shape}")
    f = s.shape[1]
    within = s.var(axis=1, ddof=1).mean(axis=0)
    var_plus = (f - 1) / f * within + s.mean(axis=1).var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(within > 0, np.sqrt(var_plus / within), 1.0)


def effective_sample_size(series, method: str = "autocorrelation", blocks: int = 10):
    """Effective number of independent samples of each column of a correlated series.

    Args:
        series: (F, K) frames in time order, or (C, F, K) for C chains.
        method: "autocorrelation" (n / 2τ_int, ``autocorrelation_time``) or "blocks"
            (n s² / (B s_B²) from B block means per chain: the variance of the mean seen
            by block analysis, turned into an equivalent number of independent samples).
        blocks: B for "blocks".

    Returns:
        (K,) effective sample sizes, at most the number of frames C·F.
    """
    s = np.asarray(series, dtype=np.float64)
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3:
        raise InputError(f"series must be (F, K) or (C, F, K), got {s.shape}")
    n = s.shape[0] * s.shape[1]
    if method == "autocorrelation":
        return np.minimum(n, n / (2.0 * autocorrelation_time(s)))
    if method == "blocks":
        if s.shape[1] < blocks:
            raise InputError(f"{s.shape[1]} frames per chain cannot make {blocks} blocks")
        means = np.concatenate(
            [np.stack([b.mean(0) for b in np.array_split(c, blocks)]) for c in s]
        )
        var = s.reshape(n, -1).var(axis=0, ddof=1)
        var_mean = means.var(axis=0, ddof=1) / means.shape[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            ess = np.where(var_mean > 0, var / var_mean, n)  # var(mean) = var / ESS
        return np.minimum(n, ess)
    raise InputError(
        f"effective_sample_size method must be 'autocorrelation' or 'blocks', got {method!r}"
    )


# --------------------------------------------------------------------------- chains


@functools.lru_cache(maxsize=8)
def _chain_program(system, n_blocks, save_every, dtype="float64"):
    """C chains of ``n_blocks`` blocks of ``save_every`` steps, vmapped; each block saves
    (x, v, step, potential energy) for the samples and the blow-up check. ``dtype``
    float32 (``timemachine.precision``) runs the step in single precision (the system's
    constants, θ, the coefficients and the state cast on entry)."""
    dtype = np.dtype(dtype)
    cast = cast_system(system, dtype)
    gradient = gradient_fn(cast)
    energy = cast.energy_fn()
    if neighbours.has_neighbours(cast):
        return jax.jit(_chains_on_neighbour_lists(cast, gradient, energy, n_blocks,
                                                  save_every, dtype))  # fmt: skip

    def one_chain(theta, coeffs, seed, replica, x, v, step):
        theta, coeffs, x, v = cast_floats((theta, coeffs, x, v), dtype)

        def one(s, _):
            return langevin_step(lambda y: gradient(y, theta), coeffs, s, seed, replica), None

        def block(s, _):
            s, _ = jax.lax.scan(one, s, None, length=save_every)
            return s, (s.x, s.v, s.step, energy(s.x, theta))

        return jax.lax.scan(block, LangevinState(x, v, step), None, length=n_blocks)

    return jax.jit(jax.vmap(one_chain, in_axes=(None, None, None, 0, 0, 0, 0)))


def _chains_on_neighbour_lists(system, gradient, energy, n_blocks, save_every, dtype):
    """``_chain_program``'s C chains for a System with Verlet lists
    (``timemachine.neighbours``): the steps vmapped over the chains inside one loop, so
    that the lists' rebuilds are a branch taken when some chain needs one (vmapped, a
    branch would run both sides at every step)."""

    def chains(theta, coeffs, seed, replicas, x, v, step):
        theta, coeffs, x, v = cast_floats((theta, coeffs, x, v), dtype)
        period = neighbours.period(system, coeffs.dt)
        lists = jax.vmap(lambda y: neighbours.build(system, y))(x)

        def advance(s, replica, lists):
            return langevin_step(lambda y: gradient(y, theta, lists), coeffs, s, seed, replica)

        def one(carry, _):
            s, lists = carry
            lists = neighbours.step_lists(system, lists, s.x, s.step[0], period, True)
            return (jax.vmap(advance)(s, replicas, lists), lists), None

        def block(carry, _):
            (s, lists), _ = jax.lax.scan(one, carry, None, length=save_every)
            # the frame's energy on lists fresh at its x (the next step would build the
            # same ones: the rule is a function of (lists, x, step))
            lists = neighbours.step_lists(system, lists, s.x, s.step[0], period, True)
            e = jax.vmap(lambda y, nb: energy(y, theta, nb))(s.x, lists)
            return (s, lists), (s.x, s.v, s.step, e)

        (final, _), frames = jax.lax.scan(block, (LangevinState(x, v, step), lists), None,
                                          length=n_blocks)  # fmt: skip
        return final, tuple(jnp.swapaxes(a, 0, 1) for a in frames)  # (C, F, ...) as vmapped

    return chains


def _run_chains(labels, x, v, step, theta, system, coeffs, seed, program):
    """Chains ``labels`` (their noise streams) from (x, v, step) (C, ...) at θ: the
    compiled ``_chain_program`` of ``program`` = (blocks, steps per block, dtype name).
    Returns numpy (final x, final v, final step, frames x (C, F, N, 3), v, step (C, F),
    potential energy (C, F)). Over several JAX devices the chains are sharded
    (``device_sharding``)."""
    run = _chain_program(system, *program)
    # over D > 1 JAX devices, the chain axis is sharded (padded to a multiple of D with
    # copies of the last chain, dropped after)
    c = len(labels)
    put, width = device_sharding(c)
    rows = np.minimum(np.arange(width), c - 1)
    final, frames = run(
        jnp.asarray(theta),
        coeffs,
        jnp.asarray(seed, dtype=jnp.int64),
        *(put(jnp.asarray(np.asarray(a)[rows])) for a in (labels, x, v, step)),
    )
    return tuple(np.asarray(a)[:c] for a in (final.x, final.v, final.step, *frames))


def _chain_task(task, system, key, coeffs, seed, program):
    """One Dask task: ``_run_chains`` of its chains on a worker, with the worker's first
    System of this content (``worker_copy``), whose compiled programs are cached."""
    labels, x, v, step, theta = task
    return _run_chains(labels, x, v, step, theta, worker_copy(system, key), coeffs, seed, program)


class ChainSamples(NamedTuple):
    """Frames of one production segment of C chains.

    Attributes:
        x: (C, F, N, 3) positions, nm, in time order per chain.
        steps: (C, F) step index of each frame on its chain.
        params: (P_all,) the θ they were sampled at.
    """

    x: np.ndarray
    steps: np.ndarray
    params: np.ndarray


class ChainSampler:
    """Persistent chains continued segment by segment at the θ of each epoch: what a fit's
    sampler provides (``EquilibriumChains`` runs them on JAX, ``OpenMMChains`` in OpenMM).

    A subclass sets ``system`` (the System whose parameters θ are), ``integrator``,
    ``n_chains``, ``save_every``, ``state`` (a ``LangevinState`` with a leading chain axis;
    a checkpoint stores and restores it) and ``executor``, and implements
    ``_advance(params, n_steps, save_every) -> (frames x (C, F, N, 3), steps (C, F), θ)``.
    """

    @property
    def steps_run(self) -> int:
        return int(self.state.step[0])

    def _segment(self, params, n_steps, save_every):
        """(n_steps, θ (P_all,) float64) of a segment, checked: a positive multiple of
        ``save_every`` steps, and θ of the System's shape."""
        n_steps = check_int(n_steps, "n_steps", minimum=1)
        if n_steps % save_every:
            raise InputError(f"n_steps = {n_steps} must be a multiple of save_every = {save_every}")
        theta = np.asarray(params, dtype=np.float64)
        if theta.shape != (self.system.n_params,):
            raise InputError(f"params must have shape ({self.system.n_params},), got {theta.shape}")
        return n_steps, theta

    def decorrelate(self, params, n_steps: int) -> None:
        """Run every chain ``n_steps`` at θ = ``params`` and discard the frames."""
        if n_steps:
            block = np.gcd(int(n_steps), self.save_every) or 1
            self._advance(params, n_steps, int(block))

    def sample(self, params, n_steps: int) -> ChainSamples:
        """Run every chain ``n_steps`` at θ = ``params``; the saved frames (every
        ``save_every`` steps)."""
        xs, steps, theta = self._advance(params, n_steps, self.save_every)
        return ChainSamples(xs, steps, theta)

    def sample_until(self, params, n_steps: int, values, min_ess: float, max_extend: int):
        """Production at θ = ``params`` in segments of ``n_steps``, extended (up to
        ``max_extend`` more segments) until every observable has ``min_ess`` effective
        samples: slow conformational exchange at some θ needs longer runs, not a crash.

        Args:
            params: (P_all,) θ.
            n_steps: steps per chain and segment (a multiple of ``save_every``).
            values: ``values(x (F, N, 3) nm) -> (F, K)`` the observables of F frames.
            min_ess: the effective sample size (``effective_sample_size``) to reach.
            max_extend: the most extra segments.

        Returns:
            (``ChainSamples`` of all segments (C, F, ...), series (C, F, K) of the
            observables, ess (K,), the number of extensions run). The caller decides what
            an ESS still below ``min_ess`` means.
        """
        segment = self.sample(params, n_steps)
        series = np.stack([values(c) for c in segment.x])
        ess = effective_sample_size(series)
        extended = 0
        while ess.min() < min_ess and extended < max_extend:
            more = self.sample(params, n_steps)
            segment = ChainSamples(
                np.concatenate([segment.x, more.x], axis=1),
                np.concatenate([segment.steps, more.steps], axis=1),
                segment.params,
            )
            series = np.concatenate([series, np.stack([values(c) for c in more.x])], axis=1)
            ess = effective_sample_size(series)
            extended += 1
        return segment, series, ess, extended


class EquilibriumChains(ChainSampler):
    """C persistent plain-MD chains of a System, continued at the θ of each epoch.

    Args:
        system: a ``timemachine.System``.
        x0: (N, 3) or (C, N, 3) starting positions, nm (a minimised structure is fine:
            the first ``equilibrate`` call relaxes it).
        integrator: ``LangevinIntegrator`` (temperature, friction, dt, seed).
        n_chains: C.
        save_every: steps between saved frames of a production segment.
        first_replica: chain c uses noise and velocity stream ``first_replica + c``.
        precision: "float64" (default) or "float32": the chains' dynamics and state in
            single precision (``timemachine.precision``); their frames are returned as
            float64 arrays (of float32 values) for the estimators.
        params: (P,) θ the start is checked at (``timemachine.start_checks.check_start``);
            default ``system.params``.
        executor: an open ``timemachine.fitting.Executor`` (``open_executor``) the chains
            run on, or None (in this process, all C chains as one vmapped program). On
            Dask each task is ``chains_per_task`` consecutive chains (default C divided
            among the cluster's worker threads), vmapped on a worker; their frames and
            states come back in chain order. It may be set or changed between segments
            (attribute ``executor``): a chain's numbers do not depend on where it runs
            (to round-off: a vmap of another width may round differently).

    Raises:
        InputError: bad arguments; a start with two atoms closer than 0.05 nm or a
            non-finite or enormous energy or gradient (``check_start`` names the atoms).

    Attributes:
        state: the chains' ``LangevinState`` (leading axis C), numpy arrays.
        steps_run: total steps per chain so far.
    """

    def __init__(
        self,
        system: System,
        x0,
        integrator: LangevinIntegrator,
        n_chains: int = 2,
        save_every: int = 500,
        first_replica: int = 0,
        precision: str = "float64",
        params=None,
        executor=None,
        chains_per_task: int | None = None,
    ):
        self.dtype = check_precision(precision)
        if not isinstance(system, System):
            raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
        if not isinstance(integrator, LangevinIntegrator):
            raise InputError(
                f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
            )
        self.system, self.integrator = system, integrator
        self.n_chains = check_int(n_chains, "n_chains", minimum=1)
        self.save_every = check_int(save_every, "save_every", minimum=1)
        self.first_replica = check_int(first_replica, "first_replica", minimum=0)
        if executor is not None and not isinstance(executor, Executor):
            raise InputError(
                "executor must be an open timemachine.fitting.Executor (open_executor) or "
                f"None, got {type(executor).__name__}"
            )
        self.executor = executor
        if chains_per_task is not None:
            chains_per_task = check_int(chains_per_task, "chains_per_task", minimum=1)
        self.chains_per_task = chains_per_task
        n = system.n_atoms
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.ndim == 2:
            x0 = np.broadcast_to(x0, (self.n_chains,) + x0.shape)
        if x0.ndim != 3 or x0.shape[0] != self.n_chains:
            raise InputError(
                f"x0 must be (N, 3) or (n_chains={self.n_chains}, N, 3) nm, got {x0.shape}"
            )
        x = np.stack([check_vectors(x0[c], f"x0[{c}]", n) for c in range(self.n_chains)])
        # atoms too close or an overflowing start: refused before the first step
        for c in range(1 if x0.strides[0] == 0 else self.n_chains):
            check_start(system, x[c], params, "x0" if x0.strides[0] == 0 else f"x0[{c}]")
        masses = np.asarray(system.masses)
        v = np.stack(
            [
                np.asarray(
                    maxwell_boltzmann_velocities(
                        masses, integrator.temperature, integrator.seed, self.first_replica + c
                    )
                )
                for c in range(self.n_chains)
            ]
        )
        if self.dtype != np.float64:
            cast_system(system, self.dtype)  # refuses custom terms before anything runs
            x, v = x.astype(self.dtype), v.astype(self.dtype)
        self.state = LangevinState(x, v, np.zeros(self.n_chains, dtype=np.int64))
        self._coeffs = integrator.coefficients(masses)

    def _advance(self, params, n_steps, save_every):
        n_steps, theta = self._segment(params, n_steps, save_every)
        program = (n_steps // save_every, save_every, self.dtype.name)
        labels = np.arange(self.n_chains, dtype=np.int64) + self.first_replica
        start = (self.state.x, self.state.v, self.state.step)
        ex = self.executor
        if ex is None or ex.kind == "in-process":
            outputs = _run_chains(labels, *start, theta, self.system, self._coeffs,
                                  self.integrator.seed, program)  # fmt: skip
        else:
            # C/T tasks of consecutive chains, gathered in chain order; a chain's numbers
            # depend only on (seed, its index, its state, θ), wherever it runs
            per = self.chains_per_task or -(-self.n_chains // ex.slots())
            tasks = [
                (labels[lo : lo + per],) + tuple(a[lo : lo + per] for a in start) + (theta,)
                for lo in range(0, self.n_chains, per)
            ]
            shared = (self.system, content_key(self.system), self._coeffs,
                      self.integrator.seed, program)  # fmt: skip
            parts = ex.map(_chain_task, tasks, *shared)
            outputs = tuple(np.concatenate(a) for a in zip(*parts, strict=True))
        final_x, final_v, final_step, xs, vs, steps, energies = outputs
        xs = np.asarray(xs, dtype=np.float64)
        # a blow-up stops here, at the first bad saved frame, before the chains' state
        # moves on: the state (and a fit's last checkpoint) stays the last good one
        check_batch(
            xs,
            None,
            steps,
            (),
            None,
            self.integrator,
            np.arange(self.n_chains),
            vs=vs,
            energies=energies,
            gradient=lambda x: self.system.gradient(x, theta),
            where="equilibrium chains",
            member="chain",
        )
        self.state = LangevinState(final_x, final_v, final_step)
        return xs, steps, theta


def reservoir_frames(samples: ChainSamples, capacity: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm R over a production segment, frames streamed in time order (chains
    interleaved frame by frame); returns (x (R, N, 3), origin (R, 2) = (chain, step)),
    sorted by chain then step so that contiguous blocks are contiguous in time."""
    reservoir = Reservoir(capacity, seed)
    c, f = samples.steps.shape
    for j in range(f):
        for i in range(c):
            slot = reservoir.next_slot()
            if slot is not None:
                reservoir.put(slot, (i, j))
    held = sorted(reservoir.items)
    x = np.stack([samples.x[i, j] for i, j in held])
    origin = np.array([(i, int(samples.steps[i, j])) for i, j in held], dtype=np.int64)
    return x, origin
