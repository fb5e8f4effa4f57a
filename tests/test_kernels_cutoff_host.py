"""The cutoff pair kernels (cuda/kernels/cutoff.cuh), built for the CPU, against the JAX
reference of timemachine/potentials/cutoffs.py.

Two levels, as test_kernels_host.py does for the all-pairs terms:

* the per-pair maths on random pairs (reaction field and PME's erfc, with and without
  OpenMM's switch, σ = 0 and ε = 0 among them): the radial functions against
  ``cutoffs._pair_scalars`` and u, B = u'/r, A = (dB/dr)/r and ∂u/∂θ, ∂B/∂θ of every
  pair parameter against jax.grad of the pair energy written from the module's formula;
  and the minimum image against ``cutoffs.minimum_image`` (halves of the box included:
  both round half to even);
* the Verlet-list kernels (tm_cutoff_primal, tm_cutoff_zeta[_xonly]) on a real box of
  1,038 TIP3P atoms (PME and reaction field with a switch, periodic; and without a box)
  against ``neighbour_pair_energy``, jax.grad of it for ∂E/∂(q, σ, ε), and
  ``neighbour_pair_gradient_and_zeta`` for ∇E and ζ with 10 tangents (charges, σ and ε
  of both atom types, ε_H = 0 among them, and bond/angle tangents that are x-only):
  to 1e-12 relative (max-abs error over max-abs value); and tm_cutoff_list, the list
  build, against the term's ``build_neighbours``.

With a GPU (``@pytest.mark.gpu``, skipped without one) the same kernels run through CuPy
on the same box, against the reference and the host build.

Errors are max-abs over max-abs of each array; for the random pairs, within each of 12
log-spaced bins of r, so that the small values near the cutoff are checked as tightly as
the large ones at short range.
"""

import ctypes
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel, tip3p_box

import timemachine as tm
from timemachine.backends.abi import PCHUNK
from timemachine.backends.host import LAUNCH_ORDERS, HostExecutor, host_compiler, load_host_library
from timemachine.constants import COULOMB
from timemachine.potentials import cutoffs
from timemachine.potentials.nonbonded import safe_sqrt

pytestmark = pytest.mark.skipif(host_compiler() is None, reason="needs a host C++ compiler")

TOL = 1e-12
CUTOFF = 0.9
ALPHA = 2.92  # nm⁻¹, what PME chooses for a 0.9 nm cutoff at OpenMM's default tolerance
# (switch_distance, alpha): reaction field and PME's erfc, each with and without the switch
FORMS = [(None, None), (0.8, None), (None, ALPHA), (0.8, ALPHA)]
FORM_IDS = ["rf", "rf-switch", "erfc", "erfc-switch"]
FILES = ("amber99sbildn.xml", "tip3p.xml")


@pytest.fixture(scope="module")
def lib():
    t0 = time.perf_counter()
    lib = load_host_library()
    print(f"host build + load: {time.perf_counter() - t0:.1f} s")
    lib.tm_cutoff_pairs.argtypes = [ctypes.c_longlong] + [ctypes.c_void_p] * 3
    lib.tm_cutoff_pairs.restype = None
    lib.tm_minimum_image.argtypes = [ctypes.c_longlong] + [ctypes.c_void_p] * 3
    lib.tm_minimum_image.restype = None
    return lib


def _ptr(a):
    assert a.flags["C_CONTIGUOUS"] and a.dtype == np.float64
    return int(a.ctypes.data)


# --------------------------------------------------------------------------- per pair


def host_pairs(lib, switch_distance, alpha, pairs):
    """tm_cutoff_pairs: (n, 23) the radial functions, u, B, A, ∂u/∂θ and ∂B/∂θ."""
    k_rf, c_rf = cutoffs.reaction_field_constants(CUTOFF, 78.3)
    form = np.array([CUTOFF, switch_distance or 0.0, k_rf, c_rf, alpha or 0.0,
                     switch_distance is not None, alpha is not None], np.float64)  # fmt: skip
    pairs = np.ascontiguousarray(pairs, np.float64)
    out = np.zeros((pairs.shape[0], 23))
    lib.tm_cutoff_pairs(pairs.shape[0], _ptr(form), _ptr(pairs), _ptr(out))
    return out


