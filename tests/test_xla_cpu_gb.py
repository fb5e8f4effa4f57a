"""The plain-MD gradient's CPU custom call (timemachine.backends.xla_cpu_gb): OBC2 and the
all-pairs LJ + Coulomb in C++ against jax.grad of the JAX reference energy, with and
without pass 1's cache, thread-count independence, a plain trajectory with the call on
and off, the reference's derivatives through its custom_jvp, the fallbacks, and a
sanitizer run."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_compile_env, rel_err

import timemachine as tm
from timemachine.backends import xla_cpu_gb
from timemachine.structured import gradient_fn, make_gradient

pytestmark = pytest.mark.skipif(
    not xla_cpu_gb.available()[0],
    reason=f"CPU custom call unavailable: {xla_cpu_gb.available()[1]}",
)


def _terms(system):
    nb = [t for t in system.terms if t.structured == "nonbonded"]
    gb = [t for t in system.terms if t.structured == "obc2"]
    return (nb[0] if nb else None), (gb[0] if gb else None)


@pytest.fixture(scope="module")
def villin_obc2(villin):
    return tm.load_system(villin, implicit_solvent="obc2")


@pytest.fixture(scope="module")
def trialanine_obc2(trialanine):
    return tm.load_system(trialanine, implicit_solvent="obc2")


@pytest.mark.parametrize("name", ["trialanine_obc2", "villin_obc2"])
def test_gradient_matches_jax_grad_of_the_reference_energy(name, request):
    """The whole plain-MD gradient (pairs in this call, bonded terms in xla_cpu's) against
    jax.grad of System.energy, to ≤ 1e-12 relative; and each all-pairs part alone (OBC2
    with pass 1's cache and without it, LJ + Coulomb with its exclusions) against
    jax.grad of that term's energy."""
    system, x = request.getfixturevalue(name)
    x, theta = jnp.asarray(x), jnp.asarray(system.params)
    want = jax.jit(jax.grad(system.energy_fn()))(x, theta)
    fast = xla_cpu_gb.make_gradient(system)
    assert fast is not None
    got = jax.jit(fast)(x, theta)
    assert rel_err(got, want) <= 1e-12
    assert float(jnp.abs(got - want).max()) <= 1e-12 * float(jnp.abs(want).max())
    nb, gb = _terms(system)
    for term, kwargs in [(gb, {}), (gb, {"cache_bytes": 0}), (nb, {})]:
        pairs = xla_cpu_gb.PairGradient(
            system.n_atoms, term if term is nb else None, term if term is gb else None, **kwargs
        )
        ref = jax.jit(jax.grad(term.energy))(x, theta)
        if term is nb:  # the 1-4 exceptions are a coordinate group, not this call's
            from timemachine.potentials import nonbonded_exceptions

            q, sig, eps = (theta[np.asarray(i)] for i in (nb.charge_index, nb.sigma_index,
                                                          nb.epsilon_index))  # fmt: skip
            ref = ref - jax.grad(nonbonded_exceptions)(
                x, nb.exception_idx, q, sig, eps, nb.coulomb_scale, nb.lj_scale
            )
        assert rel_err(jax.jit(pairs)(x, theta), ref) <= 1e-12, (term.kind, kwargs)


def test_exclusion_lists_are_the_masked_upper_triangle():
    mask = np.ones((7, 7), bool)
    np.fill_diagonal(mask, False)
    for i, j in [(0, 1), (0, 5), (2, 3), (6, 4)]:
        mask[i, j] = mask[j, i] = False
    start, partners = xla_cpu_gb.exclusion_lists(mask)
    rows = {i: list(partners[start[i] : start[i + 1]]) for i in range(7)}
    assert rows == {0: [1, 5], 1: [], 2: [3], 3: [], 4: [6], 5: [], 6: []}


def test_small_and_odd_sizes(trialanine_obc2):
    """Sizes around the SIMD width (W = 4) and the 16 units (partial blocks, units with no
    rows): the first n atoms of trialanine at random positions, with its exclusions."""
    system, _ = trialanine_obc2
    nb, gb = _terms(system)
    theta = jnp.asarray(system.params)
    rng = np.random.default_rng(5)
    for n in (2, 3, 5, 17, 33):
        sub_nb = dataclasses.replace(
            nb, charge_index=nb.charge_index[:n], sigma_index=nb.sigma_index[:n],
            epsilon_index=nb.epsilon_index[:n], pair_mask=nb.pair_mask[:n, :n],
            exception_idx=np.zeros((0, 2), np.int64), coulomb_scale=np.zeros(0),
            lj_scale=np.zeros(0),
        )  # fmt: skip
        sub_gb = dataclasses.replace(
            gb, charge_index=gb.charge_index[:n], radius_index=gb.radius_index[:n],
            scale_index=gb.scale_index[:n],
        )  # fmt: skip
        grid = np.stack(np.unravel_index(np.arange(n), (4, 4, 4)), axis=1) * 0.25
        xs = jnp.asarray(grid + rng.uniform(-0.03, 0.03, size=(n, 3)))
        for pair_nb, pair_gb, term in [(None, sub_gb, sub_gb), (sub_nb, None, sub_nb)]:
            pairs = xla_cpu_gb.PairGradient(n, pair_nb, pair_gb)
            want = np.asarray(jax.jit(jax.grad(term.energy))(xs, theta))
            got = np.asarray(jax.jit(pairs)(xs, theta))
            scale = max(float(np.abs(want).max()), 1.0)  # n = 2: the pair is excluded
            assert float(np.abs(got - want).max()) <= 1e-12 * scale, (n, term.kind)


def test_gradient_fn_uses_the_call_and_keeps_the_reference_derivatives(trialanine_obc2):
    """gradient_fn (plain dynamics, EquilibriumChains) is the custom call's gradient; its
    derivatives with respect to θ (force matching) and x are the JAX reference's, through
    the custom_jvp; a float32 step keeps the reference."""
    system, x = trialanine_obc2
    x, theta = jnp.asarray(x), jnp.asarray(system.params)
    fn = gradient_fn(system)
    ref = make_gradient(system)
    assert fn is not ref and "xla_cpu_gb" in fn.__module__
    v = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))

    def loss(g, th):
        return jnp.sum(g(x, th) * v)

    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda th: loss(fn, th)))(theta),
        jax.jit(jax.grad(lambda th: loss(ref, th)))(theta),
        rtol=1e-12,
        atol=1e-12,
    )
    # under jit: traced op by op, the custom_jvp's rule costs ~30 s of dispatch
    hv = jax.jit(lambda y, t: jax.jvp(lambda z: fn(z, theta), (y,), (t,))[1])(x, v)
    hv_ref = jax.jit(lambda y, t: jax.jvp(lambda z: ref(z, theta), (y,), (t,))[1])(x, v)
    assert rel_err(hv, hv_ref) <= 1e-13
    g32 = jax.jit(fn)(x.astype(jnp.float32), theta.astype(jnp.float32))
    assert g32.dtype == jnp.float32


