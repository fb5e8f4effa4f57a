"""Validation in a second engine: OpenMM samples a force field, our observables score it.

A fitted force field should be judged by an engine that did not fit it. This module
builds an OpenMM System from force-field XML files (e.g. what
``timemachine.export_forcefield`` wrote, or ``amber99sbildn.xml`` + ``amber99_obc.xml``),
runs independent Langevin chains with OpenMM, and evaluates every target's observable
(``timemachine.fitting.Target``, the same objects the fit uses) on the saved frames.

Statistics (K values, chains c = 1..M, each cut into ``n_blocks`` contiguous blocks):

* ⟨O_k⟩ is the mean over every saved frame of every chain (chains have equal length).
* Its standard error comes from the B = M·n_blocks block means, treated as independent:
  SE_k = std(block means, ddof=1) / √B. Blocks never straddle two chains. Blocks must be
  longer than the correlation time for this to be honest (1 ns / n_blocks per chain is
  ample for the backbone φ of a short peptide; not for a folding protein).
* χ² = Σ_k ((⟨O_k⟩ − y_k)/σ_k)², χ²/N = χ²/K (target weights are not applied: this is
  the plain reduced χ² against experiment), and per target (group) the same over its
  values.
* The standard error of χ²/N (and of each group's) is the delete-one-block jackknife:
  χ²/N is recomputed with the means of all frames outside block b, for each of the B
  blocks, and SE = √((B−1)/B · Σ_b (f_(−b) − f̄)²). It is the sampling error of the
  simulated averages only; y and σ are taken as exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import numpy as np

from timemachine.errors import InputError, MissingFileError, SimulationError

__all__ = ["ValidationResult", "validate_openmm", "validate_sampler"]

_CONSTRAINTS = ("HBonds", "AllBonds", "HAngles", None)


@dataclasses.dataclass
class ValidationResult:
    """What :func:`validate_openmm` measured.

    Attributes:
        labels: (K,) ``target:label`` of every value.
        mean, stderr: (K,) ⟨O⟩ over all frames and its block standard error.
        value, uncertainty: (K,) the targets' y and σ.
        chi2: Σ ((⟨O⟩ − y)/σ)²; chi2_per_n: chi2 / K; chi2_per_n_stderr: its jackknife SE.
        groups: per target name, ``{"n": K_g, "chi2_per_n": …, "chi2_per_n_stderr": …}``.
        n_frames: frames scored, all chains; n_chains; n_blocks: blocks per chain.
        simulated_ns: production time of all chains (equilibration excluded);
        equilibration_ps: per chain, discarded.
        wall_s: wall time of the run (build, minimisation, dynamics, observables);
        ns_per_day: simulated ns (production + equilibration) per day of dynamics wall time.
        platform: the OpenMM platform used (and its threads, for CPU).
        forcefield_files: the files the System was built from.
        seeds: the OpenMM random seed of each chain.
        settings: temperature, friction, dt, constraints, save interval.
        values: (S, K) the observable on every frame; chain: (S,) each frame's chain.
        frames: (S, N, 3) nm, only with ``keep_frames=True``, else None.
    """

    labels: tuple
    mean: np.ndarray
    stderr: np.ndarray
    value: np.ndarray
    uncertainty: np.ndarray
    chi2: float
    chi2_per_n: float
    chi2_per_n_stderr: float
    groups: dict
    n_frames: int
    n_chains: int
    n_blocks: int
    simulated_ns: float
    equilibration_ps: float
    wall_s: float
    ns_per_day: float
    platform: str
    forcefield_files: tuple
    seeds: tuple
    settings: dict
    values: np.ndarray
    chain: np.ndarray
    frames: np.ndarray | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-frame arrays)."""
        return {
            "labels": list(self.labels),
            "mean": [float(v) for v in self.mean],
            "stderr": [float(v) for v in self.stderr],
            "value": [float(v) for v in self.value],
            "uncertainty": [float(v) for v in self.uncertainty],
            "chi2": float(self.chi2),
            "chi2_per_n": float(self.chi2_per_n),
            "chi2_per_n_stderr": float(self.chi2_per_n_stderr),
            "chi2_stderr_method": "delete-one-block jackknife over all chains' blocks",
            "groups": {k: {kk: float(vv) for kk, vv in v.items()} for k, v in self.groups.items()},
            "n_frames": int(self.n_frames),
            "n_chains": int(self.n_chains),
            "n_blocks": int(self.n_blocks),
            "simulated_ns": float(self.simulated_ns),
            "equilibration_ps": float(self.equilibration_ps),
            "wall_s": float(self.wall_s),
            "ns_per_day": float(self.ns_per_day),
            "platform": self.platform,
            "forcefield_files": list(self.forcefield_files),
            "seeds": [int(s) for s in self.seeds],
            "settings": dict(self.settings),
            "chain_mean": self.chain_mean().tolist(),
            "chain_chi2_per_n": [
                _chi2_per_n(m, self.value, self.uncertainty) for m in self.chain_mean()
            ],
        }

    def chain_mean(self) -> np.ndarray:
        """(C, K) ⟨O⟩ of each chain alone: one chain far from the others is a slow state
        that some seeds visited and others did not (the error bars then understate)."""
        return np.stack([self.values[self.chain == c].mean(axis=0) for c in range(self.n_chains)])


