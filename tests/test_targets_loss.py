"""Target files (with their errors) and the χ² loss's chain-rule gradient against autodiff."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timemachine.errors import InputError, MissingFileError
from timemachine.fitting.loss import loss_and_gradient, observable_samples, target_vector
from timemachine.fitting.observables import Dihedral, RadiusOfGyration
from timemachine.fitting.targets import load_targets, make_target, save_targets


def _write(tmp_path, entries, name="targets.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return str(path)


def test_target_file_round_trip(tmp_path, trialanine):
    top, x = trialanine
    entries = {
        "targets": [
            {"name": "J", "type": "J3_HN_HA", "value": [6.0, 7.0], "uncertainty": 0.5},
            {"name": "Rg", "type": "Rg", "atoms": "name CA", "value": 0.4, "sigma": 0.01},
        ]
    }
    targets = load_targets(_write(tmp_path, entries), top)
    assert [t.name for t in targets] == ["J", "Rg"]
    np.testing.assert_array_equal(targets[0].uncertainty, [0.5, 0.5])
    assert targets[1].value.tolist() == [0.4] and targets[1].uncertainty.tolist() == [0.01]
    out = tmp_path / "again.json"
    save_targets(out, targets)
    again = load_targets(out, top)
    for a, b in zip(targets, again, strict=True):
        np.testing.assert_array_equal(a.value, b.value)
        np.testing.assert_array_equal(a.uncertainty, b.uncertainty)
        np.testing.assert_allclose(a.observable(x), b.observable(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"name": "bad", "type": "J3_XX", "value": 1.0, "uncertainty": 1.0}, "J3_XX"),
        (
            {"name": "empty", "type": "Rg", "atoms": "name ZZ", "value": 1.0, "uncertainty": 1.0},
            "ZZ",
        ),
        ({"name": "nosigma", "type": "Rg", "value": 1.0}, "uncertainty"),
        ({"name": "zero", "type": "Rg", "value": 1.0, "uncertainty": 0.0}, "> 0"),
        ({"name": "neg", "type": "J3_HN_HA", "value": [1, 2], "uncertainty": [1, -1]}, "> 0"),
        ({"name": "len", "type": "J3_HN_HA", "value": [1, 2, 3], "uncertainty": 1}, "3 numbers"),
    ],
)
def test_bad_target_names_file_and_entry(tmp_path, trialanine, entry, fragment):
    top, _ = trialanine
    good = {"name": "ok", "type": "Rg", "value": 0.5, "uncertainty": 0.1}
    path = _write(tmp_path, [good, entry])
    with pytest.raises(InputError) as info:
        load_targets(path, top)
    msg = str(info.value)
    assert path in msg and "target 1" in msg and repr(entry["name"]) in msg and fragment in msg


def test_missing_target_file(tmp_path):
    with pytest.raises(MissingFileError, match="nope.json"):
        load_targets(tmp_path / "nope.json")


def test_chain_rule_gradient_matches_autodiff_of_the_whole_loss():
    """x_s(θ) = X_s + Σ_p θ_p D_sp is linear, so dx_s/dθ = D_s exactly; the loss built from
    pathwise sample gradients must equal jax.grad of the loss written directly in θ."""
    rng = np.random.default_rng(3)
    n, p, s_ens, s_time = 6, 3, 5, 7
    base = rng.normal(size=(s_ens + s_time, n, 3))
    direction = 0.05 * rng.normal(size=(s_ens + s_time, p, n, 3))
    theta = np.array([0.3, -0.2, 0.1])
    obs_a = RadiusOfGyration(masses=np.arange(1.0, n + 1))
    obs_b = Dihedral([[0, 1, 2, 3], [2, 3, 4, 5]])
    targets = [
        make_target(obs_a, 1.1, 0.05, name="Rg"),
        make_target(obs_b, [0.5, -1.0], [0.2, 0.3], name="dih", weight=2.0),
    ]
    tv = target_vector(targets)
    x = base + np.einsum("p,spnd->snd", theta, direction)
    ens = observable_samples(tv.observable, x[:s_ens], direction[:s_ens])
    tim = observable_samples(tv.observable, x[s_ens:], direction[s_ens:])
    theta_ref, width, lam = np.zeros(p), np.array([0.5, 1.0, 2.0]), 0.7
    got = loss_and_gradient(
        tv, ens, tim, "ensemble", lam, theta=theta, theta_ref=theta_ref, prior_sigma=width
    )

    def direct(th):
        xs = jnp.asarray(base) + jnp.einsum("p,spnd->snd", th, jnp.asarray(direction))
        vals = jax.vmap(tv.observable)(xs)
        ens_mean, time_mean = vals[:s_ens].mean(0), vals[s_ens:].mean(0)
        k = tv.value.size
        chi2 = jnp.sum(tv.weight * ((ens_mean - tv.value) / tv.uncertainty) ** 2) / k
        erg = lam * jnp.sum(tv.weight * ((time_mean - ens_mean) / tv.uncertainty) ** 2) / k
        prior = jnp.sum(((th - theta_ref) / width) ** 2) / p
        return chi2 + erg + prior

    value, grad = jax.value_and_grad(direct)(jnp.asarray(theta))
    assert got.ergodicity > 0 and got.prior > 0 and got.chi2 > 0
    np.testing.assert_allclose(got.loss, float(value), rtol=1e-12)
    np.testing.assert_allclose(got.gradient, np.asarray(grad), rtol=1e-10, atol=1e-12)


def test_loss_refuses_missing_samples():
    tv = target_vector([make_target(RadiusOfGyration(), 1.0, 0.1)])
    with pytest.raises(InputError, match="ensemble and/or time"):
        loss_and_gradient(tv)
    x = np.random.default_rng(0).normal(size=(2, 4, 3))
    samples = observable_samples(tv.observable, x, np.zeros((2, 1, 4, 3)))
    with pytest.raises(InputError, match="both ensemble and time"):
        loss_and_gradient(tv, ensemble=samples, ergodicity_weight=1.0)
