"""Analytic dx/dθ against central finite differences of the same seeded trajectory
(common random numbers): trialanine OBC2 and vacuum, villin, and the FD machinery."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import InputError
from timemachine.integrator import LangevinIntegrator, maxwell_boltzmann_velocities, run
from timemachine.sensitivity import (
    ComparisonTable,
    compare,
    finite_difference,
    plot_comparison,
    simulate,
)
from timemachine.sensitivity.finite_difference import perturbed_runs

MASSES = np.array([1.008, 4.0, 12.011, 15.999])


def oscillator(k=400.0):
    system = tm.System(MASSES, (), (), [])
    return system.add_term(lambda x, p: 0.5 * p[0] * jnp.sum(x * x), ["spring/all/k"], [k])


def x_start(seed=0):
    return np.random.default_rng(seed).normal(scale=0.1, size=(len(MASSES), 3))


def total_rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def trialanine_fixed():
    """Trialanine as ``build_peptide`` makes it: bitwise the same in every process (it seeds
    the ``random`` that OpenMM's Modeller.addHydrogens uses). Chaotic trajectories, and
    where they meet OBC2's kinks, depend on the structure to the last bit."""
    return tm.build_peptide("AAA")


@pytest.fixture(scope="module")
def trialanine_obc2(trialanine_fixed):
    system, x = tm.load_system(
        trialanine_fixed, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2"
    )
    return system, tm.minimize_system(system, x, warn=False)


@pytest.fixture(scope="module")
def trialanine_vacuum(trialanine_fixed):
    system, x = tm.load_system(trialanine_fixed, forcefield=("amber99sbildn.xml",))
    return system, tm.minimize_system(system, x, warn=False)


def test_trialanine_obc2_torsion_sensitivities_match_finite_differences(trialanine_obc2, tmp_path):
    """1,000 steps (1 ps at 1 fs, 300 K, γ = 1/ps) of minimised trialanine in OBC2; all 18
    torsion force constants; central FD with h = 1e-6 (relative): each parameter within
    1e-6 (measured ≤ 6e-8 here).

    Why not a larger h: OBC2 as OpenMM defines it is only C¹. Its descreening integral
    switches branch at r = or_i + sr_j (L = max(or_i, |r - sr_j|)), where the force is
    continuous but the Hessian jumps. x_t(θ) is then C¹ with jumps in d²x/dθ² wherever a
    step lands on such a surface, and a central difference whose interval [θ - h, θ + h]
    contains one is off by O(h · jump) — large, because chaos amplifies second derivatives
    more than first ones. For this structure and seed, torsion/X-CT-CT-X/k3 is off by
    3.1e-5 at h = 1e-5 and 1.9e-5 at h = 3e-6 (its interval straddles a jump), and agrees
    to 4e-9 at h = 1e-6; seeds 2 and 3 agree to ≤ 3e-8 at every h from 1e-5 to 1e-6.
    Round-off at h = 1e-6 is still ≈ 5e-8. Vacuum is smooth: see the h-scan below."""
    system, x0 = trialanine_obc2
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=1)
    traj = simulate(
        system, x0, integrator, 1000, wrt="torsion/*/k*", save_every=100, progress=False
    )
    fd = finite_difference(system, x0, integrator, 1000, wrt="torsion/*/k*", h=1e-6)
    table = compare(traj, fd)
    print(f"\ntrialanine OBC2, 1000 steps, FD h = 1e-6:\n{table}")
    assert isinstance(table, ComparisonTable) and len(table) == 18
    assert [row["name"] for row in table] == list(traj.param_names)
    assert table.max_rel_error <= 1e-6
    assert min(row["fd_norm"] for row in table) > 1e-3  # far from trivially small
    png = plot_comparison(traj, fd, tmp_path / "fd.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_h_scan_falls_as_h_squared_then_rises_with_round_off(trialanine_vacuum):
    """Vacuum trialanine (a smooth energy), 1,000 steps: ‖analytic - FD‖/‖FD‖ over all 18
    torsion k's falls by 100 per decade of h (truncation ∝ h²) from h = 1e-2, reaches its
    minimum at an intermediate h, and rises again (round-off ∝ ε/h) at h = 1e-7."""
    system, x0 = trialanine_vacuum
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=1)
    traj = simulate(
        system, x0, integrator, 1000, wrt="torsion/*/k*", save_every=1000, progress=False
    )
    analytic = traj.dx_dtheta[-1]
    hs = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
    errors = []
    for h in hs:
        fd = finite_difference(system, x0, integrator, 1000, wrt="torsion/*/k*", h=h)
        errors.append(total_rel(analytic, fd.dx_dtheta))
    slopes = [math.log10(errors[i] / errors[i + 1]) for i in range(len(hs) - 1)]
    print("\nh-scan, vacuum trialanine, 1000 steps (h, error, slope per decade):")
    for h, err, slope in zip(hs, errors, slopes + [float("nan")], strict=True):
        print(f"  h = {h:.0e}  error = {err:.3e}  slope = {slope:+.2f}")
    best = int(np.argmin(errors))
    assert 0 < best < len(hs) - 1
    assert all(1.7 < s < 2.3 for s in slopes[:3])  # h = 1e-2 → 1e-5
    assert errors[-1] > 3 * errors[best]
    assert errors[best] < 1e-7


