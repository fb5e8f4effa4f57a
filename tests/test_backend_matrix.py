"""One backend consistency matrix (issue 16): every backend of tests/backends.py against
the reference JAX definitions, each check written once.

Backends (the ``backend`` fixture): ``reference``, ``structured``, ``structured-host``
(the XLA CPU custom call), ``cuda-host`` (the CUDA kernels built for the CPU) and
``cuda-gpu`` (CuPy; marked ``gpu``, skipped without one). A backend takes part in the
checks it lists in ``checks``, with the tolerances (``tol``) and run lengths
(``dynamics``) its own tests used before the matrix.

Static checks, on trialanine (vacuum and OBC2; ζ over the torsion k's and over every
parameter) and villin (slow): ∇E and ζ = H·dx/dθ + ∂²E/∂x∂θ (random and zero tangents),
E and ∂E/∂θ. Dynamics, on trialanine with OBC2 (and villin on a GPU): noise-free
``simulate`` (exact and window) and a thermal one against the engine's equations fed the
CUDA noise stream (``backends.equation_run``), repeated runs bit for bit, and noise-free
``run_replicas`` against ``backend="jax"``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from backends import BACKENDS, equation_run
from conftest import rel, rel_err

import timemachine as tm

REFERENCE = BACKENDS["reference"]


def backends_for(check):
    """The ``backend`` parameters (indirect) of the backends that take part in ``check``."""
    return [
        pytest.param(b.id, id=b.id, marks=[pytest.mark.gpu] if b.id == "cuda-gpu" else [])
        for b in BACKENDS.values()
        if check in b.checks
    ]


def over(check, cases=()):
    """Parametrize a test over the backends in ``check`` (and the static ``cases``)."""

    def wrap(fn):
        fn = pytest.mark.parametrize("backend", backends_for(check), indirect=True)(fn)
        return pytest.mark.parametrize("case", cases, indirect=True)(fn) if cases else fn

    return wrap


@pytest.fixture
def backend(request):
    b = BACKENDS[request.param]
    ok, why = b.available()
    if not ok:
        pytest.skip(why)
    return b


# --------------------------------------------------------------------------- systems


@pytest.fixture(scope="module")
def trialanine_vacuum(trialanine):
    return tm.load_system(trialanine, forcefield=("amber99sbildn.xml",))


@pytest.fixture(scope="module")
def trialanine_obc2(trialanine):
    return tm.load_system(trialanine, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2")


@pytest.fixture(scope="module")
def villin_vacuum(villin):
    return tm.load_system(villin, forcefield=("amber99sbildn.xml",))


@pytest.fixture(scope="module")
def villin_minimized(villin_vacuum):
    system, x = villin_vacuum
    theta = jnp.asarray(system.params)
    energy = system.energy_fn()
    x = tm.minimize(
        jax.jit(lambda y: energy(y, theta)),
        jax.jit(jax.grad(lambda y: energy(y, theta))),
        x,
        tolerance=10.0,
        max_iterations=300,
    )
    return system, np.asarray(x)


def _villin_wrt(system):
    # the torsion k's (60-90 of them) and four charge/σ channels: the all-pairs term's
    # mixed partials on a system of several pair tiles and exclusion-mask words
    wrt = np.concatenate(
        [system.select("torsion/*/k*"), system.select(["charge/*", "sigma/*"])[:4]]
    )
    assert system.n_atoms > 500 and 64 <= wrt.size <= 94
    return wrt


CASES = {  # static case -> (system fixture, wrt)
    "trialanine-vacuum-torsion_k": ("trialanine_vacuum", lambda s: s.select("torsion/*/k*")),
    "trialanine-vacuum-all": ("trialanine_vacuum", lambda s: np.arange(s.n_params)),
    "trialanine-obc2-torsion_k": ("trialanine_obc2", lambda s: s.select("torsion/*/k*")),
    "trialanine-obc2-all": ("trialanine_obc2", lambda s: np.arange(s.n_params)),
    "villin": ("villin_vacuum", _villin_wrt),
}
STATIC_CASES = [
    pytest.param(name, marks=[pytest.mark.slow] if name == "villin" else []) for name in CASES
]


@pytest.fixture(scope="module")
def case(request):
    """(system, x, wrt, random tangents dx, θ) of one static case."""
    fixture, select = CASES[request.param]
    system, x = request.getfixturevalue(fixture)
    wrt = np.asarray(select(system))
    dx = np.random.default_rng(0).normal(scale=1e-3, size=(wrt.size, system.n_atoms, 3))
    return system, np.asarray(x), wrt, dx, np.asarray(system.params)


# --------------------------------------------------------------------------- static checks


def per_param_ok(got, ref, tol):
    """Each parameter's own ζ_p within rtol of its norm (+ atol): none is swamped."""
    rtol, atol = tol
    p = len(ref)
    err = np.linalg.norm((got - ref).reshape(p, -1), axis=1)
    return bool(np.all(err <= rtol * np.linalg.norm(ref.reshape(p, -1), axis=1) + atol))


