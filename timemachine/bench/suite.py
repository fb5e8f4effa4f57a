"""The benchmark suite: settings (full, quick) and the run that fills one result dict."""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import jax

from timemachine.errors import InputError

__all__ = ["Settings", "FULL", "QUICK", "check_settings", "environment", "run_suite"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the suite runs.

    Attributes:
      plain_md: {case: n_steps} timed per engine.
      openmm_platforms: OpenMM platforms to time (those missing here are skipped);
        None: every one this machine has.
      derivatives: ((case, P, n_steps), ...) dx/dθ comparisons.
      derivative_methods: names from ``derivatives.METHODS``.
      isolate: run each derivative method in its own subprocess (per-method peak memory).
      scaling_p_case, scaling_p: the case and the P values of the P scan (empty: skipped).
      scaling_n_cases, scaling_n_p: the cases of the N scan at fixed P (empty: skipped).
      scaling_steps: steps per timed sensitivity run; plain_steps: per plain run.
      memory_case, memory_p: (N, P) of the memory table come from this case and P.
      temperature K, friction 1/ps, dt ps, seed: the Langevin settings everywhere.
      agreement_steps: noise-free steps for the ours-vs-OpenMM-Reference trajectory check.
      openmm_budget_s: seconds one timed OpenMM run (and the agreement check) may take;
        slower engines (Reference with the CustomGBForce on thousands of atoms) time fewer
        steps, and the rows say how many (``plain_md.bench_openmm``).
      repeats: every timing is the best of this many runs (the machine may be shared).
      profile: ((case, P), ...) where the time of a sensitivity step goes (``profile``).
    """

    plain_md: dict
    derivatives: tuple
    derivative_methods: tuple = ("timemachine", "openmm-fd", "jaxmd-forward", "reverse")
    openmm_platforms: tuple | None = None
    isolate: bool = True
    scaling_p_case: str = "villin-vacuum"
    scaling_p: tuple = (1, 10, 30, 60, 100, 200)
    scaling_n_cases: tuple = ("trialanine-obc2", "villin-obc2", "peptide2k-obc2")
    scaling_n_p: int = 10
    scaling_steps: int = 20
    plain_steps: int = 50
    memory_case: str = "villin-vacuum"
    memory_p: int = 60
    temperature: float = 300.0
    friction: float = 1.0
    dt: float = 0.001
    seed: int = 0
    agreement_steps: int = 20
    openmm_budget_s: float = 30.0
    repeats: int = 3
    profile: tuple = (("villin-vacuum", 60), ("villin-obc2", 60))


FULL = Settings(
    plain_md={
        "trialanine-vacuum": 2000,
        "trialanine-obc2": 2000,
        "villin-vacuum": 200,
        "villin-obc2": 200,
        "peptide2k-obc2": 20,
    },
    derivatives=(("villin-vacuum", 60, 50), ("trialanine-obc2", 18, 200)),
)

QUICK = Settings(
    plain_md={
        "trialanine-vacuum": 500,
        "trialanine-obc2": 500,
        "villin-vacuum": 50,
        "villin-obc2": 30,
    },
    derivatives=(("villin-vacuum", 60, 10),),
    scaling_p_case="trialanine-obc2",
    scaling_p=(1, 10, 40),
    scaling_n_cases=(),
    scaling_steps=20,
    plain_steps=100,
    profile=(("villin-vacuum", 60),),
)


def environment() -> dict:
    """Machine, library versions and accelerators: JAX devices, OpenMM platforms, and
    whether timemachine's CUDA backend can run (with the reason when it cannot)."""
    import openmm

    from timemachine.bench.plain_md import openmm_platforms

    cuda_backend = {"available": False}
    try:
        from timemachine.backends import check_backend

        check_backend("cuda")
        cuda_backend["available"] = True
    except InputError as exc:
        cuda_backend["reason"] = str(exc)
    from importlib.metadata import PackageNotFoundError, version

    try:  # importing jax_md itself takes seconds; the worker that needs it imports it
        jax_md_version = version("jax-md")
    except PackageNotFoundError:
        jax_md_version = None
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_md": jax_md_version,
        "openmm": openmm.__version__,
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "gpu": any(d.platform == "gpu" for d in jax.devices()),
        "openmm_platforms": openmm_platforms(),
        "cuda_backend": cuda_backend,
    }


def _integrator(settings):
    import timemachine as tm

    return tm.LangevinIntegrator(
        settings.temperature, settings.friction, settings.dt, settings.seed
    )