def random_pairs(seed, n=4000):
    """(n, 7) r, q_i, q_j, σ_i, σ_j, ε_i, ε_j: r from 0.08 nm to the cutoff (none at the
    switch distance exactly), 5% of the pairs with σ = 0 and a fifth of the ε zero."""
    rng = np.random.default_rng(seed)
    r = np.exp(rng.uniform(np.log(0.08), np.log(CUTOFF), n))
    q = rng.normal(size=(n, 2)) * 0.6
    s = rng.uniform(0.0, 0.45, (n, 2))
    s[: n // 20] = 0.0
    e = rng.uniform(0.0, 1.5, (n, 2))
    e[rng.random((n, 2)) < 0.2] = 0.0
    return np.column_stack([r, q, s, e])


def binned_rel(got, ref, r, bins=12):
    """The worst over log-spaced bins of r of max |got - ref| / max |ref| within the bin,
    per column (a column that is zero in a whole bin must be zero there too)."""
    edges = np.exp(np.linspace(np.log(r.min()), np.log(r.max()) * (1 + 1e-12), bins + 1))
    worst = np.zeros(got.shape[1])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (r >= lo) & (r < hi)
        if sel.any():
            worst = np.maximum(worst, [rel(got[sel, k], ref[sel, k]) for k in range(got.shape[1])])
    return worst


def jax_pair(switch_distance, alpha):
    """(u, B, A, ∂u/∂(q_i, q_j, σ_i, σ_j, ε_i, ε_j), ∂B/∂(the same)) of pairs by
    jax.grad of the pair energy as cutoffs' module docstring writes it (vmapped)."""
    k_rf, c_rf = cutoffs.reaction_field_constants(CUTOFF, 78.3)

    def u(r, qi, qj, si, sj, ei, ej):
        s6 = (0.5 * (si + sj) / r) ** 6
        lj = 4.0 * safe_sqrt(ei) * safe_sqrt(ej) * (s6 * s6 - s6)
        if switch_distance is not None:
            lj = lj * cutoffs.lj_switch(r, switch_distance, CUTOFF)
        if alpha is None:
            return lj + COULOMB * qi * qj * (1.0 / r + k_rf * r * r - c_rf)
        return lj + COULOMB * qi * qj * jax.scipy.special.erfc(alpha * r) / r

    def b(*a):
        return jax.grad(u)(*a) / a[0]

    def a_(*a):
        return jax.grad(b)(*a) / a[0]

    params = tuple(range(1, 7))

    def one(*a):
        return (u(*a), b(*a), a_(*a), *jax.grad(u, params)(*a), *jax.grad(b, params)(*a))

    return jax.jit(jax.vmap(one))


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_pair_scalars_match_the_reference_closed_forms(lib, form):
    pairs = random_pairs(1)
    got = host_pairs(lib, *form, pairs)
    k_rf, _ = cutoffs.reaction_field_constants(CUTOFF, 78.3)
    ref = np.stack(cutoffs._pair_scalars(jnp.asarray(pairs[:, 0]),
                                         jnp.asarray(0.5 * (pairs[:, 3] + pairs[:, 4])),
                                         CUTOFF, form[0], k_rf, form[1]), 1)  # fmt: skip
    # b_lj, db_lj, b_c, db_c, db_lj_s
    errs = binned_rel(got[:, [3, 4, 5, 6, 7]], ref, pairs[:, 0])
    print(f"{form}: worst binned rel err of the five scalars {errs.max():.1e}")
    assert errs.max() < TOL, errs
    sig0 = pairs[:, 3] + pairs[:, 4] == 0
    assert sig0.sum() > 100 and np.all(got[sig0][:, [0, 2, 3, 4, 7]] == 0.0)  # σ = 0: no LJ


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_pair_values_and_derivatives_match_jax_grad(lib, form):
    pairs = random_pairs(2)
    got = host_pairs(lib, *form, pairs)[:, 8:]
    ref = np.stack(jax_pair(*form)(*[jnp.asarray(pairs[:, k]) for k in range(7)]), 1)
    names = ["u", "B", "A"] + [f"{w}/{c}" for w in ("du", "dB")
                               for c in ("qi", "qj", "si", "sj", "ei", "ej")]  # fmt: skip
    errs = binned_rel(got, ref, pairs[:, 0])
    print(f"{form}: " + " ".join(f"{n} {e:.0e}" for n, e in zip(names, errs, strict=True)))
    assert errs.max() < TOL, dict(zip(names, errs, strict=True))
    # every column is exercised (not zero), and ε = 0 gives ∂/∂ε = 0, as safe_sqrt does
    assert np.all(np.abs(ref).max(0) > 0)
    eps0 = pairs[:, 5] == 0
    assert eps0.sum() > 100 and np.all(got[eps0][:, [7, 13]] == 0.0)


def test_minimum_image_rounds_as_jnp_round(lib):
    rng = np.random.default_rng(3)
    box = np.array([2.2, 3.1, 2.7])
    d = rng.uniform(-4.0, 4.0, (3000, 3))
    d[:6] = box * np.array([0.5, -0.5, 1.5, -1.5, 2.5, 0.0])[:, None]  # ties: half to even
    d = np.ascontiguousarray(d)
    out = np.zeros_like(d)
    lib.tm_minimum_image(d.shape[0], _ptr(box), _ptr(d), _ptr(out))
    ref = np.asarray(cutoffs.minimum_image(jnp.asarray(d), jnp.asarray(box)))
    np.testing.assert_array_equal(out, ref)
    assert np.all(np.abs(out) <= box / 2 * (1 + 1e-15))


# --------------------------------------------------------------------------- a water box


def _water(edge=2.2):
    return tip3p_box(edge)


# (nonbonded_method, switch_distance): PME's erfc, the reaction field with a switch in a
# box, and the reaction field without a box (no images)
BOXES = [("PME", None), ("CutoffPeriodic", 0.8), ("CutoffNonPeriodic", None)]


@pytest.fixture(scope="module")
def water_top():
    return _water()


@pytest.fixture(scope="module", params=BOXES, ids=[m for m, _ in BOXES])
def water(request, water_top):
    """(term, θ, x, Neighbours) of 1,038 TIP3P atoms with a Verlet list (skin 0.1 nm), the
    atoms shifted by random whole boxes so that the minimum image does work."""
    method, switch = request.param
    top, x = water_top
    kw = {} if switch is None else {"switch_distance": switch}
    system, x = tm.load_system((top, x), forcefield=FILES, nonbonded_method=method,
                               cutoff=CUTOFF, neighbour_skin=0.1, **kw)  # fmt: skip
    (term,) = [t for t in system.terms if t.kind == "nonbonded-cutoff"]
    x = np.asarray(x)
    if term.box is not None:
        shifts = np.random.default_rng(4).integers(-2, 3, x.shape)
        x = x + shifts * np.asarray(term.box)
    nb = term.build_neighbours(jnp.asarray(x))
    assert not bool(nb.overflow)
    return system, term, x, nb


WRT_NAMES = ["charge/tip3p-O/q", "charge/tip3p-H/q", "sigma/OW/sigma", "sigma/HW/sigma",
             "epsilon/OW/epsilon", "epsilon/HW/epsilon", "bond/OW-HW/length",
             "bond/OW-HW/k", "angle/HW-OW-HW/theta0", "angle/HW-OW-HW/k"]  # fmt: skip


def pair_args(term, theta):
    """(charge, sigma, epsilon) (N,) of the term's atoms."""
    return (theta[term.charge_index], theta[term.sigma_index], theta[term.epsilon_index])


def kernel_run(executor, term, theta, x, nb, wrt, dx, xonly=False):
    """(energy (N,), ∇E, ∂E/∂(q_i, σ_i, ε_i) (N, 3), ζ) from the cutoff kernels on
    ``executor`` (the host build, or CuPy on a GPU), as numpy arrays."""
    n = x.shape[0]
    p = len(wrt)
    q, sig, eps = (np.asarray(a, np.float64) for a in pair_args(term, theta))
    root = np.sqrt(eps)
    with np.errstate(divide="ignore"):
        droot = np.where(eps > 0, 0.5 / root, 0.0)
    inv_wrt = np.full(theta.shape[0], -1, np.int32)
    inv_wrt[np.asarray(wrt)] = np.arange(p, dtype=np.int32)
    k_rf, c_rf = cutoffs.reaction_field_constants(term.cutoff, term.dielectric)
    arrays = dict(
        x=np.asarray(x, np.float64), charge=q, sigma=sig, root_eps=root, droot_eps=droot,
        slot_q=inv_wrt[term.charge_index], slot_sig=inv_wrt[term.sigma_index],
        slot_eps=inv_wrt[term.epsilon_index], nbr=np.asarray(nb.idx, np.int32),
        dx=np.asarray(dx, np.float64), energy=np.zeros(n), grad=np.zeros((n, 3)),
        dedp=np.zeros((n, 3)), zeta=np.zeros((max(p, 1), n, 3)),
    )  # fmt: skip
    arrays = {k: executor.upload(k, np.ascontiguousarray(v)) for k, v in arrays.items()}
    box = np.zeros(3) if term.box is None else np.asarray(term.box, np.float64)
    fields = {k: executor.ptr(v) for k, v in arrays.items()}
    fields.update(
        box_x=box[0], box_y=box[1], box_z=box[2], cutoff=term.cutoff,
        switch_distance=term.switch_distance or 0.0, k_rf=k_rf, c_rf=c_rf,
        alpha=term.alpha or 0.0, periodic=int(term.box is not None),
        use_switch=int(term.switch_distance is not None), pme=int(term.alpha is not None),
        n_atoms=n, capacity=nb.idx.shape[1], n_params=p,
    )  # fmt: skip
    block = executor.struct("cutoff", "CutoffArgs", fields)
    executor.launch("tm_cutoff_primal", n, 1, block)
    if p:
        kernel = "tm_cutoff_zeta_xonly" if xonly else "tm_cutoff_zeta"
        executor.launch(kernel, n, -(-p // PCHUNK), block)
    out = [executor.to_host(arrays[k]) for k in ("energy", "grad", "dedp", "zeta")]
    out[3] = out[3][:p]
    return tuple(out)


def reference_run(term, theta, x, nb, wrt, dx):
    """(E, ∂E/∂(q, σ, ε) (N, 3), ∇E, ζ) of the pair sum on the list, from cutoffs."""
    box = None if term.box is None else jnp.asarray(term.box)
    args = (term.cutoff, term.dielectric, term.switch_distance, term.alpha)
    q, sig, eps = pair_args(term, jnp.asarray(theta))

    def energy(q, sig, eps):
        return cutoffs.neighbour_pair_energy(jnp.asarray(x), q, sig, eps, nb, box, *args)

    e, dedp = jax.value_and_grad(energy, argnums=(0, 1, 2))(q, sig, eps)
    wrt = np.asarray(wrt)
    onehots = {}
    for kind, index in (("charge", term.charge_index), ("sigma", term.sigma_index),
                        ("epsilon", term.epsilon_index)):  # fmt: skip
        hit = np.asarray(index)[:, None] == wrt[None, :]
        cols = np.nonzero(hit.any(0))[0]
        onehots[kind] = (cols, hit[:, cols].astype(np.float64)) if cols.size else None
    g, z = cutoffs.neighbour_pair_gradient_and_zeta(jnp.asarray(x), q, sig, eps, nb, box, *args,
                                                    jnp.asarray(dx), onehots)  # fmt: skip
    return float(e), np.stack([np.asarray(d) for d in dedp], 1), np.asarray(g), np.asarray(z)


def tangents(system, x, wrt, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(len(wrt),) + x.shape) * 0.05


def test_verlet_list_kernels_match_the_reference_on_a_water_box(water):
    system, term, x, nb = water
    theta = np.asarray(system.params)
    wrt = [system.param_names.index(name) for name in WRT_NAMES]  # a chunk of 8 and one of 2
    dx = tangents(system, x, wrt, 5)
    executor = HostExecutor(load_host_library())
    t0 = time.perf_counter()
    energy, grad, dedp, zeta = kernel_run(executor, term, theta, x, nb, wrt, dx)
    t_kernel = time.perf_counter() - t0
    e_ref, dedp_ref, g_ref, z_ref = reference_run(term, theta, x, nb, wrt, dx)
    errs = {
        "E": abs(energy.sum() - e_ref) / abs(e_ref),
        "∇E": rel(grad, g_ref),
        "∂E/∂(q,σ,ε)": rel(dedp, dedp_ref),
        "ζ": rel(zeta, z_ref),
    }
    errs.update({f"ζ[{WRT_NAMES[k]}]": rel(zeta[k], z_ref[k]) for k in range(len(wrt))})
    print(f"{term.alpha=} {term.switch_distance=} box={term.box is not None}: "
          f"host kernels {t_kernel:.2f} s, K = {nb.idx.shape[1]}")  # fmt: skip
    print("  " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    for name, err in errs.items():
        assert err < TOL, f"{name}: relative error {err:.2e}"
    assert abs(e_ref) > 1e3 and np.abs(g_ref).max() > 100 and np.abs(dedp_ref).max() > 10


def test_mixed_partials_alone_match_the_reference(water):
    """ζ with zero tangents is ∂(∇E)/∂θ alone (under H·dx above it is a few percent of
    ζ): the same to 1e-12 per parameter, nonzero for q_O, q_H, σ_O and ε_O, and zero for
    σ_H and ε_H (ε_H = 0, so no pair with an H has LJ, and ∂√ε/∂ε is 0 at 0) and for the
    bonded parameters."""
    system, term, x, nb = water
    theta = np.asarray(system.params)
    wrt = [system.param_names.index(name) for name in WRT_NAMES]
    dx = np.zeros((len(wrt),) + x.shape)
    zeta = kernel_run(HostExecutor(load_host_library()), term, theta, x, nb, wrt, dx)[3]
    *_, z_ref = reference_run(term, theta, x, nb, wrt, dx)
    scale = np.abs(z_ref).reshape(len(wrt), -1).max(1)
    print("max |∂∇E/∂θ|:", dict(zip(WRT_NAMES, scale.round(1), strict=True)))
    for k in (0, 1, 2, 4):
        err = rel(zeta[k], z_ref[k])
        print(f"  {WRT_NAMES[k]}: rel err {err:.1e}")
        assert scale[k] > 10 and err < TOL, WRT_NAMES[k]
    for k in (3, 5, 6, 7, 8, 9):
        assert scale[k] == 0 and np.all(zeta[k] == 0), WRT_NAMES[k]


def test_xonly_pass_matches_the_reference_without_pair_parameters(water):
    system, term, x, nb = water
    theta = np.asarray(system.params)
    wrt = [system.param_names.index(name) for name in WRT_NAMES[6:]]  # bonds and angles
    dx = tangents(system, x, wrt, 6)
    executor = HostExecutor(load_host_library())
    *_, z_ref = reference_run(term, theta, x, nb, wrt, dx)
    for xonly in (True, False):
        zeta = kernel_run(executor, term, theta, x, nb, wrt, dx, xonly)[3]
        err = rel(zeta, z_ref)
        print(f"xonly={xonly}: ζ rel err {err:.1e}")
        assert err < TOL
    assert np.abs(z_ref).max() > 100


@pytest.mark.parametrize("order", LAUNCH_ORDERS[1:])
def test_rows_own_their_sums_in_every_launch_order(water, order):
    """A row's thread writes only its own atom's outputs: the same bits in any order."""
    system, term, x, nb = water
    theta = np.asarray(system.params)
    wrt = [system.param_names.index(name) for name in WRT_NAMES]
    dx = tangents(system, x, wrt, 7)
    lib = load_host_library()
    base = kernel_run(HostExecutor(lib), term, theta, x, nb, wrt, dx)
    other = kernel_run(HostExecutor(lib, order=order), term, theta, x, nb, wrt, dx)
    for a, b in zip(base, other, strict=True):
        np.testing.assert_array_equal(a, b)


def kernel_list(executor, term, x, capacity):
    """(nbr (N, K), count (N,)) from tm_cutoff_list at radius cutoff + skin."""
    n = x.shape[0]
    excluded = cutoffs.exclusion_table(term.exclusion_idx, n)
    arrays = dict(x=np.asarray(x, np.float64), excluded=excluded,
                  nbr=np.zeros((n, capacity), np.int32), count=np.zeros(n, np.int32))  # fmt: skip
    arrays = {k: executor.upload(k, np.ascontiguousarray(v)) for k, v in arrays.items()}
    box = np.zeros(3) if term.box is None else np.asarray(term.box, np.float64)
    fields = {k: executor.ptr(v) for k, v in arrays.items()}
    fields.update(box_x=box[0], box_y=box[1], box_z=box[2], radius=term.cutoff + term.skin,
                  periodic=int(term.box is not None), n_atoms=n,
                  n_excluded=excluded.shape[1], capacity=capacity)  # fmt: skip
    executor.launch("tm_cutoff_list", n, 1, executor.struct("list", "ListArgs", fields))
    return executor.to_host(arrays["nbr"]), executor.to_host(arrays["count"])


def test_list_kernel_finds_the_pairs_of_build_neighbours(water):
    """tm_cutoff_list (all j per row, in increasing j) holds in each row the partners of
    the JAX build (cell list or all pairs, in its own order), and marks overflow."""
    system, term, x, nb = water
    n, capacity = nb.idx.shape
    lib = load_host_library()
    nbr, count = kernel_list(HostExecutor(lib), term, x, capacity)
    ref = np.asarray(nb.idx)
    assert np.array_equal(count, (ref < n).sum(1)) and count.max() > 300
    np.testing.assert_array_equal(nbr, np.sort(ref, axis=1))  # padding N sorts last
    # the kernels on the kernel's own list give what they give on the reference list
    wrt = [system.param_names.index(name) for name in WRT_NAMES]
    dx = tangents(system, x, wrt, 9)
    mine = kernel_run(HostExecutor(lib), term, np.asarray(system.params), x,
                      nb._replace(idx=nbr), wrt, dx)  # fmt: skip
    # (the build lists j > i first: sorted, its rows are the kernel's, in the same order)
    theirs = kernel_run(HostExecutor(lib), term, np.asarray(system.params), x,
                        nb._replace(idx=np.sort(ref, axis=1)), wrt, dx)  # fmt: skip
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_array_equal(a, b)  # the same pairs in the same order per row
    # too small a capacity: the first K partners, and counts that say so
    small, count_small = kernel_list(HostExecutor(lib, order="strided"), term, x, 100)
    np.testing.assert_array_equal(count_small, count)
    np.testing.assert_array_equal(small, nbr[:, :100])


def test_cuda_backend_refuses_the_term_and_says_why(water):
    from timemachine.backends.tables import build_plan
    from timemachine.errors import InputError

    system, *_ = water
    why = (
        r"no kernel for system\.terms\[2\] \(nonbonded-cutoff\), a CutoffNonbonded, yet: "
        r"its Verlet-list pair kernels \(tm_cutoff_primal.*backend='jax'"
    )
    with pytest.raises(InputError, match=why):
        build_plan(system, [])


@pytest.mark.gpu
def test_gpu_cutoff_kernels_match_the_reference_and_the_host_build(water):
    """The same kernels through CuPy (NVRTC) on a GPU: against the JAX reference to 1e-12,
    and against the host build of the same bodies (a different compiler: FMA contraction
    may change the last bits, not more)."""
    from timemachine.backends.cupy_backend import CupyExecutor

    system, term, x, nb = water
    theta = np.asarray(system.params)
    wrt = [system.param_names.index(name) for name in WRT_NAMES]
    dx = tangents(system, x, wrt, 8)
    gpu = kernel_run(CupyExecutor(), term, theta, x, nb, wrt, dx)
    host = kernel_run(HostExecutor(load_host_library()), term, theta, x, nb, wrt, dx)
    e_ref, dedp_ref, g_ref, z_ref = reference_run(term, theta, x, nb, wrt, dx)
    errs = {
        "E": abs(gpu[0].sum() - e_ref) / abs(e_ref),
        "∇E": rel(gpu[1], g_ref),
        "∂E/∂(q,σ,ε)": rel(gpu[2], dedp_ref),
        "ζ": rel(gpu[3], z_ref),
    }
    print("GPU vs JAX: " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    for name, err in errs.items():
        assert err < TOL, f"{name}: relative error {err:.2e}"
    for a, b in zip(gpu, host, strict=True):
        assert rel(a, b) < 1e-13


SANITIZED_RUN = """
import sys
sys.path.insert(0, TESTS)
import jax.numpy as jnp
import numpy as np
import timemachine as tm
import test_kernels_cutoff_host as t
from timemachine.backends.host import HostExecutor, load_host_library

lib = load_host_library(SANITIZER_FLAGS)
top, x0 = t._water()
for method, kw in (("PME", {}), ("CutoffNonPeriodic", {"switch_distance": 0.8})):
    system, x = tm.load_system((top, x0), forcefield=t.FILES, nonbonded_method=method,
                               cutoff=t.CUTOFF, neighbour_skin=0.1, **kw)
    (term,) = [u for u in system.terms if u.kind == "nonbonded-cutoff"]
    x = np.asarray(x)
    nb = term.build_neighbours(jnp.asarray(x))
    capacity = nb.idx.shape[1]
    nbr, count = t.kernel_list(HostExecutor(lib), term, x, capacity)
    t.kernel_list(HostExecutor(lib), term, x, 50)  # rows that overflow
    wrt = [system.param_names.index(name) for name in t.WRT_NAMES]
    dx = t.tangents(system, x, wrt, 1)
    for xonly in (False, True):
        out = t.kernel_run(HostExecutor(lib), term, np.asarray(system.params), x,
                           nb._replace(idx=nbr), wrt, dx, xonly)
        assert all(np.isfinite(a).all() for a in out)
    print(method, "clean")
"""


def test_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers(sanitizer_env):
    # the list build (at capacity and overflowing it) and the pair passes, periodic and
    # not, with a partial tangent chunk: an out-of-bounds index stops the run and is named
    import os
    import subprocess
    import sys

    from conftest import SANITIZER_FLAGS

    code = SANITIZED_RUN.replace("SANITIZER_FLAGS", repr(tuple(SANITIZER_FLAGS.split())))
    code = code.replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=sanitizer_env, capture_output=True, text=True
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert report.count("clean") == 2, report[-6000:]
