"""The structured ζ against jax.hessian (the full Hessian of trialanine, the closed-form pair
blocks of small hand-built systems), custom terms, jit inside scan and bad arguments. The
structured ζ and ∇E against the reference ζ (one jvp of ∇E per parameter) on trialanine
(vacuum, OBC2) and villin are the ``structured`` row of test_backend_matrix.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import timemachine as tm
from timemachine.sensitivity.zeta import make_zeta
from timemachine.system import OBC2, Nonbonded, System

TOL = 1e-10

MIXED_SELECTION = [
    "charge/*",
    "sigma/*",
    "epsilon/*",
    "bond/*/k",
    "bond/*/length",
    "angle/*/theta0",
    "improper/*/k*",
    "torsion/*/phase*",
]


def random_tangents(p, n, seed=0, scale=1e-3):
    return np.random.default_rng(seed).normal(scale=scale, size=(p, n, 3))


@pytest.fixture(scope="module", params=[None, "obc2"], ids=["vacuum", "obc2"])
def trialanine_system(request, trialanine):
    return tm.load_system(
        trialanine, forcefield=("amber99sbildn.xml",), implicit_solvent=request.param
    )


@pytest.fixture(scope="module", params=["torsion_k", "mixed"])
def trialanine_case(request, trialanine_system):
    """(system, x, wrt, structured ζ, reference ζ), each compiled once per module."""
    system, x = trialanine_system
    if request.param == "torsion_k":
        wrt = system.select("torsion/*/k*")
    else:
        gb = ["gb/*/radius", "gb/*/scale"] if "gb" in [t.kind for t in system.terms] else []
        wrt = system.select(MIXED_SELECTION + gb)
    fast = jax.jit(make_zeta(system, wrt))
    ref = jax.jit(make_zeta(system, wrt, method="reference"))
    return system, jnp.asarray(x), wrt, fast, ref


def test_full_hessian_of_trialanine_matches_jax_hessian(trialanine_system):
    """ζ(dx = I) - ζ(dx = 0) is the Hessian, column by column: all terms together against
    jax.hessian of the whole energy."""
    system, x = trialanine_system
    n = system.n_atoms
    wrt = np.full(3 * n, system.select("torsion/*/k*")[0])
    x, theta = jnp.asarray(x), jnp.asarray(system.params)
    zeta = jax.jit(make_zeta(system, wrt))
    basis = jnp.eye(3 * n).reshape(3 * n, n, 3)
    hess_cols = zeta(x, theta, basis) - zeta(x, theta, jnp.zeros_like(basis))
    ref = jax.jit(jax.hessian(system.energy_fn()))(x, theta).reshape(3 * n, 3 * n)
    err = rel_err(hess_cols.reshape(3 * n, 3 * n), ref)
    print(f"trialanine full Hessian: rel err {err:.2e}")
    assert err <= TOL


def five_atoms(with_gb=False):
    """Five atoms with charges, LJ (one ε = 0 hydrogen-like atom), one excluded pair and
    one scaled exception: every branch of the nonbonded closed form."""
    rng = np.random.default_rng(3)
    x = np.array(
        [[0.0, 0.0, 0.0], [0.15, 0.02, 0.0], [0.1, 0.3, 0.05], [-0.2, 0.1, 0.25], [0.3, -0.2, -0.1]]
    ) + rng.normal(scale=0.01, size=(5, 3))
    q = [0.4, -0.3, 0.25, -0.5, 0.15]
    sig = [0.32, 0.25, 0.0, 0.3, 0.29]
    eps = [0.6, 0.2, 0.0, 0.45, 0.3]
    names = [f"charge/a{i}/q" for i in range(5)]
    names += [f"sigma/a{i}/sigma" for i in range(5)]
    names += [f"epsilon/a{i}/epsilon" for i in range(5)]
    params = q + sig + eps
    mask = ~np.eye(5, dtype=bool)
    mask[0, 1] = mask[1, 0] = False  # excluded ...
    mask[0, 3] = mask[3, 0] = False  # ... and re-added scaled
    terms = [
        Nonbonded(
            np.arange(5),
            np.arange(5, 10),
            np.arange(10, 15),
            mask,
            np.array([[0, 3]]),
            np.array([0.8333]),
            np.array([0.5]),
        )
    ]
    if with_gb:
        names += [f"gb/a{i}/radius" for i in range(5)] + [f"gb/a{i}/scale" for i in range(5)]
        params += [0.17, 0.12, 0.155, 0.15, 0.18] + [0.72, 0.85, 0.79, 0.85, 0.8]
        terms.append(OBC2(np.arange(5), np.arange(15, 20), np.arange(20, 25)))
    system = System(np.full(5, 12.0), terms, names, params)
    return system, x


@pytest.mark.parametrize("with_gb", [False, True], ids=["lj_coulomb", "lj_coulomb_obc2"])
def test_pair_hessian_closed_form_matches_jax_hessian(with_gb):
    """(E'' - E'/r) r̂r̂ᵀ + (E'/r) I blocks (and the OBC2 Born-radius chain) contracted with
    the 15 unit tangents reproduce jax.hessian of the energy; the mixed partials for every
    charge, σ and ε (and GB radius, scale) match jax.jacfwd of the gradient."""
    system, x = five_atoms(with_gb)
    x, theta = jnp.asarray(x), jnp.asarray(system.params)
    energy = system.energy_fn()
    wrt = np.arange(system.n_params)  # 15 or 25 >= 3N: the first 15 tangents are a basis
    zeta = jax.jit(make_zeta(system, wrt))
    basis = jnp.zeros((len(wrt), 15)).at[:15].set(jnp.eye(15)).reshape(-1, 5, 3)
    mixed = zeta(x, theta, jnp.zeros_like(basis))
    hess = (zeta(x, theta, basis) - mixed)[:15].reshape(15, 15)
    ref = jax.jit(jax.hessian(energy))(x, theta).reshape(15, 15)
    assert rel_err(hess, ref) <= TOL
    np.testing.assert_allclose(hess, hess.T, rtol=0, atol=1e-12 * np.abs(ref).max())
    ref_mixed = jax.jit(jax.jacfwd(jax.grad(energy), argnums=1))(x, theta)  # (5, 3, P)
    assert rel_err(mixed, jnp.moveaxis(ref_mixed, -1, 0)) <= TOL


def test_custom_term_is_handled_by_autodiff(trialanine):
    """A Morse bond added with add_term (a new functional form) next to the amber terms."""
    system, x = tm.load_system(trialanine, forcefield=("amber99sbildn.xml",))
    bonds = [t for t in system.terms if t.kind == "bond"][0]
    idx = np.asarray(bonds.idx)[:6]

    def morse(y, p):
        r = jnp.linalg.norm(y[idx[:, 1]] - y[idx[:, 0]], axis=1)
        return jnp.sum(p[0] * (1.0 - jnp.exp(-p[1] * (r - p[2]))) ** 2)

    system = system.add_term(
        morse, ["morse/X/D", "morse/X/a", "morse/X/r0"], [300.0, 20.0, 0.1], kind="morse"
    )
    wrt = system.select(["morse/*", "torsion/*/k1", "charge/ALA:CA/q"])
    dx = jnp.asarray(random_tangents(len(wrt), system.n_atoms, seed=2))
    fast_fn = jax.jit(make_zeta(system, wrt))  # compiled once for both tangents
    ref_fn = jax.jit(make_zeta(system, wrt, method="reference"))
    x, theta = jnp.asarray(x), jnp.asarray(system.params)
    assert rel_err(fast_fn(x, theta, dx), ref_fn(x, theta, dx)) <= TOL
    fast0, ref0 = fast_fn(x, theta, 0.0 * dx), ref_fn(x, theta, 0.0 * dx)
    assert rel_err(fast0, ref0) <= TOL
    assert np.abs(fast0[:3]).max() > 0  # the Morse parameters do have a mixed partial
    # plain dynamics' closed-form gradient takes the Morse term by autodiff
    grad = jax.jit(system.gradient_fn())(x, theta)
    assert rel_err(grad, system.gradient(x)) <= 1e-13
    without = system.without_terms("morse").gradient(x)
    assert rel_err(grad, without) > 1e-6  # and the term is in it


def test_zeta_is_jittable_inside_scan(trialanine_case):
    system, x, wrt, fast_fn, ref_fn = trialanine_case
    zeta = make_zeta(system, wrt)
    theta = jnp.asarray(system.params)
    dx = jnp.asarray(random_tangents(len(wrt), system.n_atoms, seed=5))

    def body(carry, _):
        z = zeta(x, theta, carry)
        return carry + 1e-3 * z / jnp.max(jnp.abs(z)), z

    _, zs = jax.jit(lambda c: jax.lax.scan(body, c, None, length=2))(dx)
    assert rel_err(zs[0], ref_fn(x, theta, dx)) <= TOL
    assert rel_err(zs[1], fast_fn(x, theta, dx + 1e-3 * zs[0] / jnp.max(jnp.abs(zs[0])))) <= TOL


def test_bad_arguments_raise_input_errors(trialanine_system):
    system, _ = trialanine_system
    with pytest.raises(tm.InputError, match="wrt"):
        make_zeta(system, [system.n_params])
    with pytest.raises(tm.InputError, match="wrt"):
        make_zeta(system, np.array([0.5]))
    with pytest.raises(tm.InputError, match="wrt"):
        make_zeta(system, [])
    with pytest.raises(ValueError, match="method"):
        make_zeta(system, [0], method="fast")
