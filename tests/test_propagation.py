"""Exact and windowed propagation of dx/dθ, and ``simulate``: closed forms (paper eqs. 7
and 9, a harmonic oscillator's linear recursion), the primal against the integrator,
window convergence, bitwise continuation, streaming to disk, blow-ups and bad input."""

import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import timemachine as tm
from timemachine.errors import InputError, SimulationError
from timemachine.integrator import LangevinIntegrator, langevin_init, run
from timemachine.integrator.langevin import _run_blocks
from timemachine.sensitivity import (
    ExactState,
    SensitivityTrajectory,
    WindowState,
    simulate,
    state_memory_bytes,
    window_size,
)
from timemachine.sensitivity.diagnosis import MAX_ENERGY
from timemachine.sensitivity.zeta import zeta_reference

MASSES = np.array([1.008, 4.0, 12.011, 15.999])
SPRING = 400.0  # kJ/mol/nm², E = ½ k Σ_i c_i |x_i|²


def oscillator(k=SPRING, c=None):
    """N = 4 independent 3-D harmonic oscillators E = ½ k Σ_i c_i |x_i|², parameter k."""
    c = jnp.ones(len(MASSES)) if c is None else jnp.asarray(c)
    system = tm.System(MASSES, (), (), [])
    return system.add_term(
        lambda x, p: 0.5 * p[0] * jnp.sum(c[:, None] * x * x), ["spring/all/k"], [k]
    )


def x_start(seed=0):
    return np.random.default_rng(seed).normal(scale=0.1, size=(len(MASSES), 3))


@pytest.fixture(scope="module")
def trialanine_fixed():
    """Trialanine with reproducible hydrogens. OpenMM's Modeller.addHydrogens places them
    with Python's ``random``, so the shared ``trialanine`` fixture differs from process to
    process; chaotic trajectories (and where they meet OBC2's kinks) differ with it."""
    state = random.getstate()
    random.seed(2024)
    try:
        return tm.build_peptide("AAA")
    finally:
        random.setstate(state)


@pytest.fixture(scope="module")
def trialanine_obc2(trialanine_fixed):
    system, x = tm.load_system(
        trialanine_fixed, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2"
    )
    x = tm.minimize_system(system, x)
    return system, x


@pytest.fixture(scope="module")
def trialanine_vacuum(trialanine_fixed):
    system, x = tm.load_system(trialanine_fixed, forcefield=("amber99sbildn.xml",))
    x = tm.minimize_system(system, x)
    return system, x


# --------------------------------------------------------------------------- closed forms


def test_first_three_steps_match_paper_eq7(trialanine_obc2):
    """dx1 = -bδt ζ0, dx2 = -bδt (ζ0 (1+a) + ζ1), dx3 = -bδt (ζ0 (1+a+a²) + ζ1 (1+a) + ζ2),
    with ζ_i from the reference ζ (one jvp per parameter) at the recorded x_i, dx_i."""
    system, x0 = trialanine_obc2
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.0015, seed=3)
    traj = simulate(system, x0, integrator, 3, wrt="torsion/*/k*", save_every=1, progress=False)
    coeffs = integrator.coefficients(system.masses)
    a, b, dt = float(coeffs.a), np.asarray(coeffs.b)[None, :, None], integrator.dt
    theta = jnp.asarray(system.params)
    xs = [np.asarray(x0)] + [traj.x[i] for i in range(2)]
    dxs = [np.zeros_like(traj.dx_dtheta[0])] + [traj.dx_dtheta[i] for i in range(2)]
    zeta = jax.jit(lambda x, dx: zeta_reference(system.energy_fn(), x, theta, dx, traj.wrt))
    z = [np.asarray(zeta(jnp.asarray(x), jnp.asarray(dx))) for x, dx in zip(xs, dxs, strict=True)]
    expected = [
        -b * dt * z[0],
        -b * dt * (z[0] * (1 + a) + z[1]),
        -b * dt * (z[0] * (1 + a + a * a) + z[1] * (1 + a) + z[2]),
    ]
    errors = [rel_err(traj.dx_dtheta[i], expected[i]) for i in range(3)]
    print(f"eq. 7, steps 1-3: relative errors {errors}")
    assert max(errors) < 1e-12
    assert np.abs(expected[0]).max() > 0


