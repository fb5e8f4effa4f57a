"""The CUDA kernels' maths, built for the CPU, against the JAX reference.

Every kernel body in cuda/kernels/*.cuh is compiled for the host (timemachine.backends.host)
and driven by the same launch sequence the GPU backend issues (backends.pipeline.Pipeline).
Each potential is checked on its own (a System with that one term) on random inputs that
exercise every parameter channel, and on real ones (trialanine with OBC2, villin in
vacuum): energy, gradient, ∂E/∂θ (jax.value_and_grad) and ζ (zeta_reference: one jvp of
∇E per parameter; for villin's all-pairs nonbonded term the production structured ζ,
make_gradient_and_zeta, which test_zeta checks against zeta_reference), to 1e-12
relative (max-abs error over max-abs value of each array). The whole system is then
checked against the sum of the per-term references (E, ∇E, ∂E/∂θ and ζ are sums over
terms; the real systems as a whole, and whole Langevin runs against the JAX equations,
are the ``cuda-host`` row of test_backend_matrix.py). Then what is peculiar to the
backend="cuda" runs on the host build: run_replicas as simulate per replica, fit against
backend="jax", launch-order independence, graph replay and sanitizers.

The references are jitted with the terms as *arguments* (they are pytrees), so systems
with the same term shapes share one XLA compilation, and compiled at XLA's lowest
optimisation level (compilation is most of this file's time; the arithmetic is the same
IEEE float64, without fast-math).
"""

import ctypes
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from backends import FAST_COMPILE, compiled_call, kernel_results
from conftest import rel

import timemachine as tm
from timemachine.backends import cupy_backend, noise
from timemachine.backends.abi import DTYPES, PCHUNK
from timemachine.backends.host import HostExecutor, host_compiler, load_host_library
from timemachine.errors import InputError, SimulationError
from timemachine.sensitivity.propagation import (
    exact_init,
    window_coefficients,
    window_init,
)
from timemachine.sensitivity.zeta import make_gradient_and_zeta, zeta_reference
from timemachine.system import (
    OBC2,
    HarmonicAngles,
    HarmonicBonds,
    Nonbonded,
    PeriodicTorsions,
    System,
)

pytestmark = pytest.mark.skipif(host_compiler() is None, reason="needs a host C++ compiler")

TOL = 1e-12


@pytest.fixture(scope="module")
def executor():
    t0 = time.perf_counter()
    ex = HostExecutor(load_host_library())
    print(f"host build + load: {time.perf_counter() - t0:.1f} s")
    return ex


def _terms_energy(terms):
    return lambda y, th: sum(t.energy(y, th) for t in terms)


def _reference_fn(terms, x, theta, dx, wrt):
    energy = _terms_energy(terms)
    e, (g, d) = jax.value_and_grad(energy, argnums=(0, 1))(x, theta)
    return e, g, d, zeta_reference(energy, x, theta, dx, wrt)


def _primal_fn(terms, x, theta):
    return jax.value_and_grad(_terms_energy(terms), argnums=(0, 1))(x, theta)


def reference_results(term, system, x, wrt, dx, zeta="reference"):
    """(E, ∇E, ∂E/∂θ, ζ) of one term of ``system`` from JAX. ζ from zeta_reference, or
    from the production structured path (``zeta="structured"``)."""
    args = (jnp.asarray(x), jnp.asarray(system.params))
    if zeta == "reference":
        wrt_j = jnp.asarray(wrt, dtype=jnp.int64)
        out = compiled_call(_reference_fn, (term,), *args, jnp.asarray(dx), wrt_j)
    else:
        single = System(system.masses, [term], system.param_names, system.params)
        e, (g, d) = compiled_call(_primal_fn, (term,), *args)
        fn = make_gradient_and_zeta(single, wrt)
        z = (
            jax.jit(fn)
            .lower(*args, jnp.asarray(dx))
            .compile(FAST_COMPILE)(*args, jnp.asarray(dx))[1]
        )
        out = (e, g, d, z)
    return (float(out[0]),) + tuple(np.asarray(a) for a in out[1:])


