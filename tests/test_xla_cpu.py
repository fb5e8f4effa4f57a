"""The C++ custom call (timemachine.backends.xla_cpu): its all-pairs contraction against a
dense Hessian built in numpy; under jit, scan and vmap; its gradient-only entry point;
shape checks, thread-count independence and sanitizers. Its ∇E and ζ against the
reference on trialanine (vacuum, OBC2) and villin are the ``structured-host`` row of
test_backend_matrix.py."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_compile_env, rel_err

import timemachine as tm
from timemachine.backends import xla_cpu
from timemachine.sensitivity.zeta import make_gradient_and_zeta, make_zeta

pytestmark = pytest.mark.skipif(
    not xla_cpu.available()[0], reason=f"CPU custom call unavailable: {xla_cpu.available()[1]}"
)


def test_host_bonded_under_vmap_and_scan(trialanine):
    """Replicas vmap the step (``fitting.run_replicas``) and simulate scans it."""
    system, x = tm.load_system(trialanine, forcefield=("amber99sbildn.xml",))
    wrt = system.select("torsion/*/k*")
    fn = make_gradient_and_zeta(system, wrt, bonded="host")
    theta = jnp.asarray(system.params)
    rng = np.random.default_rng(2)
    xs = jnp.asarray(x)[None] + jnp.asarray(rng.normal(scale=1e-3, size=(3, system.n_atoms, 3)))
    dxs = jnp.asarray(rng.normal(scale=1e-3, size=(3, len(wrt), system.n_atoms, 3)))
    g_v, z_v = jax.jit(jax.vmap(fn, in_axes=(0, None, 0)))(xs, theta, dxs)
    for r in range(3):
        g_r, z_r = jax.jit(fn)(xs[r], theta, dxs[r])
        np.testing.assert_array_equal(np.asarray(g_v[r]), np.asarray(g_r))
        np.testing.assert_array_equal(np.asarray(z_v[r]), np.asarray(z_r))

    def body(dx, _):
        _, z = fn(xs[0], theta, dx)
        return dx + 1e-6 * z, z

    _, zs = jax.jit(lambda d: jax.lax.scan(body, d, None, length=2))(dxs[0])
    np.testing.assert_array_equal(
        np.asarray(zs[0]), np.asarray(jax.jit(fn)(xs[0], theta, dxs[0])[1])
    )


@pytest.mark.parametrize("n_atoms,n_tangents", [(40, 3), (70, 11), (130, 16)])
def test_pair_contraction_matches_dense_hessian(n_atoms, n_tangents):
    """ζ_i += Σ_j (A_ij d dᵀ + B_ij I)(t_i - t_j) over the upper triangle, in tiles of 64
    atoms and chunks of 8 tangents: sizes with partial tiles and chunks, against the
    (3N, 3N) Hessian H_ij = -(A_ij d dᵀ + B_ij I), H_ii = -Σ_j H_ij, applied by numpy."""
    # no internal-coordinate terms: the call is the pair contraction alone
    theta = np.ones(4)
    tables = xla_cpu.BondedTables.build([], theta.size, [])
    rng = np.random.default_rng(n_atoms)
    n = n_atoms
    x = rng.uniform(0.0, 3.0, size=(n, 3))
    a = rng.normal(size=(n, n))
    a = a + a.T
    b = rng.normal(size=(n, n))
    b = b + b.T
    np.fill_diagonal(a, 0.0)
    np.fill_diagonal(b, 0.0)
    t = rng.normal(size=(n_tangents, n, 3))
    d = x[:, None, :] - x[None, :, :]
    blocks = a[:, :, None, None] * d[:, :, :, None] * d[:, :, None, :]
    blocks = blocks + b[:, :, None, None] * np.eye(3)
    hess = -blocks
    hess[np.arange(n), np.arange(n)] = blocks.sum(axis=1)
    dense = np.einsum("ijab,pjb->pia", hess, t)
    args = (jnp.asarray(x), jnp.asarray(theta), jnp.asarray(t))
    grad, with_pairs = jax.jit(tables)(*args, jnp.asarray(a), jnp.asarray(b))
    assert rel_err(with_pairs, dense) <= 1e-13
    assert not np.any(np.asarray(grad))  # the pairs' gradient is XLA's (Σ_j B_ij d_ij)
    # bitwise repeatable: each chunk of tangents is summed in one fixed order
    again = jax.jit(tables)(*args, jnp.asarray(a), jnp.asarray(b))[1]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(with_pairs))


def test_bonded_argument_is_checked(trialanine):
    system, _ = tm.load_system(trialanine, forcefield=("amber99sbildn.xml",))
    with pytest.raises(tm.InputError, match="bonded"):
        make_zeta(system, system.select("torsion/*/k*"), bonded="cpp")


def test_custom_call_rejects_mismatched_shapes(trialanine):
    """The C++ side checks what it is given and raises, rather than reading out of bounds."""
    system, x = tm.load_system(trialanine, forcefield=("amber99sbildn.xml",))
    wrt = system.select("torsion/*/k*")
    from timemachine.backends.tables import coordinate_term_groups

    tables = xla_cpu.BondedTables.build(coordinate_term_groups(system), system.n_params, wrt)
    bad_dx = jnp.zeros((len(wrt), system.n_atoms + 1, 3))
    with pytest.raises(Exception, match="dx must have shape"):
        jax.block_until_ready(jax.jit(tables)(jnp.asarray(x), jnp.asarray(system.params), bad_dx))
    dx = jnp.zeros((len(wrt), system.n_atoms, 3))
    bad_pairs = jnp.zeros((system.n_atoms, system.n_atoms + 1))
    with pytest.raises(Exception, match="pair_a and pair_b must both be"):
        jax.block_until_ready(
            jax.jit(tables)(jnp.asarray(x), jnp.asarray(system.params), dx, bad_pairs, bad_pairs)
        )


def test_host_bonded_gradient_only(trialanine):
    """make_gradient(bonded="host"): the custom call with no tangents is the gradient."""
    from timemachine.sensitivity.zeta import make_gradient

    system, x = tm.load_system(
        trialanine, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2"
    )
    x, theta = jnp.asarray(x), jnp.asarray(system.params)
    host = jax.jit(make_gradient(system, bonded="host"))(x, theta)
    assert rel_err(host, system.gradient(np.asarray(x))) <= 1e-13


_ONE_CPU = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before jax: a 1-thread pool
import jax, jax.numpy as jnp, numpy as np
import timemachine as tm
from timemachine.sensitivity.zeta import make_gradient_and_zeta
system, x = tm.load_system(tm.build_peptide("AAA"), forcefield=("amber99sbildn.xml",))
wrt = system.select("torsion/*/k*")
dx = np.random.default_rng(3).normal(scale=1e-3, size=(len(wrt), system.n_atoms, 3))
fn = jax.jit(make_gradient_and_zeta(system, wrt, bonded="host"))
g, z = fn(jnp.asarray(x), jnp.asarray(system.params), jnp.asarray(dx))
np.savez(sys.argv[1], g=np.asarray(g), z=np.asarray(z))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two CPUs to compare thread counts",
)
def test_custom_call_result_does_not_depend_on_threads(trialanine, tmp_path):
    """The call splits tangent chunks among XLA's threads; each chunk is summed in one
    fixed order, so one thread and two give bitwise the same ∇E and ζ (all pairs, bonded
    terms and mixed partials of trialanine, 18 tangents in 3 chunks)."""
    out = tmp_path / "one_cpu.npz"
    # compiled afresh under one CPU, not loaded from the session's cache (conftest.py)
    env = fresh_compile_env(os.environ)
    subprocess.run([sys.executable, "-c", _ONE_CPU, str(out)], check=True, timeout=300, env=env)
    system, x = tm.load_system(trialanine, forcefield=("amber99sbildn.xml",))
    wrt = system.select("torsion/*/k*")
    dx = np.random.default_rng(3).normal(scale=1e-3, size=(len(wrt), system.n_atoms, 3))
    fn = jax.jit(make_gradient_and_zeta(system, wrt, bonded="host"))
    g, z = fn(jnp.asarray(x), jnp.asarray(system.params), jnp.asarray(dx))
    one = np.load(out)
    np.testing.assert_array_equal(np.asarray(g), one["g"])
    np.testing.assert_array_equal(np.asarray(z), one["z"])


_SANITIZED_CASES = [
    ("AAA", "obc2", ["torsion/*", "bond/*", "angle/*", "charge/*"]),
    ("villin", None, ["torsion/*", "improper/*"]),
]

_SANITIZED = """
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, TESTS)
from test_xla_cpu import _sanitized_case
from timemachine.sensitivity.zeta import make_gradient_and_zeta