def test_harmonic_oscillator_matches_its_linear_recursion_over_10000_steps():
    """E = ½k|x|²: ζ = k dx/dk + x exactly, so dv = a dv - b (k dx + x), dx += δt dv."""
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=2.0, dt=0.002, seed=7)
    x0 = x_start()
    traj = simulate(system, x0, integrator, 10_000, wrt="spring/*", save_every=1, progress=False)
    coeffs = integrator.coefficients(MASSES)
    a, b = float(coeffs.a), np.asarray(coeffs.b)[:, None]
    xs = np.concatenate([x0[None], traj.x])
    dx = np.zeros_like(x0)
    dv = np.zeros_like(x0)
    expected = np.empty((10_000,) + x0.shape)
    for t in range(10_000):
        dv = a * dv - b * (SPRING * dx + xs[t])
        dx = dx + integrator.dt * dv
        expected[t] = dx
    err = rel_err(traj.dx_dtheta[:, 0], expected)
    print(f"oscillator, 10,000 steps: relative error {err:.2e}, |dx/dk| max {np.abs(dx).max():.3e}")
    assert err < 1e-12
    assert traj.steps[-1] == 10_000 and traj.dx_dtheta.shape == (10_000, 1, 4, 3)


def test_primal_trajectory_is_the_integrators(trialanine_obc2):
    """The body of ``integrator.run`` with the same θ and noise, to round-off: simulate takes
    ∇E from the fused ∇E-and-ζ call, which equals jax.grad's to the last bits, not bitwise.
    The step indices are identical; the public ``run`` agrees to round-off as well."""
    system, x0 = trialanine_obc2
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.0015, seed=3)
    traj = simulate(system, x0, integrator, 30, wrt="torsion/*/k*", save_every=5, progress=False)
    energy, theta = system.energy_fn(), jnp.asarray(system.params)
    grad = jax.grad(energy)

    @jax.jit
    def plain(theta, state, coeffs, seed, replica, masses):
        return _run_blocks(
            lambda y: grad(y, theta), None, 6, 5, coeffs, state, seed, replica, masses
        )

    xs, vs, steps, ke, _, _ = plain(
        theta,
        langevin_init(x0, system.masses, integrator),
        integrator.coefficients(system.masses),
        jnp.asarray(3, jnp.int64),
        jnp.asarray(0, jnp.int64),
        jnp.asarray(system.masses),
    )
    assert np.abs(traj.x - np.asarray(xs)).max() < 1e-12  # nm; trialanine spans ~1 nm
    assert np.abs(traj.v - np.asarray(vs)).max() < 1e-9  # nm/ps; |v| ~ 1
    np.testing.assert_array_equal(traj.steps, np.asarray(steps))
    # a few ulps: the CPU custom call's bonded ∇E is compiled code whose inlining (and so
    # its last bits) moves with what else the library holds (1.1e-14 measured once)
    np.testing.assert_allclose(traj.kinetic_energy, np.asarray(ke), rtol=5e-14)
    public = run(lambda y: grad(y, theta), system.masses, x0, integrator, 30, save_every=5)
    assert np.abs(traj.x - np.asarray(public.x)).max() < 1e-12


# --------------------------------------------------------------------------- window


