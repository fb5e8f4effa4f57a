"""Smoke test of the benchmark suite on tiny settings: the JSON schema, the report files,
and that each method's relative error is taken against timemachine's own dx/dθ."""

import dataclasses
import json
import os

import numpy as np
import pytest

from timemachine.bench import Settings, derivatives, run_suite, write_report
from timemachine.bench.derivatives import DerivativeSettings, relative_error, run_method
from timemachine.bench.systems import load_case, torsion_k_map

TINY = Settings(
    plain_md={"trialanine-vacuum": 20},
    openmm_platforms=("Reference", "CPU"),
    derivatives=(("trialanine-vacuum", 3, 20),),
    derivative_methods=("timemachine", "openmm-fd"),
    isolate=False,
    scaling_p=(),
    scaling_n_cases=(),
    memory_case="trialanine-vacuum",
    memory_p=3,
    agreement_steps=20,
    repeats=1,
    profile=(),  # compiles a dozen programs; its arithmetic is tested on a fixed result below
)


# about 30 s of CPU (mostly XLA compiles); longer in wall time when the 2 cores are shared
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The tiny suite, with each dx/dθ method's raw result kept on the side."""
    out = tmp_path_factory.mktemp("bench")
    arrays = {}

    def keep(settings, method):
        record, value = run_method(settings, method)
        arrays[method] = value
        return record, value

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(derivatives, "run_method", keep)
        result = run_suite(TINY, log=lambda msg: None)
    paths = write_report(result, out, out / "tiny.json")
    with open(paths["json"]) as f:
        data = json.load(f)
    return result, paths, data, arrays


def test_json_schema_and_files(suite):
    _, paths, data, _ = suite
    assert data["schema"] == "timemachine.bench/1"
    assert set(data) >= {"settings", "environment", "plain_md", "derivatives", "scaling", "goals"}
    assert data["environment"]["cpu_count"] >= 1
    engines = {r["engine"] for r in data["plain_md"]}
    assert engines == {"timemachine (JAX)", "OpenMM Reference", "OpenMM CPU"}
    for r in data["plain_md"]:
        assert r["case"] == "trialanine-vacuum" and r["n_atoms"] == 33
        assert r["us_per_step"] > 0 and np.isfinite(r["ratio_to_timemachine"])
    for g in data["goals"]:
        assert set(g) == {"goal", "measured", "target", "met", "detail"}
    trialanine_goal = next(g for g in data["goals"] if g["goal"].startswith("trialanine vacuum"))
    assert trialanine_goal["met"] == (trialanine_goal["measured"] <= 2.0)
    mem = data["scaling"]["memory"]
    assert [m["method"] for m in mem][0] == "exact"
    for m in mem:  # the formula matches what the propagation state really holds
        assert m["allocated_bytes"] == m["expected_bytes"]
    with open(paths["markdown"]) as f:
        text = f.read()
    assert "| system | atoms | engine |" in text and "openmm-fd" in text
    assert {os.path.basename(p) for p in paths["plots"]} >= {"plain_md.png", "derivatives.png"}


def test_same_trajectory_as_openmm_reference(suite):
    """Noise-free, ours and OpenMM's LangevinIntegrator follow the same trajectory from the
    same start: the timings compare like with like."""
    result, _, _, _ = suite
    ours = next(r for r in result["plain_md"] if r["engine"] == "timemachine (JAX)")
    # OpenMM 8's LangevinIntegrator is not bitwise eqs. 3-4 (2e-6 nm apart after one
    # noise-free step); a different force field or T/γ/δt would be far further apart
    assert ours["max_dx_vs_reference_nm"] < 1e-4
    assert ours["agreement_steps"] == 20  # 20 trialanine steps fit in the time budget


def test_slow_engines_time_fewer_steps():
    from timemachine.bench.plain_md import steps_within

    assert steps_within(0.001, 200, 30.0) == 200
    assert steps_within(1.5, 200, 30.0) == 20  # 20 steps of 1.5 s fill the 30 s budget
    assert steps_within(40.0, 200, 30.0) == 2  # never fewer than 2
    assert steps_within(40.0, 1, 30.0) == 1  # nor more than asked