@pytest.mark.slow
def test_villin_torsion_sensitivities_match_finite_differences(villin):
    """Villin headpiece (582 atoms, vacuum, amber99sbildn), 10 torsion types, 200 steps."""
    system, x = tm.load_system(villin, forcefield=("amber99sbildn.xml",))
    x0 = tm.minimize_system(system, x, tolerance=10.0, max_iterations=500, warn=False)
    wrt = system.select("torsion/*/k*")[:10]
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=2)
    traj = simulate(system, x0, integrator, 200, wrt=wrt, save_every=200, progress=False)
    fd = finite_difference(system, x0, integrator, 200, wrt=wrt, h=1e-4)
    table = compare(traj, fd)
    print(f"\nvillin, 200 steps, FD h = 1e-4:\n{table}")
    assert len(table) == 10
    assert table.max_rel_error <= 1e-6


# --------------------------------------------------------------------------- machinery


def test_fd_frames_on_an_oscillator_and_absolute_steps():
    """dx/dk of E = ½k|x|² at every saved frame; relative and absolute h agree."""
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=2.0, dt=0.002, seed=3)
    traj = simulate(
        system, x_start(), integrator, 500, wrt="spring/*", save_every=50, progress=False
    )
    fd = finite_difference(
        system, x_start(), integrator, 500, wrt="spring/*", h=1e-5, save_every=50
    )
    assert fd.dx_dtheta.shape == (10, 1, 4, 3) and not fd.final_only
    np.testing.assert_array_equal(fd.steps, traj.steps)
    table = compare(traj, fd)
    assert table.max_rel_error < 1e-8
    assert abs(fd.h[0] - 400.0 * 1e-5) < 1e-12  # h_p = h |θ_p|
    absolute = finite_difference(
        system, x_start(), integrator, 500, wrt="spring/*", h=np.array([4e-3]), save_every=50
    )
    assert total_rel(absolute.dx_dtheta, fd.dx_dtheta) < 1e-7
    final = finite_difference(system, x_start(), integrator, 500, wrt=[0], h=1e-5)
    assert final.final_only and final.dx_dtheta.shape == (1, 4, 3)
    np.testing.assert_allclose(final.dx_dtheta, fd.dx_dtheta[-1], rtol=1e-12)
    # an array in fd's layout compares as well as a trajectory
    assert compare(traj.dx_dtheta[-1], final).max_rel_error < 1e-8
    assert "| spring/all/k |" in str(compare(traj, final))


def test_perturbed_runs_are_the_integrators_runs():
    """At θ itself each FD run is ``integrator.run`` with the same seed and v0."""
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=2.0, dt=0.002, seed=4)
    v0 = maxwell_boltzmann_velocities(MASSES, 300.0, seed=4)
    theta = np.asarray(system.params)
    xs = perturbed_runs(system, np.stack([theta, theta]), x_start(), v0, integrator, 300, 100)
    grad = jax.grad(system.energy_fn())
    ref = run(lambda y: grad(y, theta), MASSES, x_start(), integrator, 300, v0=v0, save_every=100)
    assert xs.shape == (2, 3, 4, 3)
    np.testing.assert_allclose(xs[0], np.asarray(ref.x), rtol=0, atol=1e-13)
    np.testing.assert_array_equal(xs[0], xs[1])


def test_fd_and_compare_reject_bad_input():
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=2.0, dt=0.002, seed=4)
    with pytest.raises(InputError, match="h must be a finite number > 0"):
        finite_difference(system, x_start(), integrator, 10, wrt=[0], h=-1e-4)
    with pytest.raises(InputError, match=r"expected shape \(1,\)"):
        finite_difference(system, x_start(), integrator, 10, wrt=[0], h=np.ones(3))
    with pytest.raises(InputError, match="multiple of save_every"):
        finite_difference(system, x_start(), integrator, 10, wrt=[0], save_every=3)
    with pytest.raises(InputError, match="matches none"):
        finite_difference(system, x_start(), integrator, 10, wrt="charge/*")
    fd = finite_difference(system, x_start(), integrator, 20, wrt=[0])
    traj = simulate(system, x_start(), integrator, 10, wrt=[0], save_every=10, progress=False)
    with pytest.raises(InputError, match=r"no frame at step\(s\) \[20\]"):
        compare(traj, fd)
    with pytest.raises(InputError, match="has shape"):
        compare(np.zeros((2, 4, 3)), fd)