def test_window_is_paper_eq9_exactly():
    """dx_t = -δt b Σ_i w^{(k)}_{t-1-i} ζ_i, w^{(k)}_m = (1 - a^{m+1})/(1 - a) for m < k and
    1/(1 - a) beyond, with ζ_i = k dx_i + x_i at the windowed dx_i: a direct O(t²) sum."""
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=20.0, dt=0.002, seed=5)
    k, n = 20, 300
    x0 = x_start(1)
    traj = simulate(
        system, x0, integrator, n, wrt=[0], save_every=1, method="window", window=k, progress=False
    )
    coeffs = integrator.coefficients(MASSES)
    a, b = float(coeffs.a), np.asarray(coeffs.b)[:, None]
    xs = np.concatenate([x0[None], traj.x])
    dxs = np.concatenate([np.zeros((1, 4, 3)), traj.dx_dtheta[:, 0]])
    zetas = SPRING * dxs + xs
    m = np.arange(n)
    weights = np.where(m < k, (1 - a ** (m + 1)) / (1 - a), 1 / (1 - a))
    expected = np.stack(
        [
            -integrator.dt * b * np.tensordot(weights[t - 1 - np.arange(t)], zetas[:t], axes=1)
            for t in range(1, n + 1)
        ]
    )
    err = rel_err(traj.dx_dtheta[:, 0], expected)
    print(f"window k={k}: eq. 9 by direct summation, relative error {err:.2e}")
    assert err < 1e-12
    # the window does fold: it differs from exact mode by about a^k
    exact = simulate(system, x0, integrator, n, wrt=[0], save_every=1, progress=False)
    assert 1e-3 < rel_err(traj.dx_dtheta, exact.dx_dtheta) < 1.0


def test_window_before_any_fold_is_exact_mode_bit_for_bit():
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=5.0, dt=0.002, seed=2)
    x0 = x_start(2)
    exact = simulate(system, x0, integrator, 200, wrt="spring/*", save_every=10, progress=False)
    window = simulate(
        system,
        x0,
        integrator,
        200,
        wrt="spring/*",
        save_every=10,
        method="window",
        window=200,
        progress=False,
    )
    np.testing.assert_array_equal(window.dx_dtheta, exact.dx_dtheta)
    np.testing.assert_array_equal(window.x, exact.x)


def test_window_converges_to_exact_mode_within_a_to_the_k(trialanine_vacuum):
    """γ = 100/ps, δt = 1 fs: a^k from 7e-3 (k = 50) to 4e-18 (k = 400). The windowed
    sensitivities differ from exact mode by less than a^k and the error falls with k.

    (Window mode is unstable when a^k ω²/γ² is not small, ω the fastest vibration: k = 25
    here, a^k = 0.08, blows up. The default tol = 1e-8 keeps clear of that.)"""
    system, x0 = trialanine_vacuum
    integrator = LangevinIntegrator(temperature=300.0, friction=100.0, dt=0.001, seed=4)
    a = math.exp(-integrator.friction * integrator.dt)
    kwargs = dict(wrt="torsion/*/k*", save_every=100, progress=False)
    exact = simulate(system, x0, integrator, 1000, **kwargs)
    curve = []
    for k in (50, 100, 200, 400):
        window = simulate(system, x0, integrator, 1000, method="window", window=k, **kwargs)
        assert window.window == k
        np.testing.assert_array_equal(window.x, exact.x)  # the primal is untouched
        curve.append((k, a**k, rel_err(window.dx_dtheta, exact.dx_dtheta)))
    print("window convergence (k, a^k, ‖dx_win - dx_exact‖/‖dx_exact‖):")
    for k, ak, err in curve:
        print(f"  k = {k:4d}  a^k = {ak:.2e}  error = {err:.2e}")
    errors = [err for _, _, err in curve]
    assert all(e1 > e2 for e1, e2 in zip(errors[:-1], errors[1:], strict=True))
    assert all(err <= ak for _, ak, err in curve[:3])
    assert errors[-1] < 1e-13
    assert errors[0] > 1e-4  # the window really truncates


