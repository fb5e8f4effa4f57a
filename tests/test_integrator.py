"""Tests of timemachine.integrator: coefficients, noise, the step, runs, minimisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timemachine.errors import InputError, SimulationError, TimemachineError
from timemachine.integrator import (
    LangevinIntegrator,
    LangevinState,
    kinetic_energy,
    kinetic_temperature,
    langevin_init,
    langevin_step,
    maxwell_boltzmann_velocities,
    minimize,
    noise,
    on_step_kinetic_energy,
    run,
)

KB = 0.008314462618  # kJ/(mol K), written out so the test does not reuse the package's


def harmonic(k):
    """E = k/2 |x|^2 summed over atoms, and its gradient k x."""

    def energy(x):
        return 0.5 * k * jnp.sum(x * x)

    def gradient(x):
        return k * x

    return energy, gradient


# --------------------------------------------------------------------------- coefficients


def test_coefficients_match_closed_forms_with_friction():
    masses = [1.008, 12.011, 15.999, 32.06]
    temperature, gamma, dt = 310.0, 2.5, 0.002
    coeffs = LangevinIntegrator(temperature, gamma, dt, seed=3).coefficients(masses)
    a = math.exp(-gamma * dt)
    b = [(1.0 - a) / (gamma * m) for m in masses]
    c = [math.sqrt(KB * temperature * (1.0 - a * a) / m) for m in masses]
    assert float(coeffs.a) == pytest.approx(a, rel=1e-14)
    np.testing.assert_allclose(np.asarray(coeffs.b), b, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(coeffs.c), c, rtol=1e-12)
    assert float(coeffs.dt) == dt
    assert coeffs.b.shape == (4,) and coeffs.c.shape == (4,)
    assert coeffs.b.dtype == jnp.float64


def test_coefficients_without_friction_are_plain_leapfrog():
    masses = [1.0, 4.0, 39.948]
    dt = 0.001
    coeffs = LangevinIntegrator(temperature=300.0, friction=0.0, dt=dt).coefficients(masses)
    assert float(coeffs.a) == 1.0
    np.testing.assert_allclose(np.asarray(coeffs.b), [dt / m for m in masses], rtol=1e-15)
    # 1 - a^2 = 0: no noise without friction, whatever the temperature.
    np.testing.assert_array_equal(np.asarray(coeffs.c), 0.0)


@pytest.mark.parametrize(
    "masses, match",
    [
        ([1.0, -2.0, 3.0], r"masses\[1\] = -2\.0"),
        ([1.0, 2.0, 0.0], r"masses\[2\] = 0\.0"),
        ([float("nan"), 1.0], r"masses\[0\] = nan"),
        ([1.0, float("inf")], r"masses\[1\] = inf"),
        ([[1.0, 2.0], [3.0, 4.0]], r"1-D.*shape \(2, 2\)"),
        ([], r"shape \(0,\)"),
    ],
)
def test_bad_masses_raise_input_error(masses, match):
    with pytest.raises(InputError, match=match) as info:
        LangevinIntegrator().coefficients(masses)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TimemachineError)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dt": 0.0}, r"dt.*> 0.*got 0\.0"),
        ({"dt": -0.001}, r"dt.*got -0\.001"),
        ({"friction": -1.0}, r"friction.*got -1\.0"),
        ({"temperature": -5.0}, r"temperature.*got -5\.0"),
        ({"temperature": float("nan")}, r"temperature.*got nan"),
        ({"dt": float("inf")}, r"dt.*got inf"),
        ({"temperature": "300"}, r"temperature.*'300'"),
        ({"seed": -1}, r"seed.*got -1"),
        ({"seed": 1.5}, r"seed.*1\.5"),
    ],
)
def test_bad_integrator_settings_raise_input_error(kwargs, match):
    with pytest.raises(InputError, match=match) as info:
        LangevinIntegrator(**kwargs)
    assert isinstance(info.value, ValueError)


def test_zero_temperature_and_friction_are_allowed():
    integrator = LangevinIntegrator(temperature=0, friction=0, dt=0.001)
    assert integrator.temperature == 0.0 and isinstance(integrator.temperature, float)
    assert hash(integrator) == hash(LangevinIntegrator(0.0, 0.0, 0.001))


# --------------------------------------------------------------------------- noise


def test_noise_is_a_pure_function_of_seed_step_replica():
    n1 = np.asarray(noise(7, 12, 5, replica=2))
    n2 = np.asarray(noise(7, 12, 5, replica=2))
    assert n1.shape == (5, 3) and n1.dtype == np.float64
    assert n1.tobytes() == n2.tobytes()
    # Traced step/replica/seed give the same bits as concrete ones.
    jitted = jax.jit(noise, static_argnums=2)
    assert np.asarray(jitted(7, 12, 5, 2)).tobytes() == n1.tobytes()
    for other in (noise(7, 13, 5, 2), noise(7, 12, 5, 3), noise(8, 12, 5, 2)):
        assert not np.any(np.asarray(other) == n1)


def test_noise_vmaps_over_steps_and_replicas():
    steps = jnp.arange(4)
    by_step = jax.vmap(lambda t: noise(3, t, 6, 1))(steps)
    for t in range(4):
        np.testing.assert_array_equal(by_step[t], noise(3, t, 6, 1))
    by_replica = jax.vmap(lambda r: noise(3, 9, 6, r))(jnp.arange(3))
    for r in range(3):
        np.testing.assert_array_equal(by_replica[r], noise(3, 9, 6, r))


def test_noise_is_standard_normal():
    n = np.asarray(noise(0, 0, 100_000))
    assert abs(n.mean()) < 0.01
    assert n.var() == pytest.approx(1.0, abs=0.01)


def test_maxwell_boltzmann_stream_is_not_the_noise_stream():
    masses = np.ones(50)
    v = np.asarray(maxwell_boltzmann_velocities(masses, 300.0, seed=1))
    z = v / math.sqrt(KB * 300.0)
    for t in range(3):
        assert not np.allclose(z, noise(1, t, 50))
    other_replica = maxwell_boltzmann_velocities(masses, 300.0, seed=1, replica=1)
    assert not np.allclose(v, other_replica)
    assert np.asarray(maxwell_boltzmann_velocities(masses, 300.0, seed=1)).tobytes() == v.tobytes()


def test_maxwell_boltzmann_variance_is_kt_over_m():
    n_atoms = 300_000
    masses = np.array([1.008, 12.011, 15.999])[np.arange(n_atoms) % 3]
    temperature = 310.0
    v = np.asarray(maxwell_boltzmann_velocities(masses, temperature, seed=11))
    assert v.shape == (n_atoms, 3)
    for m in (1.008, 12.011, 15.999):
        sel = v[masses == m]
        for axis in range(3):
            variance = np.mean(sel[:, axis] ** 2)
            assert variance == pytest.approx(KB * temperature / m, rel=0.01)
    # kT / m scaling across masses, pooled: 2 K / (3 N kB) is T.
    assert float(kinetic_temperature(v, masses)) == pytest.approx(temperature, rel=0.005)
    assert not np.any(maxwell_boltzmann_velocities(masses[:10], 0.0, seed=11))


# --------------------------------------------------------------------------- step and run


def test_step_matches_equations_3_and_4_by_hand():
    masses = np.array([1.0, 2.0, 3.0])
    integrator = LangevinIntegrator(temperature=300.0, friction=2.0, dt=0.002, seed=5)
    coeffs = integrator.coefficients(masses)
    rng = np.random.default_rng(0)
    x, v = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    state = LangevinState(jnp.asarray(x), jnp.asarray(v), jnp.asarray(17))
    k = 50.0
    new = langevin_step(harmonic(k)[1], coeffs, state, 5, replica=4)
    n = np.asarray(noise(5, 17, 3, 4))
    a = math.exp(-2.0 * 0.002)
    b = (1 - a) / (2.0 * masses)
    c = np.sqrt(KB * 300.0 * (1 - a * a) / masses)
    v_expected = a * v - b[:, None] * k * x + c[:, None] * n
    np.testing.assert_allclose(new.v, v_expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(new.x, x + 0.002 * v_expected, rtol=1e-13, atol=1e-15)
    assert int(new.step) == 18


def test_no_friction_no_noise_is_symplectic_euler():
    """gamma = 0, T = 0: v_t = v_{t-1} - dt/m k x_{t-1}; x_t = x_{t-1} + dt v_t."""
    masses = np.array([1.0, 2.5, 7.0, 16.0])
    k, dt, n_steps = 400.0, 0.002, 1000
    rng = np.random.default_rng(1)
    x0, v0 = rng.normal(size=(4, 3)) * 0.1, rng.normal(size=(4, 3))
    energy, gradient = harmonic(k)
    integrator = LangevinIntegrator(temperature=0.0, friction=0.0, dt=dt)
    traj = run(gradient, masses, x0, integrator, n_steps, v0=v0, energy_fn=energy)

    x, v = x0.copy(), v0.copy()
    xs, vs = [], []
    for _ in range(n_steps):
        v = v - (dt / masses)[:, None] * (k * x)
        x = x + dt * v
        xs.append(x)
        vs.append(v)
    np.testing.assert_allclose(traj.x, np.array(xs), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(traj.v, np.array(vs), rtol=1e-11, atol=1e-13)
    np.testing.assert_array_equal(traj.steps, np.arange(1, n_steps + 1))

    # The on-step kinetic energy (velocity Verlet's velocity) keeps E + K conserved to
    # O((omega dt)^2); pairing x_t with K(v_t) alone would fluctuate at O(omega dt).
    total = np.asarray(traj.potential_energy) + np.asarray(traj.kinetic_energy)
    assert np.ptp(total) / total.mean() < 2e-3
    lagged = np.asarray(traj.potential_energy) + np.asarray(kinetic_energy(traj.v, masses))
    assert np.ptp(lagged) / lagged.mean() > 10 * np.ptp(total) / total.mean()


def test_thermostat_reaches_target_temperature():
    """500 independent oscillators, gamma = 5/ps, T = 300 K, omega dt <= 0.063."""
    n_atoms, k, dt, temperature = 500, 1000.0, 0.002, 300.0
    masses = np.array([1.0, 4.0, 12.0, 16.0])[np.arange(n_atoms) % 4]
    energy, gradient = harmonic(k)
    integrator = LangevinIntegrator(temperature=temperature, friction=5.0, dt=dt, seed=2024)
    traj = run(
        gradient,
        masses,
        np.zeros((n_atoms, 3)),
        integrator,
        20_000,
        save_every=10,
        energy_fn=energy,
    )
    burn = 200  # 4 ps, 20 velocity relaxation times
    kinetic_t = np.asarray(traj.temperature)[burn:].mean()
    assert kinetic_t == pytest.approx(temperature, rel=0.02)
    # Equipartition in the coordinates: k <x^2> = kB T per component.
    x = np.asarray(traj.x)[burn:]
    config_t = k * np.mean(x * x) / KB
    assert config_t == pytest.approx(temperature, rel=0.03)
    # Each mass on its own, since b and c depend on it.
    for m in (1.0, 16.0):
        per_mass = k * np.mean(x[:, masses == m] ** 2) / KB
        assert per_mass == pytest.approx(temperature, rel=0.03)
    assert np.mean(np.asarray(traj.potential_energy)[burn:]) == pytest.approx(
        1.5 * n_atoms * KB * temperature, rel=0.03
    )


def _anharmonic():
    """A coupled anharmonic chain, so the bitwise test exercises a non-trivial gradient."""

    def energy(x):
        d = jnp.linalg.norm(x[1:] - x[:-1], axis=1)
        return jnp.sum(100.0 * (d - 0.15) ** 2 + 5.0 * (d - 0.15) ** 4)

    return energy, jax.grad(energy)


def test_chunked_run_is_bitwise_identical_to_single_run():
    energy, gradient = _anharmonic()
    n_atoms = 8
    masses = np.linspace(1.0, 16.0, n_atoms)
    x0 = np.zeros((n_atoms, 3))
    x0[:, 0] = 0.15 * np.arange(n_atoms)
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=42)

    single = run(gradient, masses, x0, integrator, 1000, replica=3, save_every=10)
    first = run(gradient, masses, x0, integrator, 500, replica=3, save_every=10)
    second = run(gradient, masses, first.state, integrator, 500, replica=3, save_every=10)

    for name in ("x", "v"):
        chunked = np.concatenate([getattr(first, name), getattr(second, name)])
        assert chunked.tobytes() == np.asarray(getattr(single, name)).tobytes(), name
    np.testing.assert_array_equal(np.concatenate([first.steps, second.steps]), single.steps)
    assert np.asarray(second.state.x).tobytes() == np.asarray(single.state.x).tobytes()
    assert int(second.state.step) == 1000
    np.testing.assert_allclose(
        np.concatenate([first.kinetic_energy, second.kinetic_energy]),
        single.kinetic_energy,
        rtol=1e-14,
    )
    # save_every only changes what is stored, not the trajectory.
    every_step = run(gradient, masses, x0, integrator, 1000, replica=3, save_every=1)
    assert np.asarray(every_step.x[9::10]).tobytes() == np.asarray(single.x).tobytes()
    # Reported kinetic energy of frame t is K((v_t + v_{t+1}) / 2), the on-step velocity.
    np.testing.assert_allclose(
        every_step.kinetic_energy[:-1],
        on_step_kinetic_energy(every_step.v[:-1], every_step.v[1:], masses),
        rtol=1e-14,
    )
    np.testing.assert_allclose(
        every_step.temperature, 2 * every_step.kinetic_energy / (3 * n_atoms * KB), rtol=1e-14
    )
    # Another replica is another trajectory.
    other = run(gradient, masses, x0, integrator, 1000, replica=4, save_every=10)
    assert not np.allclose(other.x[-1], single.x[-1])


def test_on_step_kinetic_energy_and_temperature_by_hand():
    masses = np.array([2.0, 3.0])
    v1 = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    v2 = np.array([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    assert float(kinetic_energy(v1, masses)) == pytest.approx(0.5 * (2.0 * 1 + 3.0 * 4))
    # u = (v1 + v2) / 2 = [[0.5, 0, 1.5], [0.5, 1.5, 0.5]]
    assert float(on_step_kinetic_energy(v1, v2, masses)) == pytest.approx(
        0.5 * (2.0 * (0.25 + 2.25) + 3.0 * (0.25 + 2.25 + 0.25))
    )
    assert float(kinetic_temperature(v1, masses)) == pytest.approx(2 * 7.0 / (6 * KB))
    assert kinetic_energy(np.stack([v1, v2]), masses).shape == (2,)


def test_unstable_run_raises_simulation_error():
    # omega dt = 5 > 2: leapfrog is unstable and the coordinates overflow.
    _, gradient = harmonic(1e4)
    integrator = LangevinIntegrator(temperature=0.0, friction=0.0, dt=0.05)
    with pytest.raises(SimulationError, match=r"non-finite coordinates.*step \d+"):
        run(gradient, np.ones(2), np.full((2, 3), 0.1), integrator, 2000, save_every=100)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "x0, match",
    [
        (np.zeros((3, 2)), r"x0 must have shape \(3, 3\).*got shape \(3, 2\)"),
        (np.zeros((4, 3)), r"x0 must have shape \(3, 3\).*got shape \(4, 3\)"),
        (np.zeros(9), r"got shape \(9,\)"),
        (np.array([[0.0, 0, 0], [0, 0, 0], [0, np.nan, 0]]), r"atom 2.*nan"),
    ],
)
def test_bad_positions_raise_input_error(x0, match):
    integrator = LangevinIntegrator()
    with pytest.raises(InputError, match=match):
        langevin_init(x0, np.ones(3), integrator)
    with pytest.raises(InputError, match=match):
        run(harmonic(1.0)[1], np.ones(3), x0, integrator, 10)


def test_bad_run_arguments_raise_input_error():
    _, gradient = harmonic(1.0)
    integrator = LangevinIntegrator()
    x0 = np.zeros((2, 3))
    with pytest.raises(InputError, match=r"n_steps = 10.*save_every = 3"):
        run(gradient, np.ones(2), x0, integrator, 10, save_every=3)
    with pytest.raises(InputError, match=r"n_steps.*got 0"):
        run(gradient, np.ones(2), x0, integrator, 0)
    with pytest.raises(InputError, match=r"masses\[1\] = -1\.0"):
        run(gradient, np.array([1.0, -1.0]), x0, integrator, 10)
    with pytest.raises(InputError, match=r"velocities.*atom 1"):
        run(gradient, np.ones(2), x0, integrator, 10, v0=np.array([[0.0] * 3, [np.inf] * 3]))
    state = langevin_init(x0, np.ones(2), integrator)
    with pytest.raises(InputError, match="v0 must be None"):
        run(gradient, np.ones(2), state, integrator, 10, v0=np.zeros((2, 3)))
    with pytest.raises(InputError, match=r"replica.*got -1"):
        run(gradient, np.ones(2), x0, integrator, 10, replica=-1)


# --------------------------------------------------------------------------- minimize


@pytest.mark.filterwarnings("error")
def test_minimize_shifted_quadratic():
    rng = np.random.default_rng(3)
    center = rng.normal(size=(5, 3))
    stiffness = rng.uniform(10.0, 1000.0, size=(5, 3))

    def energy(x):
        return 0.5 * jnp.sum(stiffness * (x - center) ** 2) + 7.0

    x = minimize(energy, jax.grad(energy), np.zeros((5, 3)), tolerance=1e-6)
    assert x.shape == (5, 3)
    # |x - x*| <= |force| / k_min <= 1e-6 * sqrt(15) / 10
    np.testing.assert_allclose(x, center, rtol=0, atol=1e-6)
    assert np.sqrt(np.mean((stiffness * (x - center)) ** 2)) <= 1e-6


@pytest.mark.filterwarnings("error")
def test_minimize_lennard_jones_dimer():
    sigma, epsilon = 0.34, 0.996

    def energy(x):
        r = jnp.linalg.norm(x[1] - x[0])
        s6 = (sigma / r) ** 6
        return 4.0 * epsilon * (s6 * s6 - s6)

    x0 = np.array([[0.0, 0.0, 0.0], [0.3, 0.2, -0.1]])
    x = minimize(energy, jax.grad(energy), x0, tolerance=1e-7)
    r = np.linalg.norm(x[1] - x[0])
    assert abs(r - 2 ** (1 / 6) * sigma) < 1e-6
    assert float(energy(x)) == pytest.approx(-epsilon, rel=1e-10)


def test_minimize_errors():
    energy, gradient = harmonic(1.0)
    with pytest.raises(InputError, match=r"x0 has a non-finite value at atom 1"):
        minimize(energy, gradient, np.array([[0.0, 0, 0], [np.inf, 0, 0]]))
    with pytest.raises(InputError, match=r"tolerance.*got -1"):
        minimize(energy, gradient, np.zeros((2, 3)), tolerance=-1.0)

    def bad_energy(x):
        return jnp.sum(jnp.log(x[:, 0]))  # NaN once a coordinate goes negative

    with pytest.raises(SimulationError, match=r"energy became (nan|-inf)"):
        minimize(bad_energy, jax.grad(bad_energy), np.ones((2, 3)))