def check(got, ref, label):
    """Assert kernel results ``got`` match ``ref`` (E, ∇E, ∂E/∂θ, ζ) to TOL relative."""
    errs = [abs(got[0] - ref[0]) / max(abs(ref[0]), 1e-300)] + [
        rel(a, b) for a, b in zip(got[1:], ref[1:], strict=True)
    ]
    print(
        f"{label}: rel err E {errs[0]:.1e}  ∇E {errs[1]:.1e}  ∂E/∂θ {errs[2]:.1e}  ζ {errs[3]:.1e}"
    )
    for name, err in zip(("energy", "gradient", "dE/dθ", "ζ"), errs, strict=True):
        assert err < TOL, f"{label}: {name} relative error {err:.2e}"
    # the references are not trivially zero
    assert abs(ref[0]) > 0 and np.abs(ref[1]).max() > 0 and np.abs(ref[3]).max() > 0
    return errs


def compare_term_by_term(executor, system, x, wrt, dx, label, structured=(), whole=True):
    """Each term of ``system`` alone (a System with that one term), then (``whole``) all of
    them together against the sum of the per-term references. Terms whose kind is in
    ``structured`` get the production structured ζ as their reference. (The real systems
    as a whole are the ``cuda-host`` row of test_backend_matrix.py.)"""
    refs = []
    for term in system.terms:
        single = System(system.masses, [term], system.param_names, system.params)
        zeta = "structured" if term.kind in structured else "reference"
        ref = reference_results(term, system, x, wrt, dx, zeta)
        check(kernel_results(executor, single, x, wrt, dx), ref, f"{label} {term.kind}")
        refs.append(ref)
    if not whole:
        return
    total = tuple(sum(r[i] for r in refs) for i in range(4))
    check(kernel_results(executor, system, x, wrt, dx), total, f"{label} all terms")


# --------------------------------------------------------------------------- layout, noise


def test_struct_layouts_and_chunk_match_the_headers(executor):
    lib = executor.lib
    for name, dtype in DTYPES.items():
        assert lib.tm_sizeof(name.encode()) == dtype.itemsize, name
    assert lib.tm_pchunk() == PCHUNK


def test_philox_known_answers_and_numpy_port(executor):
    # Random123 kat_vectors for philox4x32_10
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for ctr, key, want in cases:
        c = np.array(ctr, dtype=np.uint32)
        k = np.array(key, dtype=np.uint32)
        out = np.zeros(4, dtype=np.uint32)
        executor.lib.tm_philox4x32_10(c.ctypes.data, k.ctypes.data, out.ctypes.data)
        assert out.tolist() == want
        assert noise.philox4x32_10(c[None], k)[0].tolist() == want
    # the per-atom normals: C++ and NumPy give the same stream; it is standard normal
    for seed, step, replica in [(0, 0, 0), (2**40 + 7, 2**33 + 5, 3)]:
        host = np.zeros((50, 3))
        executor.lib.tm_normals(seed, step, replica, 50, host.ctypes.data)
        np.testing.assert_allclose(
            host, noise.philox_normal(seed, step, 50, replica), rtol=1e-14, atol=1e-15
        )
    draws = np.concatenate([noise.philox_normal(1, t, 2000) for t in range(5)]).reshape(-1)
    assert abs(draws.mean()) < 0.02 and abs(draws.std() - 1.0) < 0.02
    assert abs(np.mean(draws**4) - 3.0) < 0.1  # Gaussian kurtosis
    assert not np.array_equal(noise.philox_normal(1, 0, 10), noise.philox_normal(1, 1, 10))
    assert not np.array_equal(noise.philox_normal(1, 0, 10, 0), noise.philox_normal(1, 0, 10, 1))


# --------------------------------------------------------------------------- random inputs