def test_window_size_from_tolerance_and_memory():
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.0015)
    k = window_size(integrator, 1e-8)
    a = math.exp(-0.0015)
    assert k == math.ceil(math.log(1e-8) / math.log(a)) == 12281
    assert a**k <= 1e-8 < a ** (k - 1)
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=50.0, dt=0.002, seed=1)
    traj = simulate(
        system, x_start(), integrator, 10, wrt="spring/*", save_every=10, method="window",
        progress=False,
    )  # fmt: skip
    expected_k = math.ceil(math.log(1e-8) / (-50.0 * 0.002))
    assert traj.window == expected_k
    vec = 8 * 4 * 3
    assert traj.memory_bytes["zeta_window"] == expected_k * vec
    assert traj.memory_bytes["state"] == state_memory_bytes(traj.final_state)["total"]
    assert traj.memory_bytes["state"] == 2 * vec + 4 * vec + expected_k * vec + 8
    exact = simulate(
        system, x_start(), integrator, 10, wrt="spring/*", save_every=10, progress=False
    )
    assert (
        exact.memory_bytes["state"] == 4 * vec + 8 == state_memory_bytes(exact.final_state)["total"]
    )
    assert "zeta_window" not in exact.memory_bytes
    print(f"memory: exact {exact.memory_bytes}, window {traj.memory_bytes}")


# --------------------------------------------------------------------------- continuation


def test_continuation_is_bitwise_one_longer_run(trialanine_obc2):
    system, x0 = trialanine_obc2
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.0015, seed=9)
    kw = dict(wrt="torsion/*/k*", save_every=1, progress=False)
    # chunks of 4 steps everywhere (one compiled program): the whole run's chunk
    # boundaries (4, 8, 12, 16) are not the split's (4, 8, 10 | 14, 18)
    kw["chunk_steps"] = 4
    whole = simulate(system, x0, integrator, 20, **kw)
    first = simulate(system, x0, integrator, 10, **kw)
    second = simulate(system, first.final_state, integrator, 10, **kw)
    assert isinstance(second.final_state, ExactState)
    np.testing.assert_array_equal(second.steps, np.arange(11, 21))
    for name in ("x", "v", "dx_dtheta", "kinetic_energy", "potential_energy"):
        joined = np.concatenate([getattr(first, name), getattr(second, name)])
        np.testing.assert_array_equal(joined, getattr(whole, name), err_msg=name)


def test_window_continuation_and_chunking_are_bitwise(trialanine_vacuum):
    """Across folds (k = 50 < 300 steps) and with other chunk sizes."""
    system, x0 = trialanine_vacuum
    integrator = LangevinIntegrator(temperature=300.0, friction=100.0, dt=0.001, seed=4)
    kw = dict(wrt="torsion/*/k*", save_every=100, method="window", window=50, progress=False)
    whole = simulate(system, x0, integrator, 600, **kw)
    first = simulate(system, x0, integrator, 300, **kw)
    second = simulate(system, first.final_state, integrator, 300, **kw)
    assert isinstance(second.final_state, WindowState)
    joined = np.concatenate([first.dx_dtheta, second.dx_dtheta])
    np.testing.assert_array_equal(joined, whole.dx_dtheta)
    np.testing.assert_array_equal(np.concatenate([first.x, second.x]), whole.x)
    for a, b in zip(whole.final_state, second.final_state, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunk_size_does_not_change_the_bits():
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=3)
    kw = dict(wrt="spring/*", save_every=5, progress=False)
    one = simulate(system, x_start(), integrator, 400, chunk_steps=400, **kw)
    many = simulate(system, x_start(), integrator, 400, chunk_steps=15, **kw)  # 27 chunks
    np.testing.assert_array_equal(one.dx_dtheta, many.dx_dtheta)
    np.testing.assert_array_equal(one.x, many.x)
    np.testing.assert_array_equal(one.kinetic_energy, many.kinetic_energy)


# --------------------------------------------------------------------------- streaming