# --------------------------------------------------------------------------- statistics


def _block_index(n, n_blocks):
    """(n,) block number of each of n consecutive frames, blocks as equal as possible."""
    return np.concatenate(
        [np.full(len(a), b) for b, a in enumerate(np.array_split(np.arange(n), n_blocks))]
    )


def _chi2_per_n(mean, value, sigma):
    return float(np.mean(((mean - value) / sigma) ** 2))


def _statistics(values, chain, n_blocks, value, sigma, slices, names):
    """Means, block SEs, χ²/N and jackknife SEs (see the module docstring)."""
    n_chains = int(chain.max()) + 1
    block = np.empty(len(values), dtype=np.int64)
    for c in range(n_chains):
        sel = np.flatnonzero(chain == c)
        block[sel] = c * n_blocks + _block_index(sel.size, n_blocks)
    n_b = n_chains * n_blocks
    sums = np.zeros((n_b, values.shape[1]))
    np.add.at(sums, block, values)
    counts = np.bincount(block, minlength=n_b).astype(np.float64)
    mean = values.mean(axis=0)
    block_means = sums / counts[:, None]
    stderr = block_means.std(axis=0, ddof=1) / math.sqrt(n_b)
    loo = (sums.sum(axis=0)[None, :] - sums) / (counts.sum() - counts)[:, None]  # (B, K)

    def jackknife(sl):
        f = np.array([_chi2_per_n(m[sl], value[sl], sigma[sl]) for m in loo])
        return float(math.sqrt((n_b - 1) / n_b * np.sum((f - f.mean()) ** 2)))

    everything = slice(0, values.shape[1])
    groups = {}
    for name, sl in zip(names, slices, strict=True):
        groups[name] = {
            "n": float(sl.stop - sl.start),
            "chi2_per_n": _chi2_per_n(mean[sl], value[sl], sigma[sl]),
            "chi2_per_n_stderr": jackknife(sl),
        }
    chi2 = float(np.sum(((mean - value) / sigma) ** 2))
    return mean, stderr, chi2, chi2 / values.shape[1], jackknife(everything), groups


# --------------------------------------------------------------------------- OpenMM


def _available_platforms():
    import openmm as mm

    return [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]


def _candidates(name, threads):
    """(platform name, properties) to consider; more than one means benchmark them."""
    names = _available_platforms()
    if name is None:
        out = []
        if "CPU" in names:
            out.append(("CPU", {"Threads": str(threads)}))
            if threads > 1:
                out.append(("CPU", {"Threads": "1"}))
        out.append(("Reference", {}))
        return out
    if name not in names:
        raise InputError(f"OpenMM platform {name!r} is not available here; available: {names}")
    return [(name, {"Threads": str(threads)} if name == "CPU" else {})]