def random_system(seed=0, n=14):
    """Every term kind on random, well-separated atoms, with every parameter used."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = grid[rng.permutation(len(grid))[:n]] * 0.17 + rng.normal(scale=0.02, size=(n, 3))
    names, values = [], []

    def typed(kind, count, fields, low_high):
        start = len(values)
        for t in range(count):
            for f, (lo, hi) in zip(fields, low_high, strict=True):
                names.append(f"{kind}/T{t}/{f}")
                values.append(rng.uniform(lo, hi))
        return np.arange(start, len(values)).reshape(count, len(fields))

    bt = typed("bond", 3, ("length", "k"), [(0.1, 0.2), (1e4, 3e5)])
    at = typed("angle", 2, ("theta0", "k"), [(1.7, 2.1), (200, 600)])
    tt = typed("torsion", 3, ("phase", "k"), [(0, 3.1), (0.5, 8)])
    it = typed("improper", 2, ("phase", "k"), [(0, 3.1), (1, 4)])
    qt = typed("charge", 4, ("q",), [(-0.8, 0.8)])
    st = typed("sigma", 3, ("sigma",), [(0.1, 0.35)])
    et = typed("epsilon", 3, ("epsilon",), [(0.05, 0.9)])
    values[et[0, 0]] = 0.0  # ε = 0 (amber hydrogens): the safe-sqrt branch
    gt = typed("gb", 3, ("radius", "scale"), [(0.12, 0.2), (0.7, 0.9)])

    def pick(k, count):
        return np.array([rng.choice(n, size=k, replace=False) for _ in range(count)])

    bidx, btype = pick(2, 10), rng.integers(0, 3, 10)
    aidx, atype = pick(3, 8), rng.integers(0, 2, 8)
    tidx, ttype = pick(4, 9), rng.integers(0, 3, 9)
    iidx, itype = pick(4, 4), rng.integers(0, 2, 4)
    q_of, s_of, e_of, g_of = (rng.integers(0, c, n) for c in (4, 3, 3, 3))
    mask = rng.random((n, n)) < 0.8
    mask = np.triu(mask, 1)
    mask = mask | mask.T
    off = np.argwhere(np.triu(~mask, 1))
    exc = off[rng.permutation(len(off))[:6]]
    terms = [
        HarmonicBonds(bidx, bt[btype, 0], bt[btype, 1]),
        HarmonicAngles(aidx, at[atype, 0], at[atype, 1]),
        PeriodicTorsions(tidx, rng.integers(1, 5, 9), tt[ttype, 0], tt[ttype, 1], "torsion"),
        PeriodicTorsions(iidx, np.full(4, 2), it[itype, 0], it[itype, 1], "improper"),
        Nonbonded(
            qt[q_of, 0],
            st[s_of, 0],
            et[e_of, 0],
            mask,
            exc,
            rng.uniform(0.5, 0.9, len(exc)),
            rng.uniform(0.4, 0.6, len(exc)),
        ),
        OBC2(qt[q_of, 0], gt[g_of, 0], gt[g_of, 1]),
    ]
    system = System(rng.uniform(1, 16, n), terms, names, values)
    return system, x


@pytest.mark.parametrize("seed", [0, 1])
def test_every_potential_matches_jax_on_random_inputs(executor, seed):
    system, x = random_system(seed)
    rng = np.random.default_rng(100 + seed)
    wrt = np.arange(system.n_params)  # every channel of every term
    dx = rng.normal(scale=0.05, size=(wrt.size, system.n_atoms, 3))
    assert wrt.size > PCHUNK and wrt.size % PCHUNK  # several chunks, a partial last one
    compare_term_by_term(executor, system, x, wrt, dx, f"random{seed}")


def overlapping(system, x):
    """Atom 1 moved onto atom 0 and the GB scales shrunk, so that r + sr_j < or_i there."""
    x = x.copy()
    x[1] = x[0] + np.array([0.02, 0.0, 0.0])
    params = np.array(system.params)
    params[[i for i, n in enumerate(system.param_names) if n.endswith("/scale")]] = 0.3
    return system.with_params(params), x


def test_gb_branches_are_exercised():
    # both sides of OBC2's "r + sr_j >= or_i" and of max(or_i, |r - sr_j|) occur
    for system, x in (random_system(0), overlapping(*random_system(0))):
        gb = system.terms[-1]
        radius = system.params[gb.radius_index] - 0.009
        sr = system.params[gb.scale_index] * radius
        r = np.linalg.norm(x[:, None] - x[None], axis=-1) + np.eye(len(x))
        off = ~np.eye(len(x), dtype=bool)
        lower_is_or = radius[:, None] >= np.abs(r - sr[None, :])
        assert lower_is_or[off].any() and (~lower_is_or)[off].any()
    assert ((r + sr[None, :] - radius[:, None]) < 0)[off].any()


class LaunchLog(HostExecutor):
    """The host executor, keeping the names of the kernels it launched."""

    def __init__(self):
        super().__init__()
        self.kernels = set()

    def launch(self, kernel, nx, ny, block):
        self.kernels.add(kernel)
        super().launch(kernel, nx, ny, block)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tangents", ["bonded", "all"])
def test_pair_passes_with_and_without_parameter_tangents(seed, tangents):
    # without a charge, σ, ε, radius or scale among the tangents the pair ζ passes run as
    # their _xonly entry points (no mixed partials); with them, as the full ones: both
    # against JAX, term by term
    system, x = random_system(seed)
    pair_kinds = ("charge/", "sigma/", "epsilon/", "gb/")
    wrt = np.array(
        [
            i
            for i, n in enumerate(system.param_names)
            if tangents == "all" or not n.startswith(pair_kinds)
        ]
    )
    rng = np.random.default_rng(200 + seed)
    dx = rng.normal(scale=0.05, size=(wrt.size, system.n_atoms, 3))
    assert wrt.size > PCHUNK and wrt.size % PCHUNK
    log = LaunchLog()
    compare_term_by_term(log, system, x, wrt, dx, f"random{seed} {tangents} tangents")
    passes = {"tm_nonbonded_zeta", "tm_gb_dpsi", "tm_gb_dbeta", "tm_gb_zeta"}
    want = passes if tangents == "all" else {k + "_xonly" for k in passes}
    variants = passes | {k + "_xonly" for k in passes}
    assert log.kernels & variants == want


def test_overlapping_gb_atoms_match_jax(executor):
    # the skipped branch of the Born integral (an atom inside another's offset radius)
    # (every parameter: the same shapes as the random systems, so the same compiled reference)
    system, x = overlapping(*random_system(0))
    gb = system.terms[-1]
    gb_only = System(system.masses, [gb], system.param_names, system.params)
    wrt = np.arange(system.n_params)
    dx = np.random.default_rng(5).normal(scale=0.05, size=(wrt.size, system.n_atoms, 3))
    ref = reference_results(gb, system, x, wrt, dx)
    check(kernel_results(executor, gb_only, x, wrt, dx), ref, "overlapping gb")


# --------------------------------------------------------------------------- real inputs


@pytest.fixture(scope="module")
def trialanine_obc2(trialanine):
    return tm.load_system(trialanine, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2")


def test_trialanine_obc2_term_by_term(executor, trialanine_obc2):
    system, x = trialanine_obc2
    wrt = np.arange(system.n_params)  # all 167 parameters: every type of every term
    dx = np.random.default_rng(1).normal(scale=0.02, size=(wrt.size, system.n_atoms, 3))
    compare_term_by_term(executor, system, x, wrt, dx, "trialanine obc2", whole=False)


@pytest.mark.slow
def test_villin_vacuum_term_by_term(executor, villin):
    system, x = tm.load_system(villin, forcefield=("amber99sbildn.xml",))
    torsions = system.select("torsion*")
    wrt = np.concatenate([torsions[:56], system.select(["charge/*", "sigma/*"])[:4]])
    dx = np.random.default_rng(2).normal(scale=0.01, size=(wrt.size, system.n_atoms, 3))
    assert system.n_atoms > 500 and wrt.size == 60
    assert {t.kind for t in system.terms} == {"bond", "angle", "torsion", "improper", "nonbonded"}
    # the all-pairs term's ζ against the production path (zeta_reference there would vmap
    # 60 jvps over 582² pair arrays); the bonded terms against zeta_reference
    compare_term_by_term(
        executor, system, x, wrt, dx, "villin", structured=("nonbonded",), whole=False
    )


# --------------------------------------------------------------------------- dynamics


WRT = ["torsion/*", "gb/*/radius"]  # the θ of the dynamics tests (one compiled ζ for all)


@pytest.mark.parametrize("method", ["exact", "window"])
def test_run_replicas_on_cuda_is_simulate_per_replica(host_cuda_backend, trialanine_obc2, method):
    # run_replicas(backend="cuda") runs the replicas one after another on one program;
    # each row is bitwise the run simulate(backend="cuda", replica=r) gives
    from timemachine.fitting import run_replicas

    system, x = trialanine_obc2
    integ = tm.LangevinIntegrator(temperature=300.0, friction=5.0, dt=0.001, seed=7)
    kw = dict(wrt="torsion/*", save_every=10, method=method)
    if method == "window":
        kw["window"] = 7
    got = run_replicas(system, x, integ, 20, n_replicas=2, first_replica=3, backend="cuda", **kw)
    np.testing.assert_array_equal(got.replicas, [3, 4])
    np.testing.assert_array_equal(got.steps, [10, 20])
    for row, replica in enumerate(got.replicas):
        one = tm.simulate(
            system, x, integ, 20, backend="cuda", replica=int(replica), progress=False, **kw
        )
        np.testing.assert_array_equal(got.frames_x[row], one.x)
        np.testing.assert_array_equal(got.frames_dx_dtheta[row], one.dx_dtheta)
        np.testing.assert_array_equal(got.v[row], one.v[-1])
        assert got.potential_energy[row] == one.potential_energy[-1]
        for field in one.final_state._fields:
            np.testing.assert_array_equal(
                np.asarray(getattr(got.final_state, field))[row],
                np.asarray(getattr(one.final_state, field)),
                err_msg=field,
            )
    assert np.abs(got.x[0] - got.x[1]).max() > 1e-3  # two noise streams


def test_fit_on_cuda_matches_jax_without_noise(host_cuda_backend):
    # tm.fit(backend="cuda"): the replicas run on the kernels; with no noise the loss and
    # its gradient are the JAX backend's
    from timemachine.fitting.recovery import recovery_problem

    problem = recovery_problem(2, 20, equilibration=0)
    integ = tm.LangevinIntegrator(temperature=0.0, friction=5.0, dt=0.002, seed=0)
    x0 = problem["x0"] + np.random.default_rng(2).normal(scale=0.01, size=problem["x0"].shape)
    fits = {
        backend: tm.fit(
            problem["system"],
            x0,
            integ,
            problem["targets"],
            problem["wrt"],
            params=problem["start"],
            epochs=2,
            n_replicas=2,
            n_steps=20,
            progress=False,
            backend=backend,
            estimator="pathwise",
        )  # fmt: skip
        for backend in ("jax", "cuda")
    }
    for ref, got in zip(fits["jax"].history, fits["cuda"].history, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-9)
        assert rel(got["gradient"], ref["gradient"]) < 1e-9
    assert np.abs(fits["jax"].history[0]["gradient"]).max() > 0
    assert rel(fits["cuda"].theta, fits["jax"].theta) < 1e-9


@pytest.mark.parametrize("method", ["exact", "window"])
def test_results_do_not_depend_on_the_order_threads_run_in(monkeypatch, trialanine_obc2, method):
    # a GPU runs a launch's threads in no fixed order: run every launch of a thermal run
    # (bonded, nonbonded and GB passes, gathers, Langevin and sensitivity updates) in index
    # order, reversed and strided on the host, and ask for the same bits. A thread that
    # reads or writes what another thread of its launch writes would change them.
    from timemachine import backends
    from timemachine.backends.host import LAUNCH_ORDERS

    system, x = trialanine_obc2
    integ = tm.LangevinIntegrator(temperature=300.0, friction=5.0, dt=0.001, seed=5)
    kw = dict(wrt=WRT, save_every=4, method=method, progress=False)
    if method == "window":
        kw["window"] = 3
    monkeypatch.setattr(backends, "require_cuda", lambda: None)
    real = cupy_backend.make_program
    runs = {}
    for order in LAUNCH_ORDERS:
        monkeypatch.setattr(
            cupy_backend,
            "make_program",
            lambda system, wrt, method, executor=None, o=order: real(
                system, wrt, method, HostExecutor(order=o)
            ),
        )
        runs[order] = tm.simulate(system, x, integ, 12, backend="cuda", **kw)
    ref = runs["index"]
    assert np.abs(ref.dx_dtheta).max() > 1e-6
    for order in LAUNCH_ORDERS[1:]:
        for key in ("x", "v", "dx_dtheta", "potential_energy"):
            np.testing.assert_array_equal(getattr(runs[order], key), getattr(ref, key), key)
    with pytest.raises(InputError, match="order must be one of"):
        HostExecutor(order="random")


@pytest.mark.parametrize("method", ["exact", "window"])
def test_graph_replay_gives_the_bits_of_launch_by_launch(monkeypatch, trialanine_obc2, method):
    # the steps run as captured graphs (recorded launch sequences on the host), split into
    # graphs of 1, MAX_GRAPH_STEPS and the rest; a new replica or θ rewrites the argument
    # blocks in place, which the replayed graphs must see
    system, x = trialanine_obc2
    monkeypatch.setattr(cupy_backend, "MAX_GRAPH_STEPS", 3)
    integ = tm.LangevinIntegrator(temperature=300.0, friction=5.0, dt=0.001, seed=9)
    coeffs = integ.coefficients(system.masses)
    wrt = system.select(WRT)
    k = 3 if method == "window" else None
    wco = window_coefficients(integ, k) if k else None
    theta2 = np.array(system.params)
    theta2[wrt[:4]] *= 1.1
    captures = []
    runs = {}
    for graphs in (True, False):
        ex = HostExecutor()
        real_capture = ex.capture
        ex.capture = lambda fn, real=real_capture: captures.append(1) or real(fn)
        program = cupy_backend.make_program(system, wrt, method, ex, graphs=graphs)
        v = np.asarray(tm.integrator.langevin.maxwell_boltzmann_velocities(system.masses, 300.0, 9))
        state = exact_init(x, v, wrt.size) if k is None else window_init(x, v, wrt.size, k)
        out = []
        for theta, replica in ((system.params, 0), (system.params, 0), (system.params, 1)):
            state, frames, look = program(3, state, 2, 7, theta, coeffs, wco, 9, replica)
            out.append((frames, look))
        state, frames, look = program(3, state, 2, 7, theta2, coeffs, wco, 9, 1)
        out.append((frames, look))
        runs[graphs] = out
    # graphs of 1 and 3 steps, captured in the first call and replayed ever after
    assert len(captures) == 2
    for (fg, lg), (fd, ld) in zip(runs[True], runs[False], strict=True):
        for a, b in zip(fg, fd, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(lg, ld)
    assert np.abs(runs[True][-1][0][2]).max() > 1e-6


def test_a_failed_capture_warns_and_launches_one_by_one(trialanine_obc2):
    system, x = trialanine_obc2
    integ = tm.LangevinIntegrator(temperature=300.0, friction=5.0, dt=0.001, seed=9)
    coeffs = integ.coefficients(system.masses)
    wrt = system.select(WRT)
    ex = HostExecutor()

    def broken(fn):
        raise SimulationError("CUDA kernel CUDA graph capture failed: cudaErrorNotSupported")

    ex.capture = broken
    program = cupy_backend.make_program(system, wrt, "exact", ex, graphs=True)
    state = exact_init(x, np.zeros_like(x), wrt.size)
    with pytest.warns(RuntimeWarning, match="graph capture failed.*one by one"):
        got = program(1, state, 1, 5, system.params, coeffs, None, 9, 0)
    assert not program.graphs
    ref = cupy_backend.make_program(system, wrt, "exact", HostExecutor(), graphs=False)
    want = ref(1, state, 1, 5, system.params, coeffs, None, 9, 0)
    np.testing.assert_array_equal(got[1][2], want[1][2])


SANITIZED_RUN = """
import numpy as np
import openmm.app as app, os
import timemachine as tm
from timemachine.backends import cupy_backend
from timemachine.backends.host import HostExecutor, load_host_library
from timemachine.sensitivity.propagation import exact_init, window_coefficients, window_init