def test_streaming_to_out_dir_matches_memory_and_resumes(tmp_path):
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=8)
    kw = dict(wrt="spring/*", save_every=10, chunk_steps=50, progress=False)
    in_memory = simulate(system, x_start(), integrator, 400, **kw)
    out = tmp_path / "run"
    first = simulate(system, x_start(), integrator, 200, out_dir=out, **kw)
    assert first.memory_bytes["frames"] == 0 and first.out_dir == str(out)
    names = sorted(os.listdir(out))
    ckpt = ["state.json", "state.npz", "state.prev.json", "state.prev.npz"]
    assert names == [f"chunk_{i:05d}.npz" for i in range(4)] + ["meta.json"] + ckpt
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    # the directory continues from its own final state, when asked to
    loaded = SensitivityTrajectory.load(out)
    with pytest.raises(InputError, match="not empty.*resume=True"):
        simulate(system, loaded.final_state, integrator, 200, out_dir=out, **kw)
    second = simulate(system, loaded.final_state, integrator, 200, out_dir=out, resume=True, **kw)
    assert sorted(os.listdir(out))[:8] == [f"chunk_{i:05d}.npz" for i in range(8)]
    assert len(second) == 40
    np.testing.assert_array_equal(second.steps, in_memory.steps)
    for name in ("x", "v", "dx_dtheta"):
        np.testing.assert_array_equal(np.asarray(getattr(second, name)), getattr(in_memory, name))
    np.testing.assert_array_equal(second.kinetic_energy, in_memory.kinetic_energy)
    # lazy frames: one chunk at a time
    lazy = second.dx_dtheta
    assert lazy.shape == (40, 1, 4, 3)
    np.testing.assert_array_equal(lazy[7], in_memory.dx_dtheta[7])
    np.testing.assert_array_equal(lazy[-1], in_memory.dx_dtheta[-1])
    np.testing.assert_array_equal(lazy[3:17:2, 0], in_memory.dx_dtheta[3:17:2, 0])
    assert sum(c.shape[0] for c in lazy.chunks()) == 40
    for a, b in zip(second.final_state, in_memory.final_state, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an array x0 cannot overwrite a trajectory
    with pytest.raises(InputError, match="already holds a trajectory"):
        simulate(system, x_start(), integrator, 100, out_dir=out, **kw)
    # window mode streams and resumes its ring of ζ's as well
    kw.update(method="window", window=30)
    whole = simulate(system, x_start(), integrator, 200, **kw)
    simulate(system, x_start(), integrator, 100, out_dir=tmp_path / "win", **kw)
    state = SensitivityTrajectory.load(tmp_path / "win").final_state
    assert isinstance(state, WindowState) and state.zeta_window.shape == (30, 1, 4, 3)
    resumed = simulate(system, state, integrator, 100, out_dir=tmp_path / "win", resume=True, **kw)
    np.testing.assert_array_equal(np.asarray(resumed.dx_dtheta), whole.dx_dtheta)


# --------------------------------------------------------------------------- blow-ups


def test_non_finite_coordinates_name_the_step_and_atom():
    """Atom 2 sits on an inverted spring and runs away; T = 0 makes it deterministic. The
    first saved frame whose coordinates are non-finite or whose energy is beyond
    ``MAX_ENERGY`` (the energy overflows long before the coordinates do) is named."""
    c = np.array([1e-6, 1e-6, -1.0, 1e-6])
    system = oscillator(k=1e8, c=c)
    integrator = LangevinIntegrator(temperature=0.0, friction=1.0, dt=0.002, seed=0)
    x0, v0 = x_start(), np.zeros((4, 3))
    coeffs = integrator.coefficients(MASSES)
    a, b = float(coeffs.a), np.asarray(coeffs.b)[:, None]
    x, v, first_bad = x0.copy(), v0.copy(), None
    with np.errstate(all="ignore"):
        for t in range(1, 1001):
            v = a * v - b * (1e8 * c[:, None] * x)
            x = x + integrator.dt * v
            energy = 0.5 * 1e8 * np.sum(c[:, None] * x * x)
            if t % 10 == 0 and not (np.isfinite(x).all() and abs(energy) <= MAX_ENERGY):
                first_bad = t
                break
    assert first_bad is not None
    with pytest.raises(SimulationError, match=rf"step {first_bad}\b.*atom 2") as info:
        simulate(
            system, x0, integrator, 1000, wrt="spring/*", save_every=10, v0=v0,
            max_sensitivity=None, progress=False,
        )  # fmt: skip
    assert info.value.step == first_bad and info.value.atom == 2
    print(info.value)


def test_sensitivity_blow_up_names_step_parameter_and_atom():
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=6)
    kw = dict(wrt="spring/*", save_every=10, progress=False)
    free = simulate(system, x_start(), integrator, 100, max_sensitivity=None, **kw)
    limit = 0.5 * np.abs(free.dx_dtheta[4]).max()
    f = int(np.argmax(np.abs(free.dx_dtheta).max(axis=(1, 2, 3)) > limit))
    atom = int(np.argmax(np.abs(free.dx_dtheta[f, 0]).max(axis=1)))
    with pytest.raises(SimulationError, match="sensitivity blow-up") as info:
        simulate(system, x_start(), integrator, 100, max_sensitivity=limit, **kw)
    err = info.value
    assert (err.step, err.parameter, err.atom) == (int(free.steps[f]), "spring/all/k", atom)
    assert f"step {err.step}" in str(err) and "'spring/all/k'" in str(err)
    assert f"atom {atom}" in str(err)