def test_relative_errors_against_ours(suite):
    result, _, _, _ = suite
    by = {r["method"]: r for r in result["derivatives"]}
    assert by["timemachine"]["rel_error_vs_timemachine"] == 0.0
    assert by["timemachine"]["speedup_of_timemachine"] == 1.0
    # our dx/dθ against central differences of our own float64 trajectory: an
    # independent check that does not involve OpenMM
    assert by["timemachine"]["own_fd_rows"] == [0, 2]
    assert by["timemachine"]["own_fd_rel_error"] < 1e-6
    fd = by["openmm-fd"]
    assert fd["P"] == 3 and fd["trajectories"] == 6
    # FD in OpenMM's mixed precision differentiates the same trajectory: small, not zero
    assert 0.0 < fd["rel_error_vs_timemachine"] < 1e-2
    assert fd["speedup_of_timemachine"] == pytest.approx(fd["time_s"] / by["timemachine"]["time_s"])


def test_fd_error_is_taken_against_our_dx_dtheta(suite):
    result, _, _, arrays = suite
    ours, fd = arrays["timemachine"], arrays["openmm-fd"]
    assert ours.shape == fd.shape == (3, 33, 3)
    assert np.abs(ours).max() > 0
    record = next(r for r in result["derivatives"] if r["method"] == "openmm-fd")
    expected = np.linalg.norm(fd - ours) / np.linalg.norm(ours)
    assert record["rel_error_vs_timemachine"] == pytest.approx(expected, rel=1e-12)
    assert relative_error(ours, ours) == 0.0


def test_torsion_map_covers_every_openmm_torsion():
    import openmm as mm

    case = load_case("trialanine-vacuum")
    force = next(
        f for f in case.openmm_system.getForces() if isinstance(f, mm.PeriodicTorsionForce)
    )
    keys = [tuple(force.getTorsionParameters(t)[:5]) for t in range(force.getNumTorsions())]
    wrt = case.system.select("torsion/*/k*")
    owners = torsion_k_map(case.system, keys, wrt)
    # every barrier type owns at least one entry, and the entries carry its value
    theta = np.asarray(case.system.params)
    for p, idx in zip(wrt, owners, strict=True):
        assert idx.size > 0
        for t in idx:
            k = force.getTorsionParameters(int(t))[6].value_in_unit(
                __import__("openmm.unit").unit.kilojoule_per_mole
            )
            assert k == pytest.approx(theta[p], rel=1e-12)


def test_unknown_case_is_named():
    from timemachine.errors import InputError

    with pytest.raises(InputError, match="villin-water"):
        load_case("villin-water")
    with pytest.raises(InputError, match="n_params = 999"):
        run_method(
            dataclasses.replace(DerivativeSettings("trialanine-vacuum", 999, 5)), "timemachine"
        )


def test_native_gbsaobc_force_is_the_same_energy():
    """The OpenMM row with GBSAOBCForce times the same OBC2 energy as obc2.xml's
    CustomGBForce (which is what load_system reproduces)."""
    import openmm as mm
    import openmm.unit as unit

    import timemachine as tm
    from timemachine.bench.plain_md import native_gb_system
    from timemachine.io.openmm_import import openmm_system_for

    topology, x = tm.build_peptide("AAA")
    custom = openmm_system_for(topology, implicit_solvent="obc2")
    native = native_gb_system(custom)
    kinds = [type(f).__name__ for f in native.getForces()]
    assert "GBSAOBCForce" in kinds and "CustomGBForce" not in kinds
    assert native_gb_system(openmm_system_for(topology)) is None  # vacuum: nothing to swap

    def energy(system):
        context = mm.Context(
            system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference")
        )
        context.setPositions(np.asarray(x) * unit.nanometer)
        state = context.getState(getEnergy=True)
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    # the GB part is large (a wrong radius offset or scale would move it by kJ/mol), and
    # the swap reproduces it
    vacuum = energy(openmm_system_for(topology))
    assert abs(energy(custom) - vacuum) > 10.0
    assert energy(native) == pytest.approx(energy(custom), abs=1e-3)