METRICS = {
    "max": lambda got, ref, tol: rel(got, ref) <= tol,  # max-abs over max-abs
    "norm": lambda got, ref, tol: rel_err(got, ref) <= tol,  # Frobenius
    "per_param": per_param_ok,
}


def assert_close(backend, quantity, got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, quantity
    tols = backend.tol[quantity]
    print(f"{backend.id} {quantity}: max rel {rel(got, ref):.1e}, norm rel {rel_err(got, ref):.1e}")
    for metric, tol in tols.items():
        assert METRICS[metric](got, ref, tol), f"{backend.id} {quantity}: {metric} > {tol}"


_REFERENCE_RESULTS = {}


def matches_reference(backend, method, quantities, case, *dx):
    """``backend.<method>`` on a static case against the reference's, quantity by quantity
    with the backend's tolerances; returns the backend's results."""
    system, x, wrt, _, theta = case
    got = getattr(backend, method)(system, wrt, x, theta, *dx)
    key = (method, id(system), wrt.tobytes()) + tuple(hash(d.tobytes()) for d in dx)
    if key not in _REFERENCE_RESULTS:  # one reference per case for all the backends
        _REFERENCE_RESULTS[key] = getattr(REFERENCE, method)(system, wrt, x, theta, *dx)
    ref = _REFERENCE_RESULTS[key]
    for quantity, a, b in zip(quantities, got, ref, strict=True):
        assert_close(backend, quantity, a, b)
    return got


@pytest.mark.parametrize("tangents", ["random", "zero"])
@over("gradient_and_zeta", STATIC_CASES)
def test_gradient_and_zeta_match_the_reference(backend, case, tangents):
    system, x, wrt, dx, theta = case
    if tangents == "zero":  # ζ is then the pure mixed partial ∂²E/∂x∂θ
        dx = np.zeros_like(dx)
    _, z = matches_reference(backend, "gradient_and_zeta", ("gradient", "zeta"), case, dx)
    assert np.shape(z) == (wrt.size, system.n_atoms, 3)


@over("energy_and_dedtheta", STATIC_CASES)
def test_energy_and_dedtheta_match_the_reference(backend, case):
    matches_reference(backend, "energy_and_dedtheta", ("energy", "dedtheta"), case)


@over("nontrivial", STATIC_CASES)
def test_reference_is_not_trivially_zero(backend, case):
    system, x, wrt, dx, theta = case
    e, d = backend.energy_and_dedtheta(system, wrt, x, theta)
    g, z = backend.gradient_and_zeta(system, wrt, x, theta, dx)
    assert abs(e) > 0 and np.abs(d).max() > 0 and np.abs(g).max() > 0 and np.abs(z).max() > 0


# --------------------------------------------------------------------------- dynamics


def _frames(dyn):
    return np.arange(1, dyn.n_steps // dyn.save_every + 1) * dyn.save_every


def _energy(system, xs):
    return np.array([REFERENCE.energy_and_dedtheta(system, (), y, system.params)[0] for y in xs])


@pytest.mark.parametrize("method", ["exact", "window"])
@over("noise_free_simulate")
def test_noise_free_simulate_matches_the_equations(backend, trialanine_obc2, method):
    system, x = trialanine_obc2
    dyn, tol = backend.dynamics["noise_free_simulate"], backend.tol["dynamics"]
    n = dyn.n_steps
    integ = tm.LangevinIntegrator(temperature=0.0, friction=dyn.friction, dt=0.001, seed=3)
    v0 = np.random.default_rng(0).normal(scale=0.3, size=x.shape)
    wrt = system.select(dyn.wrt)
    kw = dict(wrt=wrt, save_every=dyn.save_every, method=method, progress=False, **dyn.extra)
    window = dyn.window if method == "window" else None
    if window is not None:
        kw["window"] = window  # folds happen within the run
    got = backend.simulate(system, x, integ, n, v0=v0, **kw)
    xs, vs, dxs = equation_run(system, x, v0, integ, wrt, n, dyn.save_every, window)
    frames = _frames(dyn)
    np.testing.assert_array_equal(got.steps, frames)
    for key, ref in (("x", xs[frames]), ("v", vs[frames]), ("dx_dtheta", dxs)):
        err = rel(getattr(got, key), ref)
        print(f"{backend.id} {method} {key}: rel err {err:.1e}")
        assert err < tol, key
    assert np.abs(dxs[-1]).max() > 1e-6 and np.abs(xs[n] - x).max() > 1e-3
    if window is not None:  # the folds matter: the windowed dx/dθ is not the exact one
        exact_dxs = equation_run(system, x, v0, integ, wrt, n, dyn.save_every)[2]
        assert rel(dxs[-1], exact_dxs[-1]) > 1e-6
    # energies of the frames: E(x_t), and the on-step kinetic energy from v_{t±1/2}
    m = np.asarray(system.masses)[:, None]
    ke = [0.5 * np.sum(m * (0.5 * (vs[t] + vs[t + 1])) ** 2) for t in frames]
    np.testing.assert_allclose(got.potential_energy, _energy(system, xs[frames]), rtol=tol)
    np.testing.assert_allclose(got.kinetic_energy, ke, rtol=tol)
    # the returned state continues the same run
    more = backend.simulate(system, got.final_state, integ, n // 2, **kw)
    again = backend.simulate(system, x, integ, n + n // 2, v0=v0, **kw)
    np.testing.assert_array_equal(more.x[-1], again.x[-1])
    np.testing.assert_array_equal(more.dx_dtheta[-1], again.dx_dtheta[-1])


THERMAL = [
    pytest.param(p.values[0], name, id=f"{p.id}-{name}", marks=p.marks)
    for p in backends_for("thermal_simulate")
    for name in BACKENDS[p.values[0]].dynamics["thermal_simulate"].extra["systems"]
]


@pytest.mark.parametrize("backend, system_name", THERMAL, indirect=["backend"])
def test_thermal_simulate_matches_the_equations_fed_the_same_noise(backend, system_name, request):
    system, x = request.getfixturevalue(system_name)
    dyn, tol = backend.dynamics["thermal_simulate"], backend.tol["dynamics"]
    wrt = system.select(dyn.wrt)
    if system_name == "villin_minimized":
        wrt = wrt[:60]
    n, replica = dyn.n_steps, dyn.extra["replica"]
    integ = tm.LangevinIntegrator(temperature=300.0, friction=dyn.friction, dt=0.001, seed=11)
    got = backend.simulate(
        system, x, integ, n, wrt=wrt, save_every=n, replica=replica, progress=False
    )
    v = np.asarray(
        tm.integrator.langevin.maxwell_boltzmann_velocities(system.masses, 300.0, 11, replica)
    )
    xs, _, dxs = equation_run(system, x, v, integ, wrt, n, n, replica=replica)
    ex, edx = rel(got.x[-1], xs[n]), rel(got.dx_dtheta[-1], dxs[-1])
    print(f"{backend.id} {system_name} (P={wrt.size}): rel err x {ex:.1e} dx/dθ {edx:.1e}")
    assert ex < tol and edx < tol
    assert np.abs(xs[n] - x).max() > dyn.extra["moved"]  # it moved


@over("repeated_simulate")
def test_repeated_simulate_runs_are_bitwise_identical(backend, trialanine_obc2):
    system, x = trialanine_obc2
    dyn = backend.dynamics["repeated_simulate"]
    integ = tm.LangevinIntegrator(temperature=300.0, friction=dyn.friction, dt=0.001, seed=4)
    kw = dict(wrt=dyn.wrt, save_every=dyn.save_every, progress=False)
    runs = [backend.simulate(system, x, integ, dyn.n_steps, **kw) for _ in range(2)]
    for key in ("x", "v", "dx_dtheta", "potential_energy"):
        np.testing.assert_array_equal(getattr(runs[0], key), getattr(runs[1], key), key)


@over("noise_free_run_replicas")
def test_noise_free_run_replicas_matches_jax(backend, trialanine_obc2):
    from timemachine.fitting import run_replicas

    system, x = trialanine_obc2
    dyn, tol = backend.dynamics["noise_free_run_replicas"], backend.tol["dynamics"]
    integ = tm.LangevinIntegrator(temperature=0.0, friction=dyn.friction, dt=0.001, seed=0)
    m = dyn.extra["n_replicas"]
    v0 = np.random.default_rng(dyn.extra["v0_seed"]).normal(scale=0.3, size=(m,) + x.shape)
    kw = dict(wrt=dyn.wrt, n_replicas=m, v0=v0, save_every=dyn.save_every)
    ref = run_replicas(system, x, integ, dyn.n_steps, backend="jax", **kw)
    got = backend.run_replicas(system, x, integ, dyn.n_steps, **kw)
    for key in ("x", "v", "dx_dtheta", "frames_x", "frames_dx_dtheta", "potential_energy"):
        err = rel(getattr(got, key), getattr(ref, key))
        print(f"{backend.id} run_replicas {key}: rel err {err:.1e}")
        assert err < tol, key
    assert np.abs(ref.dx_dtheta).max() > 1e-6 and np.abs(ref.x[0] - ref.x[1]).max() > 1e-3
