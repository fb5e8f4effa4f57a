"""Langevin dynamics of a real peptide under amber99sbildn + OBC2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
from timemachine.integrator import LangevinIntegrator, run


@pytest.fixture(scope="module")
def trialanine_obc2(trialanine):
    system, x = tm.load_system(
        trialanine, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2"
    )
    x = tm.minimize_system(system, x)
    return system, x


def test_minimize_lowers_energy_to_a_stationary_point(trialanine_obc2, trialanine):
    system, x_min = trialanine_obc2
    _, x0 = tm.load_system(trialanine, implicit_solvent="obc2")
    assert float(system.energy(x_min)) < float(system.energy(x0)) - 10.0
    rms = float(jnp.sqrt(jnp.mean(system.gradient(x_min) ** 2)))
    assert rms < 1e-3  # kJ/mol/nm, the default tolerance


def test_minimize_system_params_and_warning(trialanine_obc2):
    """``minimize_system`` relaxes at the θ it is given, and ``warn=False`` silences only
    the not-converged warning."""
    import warnings

    system, x_min = trialanine_obc2
    theta = np.asarray(system.params).copy()
    theta[system.select("torsion/*/k*")] *= 3.0
    x_other = tm.minimize_system(system, x_min, params=theta)
    rms = float(jnp.sqrt(jnp.mean(system.gradient(x_other, jnp.asarray(theta)) ** 2)))
    assert rms < 1e-3 and np.abs(x_other - x_min).max() > 1e-3
    with pytest.warns(RuntimeWarning, match="best RMS force"):
        tm.minimize_system(system, x_other, max_iterations=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tm.minimize_system(system, x_other, max_iterations=1, warn=False)


def test_trialanine_obc2_samples_the_target_temperature(trialanine_obc2):
    """50 ps at 1 fs with γ = 5/ps: mean kinetic temperature within 2 % of 300 K."""
    system, x = trialanine_obc2
    theta = jnp.asarray(system.params)
    grad = jax.grad(system.energy_fn())

    def gradient_fn(y):
        return grad(y, theta)

    integrator = LangevinIntegrator(temperature=300.0, friction=5.0, dt=0.001, seed=11)
    equil = run(gradient_fn, system.masses, x, integrator, 5_000, save_every=1000)
    prod = run(gradient_fn, system.masses, equil.state, integrator, 50_000, save_every=10)
    temps = np.asarray(prod.temperature)
    mean_t = temps.mean()
    print(f"trialanine OBC2 50 ps: <T_kin> = {mean_t:.2f} K (target 300 K)")
    assert abs(mean_t - 300.0) / 300.0 < 0.02
    assert np.isfinite(np.asarray(prod.x)).all()


def test_energy_drift_without_friction_or_noise(trialanine_obc2):
    """γ = 0 and T = 0 turn the step into velocity Verlet (leapfrog): total energy only
    fluctuates by the integrator's O(dt²) error and does not drift. Reported at dt = 1 fs;
    halving dt must shrink the fluctuation about fourfold (second order)."""
    system, x = trialanine_obc2
    theta = jnp.asarray(system.params)
    energy = system.energy_fn()
    grad = jax.grad(energy)
    masses = system.masses
    v0 = tm.integrator.maxwell_boltzmann_velocities(masses, 300.0, seed=5)

    def nve(dt, n_steps):
        integrator = LangevinIntegrator(temperature=0.0, friction=0.0, dt=dt, seed=0)
        traj = run(
            lambda y: grad(y, theta),
            masses,
            x,
            integrator,
            n_steps,
            v0=v0,
            save_every=n_steps // 100,
            energy_fn=lambda y: energy(y, theta),
        )
        total = np.asarray(traj.potential_energy) + np.asarray(traj.kinetic_energy)
        return total, float(np.mean(traj.kinetic_energy))

    total, mean_ke = nve(0.001, 10_000)
    drift = (total[-1] - total[0]) / 10.0  # kJ/mol per ps
    spread = total.max() - total.min()
    half, _ = nve(0.0005, 10_000)  # same 5 ps at half the step
    spread_half = half.max() - half.min()
    print(
        f"NVE 10 ps, dt = 1 fs, trialanine OBC2: drift {drift:+.4f} kJ/mol/ps, "
        f"fluctuation {spread:.4f} kJ/mol (dt = 0.5 fs: {spread_half:.4f}), "
        f"<KE> {mean_ke:.2f} kJ/mol"
    )
    assert abs(drift) < 0.1
    assert spread < 0.05 * mean_ke
    spread_5ps = total[:51].max() - total[:51].min()  # frames every 0.1 ps
    print(f"first 5 ps: fluctuation {spread_5ps:.4f} kJ/mol, ratio {spread_5ps / spread_half:.2f}")
    assert 2.5 < spread_5ps / spread_half < 8.0
