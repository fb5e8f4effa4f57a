"""Force matching: reference data from the unperturbed system, perturb, fit back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import InputError, MissingFileError
from timemachine.fitting.force_matching import (
    ForceMatchingLoss,
    ReferenceData,
    load_reference,
    write_extxyz,
)
from timemachine.integrator import run


@pytest.fixture(scope="module")
def reference(trialanine):
    top, x = trialanine
    system, x = tm.load_system((top, x))
    theta = jnp.asarray(system.params)
    energy = system.energy_fn()
    grad = jax.jit(jax.grad(lambda y: energy(y, theta)))
    integrator = tm.LangevinIntegrator(temperature=400.0, friction=5.0, dt=0.0005, seed=2)
    traj = run(grad, system.masses, x, integrator, 400, save_every=50)
    xs = np.asarray(traj.x)
    energies = np.array([float(system.energy(y)) for y in xs])
    forces = -np.stack([np.asarray(system.gradient(y)) for y in xs])
    return system, ReferenceData(xs, energies, forces)


def test_files_round_trip(tmp_path, reference):
    system, ref = reference
    np.savez(
        tmp_path / "ref.npz", positions=ref.positions, energies=ref.energies, forces=ref.forces
    )
    got = load_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(got.positions, ref.positions)
    symbols = [a.element.symbol for a in system.topology.atoms()]
    write_extxyz(tmp_path / "ref.xyz", symbols, ref)
    text = (tmp_path / "ref.xyz").read_text().splitlines()
    assert text[0] == str(system.n_atoms) and "energy=" in text[1]
    # the file is in Å / eV; reading converts back to nm / kJ/mol exactly enough
    xyz = load_reference(tmp_path / "ref.xyz")
    np.testing.assert_allclose(xyz.positions, ref.positions, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(xyz.energies, ref.energies, rtol=1e-13)
    np.testing.assert_allclose(xyz.forces, ref.forces, rtol=1e-13, atol=1e-10)
    with pytest.raises(MissingFileError, match="absent.npz"):
        load_reference(tmp_path / "absent.npz")
    np.savez(tmp_path / "bad.npz", coords=ref.positions)
    with pytest.raises(InputError, match="positions"):
        load_reference(tmp_path / "bad.npz")


def test_gradient_matches_finite_differences(reference):
    system, ref = reference
    loss = ForceMatchingLoss(system, ref, energy_sigma=1.0, force_sigma=10.0)
    wrt = system.select(["torsion/C-N-CT-C/k*", "charge/NALA:N/q", "bond/C-O/k"])
    params = np.array(system.params)
    params[wrt] *= 1.1
    value, grad = loss.loss_and_gradient(params, wrt)
    assert value > 0
    for j, p in enumerate(wrt):
        h = 1e-5 * max(1.0, abs(params[p]))
        up, dn = params.copy(), params.copy()
        up[p] += h
        dn[p] -= h
        fd = (loss(up) - loss(dn)) / (2 * h)
        assert abs(fd - grad[j]) <= 1e-6 * max(1.0, abs(fd)), (system.param_names[p], fd, grad[j])
    assert loss(system.params) < 1e-20


def test_force_matching_recovers_perturbed_parameters(reference):
    """Perturb the φ torsion barriers and a charge by ±30 %, fit back with tm.fit."""
    system, ref = reference
    wrt = system.select(["torsion/C-N-CT-C/k*", "charge/ALA:CA/q"])
    truth = np.array(system.params)
    start = truth.copy()
    start[wrt] *= 1.0 + 0.3 * np.where(np.arange(wrt.size) % 2, -1.0, 1.0)
    loss = ForceMatchingLoss(system, ref, energy_sigma=1.0, force_sigma=5.0)
    result = tm.fit(
        system,
        None,
        None,
        None,
        wrt,
        force_matching=loss,
        params=start,
        epochs=400,
        learning_rate=0.02,
        clip_norm=None,
        progress=False,
    )
    first, last = result.history[0]["loss"], loss(result.params)
    assert last < 1e-4 * first
    np.testing.assert_allclose(result.theta, truth[wrt], rtol=2e-3)