def test_plain_trajectory_with_the_call_on_and_off(villin_obc2):
    """40 thermal steps of villin/OBC2 with the custom call and with the JAX reference
    gradient: the same trajectory to round-off."""
    from timemachine.integrator import run

    system, x = villin_obc2
    x = tm.minimize_system(system, x, max_iterations=50, warn=False)
    theta = jnp.asarray(system.params)
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.0015, seed=4)
    fast, ref = xla_cpu_gb.make_gradient(system), make_gradient(system)
    out = []
    for g in (fast, ref):

        def gradient(y, g=g):
            return g(y, theta)

        traj = run(gradient, system.masses, x, integrator, 40, save_every=10)
        out.append(np.asarray(traj.x))
    scale = np.abs(out[1] - np.asarray(x)[None]).max()  # how far the atoms moved
    assert np.abs(out[0] - out[1]).max() <= 1e-9 * scale
    assert np.abs(out[0] - out[1]).max() <= 1e-11


def test_host_kernels_off_falls_back(trialanine_obc2, monkeypatch):
    system, _ = trialanine_obc2
    monkeypatch.setenv("TIMEMACHINE_HOST_KERNELS", "0")
    assert xla_cpu_gb.available() == (False, "TIMEMACHINE_HOST_KERNELS=0")
    assert xla_cpu_gb.make_gradient(system) is None