def _fastest(omm, x, dt, candidates, seconds=0.3):
    """The candidate that runs Langevin steps of ``omm`` fastest (a ~1 s benchmark)."""
    import openmm as mm
    import openmm.unit as unit

    if len(candidates) == 1:
        return candidates[0]
    best, best_rate = None, -1.0
    for name, props in candidates:
        integrator = mm.LangevinMiddleIntegrator(300.0, 1.0, dt)
        ctx = mm.Context(omm, integrator, mm.Platform.getPlatformByName(name), props)
        ctx.setPositions(x)
        ctx.setVelocitiesToTemperature(300.0 * unit.kelvin, 1)
        integrator.step(20)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            integrator.step(50)
            n += 50
        rate = n / (time.perf_counter() - t0)
        if rate > best_rate:
            best, best_rate = (name, props), rate
        del ctx, integrator
    return best


def _progress(progress, total, desc):
    """(update(n), close()) for a bar over ``total`` steps of dynamics."""
    if callable(progress):
        done = [0]

        def update(n):
            done[0] += n
            progress(done[0], total)

        return update, lambda: None
    show = progress if progress is not None else sys.stderr.isatty()
    if not show:
        return (lambda n: None), (lambda: None)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
    return bar.update, bar.close


def _seeds(seed, n):
    """n distinct OpenMM seeds in [1, 2^31 − 1] (0 would mean "pick one at random")."""
    raw = np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32)
    out = [int(s) % (2**31 - 2) + 1 for s in raw]
    while len(set(out)) < n:  # astronomically unlikely
        out = [s + i for i, s in enumerate(out)]
    return tuple(out)


def _run_chain(
    omm,
    plat,
    props,
    x_min,
    seed,
    temperature,
    friction,
    dt,
    equil_steps,
    saves_per_chain,
    steps_per_save,
    update=None,
):
    """One LangevinMiddleIntegrator chain: (frames (F, N, 3) nm, dynamics wall seconds).

    ``omm`` and ``plat`` may be an OpenMM System and Platform, or (in a worker process) the
    System's XML and the platform's name."""
    import openmm as mm
    import openmm.unit as unit

    if isinstance(omm, str):
        omm = mm.XmlSerializer.deserialize(omm)
    if isinstance(plat, str):
        plat = mm.Platform.getPlatformByName(plat)
    if not unit.is_quantity(x_min):
        x_min = np.asarray(x_min) * unit.nanometer
    update = update or (lambda n: None)
    integrator = mm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, friction / unit.picosecond, dt * unit.picoseconds
    )
    integrator.setRandomNumberSeed(seed)
    ctx = mm.Context(omm, integrator, plat, props)
    ctx.setPositions(x_min)
    ctx.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    t0 = time.perf_counter()
    left = equil_steps
    while left > 0:
        n = min(left, 10 * steps_per_save)
        integrator.step(n)
        update(n)
        left -= n
    n_atoms = omm.getNumParticles()
    chain = np.empty((saves_per_chain, n_atoms, 3))
    for k in range(saves_per_chain):
        integrator.step(steps_per_save)
        chain[k] = ctx.getState(getPositions=True).getPositions(asNumpy=True)._value
        update(steps_per_save)
    return chain, time.perf_counter() - t0


_METHODS = ("NoCutoff", "CutoffNonPeriodic")


def _nonbonded(method, cutoff, topology=None):
    """``createSystem``'s nonbonded keywords for ``validate_openmm``'s method (one without
    a periodic box) and cutoff, checked as ``load_system`` checks its own; InputError
    naming a bad one."""
    from timemachine.io.openmm_import import _nonbonded_options

    if method not in _METHODS:
        raise InputError(f"nonbonded_method={method!r}; choose one of {list(_METHODS)}")
    return _nonbonded_options(topology, method, cutoff, None, "validate_openmm's topology")


