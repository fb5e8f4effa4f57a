"""Several systems in one equilibrium fit, sharing the fitted torsion types (issue 19).

Reference: each system's own epoch, built from the public pieces (its chains with the
noise streams the fit gives it, its reservoir, the fluctuation estimator), combined by
hand: the two-system fit's χ² must be the target-count-weighted mean of the systems' χ²,
and its gradient the sum of their gradients in the shared parameters. A fit interrupted
and resumed reproduces the uninterrupted one bit for bit (each system's chains and stored
frames are in the checkpoint).

The targets of the test are illustrative values near the Graf et al. 2007 trialanine
couplings, not measurements of tetra-alanine.
"""

from __future__ import annotations

import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import InputError
from timemachine.fitting import (
    FitSystem,
    JCoupling3HNHA,
    fluctuation_gradient,
    make_target,
    target_vector,
)
from timemachine.fitting.chi2 import block_mean_cov
from timemachine.fitting.equilibrium_samples import EpochSampler, observable_values
from timemachine.fitting.sampling import EquilibriumChains

WRT = ["torsion/C-N-CT-C/k*"]
SETTINGS = dict(
    n_chains=2,
    sample_steps=400,
    decorrelation_steps=100,
    save_every=20,
    blocks=4,
    min_ess=1.0,
    reservoir_size=40,
    reweight_threshold=2.0,  # every epoch samples afresh
    progress=False,
)


def _peptide(sequence, values):
    top, x = tm.build_peptide(sequence)
    system, x = tm.load_system((top, x))
    x = np.asarray(tm.minimize_system(system, x))
    targets = [make_target(JCoupling3HNHA(top), values, 0.36, name="3J(HN,HA)")]
    return FitSystem(system, x, targets, name=sequence)


@pytest.fixture(scope="module")
def two():
    return [_peptide("AAA", [5.68, 6.52]), _peptide("AAAA", [5.9, 6.1, 6.6])]


def integrator():
    return tm.LangevinIntegrator(300.0, 1.0, 0.002, seed=3)


def _own_epoch(i, member, theta_names, theta):
    """System i's epoch 0 by hand: (⟨O⟩ (K,), cov, J (K, P) in the shared parameters)."""
    system = member.system
    full = np.array(system.params)
    wrt = system.select(WRT)
    cols = [theta_names.index(system.param_names[j]) for j in wrt]
    full[wrt] = theta[cols]
    chains = EquilibriumChains(system, member.x0, integrator(), n_chains=2, save_every=20,
                               first_replica=2 * i, params=full)  # fmt: skip
    obs = member.targets[0].observable
    sampler = EpochSampler(chains, obs, ("a",) * 9, sample_steps=400, decorrelation_steps=100,
                           reservoir_size=40, min_ess=1.0, max_extend=3,
                           reweight_threshold=2.0, max_reuse=3)  # fmt: skip
    sample = sampler.at(full, 0, True)
    mean, cov = block_mean_cov(observable_values(obs, sample.x), None, 4)
    est = fluctuation_gradient(obs, system, sample.x, params=full, wrt=wrt, blocks=4)
    jac = np.zeros((mean.size, len(theta_names)))
    jac[:, cols] = est.gradient
    return mean, cov, jac