lib = load_host_library(SANITIZER_FLAGS)
pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
cases = [
    (tm.build_peptide("AAA"), "obc2", ["torsion/*", "gb/*/radius", "charge/*"]),
    (tm.strip_solvent(pdb.topology, pdb.positions), None, ["torsion/*"]),
]
integ = tm.LangevinIntegrator(temperature=300.0, friction=5.0, dt=0.001, seed=5)
for structure, solvent, wrt in cases:
    system, x = tm.load_system(structure, implicit_solvent=solvent)
    wrt = system.select(wrt)[:60]
    coeffs = integ.coefficients(system.masses)
    for method, k in (("exact", None), ("window", 3)):
        program = cupy_backend.make_program(system, wrt, method, HostExecutor(lib))
        v = np.zeros_like(x)
        state = exact_init(x, v, wrt.size) if k is None else window_init(x, v, wrt.size, k)
        wco = window_coefficients(integ, k) if k else None
        _, frames, _ = program(2, state, 2, 2, system.params, coeffs, wco, 5, 0)
        assert np.isfinite(frames[2]).all()
    program.pipeline.dedtheta_pass()
    print(system.n_atoms, "atoms,", wrt.size, "parameters: clean")
"""


def test_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers(sanitizer_env):
    # an out-of-bounds index on a GPU corrupts memory silently or faults the context; on
    # the host ASan and UBSan stop at the first bad access and name it. Every kernel runs
    # here (trialanine/OBC2 with torsions, radii and charges; villin with P = 60, a tail
    # tangent chunk and several exclusion-mask words), exact and window, and ∂E/∂θ.
    import subprocess
    import sys

    from conftest import SANITIZER_FLAGS

    code = SANITIZED_RUN.replace("SANITIZER_FLAGS", repr(tuple(SANITIZER_FLAGS.split())))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=sanitizer_env, capture_output=True, text=True
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert report.count("clean") == 2, report[-6000:]


def test_concurrent_builds_of_one_library_compile_it_once(tmp_path, monkeypatch):
    """Two threads asking for the same library at once (two test or Dask workers starting
    together) share one compiler run: the second waits on the build's lock and loads the
    first one's output. The compiler is a wrapper that logs each call and is slow enough
    (1 s) for the two requests to overlap."""
    import threading

    from timemachine.backends.host import build_shared_library

    cxx = host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\necho call >> "{log}"\nsleep 1\nexec {cxx} "$@"\n')
    wrapper.chmod(0o755)
    src = tmp_path / "tiny.cpp"
    src.write_text('extern "C" int tm_tiny() { return 7; }\n')
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("TIMEMACHINE_CACHE", str(tmp_path / "cache"))
    paths = []

    def build():
        paths.append(build_shared_library(str(src), "tiny", ["-O1"]))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    assert log.read_text().count("call") == 1
    assert ctypes.CDLL(paths[0]).tm_tiny() == 7