def openmm_system(forcefield_files, topology, constraints="HBonds", nonbonded_method="NoCutoff",
                  cutoff=None):  # fmt: skip
    """The OpenMM System ``validate_openmm`` samples: ``forcefield_files`` on ``topology``
    with ``constraints`` (``validate_openmm``'s choices) and the nonbonded method and
    cutoff of the fitted model (NoCutoff, or CutoffNonPeriodic with ``cutoff`` nm: the
    reaction field and, in implicit solvent, the GB pairs within it).

    Raises:
      MissingFileError: a force-field file that does not exist.
      InputError: files that cannot parametrise the topology, or a bad method or cutoff.
    """
    import openmm.app as app

    from timemachine.io.forcefield_xml import check_forcefield_files

    nonbonded = _nonbonded(nonbonded_method, cutoff, topology)
    check_forcefield_files(forcefield_files)
    try:
        ff = app.ForceField(*forcefield_files)
    except ValueError as e:
        missing = [f for f in forcefield_files if f'Could not locate file "{f}"' in str(e)]
        if missing:
            raise MissingFileError(f"force-field file {missing[0]!r} not found") from None
        raise InputError(f"force-field files {list(forcefield_files)}: {e}") from e
    try:
        return ff.createSystem(
            topology, constraints=getattr(app, constraints) if constraints else None, **nonbonded
        )  # fmt: skip
    except ValueError as e:
        raise InputError(
            f"force-field files {list(forcefield_files)} cannot parametrise the topology: {e}"
        ) from e