def test_custom_call_rejects_mismatched_shapes(trialanine_obc2):
    system, x = trialanine_obc2
    nb, gb = _terms(system)
    pairs = xla_cpu_gb.PairGradient(system.n_atoms, nb, gb)
    pairs.excl_start = pairs.excl_start[:-1]
    with pytest.raises(Exception, match="excl_start"):
        jax.block_until_ready(jax.jit(pairs)(jnp.asarray(x), jnp.asarray(system.params)))


_ONE_CPU = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before jax: a 1-thread pool
import jax, jax.numpy as jnp, numpy as np
import openmm.app as app
import timemachine as tm
from timemachine.backends import xla_cpu_gb
pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
system, x = tm.load_system(tm.strip_solvent(pdb.topology, pdb.positions), implicit_solvent="obc2")
g = jax.jit(xla_cpu_gb.make_gradient(system))(jnp.asarray(x), jnp.asarray(system.params))
np.save(sys.argv[1], np.asarray(g))
cut, x = tm.load_system(tm.strip_solvent(pdb.topology, pdb.positions), implicit_solvent="obc2",
                        nonbonded_method="CutoffNonPeriodic", cutoff=0.8)
gb = [t for t in cut.terms if t.kind == "gb"][0]
nb = gb.build_neighbours(jnp.asarray(x))
g = jax.jit(lambda y, p: xla_cpu_gb.gb_list_gradient(gb, y, p, nb))(jnp.asarray(x),
                                                                     jnp.asarray(cut.params))
np.save(sys.argv[1].replace(".npy", "_list.npy"), np.asarray(g))
t = jnp.asarray(np.random.default_rng(0).normal(size=(6, *x.shape)))
g, z = jax.jit(lambda y, p: xla_cpu_gb.gb_list_zeta(gb, y, p, nb, t))(jnp.asarray(x),
                                                                       jnp.asarray(cut.params))
np.save(sys.argv[1].replace(".npy", "_zeta.npy"), np.concatenate([np.asarray(g)[None],
                                                                  np.asarray(z)]))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two CPUs to compare thread counts",
)
def test_result_does_not_depend_on_threads(villin_obc2, tmp_path):
    """Rows go to 16 fixed units whatever the threads: one thread and two give bitwise
    the same gradient on villin/OBC2, all pairs and (the cutoff GB's list call) on a
    Verlet list; the list ζ call (each row its own atom's sums) gives the same ∇E and H·t
    bits too."""
    out = tmp_path / "one_cpu.npy"
    # compiled afresh under one CPU, not loaded from the session's cache (conftest.py)
    env = fresh_compile_env(os.environ)
    subprocess.run([sys.executable, "-c", _ONE_CPU, str(out)], check=True, timeout=300, env=env)
    system, x = villin_obc2
    g = jax.jit(xla_cpu_gb.make_gradient(system))(jnp.asarray(x), jnp.asarray(system.params))
    np.testing.assert_array_equal(np.asarray(g), np.load(out))
    cut, x = tm.load_system((system.topology, x), implicit_solvent="obc2",
                            nonbonded_method="CutoffNonPeriodic", cutoff=0.8)  # fmt: skip
    gb = [t for t in cut.terms if t.kind == "gb"][0]
    nb = gb.build_neighbours(jnp.asarray(x))
    g = jax.jit(lambda y, p: xla_cpu_gb.gb_list_gradient(gb, y, p, nb))(
        jnp.asarray(x), jnp.asarray(cut.params)
    )
    np.testing.assert_array_equal(np.asarray(g), np.load(str(out).replace(".npy", "_list.npy")))
    t = jnp.asarray(np.random.default_rng(0).normal(size=(6, *x.shape)))
    g, z = jax.jit(lambda y, p: xla_cpu_gb.gb_list_zeta(gb, y, p, nb, t))(
        jnp.asarray(x), jnp.asarray(cut.params)
    )
    got = np.concatenate([np.asarray(g)[None], np.asarray(z)])
    np.testing.assert_array_equal(got, np.load(str(out).replace(".npy", "_zeta.npy")))


