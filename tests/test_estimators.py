"""Pathwise and fluctuation gradients of ensemble averages against exact d⟨O⟩/dθ.

Two systems with known canonical averages, run as vmapped replicas:

* a 1-D double well E = k Σ_i (x_i² - 1)² (+ a harmonic c/2 (y² + z²)), many independent
  particles per replica; ⟨x²⟩, ⟨x⁴⟩ and their k-derivatives by 1-D quadrature;
* a free harmonic chain with two alternating spring constants κ_A, κ_B (zero rest
  length): bond vectors are independent Gaussians of variance k_B T/κ per component, so
  ⟨Rg²⟩ and the mean end-to-end distance ⟨r⟩ and their derivatives are closed forms.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import timemachine as tm
from timemachine.constants import BOLTZMANN
from timemachine.fitting import (
    NOEDistance,
    ObservableFunction,
    ObservableSet,
    compare_estimators,
    fluctuation_gradient,
    pathwise_gradient,
    run_replicas,
)

T = 300.0
BETA = 1.0 / (BOLTZMANN * T)


def _assert_within(estimate, exact, n_sigma=4.0):
    diff = estimate.gradient - exact
    # an exactly zero derivative (no path from θ to O) has a zero error: compare exactly
    z = np.divide(diff, estimate.stderr, out=np.where(diff == 0, 0.0, np.inf), where=diff != 0)
    assert np.all(np.abs(z) < n_sigma), (estimate.method, estimate.gradient, exact, z)


# --------------------------------------------------------------------------- double well


def _double_well_energy(x, p):
    return p[0] * jnp.sum((x[:, 0] ** 2 - 1.0) ** 2) + 0.5 * p[1] * jnp.sum(x[:, 1:] ** 2)


def _double_well_exact(k):
    """d⟨x^n⟩/dk = -β cov(x^n, (x² - 1)²) for n = 2, 4, by quadrature over exp(-βk(x²-1)²)."""

    def avg(f):
        num = integrate.quad(
            lambda s: f(s) * np.exp(-BETA * k * (s * s - 1) ** 2), -np.inf, np.inf, epsrel=1e-12
        )[0]
        den = integrate.quad(
            lambda s: np.exp(-BETA * k * (s * s - 1) ** 2), -np.inf, np.inf, epsrel=1e-12
        )[0]
        return num / den

    dedk = avg(lambda s: (s * s - 1) ** 2)
    values, grads = [], []
    for n in (2, 4):
        mean = avg(lambda s, n=n: s**n)
        values.append(mean)
        grads.append(-BETA * (avg(lambda s, n=n: s**n * (s * s - 1) ** 2) - mean * dedk))
    return np.array(values), np.array(grads)


def test_double_well_gradients_match_quadrature():
    n, m_rep, k, c = 32, 16, 1.0, 50.0
    system = tm.System(np.ones(n), (), (), []).add_term(
        _double_well_energy, ["well/x/k", "well/yz/c"], [k, c]
    )
    rng = np.random.default_rng(0)
    x0 = np.zeros((m_rep, n, 3))
    x0[:, :, 0] = rng.choice([-1.0, 1.0], size=(m_rep, n)) + 0.3 * rng.normal(size=(m_rep, n))
    integrator = tm.LangevinIntegrator(temperature=T, friction=5.0, dt=0.01, seed=3)
    res = run_replicas(system, x0, integrator, 2000, wrt=[0, 1], n_replicas=m_rep, save_every=50)
    burn = 10  # 5 ps ≫ the 0.2 ps relaxation inside a well (even observables do not see
    # the slow hopping mode, which is odd in x)
    x = res.frames_x[:, burn:].reshape(-1, n, 3)
    dx = res.frames_dx_dtheta[:, burn:].reshape(-1, 2, n, 3)
    obs = ObservableFunction(
        lambda y: jnp.stack([jnp.mean(y[:, 0] ** 2), jnp.mean(y[:, 0] ** 4)]), ["<x2>", "<x4>"]
    )
    values, grads = _double_well_exact(k)
    exact = np.stack([grads, np.zeros(2)], axis=1)  # ⟨x^n⟩ does not depend on c

    pathwise = pathwise_gradient(obs, x, dx, blocks=m_rep, param_names=res.param_names)
    fluctuation = fluctuation_gradient(obs, system, x, wrt=[0, 1], temperature=T, blocks=m_rep)
    for est in (pathwise, fluctuation):
        _assert_within(est, exact)
        np.testing.assert_array_less(np.abs(est.value - values), 4 * est.value_stderr)
    # the test can fail: the k-derivatives are many standard errors away from zero
    assert np.all(np.abs(grads) > 5 * pathwise.stderr[:, 0])
    assert np.all(np.abs(grads) > 3 * fluctuation.stderr[:, 0])
    np.testing.assert_array_equal(pathwise.gradient[:, 1], 0.0)  # x never moves with c
    comparison = compare_estimators(pathwise, fluctuation)
    print(comparison.summary)
    assert comparison.consistent, comparison.summary
    assert "well/x/k" in comparison.summary


# --------------------------------------------------------------------------- harmonic chain


def _chain(n_atoms, kappa_a, kappa_b):
    bond_type = np.arange(n_atoms - 1) % 2  # 0: κ_A, 1: κ_B, alternating

    def energy(x, p):
        b2 = jnp.sum((x[1:] - x[:-1]) ** 2, axis=1)
        return 0.5 * jnp.sum(p[bond_type] * b2)

    system = tm.System(np.full(n_atoms, 10.0), (), (), []).add_term(
        energy, ["bond/A/k", "bond/B/k"], [kappa_a, kappa_b]
    )
    return system, bond_type


def _chain_exact(n_atoms, kappas, bond_type):
    """⟨Rg²⟩ and ⟨r_end⟩ (nm², nm) and their derivatives by κ_A, κ_B (closed forms)."""
    kt = BOLTZMANN * T
    kappa = kappas[bond_type]
    left = np.arange(1, n_atoms)  # atoms on the left of bond b
    weight = left * (n_atoms - left) / n_atoms**2
    rg2 = np.sum(weight * 3 * kt / kappa)
    drg2 = [-np.sum((weight * 3 * kt / kappa**2)[bond_type == t]) for t in (0, 1)]
    sigma2 = np.sum(kt / kappa)  # variance per component of the end-to-end vector
    r_end = 2.0 * np.sqrt(2.0 * sigma2 / np.pi)  # mean of a 3-D Gaussian vector's length
    dr = [r_end / (2 * sigma2) * -np.sum((kt / kappa**2)[bond_type == t]) for t in (0, 1)]
    return np.array([rg2, r_end]), np.array([drg2, dr])


def test_harmonic_chain_gradients_match_closed_form():
    n, m_rep = 8, 32
    kappas = np.array([100.0, 200.0])
    system, bond_type = _chain(n, *kappas)
    rng = np.random.default_rng(5)
    # start from the exact Boltzmann distribution of the bond vectors
    bonds = rng.normal(size=(m_rep, n - 1, 3)) * np.sqrt(BOLTZMANN * T / kappas[bond_type])[:, None]
    x0 = np.concatenate([np.zeros((m_rep, 1, 3)), np.cumsum(bonds, axis=1)], axis=1)
    integrator = tm.LangevinIntegrator(temperature=T, friction=2.0, dt=0.01, seed=11)
    res = run_replicas(system, x0, integrator, 2000, wrt="bond/*", n_replicas=m_rep, save_every=50)

    def rg2(y):
        return jnp.mean(jnp.sum((y - jnp.mean(y, axis=0)) ** 2, axis=1))

    obs = ObservableSet([ObservableFunction(rg2, "Rg^2"), NOEDistance([[0]], [[n - 1]])])
    values, grads = _chain_exact(n, kappas, bond_type)
    burn = 10
    x = res.frames_x[:, burn:].reshape(-1, n, 3)
    dx = res.frames_dx_dtheta[:, burn:].reshape(-1, 2, n, 3)
    pathwise = pathwise_gradient(obs, x, dx, blocks=m_rep, param_names=res.param_names)
    fluctuation = fluctuation_gradient(obs, system, x, wrt="bond/*", temperature=T, blocks=m_rep)
    assert fluctuation.param_names == ("bond/A/k", "bond/B/k")
    for est in (pathwise, fluctuation):
        _assert_within(est, grads)
        np.testing.assert_array_less(np.abs(est.value - values), 4 * est.value_stderr)
    # the test can fail: every derivative is many standard errors away from zero
    assert np.all(np.abs(grads) > 10 * pathwise.stderr)
    assert np.all(np.abs(grads) > 3 * fluctuation.stderr)
    comparison = compare_estimators(pathwise, fluctuation)
    print(comparison.summary)
    assert comparison.consistent

    # ensemble average over the replicas' last frames only: independent samples
    last = pathwise_gradient(obs, res.x, res.dx_dtheta)
    print("exact", grads, "\nlast frames", last.gradient, "±", last.stderr)
    _assert_within(last, grads)
    assert last.n_samples == m_rep


def test_estimator_errors_and_comparison():
    obs = ObservableFunction(lambda y: jnp.sum(y**2), "sum x^2")
    x = np.zeros((4, 2, 3))
    with pytest.raises(tm.InputError, match=r"dx_dtheta must have shape \(S, P, N, 3\)"):
        pathwise_gradient(obs, x, np.zeros((4, 1, 3, 3)))
    with pytest.raises(tm.InputError, match="blocks = 5 but there are only 4 samples"):
        pathwise_gradient(obs, x, np.zeros((4, 1, 2, 3)), blocks=5)
    with pytest.raises(tm.InputError, match="needs params and wrt"):
        fluctuation_gradient(obs, lambda y, p: jnp.sum(y), x)
    # the pathwise value of a linear map: ∂O/∂x · dx = 2 x · dx exactly
    rng = np.random.default_rng(0)
    x, dx = rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 3, 2, 3))
    est = pathwise_gradient(obs, x, dx)
    np.testing.assert_allclose(
        est.gradient[0], np.mean(2 * np.einsum("snc,spnc->sp", x, dx), axis=0), rtol=1e-13
    )
    far = est._replace(gradient=est.gradient + 10 * est.stderr)
    comparison = compare_estimators(est, far)
    assert not comparison.consistent
    np.testing.assert_allclose(np.abs(comparison.z), 10 / np.sqrt(2), rtol=1e-12)
    assert "INCONSISTENT" in comparison.summary