def validate_openmm(
    forcefield_files,
    topology,
    positions,
    targets,
    *,
    time_ns=5.0,
    n_seeds=4,
    seed=0,
    temperature=300.0,
    friction=1.0,
    dt=0.002,
    constraints="HBonds",
    save_every_ps=1.0,
    equilibration_ps=100.0,
    platform=None,
    threads=None,
    n_blocks=10,
    progress=None,
    keep_frames=False,
    n_workers=1,
    nonbonded_method="NoCutoff",
    cutoff=None,
) -> ValidationResult:
    """Sample ``forcefield_files`` with OpenMM and score the targets' observables on it.

    Args:
        forcefield_files: OpenMM force-field XML files (bundled names or paths), loaded
            together; refused when they define implicit solvent twice
            (``timemachine.io.forcefield_xml.check_forcefield_files``).
        topology: OpenMM Topology; positions: (N, 3) nm (array or Quantity).
        targets: non-empty list of ``timemachine.fitting.Target``.
        time_ns: production time of all chains together, split equally over them.
        n_seeds: independent chains (own seed, own Maxwell–Boltzmann velocities), each
            from the one minimised structure, each equilibrated ``equilibration_ps``.
        seed: master seed; chain seeds are drawn from it (``seeds`` in the result).
        temperature (K), friction (1/ps), dt (ps): LangevinMiddleIntegrator settings.
        constraints: "HBonds" (default), "AllBonds", "HAngles" or None.
        save_every_ps: frame interval; the integrator steps in chunks of this length.
        platform: OpenMM platform name ("CPU" runs ``threads`` threads, default every
            core). None picks the fastest of CPU (all cores), CPU (1 thread) and Reference
            with a ~1 s benchmark on this System: for a peptide of a few dozen atoms the
            Reference platform is fastest (trialanine, 2 cores: Reference 1600 ns/day,
            CPU 1 thread 600, CPU 2 threads 370); CPU wins for proteins.
        n_blocks: blocks per chain for the standard errors (≥ 1; ≥ 2 blocks in all).
        progress: None (a tqdm bar when stderr is a terminal), True/False, or a callable
            ``progress(steps_done, steps_total)``.
        keep_frames: return the (S, N, 3) frames too.
        n_workers: run the chains on this many spawned processes (one chain per task);
            the frames, and so every number, are the same as with 1 (same seeds, same
            platform), only sooner on a machine with that many free cores.
        nonbonded_method: "NoCutoff" (every pair) or "CutoffNonPeriodic" (reaction field
            and, with implicit solvent, the GB pairs within ``cutoff``): the model the
            engine fitted (``load_system``'s), built the same way in OpenMM.
        cutoff: nm, with CutoffNonPeriodic (None: OpenMM's default, 1 nm).

    Returns:
        :class:`ValidationResult`.

    Raises:
        MissingFileError: a force-field file that does not exist.
        InputError: empty targets, time_ns ≤ 0, n_seeds < 1, other bad settings, too few
            frames for the blocks, or files that solvate twice.
        SimulationError: NaN positions.
    """
    import jax
    import openmm as mm
    import openmm.unit as unit

    from timemachine.fitting.loss import target_vector
    from timemachine.fitting.targets import Target

    t_start = time.perf_counter()
    if isinstance(forcefield_files, (str, os.PathLike)):
        forcefield_files = (forcefield_files,)
    forcefield_files = tuple(os.fspath(f) for f in forcefield_files)
    if not forcefield_files:
        raise InputError("forcefield_files is empty: name at least one force-field XML file")
    targets = list(targets) if targets is not None else []
    if not targets:
        raise InputError(f"targets is empty ({targets!r}): nothing to validate against")
    for i, t in enumerate(targets):
        if not isinstance(t, Target):
            raise InputError(f"targets[{i}] is {type(t).__name__}, not a timemachine Target")

    def positive(name, v, integer=False):
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        if not ok or not math.isfinite(v) or v <= 0 or (integer and int(v) != v):
            kind = "an integer ≥ 1" if integer else "a number > 0"
            raise InputError(f"{name} must be {kind}, got {v!r}")

    positive("time_ns", time_ns)
    positive("n_seeds", n_seeds, integer=True)
    positive("n_blocks", n_blocks, integer=True)
    positive("n_workers", n_workers, integer=True)
    for name, v in (("temperature", temperature), ("dt", dt), ("save_every_ps", save_every_ps)):
        positive(name, v)
    if not (isinstance(friction, (int, float)) and math.isfinite(friction) and friction >= 0):
        raise InputError(f"friction must be a number ≥ 0 (1/ps), got {friction!r}")
    if not (math.isfinite(equilibration_ps) and equilibration_ps >= 0):
        raise InputError(f"equilibration_ps must be ≥ 0, got {equilibration_ps!r}")
    if constraints not in _CONSTRAINTS:
        raise InputError(f"constraints={constraints!r}; choose one of {list(_CONSTRAINTS)}")
    nonbonded = _nonbonded(nonbonded_method, cutoff)  # refused before the force field loads
    n_seeds, n_blocks = int(n_seeds), int(n_blocks)
    steps_per_save = round(save_every_ps / dt)
    if steps_per_save < 1 or abs(steps_per_save * dt - save_every_ps) > 1e-9 * save_every_ps:
        raise InputError(f"save_every_ps={save_every_ps} is not a whole number of dt={dt} steps")
    saves_per_chain = round(time_ns * 1000.0 / n_seeds / save_every_ps)
    if saves_per_chain < n_blocks or saves_per_chain * n_seeds < 2:
        raise InputError(
            f"time_ns={time_ns} over n_seeds={n_seeds} gives {saves_per_chain} frames per chain "
            f"(every {save_every_ps} ps), fewer than n_blocks={n_blocks}; run longer, save more "
            "often or use fewer blocks"
        )
    equil_steps = round(equilibration_ps / dt)

    tv = target_vector(targets)
    omm = openmm_system(forcefield_files, topology, constraints, nonbonded_method, cutoff)
    x0 = positions.value_in_unit(unit.nanometer) if unit.is_quantity(positions) else positions
    x0 = np.asarray(x0, dtype=np.float64).reshape(-1, 3)
    if x0.shape[0] != omm.getNumParticles():
        raise InputError(f"positions have {x0.shape[0]} atoms, the System {omm.getNumParticles()}")
    threads = int(threads or os.cpu_count() or 1)
    candidates = _candidates(platform, threads)
    # minimise on the Reference platform (float64, deterministic), whatever runs the chains:
    # a multi-threaded CPU minimisation ends at slightly different positions from call to
    # call, and chaotic dynamics turn that into different samples for the same seeds
    ctx = mm.Context(omm, mm.VerletIntegrator(dt), mm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x0 * unit.nanometer)
    mm.LocalEnergyMinimizer.minimize(ctx, 10.0, 0)
    x_min = ctx.getState(getPositions=True).getPositions(asNumpy=True)
    del ctx
    name, props = _fastest(omm, x_min, dt, candidates)
    plat = mm.Platform.getPlatformByName(name)
    label = name + (f" ({props['Threads']} threads)" if "Threads" in props else "")

    seeds = _seeds(seed, n_seeds)
    total_steps = n_seeds * (equil_steps + saves_per_chain * steps_per_save)
    chain_args = (temperature, friction, dt, equil_steps, saves_per_chain, steps_per_save)
    frames, t_dyn = [], 0.0
    workers = min(int(n_workers), n_seeds)
    if workers > 1:
        # one chain per task on spawned processes (the Reference and 1-thread CPU platforms
        # use one core each); chains are collected in seed order, so the result does not
        # depend on which finished first
        import concurrent.futures
        import multiprocessing

        system_xml = mm.XmlSerializer.serialize(omm)
        update, close = _progress(progress, n_seeds, "OpenMM validation (chains)")
        try:
            with concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                futures = [
                    pool.submit(_run_chain, system_xml, name, props, x_min._value, s, *chain_args)
                    for s in seeds
                ]
                for f in futures:
                    chain, t = f.result()
                    frames.append(chain)
                    t_dyn += t / workers
                    update(1)
        finally:
            close()
    else:
        update, close = _progress(progress, total_steps, "OpenMM validation")
        try:
            for s in seeds:
                chain, t = _run_chain(omm, plat, props, x_min, s, *chain_args, update=update)
                frames.append(chain)
                t_dyn += t
        finally:
            close()
    for c, (chain, s) in enumerate(zip(frames, seeds, strict=True)):
        if not np.isfinite(chain).all():
            raise SimulationError(f"chain {c} (seed {s}) produced non-finite positions")

    obs = jax.jit(jax.vmap(tv.observable))
    values = np.concatenate([np.asarray(obs(f)) for f in frames])
    chain_of = np.repeat(np.arange(n_seeds), saves_per_chain)
    if not np.isfinite(values).all():
        raise SimulationError("an observable is not finite on some frame")
    names = [t.name for t in targets]
    mean, stderr, chi2, chi2n, chi2n_se, groups = _statistics(
        values, chain_of, n_blocks, tv.value, tv.uncertainty, tv.slices, names
    )
    prod_ns = n_seeds * saves_per_chain * save_every_ps / 1000.0
    all_ns = prod_ns + n_seeds * equil_steps * dt / 1000.0
    return ValidationResult(
        labels=tv.labels,
        mean=mean,
        stderr=stderr,
        value=np.asarray(tv.value),
        uncertainty=np.asarray(tv.uncertainty),
        chi2=chi2,
        chi2_per_n=chi2n,
        chi2_per_n_stderr=chi2n_se,
        groups=groups,
        n_frames=int(values.shape[0]),
        n_chains=n_seeds,
        n_blocks=n_blocks,
        simulated_ns=prod_ns,
        equilibration_ps=float(equil_steps * dt),
        wall_s=time.perf_counter() - t_start,
        ns_per_day=all_ns / t_dyn * 86400.0 if t_dyn > 0 else float("inf"),
        platform=label,
        forcefield_files=forcefield_files,
        seeds=seeds,
        settings={
            "temperature_K": float(temperature),
            "friction_per_ps": float(friction),
            "dt_ps": float(dt),
            "constraints": constraints or "none",
            "save_every_ps": float(save_every_ps),
            "nonbonded_method": nonbonded_method,
            "cutoff_nm": None
            if nonbonded_method == "NoCutoff"
            else float(nonbonded["nonbondedCutoff"].value_in_unit(unit.nanometer)),
        },
        values=values,
        chain=chain_of,
        frames=np.concatenate(frames) if keep_frames else None,
    )