def test_two_systems_share_their_torsion_types_and_combine_their_estimates(two):
    r = tm.fit(two, None, integrator(), None, WRT, epochs=1, **SETTINGS)
    rec = r.history[0]
    names = r.param_names
    # the torsion types are shared: both peptides have them, and they are fitted once
    for m in two:
        own = {m.system.param_names[j] for j in m.system.select(WRT)}
        assert own == set(names), (m.name, own, names)
    labels = tuple(f"{m.name}:{t}" for m in two for t in target_vector(m.targets).labels)
    assert r.labels == labels and len(labels) == 5
    assert set(rec["systems"]) == {"AAA", "AAAA"} and rec["sampled"]
    assert set(r.system_params) == {"AAA", "AAAA"}

    theta = np.asarray(rec["params"])
    parts = [_own_epoch(i, m, names, theta) for i, m in enumerate(two)]
    mean = np.concatenate([p[0] for p in parts])
    jac = np.vstack([p[2] for p in parts])
    y = np.concatenate([m.targets[0].value for m in two])
    k = y.size
    chi2 = float(np.sum(((mean - y) / 0.36) ** 2) / k)
    grad = 2.0 / k * (((mean - y) / 0.36**2) @ jac)
    np.testing.assert_allclose(rec["observables"], mean, rtol=1e-12)
    assert rec["chi2"] == pytest.approx(chi2, rel=1e-12)
    np.testing.assert_allclose(rec["gradient"], grad, rtol=1e-10, atol=1e-14)
    # each system's part is live: both contribute to the gradient
    assert all(np.abs(p[2]).max() > 0 for p in parts)
    # the fitted θ goes into every system's full parameter vector
    for m in two:
        full = r.system_params[m.name]
        for j in m.system.select(WRT):
            assert full[j] == r.theta[names.index(m.system.param_names[j])]


def test_a_two_system_fit_resumes_bit_for_bit(two, tmp_path):
    straight = tm.fit(two, None, integrator(), None, WRT, epochs=3, out_dir=tmp_path / "a",
                      **SETTINGS)  # fmt: skip

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tm.fit(two, None, integrator(), None, WRT, epochs=3, out_dir=tmp_path / "b",
               callback=interrupt, **SETTINGS)  # fmt: skip
    resumed = tm.fit(two, None, integrator(), None, WRT, epochs=3, out_dir=tmp_path / "b",
                     resume=True, **SETTINGS)  # fmt: skip
    np.testing.assert_array_equal(resumed.theta, straight.theta)
    assert [r["chi2"] for r in resumed.history] == [r["chi2"] for r in straight.history]
    for name in ("AAA", "AAAA"):
        np.testing.assert_array_equal(resumed.system_params[name], straight.system_params[name])
    # a checkpoint of the two-system fit is not resumed by a one-system fit
    with pytest.raises(InputError, match="systems"):
        m = two[0]
        tm.fit(m.system, m.x0, integrator(), m.targets, WRT, epochs=3, out_dir=tmp_path / "b",
               resume=True, **SETTINGS)  # fmt: skip


def test_bad_several_system_fits_are_named(two):
    a, b = two
    with pytest.raises(InputError, match="x0=None and targets=None"):
        tm.fit(two, a.x0, integrator(), None, WRT, **SETTINGS)
    with pytest.raises(InputError, match=r"wrt pattern 'torsion/XX-\*' matches no parameter"):
        tm.fit(two, None, integrator(), None, WRT + ["torsion/XX-*"], **SETTINGS)
    with pytest.raises(InputError, match="int indices differ between systems"):
        tm.fit(two, None, integrator(), None, [0, 1], **SETTINGS)
    with pytest.raises(InputError, match=r"systems\[1\] must be a .*FitSystem"):
        tm.fit([a, (b.system, b.x0, b.targets)], None, integrator(), None, WRT, **SETTINGS)
    with pytest.raises(InputError, match=r"repeats an earlier system's name"):
        tm.fit([a, a], None, integrator(), None, WRT, **SETTINGS)
    with pytest.raises(InputError, match="needs an equilibrium estimator"):
        tm.fit(two, None, integrator(), None, WRT, estimator="pathwise")
    # a shared parameter that starts at different values in the two systems
    j = b.system.select(WRT)[0]
    pb = np.array(b.system.params)
    pb[j] *= 1.5
    with pytest.raises(InputError, match=rf"{b.system.param_names[j]} starts at .* in 'AAA'"):
        tm.fit(two, None, integrator(), None, WRT, params=[None, pb], **SETTINGS)