out = {}
for k in range(2):
    system, wrt, args = _sanitized_case(k)
    g, z = jax.jit(make_gradient_and_zeta(system, wrt, bonded="host"))(*args)
    out[f"g{k}"], out[f"z{k}"] = np.asarray(g), np.asarray(z)
    print(system.n_atoms, "atoms,", wrt.size, "tangents: clean")
np.savez(sys.argv[1], **out)
"""


def _sanitized_case(k):
    """(System, wrt, (x, θ, dx)) of the sanitizer run's case ``k``."""
    import openmm.app as app

    name, solvent, wrt = _SANITIZED_CASES[k]
    if name == "villin":
        pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
        structure = tm.strip_solvent(pdb.topology, pdb.positions)
    else:
        structure = tm.build_peptide(name)
    system, x = tm.load_system(structure, implicit_solvent=solvent)
    wrt = system.select(wrt)[:70]
    dx = np.random.default_rng(0).normal(scale=1e-3, size=(wrt.size, system.n_atoms, 3))
    return system, wrt, (jnp.asarray(x), jnp.asarray(system.params), jnp.asarray(dx))


def test_custom_call_runs_clean_under_address_and_undefined_behaviour_sanitizers(
    sanitizer_env, tmp_path
):
    """tm_xla_cpu.cpp built with ASan and UBSan (TIMEMACHINE_XLA_CPU_FLAGS), inside XLA's
    compiled step on XLA's threads: trialanine/OBC2 with bond, angle, torsion and charge
    tangents (the mixed partials), villin with 70 torsion and improper tangents (a tail
    chunk, tiles of 64 atoms and a partial last tile); the results match the pure-JAX ζ
    (computed here, outside the sanitized process, where XLA compiles it faster)."""
    from conftest import SANITIZER_FLAGS

    env = dict(sanitizer_env, TIMEMACHINE_XLA_CPU_FLAGS=SANITIZER_FLAGS)
    code = _SANITIZED.replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "sanitized.npz"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert report.count("clean") == 2, report[-6000:]
    with np.load(out) as got:
        for k in range(2):
            system, wrt, args = _sanitized_case(k)
            g0, z0 = jax.jit(make_gradient_and_zeta(system, wrt, bonded="jax"))(*args)
            scale = float(np.abs(z0).max())
            assert float(np.abs(got[f"z{k}"] - np.asarray(z0)).max()) <= 1e-11 * scale, k
            assert rel_err(got[f"g{k}"], g0) <= 1e-13, k
