"""Vmapped replicas against one ``simulate`` run per replica index."""

import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
from timemachine.fitting import run_replicas
from timemachine.integrator import maxwell_boltzmann_velocities
from timemachine.sensitivity import simulate
from timemachine.system import HarmonicAngles, HarmonicBonds, PeriodicTorsions


@pytest.fixture(scope="module")
def chain():
    """A 6-atom united-atom chain: typed bonds, angles, torsions (the structured ζ path)
    and a CustomTerm soft repulsion between atoms three or more bonds apart (autodiff ζ)."""
    n = 6
    i = np.arange(n)
    names = [
        "bond/CC/length",
        "bond/CC/k",
        "angle/CCC/theta0",
        "angle/CCC/k",
        "torsion/CCCC/phase1",
        "torsion/CCCC/k1",
    ]
    params = [0.153, 2.0e5, 1.95, 400.0, 0.0, 5.0]
    terms = (
        HarmonicBonds(np.stack([i[:-1], i[1:]], 1), np.zeros(n - 1, int), np.ones(n - 1, int)),
        HarmonicAngles(np.stack([i[:-2], i[1:-1], i[2:]], 1), np.full(n - 2, 2), np.full(n - 2, 3)),
        PeriodicTorsions(
            np.stack([i[:-3], i[1:-2], i[2:-1], i[3:]], 1),
            np.full(n - 3, 3),
            np.full(n - 3, 4),
            np.full(n - 3, 5),
        ),
    )
    far = np.array([(a, b) for a in range(n) for b in range(a + 3, n)])

    def repulsion(x, p):
        r2 = jnp.sum((x[far[:, 0]] - x[far[:, 1]]) ** 2, axis=1)
        return p[0] * jnp.sum(jnp.exp(-r2 / 0.09))

    system = tm.System(np.full(n, 14.0), terms, names, params).add_term(
        repulsion, ["custom/rep/eps"], [2.0]
    )
    # zig-zag with C-C 0.153 nm and C-C-C near 112°
    x = np.zeros((n, 3))
    x[:, 0] = 0.127 * i
    x[:, 1] = 0.085 * (i % 2)
    x[:, 2] = 0.01 * np.sin(i)
    return system, x


def test_replica_r_equals_simulate_with_replica_r(chain):
    system, x0 = chain
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=2.0, dt=0.002, seed=7)
    wrt = ["torsion/*/k1", "angle/*/k", "custom/*"]
    res = run_replicas(
        system, x0, integrator, 300, wrt=wrt, n_replicas=3, first_replica=4, save_every=100
    )
    assert res.x.shape == (3, 6, 3) and res.dx_dtheta.shape == (3, 3, 6, 3)
    assert res.frames_x.shape == (3, 3, 6, 3) and res.frames_dx_dtheta.shape == (3, 3, 3, 6, 3)
    np.testing.assert_array_equal(res.replicas, [4, 5, 6])
    np.testing.assert_array_equal(res.steps, [100, 200, 300])
    assert res.param_names == ("angle/CCC/k", "torsion/CCCC/k1", "custom/rep/eps")
    for row, replica in enumerate(res.replicas):
        ref = simulate(system, x0, integrator, 300, wrt=wrt, save_every=100, replica=int(replica))
        np.testing.assert_allclose(res.frames_x[row], ref.x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.frames_dx_dtheta[row], ref.dx_dtheta, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.x[row], ref.final_state.x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.v[row], ref.final_state.v, rtol=0, atol=1e-10)
        np.testing.assert_allclose(res.potential_energy[row], ref.potential_energy[-1], rtol=1e-12)
        assert np.abs(ref.dx_dtheta[-1]).max() > 1e-3  # the sensitivities are not trivial
    # replicas are independent: different starting velocities and noise
    assert np.abs(res.x[0] - res.x[1]).max() > 1e-2
    assert np.abs(res.dx_dtheta[0] - res.dx_dtheta[2]).max() > 1e-4
    v_start = maxwell_boltzmann_velocities(system.masses, 300.0, 7, replica=5)
    alone = simulate(system, x0, integrator, 300, wrt=wrt, save_every=100, v0=v_start, replica=5)
    np.testing.assert_allclose(alone.final_state.x, res.x[1], atol=1e-12)
    # a blow-up names the replica (same shapes as above: no new compilation)
    bad = tm.LangevinIntegrator(temperature=300.0, friction=2.0, dt=0.5, seed=7)
    with pytest.raises(
        tm.SimulationError,
        match=r"^run_replicas: replica \d+: (non-finite|the potential energy overflowed)",
    ):
        run_replicas(system, x0, bad, 300, wrt=wrt, n_replicas=3, first_replica=4, save_every=100)


@pytest.mark.slow
def test_window_mode_and_padded_batches(chain):
    system, x0 = chain
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=20.0, dt=0.002, seed=1)
    starts = x0[None] + 0.002 * np.random.default_rng(0).normal(size=(3, 6, 3))
    # batches of 2: the last one is padded, and the same program serves both
    res = run_replicas(
        system,
        starts,
        integrator,
        200,
        wrt="torsion/*/k1",
        replicas=[9, 2, 5],
        method="window",
        window=20,
        batch_size=2,
    )
    assert res.x.shape == (3, 6, 3)
    for row, replica in [(0, 9), (2, 5)]:
        ref = simulate(
            system,
            starts[row],
            integrator,
            200,
            wrt="torsion/*/k1",
            save_every=200,
            method="window",
            window=20,
            replica=replica,
        )
        np.testing.assert_allclose(res.dx_dtheta[row], ref.dx_dtheta[-1], atol=1e-12)
        np.testing.assert_allclose(res.x[row], ref.x[-1], atol=1e-12)
    assert res.frames_x is None and res.steps.size == 0


def test_input_errors(chain):
    system, x0 = chain
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=2.0, dt=0.002, seed=1)
    with pytest.raises(tm.InputError, match="replicas repeat an index"):
        run_replicas(system, x0, integrator, 10, wrt="torsion/*/k1", replicas=[1, 1])
    with pytest.raises(tm.InputError, match=r"x0 must have shape \(6, 3\) or \(2, 6, 3\)"):
        run_replicas(system, np.stack([x0] * 3), integrator, 10, wrt="torsion/*/k1", n_replicas=2)
    with pytest.raises(tm.InputError, match="matches none"):
        run_replicas(system, x0, integrator, 10, wrt="nonbonded/*", n_replicas=2)