def run_plain_md(settings: Settings, log=print) -> list[dict]:
    from timemachine.bench import plain_md
    from timemachine.bench.systems import load_case

    integrator = _integrator(settings)
    available = plain_md.openmm_platforms()
    wanted = available if settings.openmm_platforms is None else settings.openmm_platforms
    rows = []
    for name, n_steps in settings.plain_md.items():
        case = load_case(name)
        log(f"plain MD: {name} ({case.n_atoms} atoms), {n_steps} steps")
        ours = plain_md.bench_ours(case, integrator, n_steps, settings.repeats)
        ours.pop("final_x")
        ours["max_dx_vs_reference_nm"], ours["agreement_steps"] = plain_md.reference_agreement(
            case, integrator, settings.agreement_steps, settings.openmm_budget_s
        )
        case_rows = [ours]
        if any(d.platform == "gpu" for d in jax.devices()):
            with jax.default_device(jax.devices("cpu")[0]):
                cpu = plain_md.bench_ours(case, integrator, n_steps, settings.repeats)
            cpu.pop("final_x")
            case_rows.append(cpu)
        for p in wanted:
            if p not in available:
                continue
            case_rows.append(
                plain_md.bench_openmm(
                    case,
                    p,
                    integrator,
                    n_steps,
                    repeats=settings.repeats,
                    budget_s=settings.openmm_budget_s,
                )
            )
            if case.solvent is not None:  # the same OBC2 energy through OpenMM's own force
                native = plain_md.bench_openmm(
                    case,
                    p,
                    integrator,
                    n_steps,
                    repeats=settings.repeats,
                    native_gb=True,
                    budget_s=settings.openmm_budget_s,
                )
                if native is not None:
                    case_rows.append(native)
        for row in case_rows:
            row["ratio_to_timemachine"] = row["us_per_step"] / ours["us_per_step"]
            rows.append({"case": name, "n_atoms": case.n_atoms, **row})
    return rows


def run_derivatives(settings: Settings, log=print) -> list[dict]:
    from timemachine.bench.derivatives import DerivativeSettings, run_methods

    records = []
    for case, n_params, n_steps in settings.derivatives:
        log(
            f"dx/dθ: {case}, P = {n_params}, {n_steps} steps: "
            f"{', '.join(settings.derivative_methods)}"
        )
        ds = DerivativeSettings(
            case,
            n_params,
            n_steps,
            settings.temperature,
            settings.friction,
            settings.dt,
            settings.seed,
            repeats=settings.repeats,
        )
        records.extend(run_methods(ds, settings.derivative_methods, isolate=settings.isolate))
    return records


def run_scaling(settings: Settings, log=print) -> dict:
    from timemachine.bench import scaling
    from timemachine.bench.systems import load_case

    integrator = _integrator(settings)
    out = {"in_p": [], "in_n": []}
    if settings.scaling_p:
        case = load_case(settings.scaling_p_case)
        log(f"scaling in P: {case.name}, P = {settings.scaling_p}")
        out["in_p"] = scaling.scaling_in_p(
            case, integrator, settings.scaling_p, settings.scaling_steps, settings.plain_steps
        )
    if settings.scaling_n_cases:
        log(f"scaling in N: {settings.scaling_n_cases}, P = {settings.scaling_n_p}")
        cases = [load_case(c) for c in settings.scaling_n_cases]
        out["in_n"] = scaling.scaling_in_n(
            cases, integrator, settings.scaling_n_p, settings.scaling_steps, settings.plain_steps
        )
    n_atoms = load_case(settings.memory_case).n_atoms
    out["memory"] = scaling.memory_table(n_atoms, settings.memory_p, integrator)
    return out


def run_profile(settings: Settings, log=print) -> list[dict]:
    from timemachine.bench.profile import profile_step
    from timemachine.bench.systems import load_case

    integrator = _integrator(settings)
    rows = []
    for name, n_params in settings.profile:
        log(f"profile: {name}, P = {n_params}")
        rows.append(profile_step(load_case(name), n_params, integrator, settings.repeats))
    return rows


def check_settings(settings: Settings) -> None:
    """Fail before any timing if a part of ``settings`` cannot run: an unknown case name,
    or a dx/dθ comparison asking for more torsion barrier types than its case has.

    Raises:
      InputError: naming the setting and the value.
    """
    from timemachine.bench.systems import CASES, load_case

    names = [("plain_md", n) for n in settings.plain_md]
    names += [("derivatives", c) for c, _, _ in settings.derivatives]
    names += [("scaling_n_cases", c) for c in settings.scaling_n_cases]
    names += [("profile", c) for c, _ in settings.profile]
    if settings.scaling_p:
        names.append(("scaling_p_case", settings.scaling_p_case))
    for field, name in names:
        if name not in CASES:
            raise InputError(
                f"Settings.{field}: unknown benchmark system {name!r}; known: {', '.join(CASES)}"
            )
    for name, n_params, _ in settings.derivatives:
        pool = load_case(name, minimise_iterations=0).system.select("torsion/*/k*").size
        if not 1 <= n_params <= pool:
            raise InputError(
                f"Settings.derivatives: P = {n_params} for {name!r}, which has {pool} torsion "
                f"barrier types (torsion/*/k*)"
            )


def run_suite(settings: Settings, log=print, checkpoint=None) -> dict:
    """Run every part of ``settings``; the result dict that ``report`` writes out.

    ``check_settings`` runs first, so a setting that cannot work fails in seconds.
    ``checkpoint(result)``, if given, is called after each part with the parts so far
    (``result["complete"]`` False until the last), so an interrupted run keeps them."""
    check_settings(settings)
    t0 = time.perf_counter()
    result = {
        "schema": "timemachine.bench/1",
        "settings": dataclasses.asdict(settings),
        "environment": environment(),
        "complete": False,
    }
    parts = (
        ("plain_md", run_plain_md),
        ("derivatives", run_derivatives),
        ("scaling", run_scaling),
        ("profile", run_profile),
    )
    for key, part in parts:
        result[key] = part(settings, log)
        result["wall_s"] = time.perf_counter() - t0
        if key == parts[-1][0]:
            result["complete"] = True
        if checkpoint is not None:
            checkpoint(result)
    result["load_average_end"] = list(os.getloadavg())
    return result