_SANITIZED = """
import jax, jax.numpy as jnp, numpy as np
import timemachine as tm
from timemachine.backends import xla_cpu_gb
system, x = tm.load_system(tm.build_peptide("AAAAAAA"), implicit_solvent="obc2")
x, theta = jnp.asarray(x), jnp.asarray(system.params)
want = jax.jit(jax.grad(system.energy_fn()))(x, theta)  # op by op under ASan: 25 s
nb = [t for t in system.terms if t.structured == "nonbonded"][0]
gb = [t for t in system.terms if t.structured == "obc2"][0]
for cache in (xla_cpu_gb.CACHE_BYTES, 0):
    fast = xla_cpu_gb.make_gradient(system)
    pairs = xla_cpu_gb.PairGradient(system.n_atoms, nb, gb, cache_bytes=cache)
    g = jax.jit(pairs)(x, theta)
    assert np.isfinite(np.asarray(g)).all()
g = jax.jit(fast)(x, theta)
assert float(jnp.abs(g - want).max()) <= 1e-11 * float(jnp.abs(want).max())
# the cutoff GB on its Verlet list (0.6 nm: rows of every length, heads ending anywhere)
cut, _ = tm.load_system(tm.build_peptide("AAAAAAA"), implicit_solvent="obc2",
                        nonbonded_method="CutoffNonPeriodic", cutoff=0.6)
gbc = [t for t in cut.terms if t.kind == "gb"][0]
lst = gbc.build_neighbours(x)
theta = jnp.asarray(cut.params)
g = jax.jit(lambda y, p: xla_cpu_gb.gb_list_gradient(gbc, y, p, lst))(x, theta)
want = gbc.gradient(x, theta, lst)
assert float(jnp.abs(g - want).max()) <= 1e-11 * float(jnp.abs(want).max())
# the list ζ call (its values are checked against JAX in test_obc2_cutoff.py); P = 5: a
# padded vector of tangents
t = jnp.asarray(np.random.default_rng(0).normal(size=(5, *x.shape)))
g, z = jax.jit(lambda y, p: xla_cpu_gb.gb_list_zeta(gbc, y, p, lst, t))(x, theta)
assert float(jnp.abs(g - want).max()) <= 1e-11 * float(jnp.abs(want).max())
assert np.isfinite(np.asarray(z)).all() and float(jnp.abs(z).max()) > 0
print(system.n_atoms, "atoms: clean")
"""


def test_custom_call_runs_clean_under_address_and_undefined_behaviour_sanitizers(
    sanitizer_env,
):
    """tm_xla_cpu_gb.cpp built with ASan and UBSan, inside XLA's compiled step on its
    threads, with and without pass 1's cache: no out-of-bounds access, no UB."""
    from conftest import SANITIZER_FLAGS

    env = dict(sanitizer_env, TIMEMACHINE_XLA_CPU_FLAGS=SANITIZER_FLAGS)
    proc = subprocess.run(
        [sys.executable, "-c", _SANITIZED], env=env, capture_output=True, text=True, timeout=600
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert "clean" in report, report[-6000:]
