"""Equilibrium averages: ESS, reweighting, the hybrid estimator, and the equilibrium fit.

References: closed forms (AR(1) autocorrelation time, a harmonic well's ⟨r²⟩ and its θ
derivative), a long fluctuation run on trialanine (the hybrid estimator must agree with
it; the pathwise-only one is biased and must not), and an uninterrupted fit (a resumed
fit must reproduce it bit for bit).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
from timemachine.constants import BOLTZMANN
from timemachine.fitting import (
    JCoupling3HNC,
    JCoupling3HNCB,
    JCoupling3HNHA,
    ObservableFunction,
    ObservableSet,
    compare_estimators,
    fluctuation_gradient,
    make_target,
    pathwise_gradient,
    run_replicas,
)
from timemachine.fitting.estimators import (
    choose_horizon,
    hybrid_gradient,
    kish_effective_sample_size,
    reweighting_weights,
)
from timemachine.fitting.sampling import (
    EquilibriumChains,
    autocorrelation_time,
    effective_sample_size,
    potential_scale_reduction,
)

KT = BOLTZMANN * 300.0


def _ar1(phi, n, k=1, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, k))
    x = np.empty((n, k))
    x[0] = e[0] / np.sqrt(1 - phi**2)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x


def test_autocorrelation_time_and_ess_of_ar1_match_the_closed_form():
    phi = 0.8
    tau = (1 + phi) / (2 * (1 - phi))  # τ_int of AR(1): 1/2 + Σ φ^t = 4.5
    x = _ar1(phi, 100_000, k=2)
    got = autocorrelation_time(x)
    np.testing.assert_allclose(got, tau, rtol=0.05)
    ess = effective_sample_size(x)
    np.testing.assert_allclose(ess, 100_000 / (2 * tau), rtol=0.05)
    # block analysis is noisier (20 block means: ~30 % per column): average 8 columns
    blocks = effective_sample_size(_ar1(phi, 100_000, k=8, seed=3), method="blocks", blocks=20)
    assert blocks.mean() == pytest.approx(100_000 / (2 * tau), rel=0.3)
    # independent samples: τ = 1/2, ESS = n
    white = np.random.default_rng(1).normal(size=(50_000, 1))
    assert abs(autocorrelation_time(white)[0] - 0.5) < 0.05
    with pytest.raises(tm.InputError, match="method"):
        effective_sample_size(x, method="spectral")


def test_chains_stuck_apart_have_a_long_autocorrelation_time_and_a_large_rhat():
    rng = np.random.default_rng(4)
    f = 20_000
    mixed = rng.normal(size=(2, f, 1))
    assert potential_scale_reduction(mixed)[0] == pytest.approx(1.0, abs=0.01)
    # two chains of white noise whose means sit at ±1: var⁺ = (F-1)/F W + B/F, B/F = 2
    stuck = mixed + np.array([1.0, -1.0])[:, None, None]
    rhat = potential_scale_reduction(stuck)[0]
    assert rhat == pytest.approx(np.sqrt((f - 1) / f * 1.0 + 2.0), rel=0.03)
    # pooled over chains, the ESS sees that the two halves never meet
    assert effective_sample_size(stuck)[0] < 0.01 * effective_sample_size(mixed)[0]


def _harmonic(theta):
    """E(x, θ) = θ₀/2 |x|² for one atom: ⟨|x|²⟩ = 3kT/θ₀, d⟨|x|²⟩/dθ₀ = -3kT/θ₀²."""
    return lambda x, th: 0.5 * th[0] * jnp.sum(x * x)


def _exact_samples(k, n, seed):
    return np.random.default_rng(seed).normal(scale=np.sqrt(KT / k), size=(n, 1, 3))


def test_fluctuation_and_reweighted_estimates_match_the_harmonic_closed_form():
    energy = _harmonic(None)
    r2 = ObservableFunction(lambda x: jnp.sum(x * x), "r2")
    k0, k1 = 100.0, 110.0
    x = _exact_samples(k0, 20_000, 0)
    est = fluctuation_gradient(r2, energy, x, params=[k0], wrt=[0], blocks=20)
    exact = -3 * KT / k0**2
    assert abs(est.gradient[0, 0] - exact) < 4 * est.stderr[0, 0]
    assert est.stderr[0, 0] < 0.1 * abs(exact)
    # samples of k0 reweighted to k1: weights exp(-β(k1-k0)|x|²/2), written out by hand
    w, ess = reweighting_weights(energy, x, [k0], [k1])
    by_hand = np.exp(-(k1 - k0) * 0.5 * np.sum(x**2, axis=(1, 2)) / KT)
    np.testing.assert_allclose(w, by_hand / by_hand.sum(), rtol=1e-12)
    assert ess == pytest.approx(kish_effective_sample_size(by_hand), rel=1e-12)
    assert 0.5 * x.shape[0] < ess < x.shape[0]
    rw = fluctuation_gradient(r2, energy, x, params=[k1], wrt=[0], blocks=20, weights=w)
    assert abs(rw.value[0] - 3 * KT / k1) < 4 * rw.value_stderr[0]
    assert abs(rw.gradient[0, 0] + 3 * KT / k1**2) < 4 * rw.stderr[0, 0]
    assert rw.diagnostics["kish_ess"] == pytest.approx(ess)
    # uniform weights are the unweighted estimator (up to its s/(s-1) normalisation)
    s = x.shape[0]
    flat = fluctuation_gradient(r2, energy, x, params=[k0], wrt=[0], blocks=20, weights=np.ones(s))
    np.testing.assert_allclose(flat.gradient, est.gradient * (s - 1) / s, rtol=1e-10)
    np.testing.assert_allclose(flat.value, est.value, rtol=1e-12)
    with pytest.raises(tm.InputError, match="weights"):
        fluctuation_gradient(r2, energy, x, params=[k0], wrt=[0], weights=-np.ones(s))


def test_choose_horizon_recovers_an_exponential_growth_rate():
    dt, rate = 0.002, 3.0  # 1/ps
    steps = np.arange(1, 21) * 25
    growth = 1e-4 * np.exp(rate * steps * dt)  # nm per unit θ
    dx = np.zeros((4, steps.size, 2, 5, 3))
    dx[:, :, 1, 2, 0] = growth
    theta = np.array([1.0, 2.0])
    choice = choose_horizon(steps, dx, theta, dt, cap=0.01)
    assert choice.growth_rate == pytest.approx(rate, rel=1e-9)
    below = steps[2 * growth <= 0.01]
    assert choice.n_steps == below[-1]  # the last step whose θ-scaled growth is under the cap
    with pytest.raises(tm.InputError, match="cap"):
        choose_horizon(steps, dx, theta, dt, cap=-1.0)


@pytest.fixture(scope="module")
def trialanine_equilibrium():
    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x), implicit_solvent="obc2")
    x = tm.minimize_system(system, x)
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=0)
    return top, system, x, integrator


@pytest.mark.slow
def test_hybrid_agrees_with_a_long_fluctuation_reference_and_pathwise_does_not(
    trialanine_equilibrium,
):
    top, system, x, integrator = trialanine_equilibrium
    obs = ObservableSet([JCoupling3HNHA(top), JCoupling3HNC(top), JCoupling3HNCB(top)])
    wrt = system.select(["torsion/C-N-CT-C/k*", "torsion/N-CT-C-N/k*"])
    assert wrt.size >= 5
    chains = EquilibriumChains(system, x, integrator, n_chains=2, save_every=250)
    chains.decorrelate(system.params, 10_000)
    # 2 × 0.4 ns, 1,600 frames: the reference's standard errors stay a fraction of the
    # hybrid's (96 replicas), and the pathwise bias is still > 15σ of their sum
    frames = chains.sample(system.params, 200_000).x
    flat = frames.reshape(-1, *frames.shape[2:])
    reference = fluctuation_gradient(obs, system, flat, wrt=wrt, blocks=20)
    starts = flat[np.random.default_rng(0).choice(flat.shape[0], 96, replace=False)]
    res = run_replicas(system, starts, integrator, 100, wrt=wrt, replicas=10_000 + np.arange(96))
    hybrid = hybrid_gradient(obs, system, starts, res.x, res.dx_dtheta, wrt=wrt, horizon=100)
    assert hybrid.method == "hybrid" and hybrid.gradient.shape == (6, wrt.size)
    np.testing.assert_allclose(
        hybrid.gradient, hybrid.diagnostics["pathwise"] + hybrid.diagnostics["score"], atol=1e-14
    )
    agree = compare_estimators(hybrid, reference)
    assert agree.consistent, agree.summary
    # the pathwise term alone is the gradient of the 100-step protocol: biased for ⟨O⟩
    biased = compare_estimators(pathwise_gradient(obs, res.x, res.dx_dtheta), reference)
    assert not biased.consistent, biased.summary


def _fit_settings(top):
    targets = [make_target(JCoupling3HNHA(top), [5.68, 6.52], 0.36, name="3J(HN,HA)")]
    return targets, dict(
        epochs=4,
        n_chains=2,
        sample_steps=20_000,
        trust_radius=0.5,
        decorrelation_steps=1_000,
        save_every=100,
        blocks=10,
        min_ess=5.0,
        progress=False,
    )


def test_equilibrium_fit_lowers_chi2_and_resumes_bit_for_bit(trialanine_equilibrium, tmp_path):
    top, system, x, integrator = trialanine_equilibrium
    targets, settings = _fit_settings(top)
    wrt = ["torsion/C-N-CT-C/k*"]
    straight = tm.fit(system, x, integrator, targets, wrt, out_dir=tmp_path / "a", **settings)
    first, best = straight.history[0], straight.info["accepted"]
    assert straight.info["estimator"] == "fluctuation"
    assert first["sampled"] and first["ess_min"] >= 5.0
    # amber99sbildn's ³J(HN,Hα) are 1-2 Hz above experiment: χ² starts well above 1
    assert first["chi2"] > 3.0 and first["chi2"] > 3 * first["chi2_stderr"]
    assert best["loss"] < 0.5 * first["chi2"]
    # the last epoch always samples afresh: a reweighted-only verdict is not trusted
    assert straight.history[-1]["sampled"]
    assert not straight.history[1]["sampled"]  # ... while the first step reweighted
    assert os.path.isfile(tmp_path / "a" / "history.json")

    # interrupted after two epochs (the checkpoint is written before the callback), then
    # resumed: the same numbers as the uninterrupted fit
    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tm.fit(
            system,
            x,
            integrator,
            targets,
            wrt,
            out_dir=tmp_path / "b",
            callback=interrupt,
            **settings,
        )
    resumed = tm.fit(
        system, x, integrator, targets, wrt, out_dir=tmp_path / "b", resume=True, **settings
    )
    np.testing.assert_array_equal(resumed.params, straight.params)
    assert [r["chi2"] for r in resumed.history] == [r["chi2"] for r in straight.history]

    # killed after its last checkpoint but before history.json was rewritten: resuming
    # the finished fit runs no epoch, and still writes the whole history
    path = tmp_path / "a" / "history.json"
    whole = path.read_text()
    path.write_text(json.dumps({"epochs": json.loads(whole)["epochs"][:1]}))
    again = tm.fit(
        system, x, integrator, targets, wrt, out_dir=tmp_path / "a", resume=True, **settings
    )
    np.testing.assert_array_equal(again.params, straight.params)
    assert json.loads(path.read_text()) == json.loads(whole)


def test_equilibrium_fit_stops_once_it_fits_the_data(trialanine_equilibrium, tmp_path):
    # the discrepancy principle: the first fresh epoch after a step with χ²/N below
    # stop_chi2 by 2 standard errors ends the fit at the θ it sampled
    top, system, x, integrator = trialanine_equilibrium
    targets, settings = _fit_settings(top)
    settings = dict(settings, sample_steps=10_000, reweight_threshold=2.0)  # always sample
    wrt = "torsion/C-N-CT-C/k*"
    r = tm.fit(system, x, integrator, targets, wrt, stop_chi2=1e4, out_dir=tmp_path, **settings)
    assert len(r.history) == 2 and r.history[1]["sampled"]
    last = r.history[-1]
    assert last["converged"] and last["chi2"] + 2 * last["chi2_stderr"] <= 1e4
    assert r.info["stop_reason"].startswith("fits the data: χ²/N = ")
    np.testing.assert_array_equal(r.theta, last["params"])
    # resumed, the converged fit runs nothing and returns the θ it stopped at
    again = tm.fit(
        system, x, integrator, targets, wrt, stop_chi2=1e4, out_dir=tmp_path, resume=True,
        **settings,
    )  # fmt: skip
    np.testing.assert_array_equal(again.theta, r.theta)
    assert again.info["stop_reason"] == r.info["stop_reason"]
    with pytest.raises(tm.InputError, match="stop_chi2"):
        tm.fit(system, x, integrator, targets, "torsion/C-N-CT-C/k*", stop_chi2=-1.0)


def test_equilibrium_fit_refuses_bad_settings_without_writing(trialanine_equilibrium, tmp_path):
    top, system, x, integrator = trialanine_equilibrium
    targets, settings = _fit_settings(top)
    with pytest.raises(tm.InputError, match="estimator 'bogus' unknown"):
        tm.fit(system, x, integrator, targets, "torsion/C-N-CT-C/k*", estimator="bogus")
    out = tmp_path / "few"
    with pytest.raises(
        tm.InputError, match=r"effective sample size of .*J3_HN_HA.* < min_ess.*after 1 ext"
    ):
        tm.fit(
            system,
            x,
            integrator,
            targets,
            "torsion/C-N-CT-C/k*",
            out_dir=out,
            **dict(settings, min_ess=1e6, max_extend=1),
        )
    assert not out.exists() or not os.listdir(out)  # nothing half-written
    with pytest.raises(tm.InputError, match="does not take time_samples"):
        tm.fit(system, x, integrator, targets, "torsion/C-N-CT-C/k*", time_samples=4)
    with pytest.raises(tm.InputError, match="sample_steps"):
        tm.fit(system, x, integrator, targets, "torsion/C-N-CT-C/k*", sample_steps=0)