def validate_sampler(
    sampler,
    system,
    params,
    targets,
    integrator,
    *,
    time_ns=1.0,
    n_seeds=4,
    equilibration_ps=100.0,
    save_every_ps=1.0,
    n_blocks=10,
    first_replica=1000,
) -> ValidationResult:
    """Score θ in OpenMM on any OpenMM System (an ``OpenMMSampler``: explicit water, PME):
    independent OpenMM chains with θ's torsions written in, the targets' observables on
    the solute's frames, and the statistics of ``validate_openmm``.

    Args:
        sampler: ``timemachine.fitting.OpenMMSampler``; system: the solute's System.
        params: (P_all,) θ to validate (e.g. ``FitResult.params``).
        targets: list of ``Target``; integrator: ``LangevinIntegrator`` (its seed and
            ``first_replica`` choose the chains' noise: use ones the fit did not).
        time_ns: production of all chains together; equilibration_ps: per chain,
            discarded; save_every_ps: between scored frames.

    Returns:
        ``ValidationResult`` (``forcefield_files`` empty: the System was given).
    """
    import jax

    from timemachine.fitting.loss import target_vector

    t_start = time.perf_counter()
    dt = integrator.dt
    save_every = max(1, int(round(save_every_ps / dt)))
    saves = max(n_blocks, int(round(time_ns * 1000.0 / n_seeds / (save_every * dt))))
    equil = int(round(equilibration_ps / dt / save_every)) * save_every
    tv = target_vector(targets)
    chains = sampler.chains(system, integrator, n_seeds, save_every, first_replica, params)
    theta = system.resolve_params(params)
    t_dyn = time.perf_counter()
    chains.decorrelate(theta, equil)
    frames = chains.sample(theta, saves * save_every).x
    t_dyn = time.perf_counter() - t_dyn
    obs = jax.jit(jax.vmap(tv.observable))
    values = np.concatenate([np.asarray(obs(f)) for f in frames])
    if not np.isfinite(values).all():
        raise SimulationError("an observable is not finite on some frame")
    chain_of = np.repeat(np.arange(n_seeds), saves)
    names = [t.name for t in targets]
    mean, stderr, chi2, chi2n, chi2n_se, groups = _statistics(
        values, chain_of, n_blocks, tv.value, tv.uncertainty, tv.slices, names
    )
    prod_ns = n_seeds * saves * save_every * dt / 1000.0
    all_ns = prod_ns + n_seeds * equil * dt / 1000.0
    return ValidationResult(
        labels=tv.labels, mean=mean, stderr=stderr, value=np.asarray(tv.value),
        uncertainty=np.asarray(tv.uncertainty), chi2=chi2, chi2_per_n=chi2n,
        chi2_per_n_stderr=chi2n_se, groups=groups, n_frames=int(values.shape[0]),
        n_chains=n_seeds, n_blocks=n_blocks, simulated_ns=prod_ns,
        equilibration_ps=float(equil * dt), wall_s=time.perf_counter() - t_start,
        ns_per_day=all_ns / t_dyn * 86400.0 if t_dyn > 0 else float("inf"),
        platform=sampler.platform, forcefield_files=(),
        seeds=tuple(range(first_replica, first_replica + n_seeds)),
        settings={"temperature_K": float(integrator.temperature),
                  "friction_per_ps": float(integrator.friction), "dt_ps": float(dt),
                  "save_every_ps": float(save_every * dt),
                  "nonbonded_method": "the OpenMM System's"},
        values=values, chain=chain_of,
    )  # fmt: skip