def test_goals_arithmetic_and_profile_note():
    """goals() on a fixed result: ratios, thresholds, and the profile note of a miss."""
    from timemachine.bench import goals

    def plain(case, engine, us, cpu):
        return {"case": case, "engine": engine, "us_per_step": us, "cpu_us_per_step": cpu}

    result = {
        "plain_md": [
            plain("villin-vacuum", "timemachine (JAX)", 9000.0, 9000.0),
            plain("villin-vacuum", "OpenMM Reference", 10000.0, 10000.0),
            plain("villin-vacuum", "OpenMM CPU", 3000.0, 6000.0),
        ],
        "derivatives": [
            {
                "method": "timemachine",
                "case": "villin-vacuum",
                "P": 60,
                "n_steps": 10,
                "time_s": 1.0,
                "cpu_s": 1.0,
                "own_fd_rel_error": 1e-9,
            },
            {
                "method": "openmm-fd",
                "case": "villin-vacuum",
                "P": 60,
                "n_steps": 10,
                "time_s": 4.0,
                "cpu_s": 8.0,
                "speedup_of_timemachine": 4.0,
                "rel_error_vs_timemachine": 1e-3,
            },
        ],
        "profile": [
            {
                "case": "villin-vacuum",
                "N": 582,
                "P": 60,
                "zeta_in_gradients": 4.0,
                "step_in_gradients": 10.0,
                "overhead_ms": 55.0,
                "dominant_term": "nonbonded",
                "ms": {
                    "gradient": 10.0,
                    "gradient/nonbonded": 9.0,
                    "zeta": 40.0,
                    "gradient_and_zeta": 45.0,
                    "plain_step": 9.0,
                    "sensitivity_step": 100.0,
                },
            },
        ],
    }
    by = {g["goal"]: g for g in goals(result)}
    ref = by["villin vacuum faster than OpenMM Reference"]
    assert ref["measured"] == pytest.approx(0.9) and ref["met"] is True
    cpu = by["villin vacuum within 1.5× of OpenMM CPU"]
    assert cpu["measured"] == pytest.approx(3.0) and cpu["met"] is False
    assert "CPU-time ratio 1.5" in cpu["detail"] and "nonbonded 9 ms" in cpu["detail"]
    fd = by["villin dx/dθ ≥ 5× faster than openmm-fd"]
    assert fd["measured"] == 4.0 and fd["met"] is False
    # 2P OpenMM CPU steps of 3 ms = 360 ms per step of FD work; 5× needs ours ≤ 72 ms
    assert "our step ≤ 72 ms" in fd["detail"] and "own float64 FD 1.0e-09" in fd["detail"]
    assert by["villin OBC2 faster than OpenMM CPU"]["met"] is None  # not run


def test_shipped_settings_can_run_and_bad_ones_fail_at_once():
    """FULL once asked trialanine for P = 20 of its 18 torsion types and died 25 min in."""
    from timemachine.bench import FULL, QUICK, check_settings
    from timemachine.errors import InputError

    check_settings(FULL)
    check_settings(QUICK)
    too_many = dataclasses.replace(QUICK, derivatives=(("trialanine-obc2", 19, 10),))
    with pytest.raises(InputError, match=r"P = 19 for 'trialanine-obc2', which has 18"):
        check_settings(too_many)
    unknown = dataclasses.replace(QUICK, profile=(("villin-water", 60),))
    with pytest.raises(InputError, match=r"Settings.profile: unknown benchmark system"):
        check_settings(unknown)


def test_worker_peak_memory_is_its_own():
    """A dx/dθ worker subprocess reports its own high-water mark, not its parent's (Linux
    carries ru_maxrss across fork and exec, so a large parent would mask every worker)."""
    import subprocess
    import sys

    ballast = np.ones(600 * 2**20 // 8)  # 600 MiB, touched
    parent = derivatives._maxrss_bytes()
    code = "from timemachine.bench.derivatives import _maxrss_bytes as m; print(m())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)  # fmt: skip
    assert ballast.sum() > 0 and parent > 600 * 2**20
    assert child < parent - 300 * 2**20


def test_step_cost_cancels_the_cost_of_a_call(monkeypatch):
    """Per-step cost from runs of n and 2n steps: a fixed cost per call (argument checks,
    the saved frame) drops out. Driven by a fake clock, so the arithmetic is exact."""
    import types

    from timemachine.bench import plain_md, scaling

    clock = {"t": 0.0}
    fake = types.SimpleNamespace(perf_counter=lambda: clock["t"], process_time=lambda: clock["t"])
    monkeypatch.setattr(plain_md, "time", fake)

    def run(n):  # 50 ms per call and 2 ms per step
        clock["t"] += 0.050 + 0.002 * n

    wall, cpu = scaling._per_step(run, 20, repeats=2)
    assert wall == pytest.approx(0.002, rel=1e-9) and cpu == pytest.approx(0.002, rel=1e-9)
    # one call over n steps alone would have said 4.5 ms per step