# --------------------------------------------------------------------------- input


def test_bad_input_raises_input_error(tmp_path):
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=0)
    x0 = x_start()

    def sim(**kw):
        args = dict(wrt="spring/*", save_every=10, progress=False)
        args.update(kw)
        n = args.pop("n_steps", 20)
        return simulate(system, args.pop("x0", x0), args.pop("integrator", integrator), n, **args)

    with pytest.raises(InputError, match="'cuda' is not available yet"):
        sim(backend="cuda")
    with pytest.raises(InputError, match="unknown backend 'tpu'"):
        sim(backend="tpu")
    with pytest.raises(InputError, match="method must be one of .* got 'leapfrog'"):
        sim(method="leapfrog")
    with pytest.raises(InputError, match="zeta must be one of"):
        sim(zeta="fast")
    with pytest.raises(InputError, match="n_steps = 25 must be a multiple of save_every = 10"):
        sim(n_steps=25)
    with pytest.raises(InputError, match="matches none"):
        sim(wrt="torsion*")
    with pytest.raises(InputError, match=r"wrt\[0\] = 5 is not an index"):
        sim(wrt=[5])
    with pytest.raises(InputError, match="friction > 0"):
        sim(method="window", integrator=LangevinIntegrator(300.0, 0.0, 0.002))
    with pytest.raises(InputError, match="only used with method='window'"):
        sim(window=10)
    with pytest.raises(InputError, match="chunk_steps = 15 must be a multiple"):
        sim(chunk_steps=15)
    with pytest.raises(InputError, match=r"shape \(4, 3\)"):
        sim(x0=np.zeros((3, 3)))
    exact = sim()
    with pytest.raises(InputError, match="ExactState but method='window'"):
        sim(x0=exact.final_state, method="window", window=5)
    with pytest.raises(InputError, match="v0 must be None"):
        sim(x0=exact.final_state, v0=np.zeros((4, 3)))
    with pytest.raises(InputError, match="max_sensitivity"):
        sim(max_sensitivity=-1.0)
    # a γ = 0 run is fine in exact mode
    assert np.isfinite(sim(integrator=LangevinIntegrator(300.0, 0.0, 0.002)).dx_dtheta).all()


def test_progress_bar_and_repr(capsys):
    system = oscillator()
    integrator = LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=0)
    traj = simulate(
        system, x_start(), integrator, 100, wrt="spring/*", save_every=10, progress=True
    )
    assert "100/100" in capsys.readouterr().err
    assert "frames=10" in repr(traj) and traj.param_names == ("spring/all/k",)
    assert traj.temperature.shape == (10,) and traj.potential_energy.shape == (10,)
    e = 0.5 * SPRING * np.sum(traj.x**2, axis=(1, 2))
    np.testing.assert_allclose(traj.potential_energy, e, rtol=1e-12)
