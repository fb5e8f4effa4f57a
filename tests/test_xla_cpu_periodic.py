"""The plain-MD step of Verlet-list Systems in the CPU custom calls
(``timemachine.backends.xla_cpu_periodic``, issue 20): the compiled list build against
the JAX build (the same partners per row, j > i first; the same overflow flags), and the
plain gradient (pairs, PME's spread and gather) against the sparse JAX reference, with
its derivatives (custom_jvp) the reference's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tip3p_box, trialanine_rf_box

import timemachine as tm
from timemachine import neighbours
from timemachine.backends import xla_cpu, xla_cpu_periodic
from timemachine.potentials import cutoffs
from timemachine.structured import gradient_fn, make_gradient

FILES = ("amber99sbildn.xml", "tip3p.xml")

pytestmark = pytest.mark.skipif(not xla_cpu.available()[0], reason="no CPU custom call here")


def _water(edge):
    return tip3p_box(edge)


@pytest.fixture(scope="module")
def water():
    """A 2.2 nm box of flexible TIP3P (1,038 atoms), PME 0.9 nm, on a Verlet list."""
    top, x = _water(2.2)
    system, x = tm.load_system((top, x), forcefield=FILES, nonbonded_method="PME", cutoff=0.9)
    x = np.asarray(tm.minimize_system(system, x, tolerance=100.0, max_iterations=50, warn=False))
    return system, x


@pytest.fixture(scope="module")
def peptide_box():
    """Trialanine in flexible TIP3P, reaction field with a switch, on a Verlet list."""
    return trialanine_rf_box()


def _jax_build(*args, **kwargs):
    """cutoffs.build_neighbours with the compiled build unregistered."""
    cutoffs.register_list_builder(None)
    try:
        return cutoffs.build_neighbours(*args, **kwargs)
    finally:
        cutoffs.register_list_builder(xla_cpu_periodic.build_list)


def _parts(idx, n):
    """Per row: (sorted partners j > i, sorted partners j < i), checking that the j > i
    come first."""
    out = []
    for i, row in enumerate(np.asarray(idx)):
        row = row[row < n]
        head = int(np.argmax(row < i)) if (row < i).any() else row.size
        assert (row[:head] > i).all() and (row[head:] < i).all()
        out.append((tuple(np.sort(row[:head])), tuple(np.sort(row[head:]))))
    return out


@pytest.mark.parametrize("edge", [2.2, 3.1])  # 7 and 10 half-radius cells per edge
def test_the_compiled_cell_list_build_has_the_jax_builds_partners(edge):
    top, x = _water(edge)
    system, _ = tm.load_system((top, x), forcefield=FILES, nonbonded_method="PME", cutoff=0.5,
                               neighbour_skin=0)  # fmt: skip
    term, n, radius = system.terms[-1], system.n_atoms, 0.6
    box = jnp.asarray(term.box)
    cells = cutoffs.cell_grid(term.box, radius)
    assert cells is not None and min(cells) == int(edge // radius)
    cap = cutoffs.cell_capacity(x, term.box, cells)
    table = cutoffs.exclusion_table(term.exclusion_idx, n)
    build = jax.jit(lambda y, k: xla_cpu.neighbour_build(y, box, radius, k, exclusions=table),
                    static_argnums=1)  # fmt: skip
    idx, overflow = build(jnp.asarray(x), 200)
    ref = _jax_build(jnp.asarray(x), table, box, radius, 200, cells, cap)
    assert not bool(overflow) and not bool(ref.overflow)
    assert _parts(idx, n) == _parts(ref.idx, n)
    assert ((np.asarray(idx) < n).sum(1) > 20).all()  # the rows do hold partners
    # rows over capacity: flagged, and their first partners kept
    short, over = build(jnp.asarray(x), 40)
    assert bool(over)
    np.testing.assert_array_equal(np.asarray(short), np.asarray(idx)[:, :40])
    # the JAX table flags a cell over its capacity; the compiled cells hold every atom
    assert bool(_jax_build(jnp.asarray(x), table, box, radius, 200, cells, 5).overflow)


@pytest.mark.parametrize("allowed", ["mask", "table"])
@pytest.mark.parametrize("periodic", [True, False])
def test_the_compiled_build_from_a_mask_has_the_jax_builds_partners(water, periodic, allowed):
    """The allowed pairs given as the (N, N) mask or as the term's (N, M) exclusion table
    (what the term keeps: no N² array), through the cells and densely (the JAX build's
    dense scan takes the table row block by row block)."""
    system, x = water
    term = system.terms[-1]
    box = jnp.asarray(term.box) if periodic else None
    mask = np.asarray(term.pair_mask)
    given = mask if allowed == "mask" else np.asarray(term.exclusion_rows)
    kw = {"mask": given} if allowed == "mask" else {"exclusions": given}
    idx, overflow = xla_cpu.neighbour_build(jnp.asarray(x), box, 0.6, 200, **kw)
    ref = _jax_build(jnp.asarray(x), given, box, 0.6, 200)
    # the compiled build takes its cell list: the box is 3.7 radii across, and without
    # one a virtual box around the atoms (whose images never come within the radius)
    assert _parts(idx, system.n_atoms) == _parts(ref.idx, system.n_atoms)
    if periodic:  # a box under 2.5 radii across: every j by index, as the JAX build
        got, _ = xla_cpu.neighbour_build(jnp.asarray(x), box, 1.05, 400, **kw)
        want = _jax_build(jnp.asarray(x), given, box, 1.05, 400).idx
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if not periodic:  # a spread-out x (3 cells a side per atom) or a NaN: every j by index
        far = np.asarray(x) * np.array([1.0, 1.0, 1000.0])
        got, _ = xla_cpu.neighbour_build(jnp.asarray(far), None, 0.6, 200, **kw)
        want = _jax_build(jnp.asarray(far), given, None, 0.6, 200).idx
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        bad = np.asarray(x).copy()
        bad[3, 1] = np.nan
        got, _ = xla_cpu.neighbour_build(jnp.asarray(bad), None, 0.6, 200, **kw)
        want = _jax_build(jnp.asarray(bad), given, None, 0.6, 200).idx
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not bool(overflow) and not bool(ref.overflow)
    # the lists: every allowed pair within the radius, each in both rows
    n = system.n_atoms
    d = x[:, None, :] - x[None, :, :]
    if periodic:
        d = d - np.asarray(term.box) * np.round(d / np.asarray(term.box))
    near = (np.sum(d * d, -1) < 0.36) & mask & ~np.eye(n, dtype=bool)
    rows = np.zeros((n, n), bool)
    listed = np.asarray(idx)
    r, c = np.nonzero(listed < n)
    rows[r, listed[r, c]] = True
    np.testing.assert_array_equal(rows, near)


@pytest.mark.parametrize("box", ["water", "peptide_box"])
def test_plain_gradient_in_the_custom_calls_matches_the_jax_reference(box, request):
    """PME (water) and reaction field with a switch (trialanine): the registered plain
    gradient against the sparse JAX gradient, and its jvp (force matching) the
    reference's."""
    system, x = request.getfixturevalue(box)
    fast = gradient_fn(system)
    assert fast.__module__ == xla_cpu_periodic.__name__
    lists = neighbours.build(system, jnp.asarray(x))
    theta = jnp.asarray(system.params)
    ref = make_gradient(system)
    g = np.asarray(jax.jit(fast)(jnp.asarray(x), theta, lists))
    g_ref = np.asarray(jax.jit(ref)(jnp.asarray(x), theta, lists))
    assert np.abs(g - g_ref).max() <= 1e-12 * np.abs(g_ref).max()
    assert np.abs(g_ref).max() > 100.0
    rng = np.random.default_rng(3)
    dx = jnp.asarray(rng.normal(size=x.shape))
    dth = jnp.asarray(rng.normal(size=theta.shape) * 1e-3)
    # under jit: op by op, the jvp's dispatch is most of this test's time
    t = jax.jit(lambda y, p, d, e, nb: jax.jvp(lambda u, v: fast(u, v, nb), (y, p), (d, e))[1])(
        jnp.asarray(x), theta, dx, dth, lists
    )
    t_ref = jax.jit(lambda y, p, d, e, nb: jax.jvp(lambda u, v: ref(u, v, nb), (y, p), (d, e))[1])(
        jnp.asarray(x), theta, dx, dth, lists
    )
    np.testing.assert_allclose(np.asarray(t), np.asarray(t_ref), rtol=0, atol=1e-12 *
                               float(np.abs(t_ref).max()))  # fmt: skip


def test_the_pair_call_sums_ewalds_exclusion_correction_in_its_rows(water):
    """tm_neighbour_pairs with the exclusion table: its ∇E and ζ minus the call's without
    it are Ewald's exclusion correction (cutoffs.ewald_exclusion_gradient_and_zeta, the
    closed form over the (X, 2) pairs, with its charge mixed partials) to 1e-12; the
    correction is not small (TIP3P's O-H pairs); under the reaction field the table is
    refused by name."""
    system, x = water
    term = next(t for t in system.terms if getattr(t, "uses_neighbours", False))
    nb = neighbours.build(system, jnp.asarray(x))[system.terms.index(term)]
    theta = jnp.asarray(system.params)
    q = theta[term.charge_index]
    wrt = system.select(["charge/*", "bond/*"])  # mixed partials: the charges alone here
    p, n = wrt.size, system.n_atoms
    dx = jnp.asarray(np.random.default_rng(4).normal(size=(p, n, 3)))
    mix_p = np.full((3, n), -1, np.int32)
    dq = np.zeros((p, n))
    for col, w in enumerate(wrt):
        hit = np.asarray(term.charge_index) == w
        mix_p[0, hit], dq[col, hit] = col, 1.0
    atoms = jnp.stack([q, theta[term.sigma_index], jnp.sqrt(theta[term.epsilon_index]),
                       0.5 / jnp.sqrt(theta[term.epsilon_index])])  # fmt: skip
    atoms = jnp.where(jnp.isfinite(atoms), atoms, 0.0)
    consts = [term.cutoff, term.switch_distance or -1.0, 0.0, term.alpha]
    box = jnp.asarray(term.box)
    call = jax.jit(xla_cpu.neighbour_pairs)
    g1, z1 = call(jnp.asarray(x), box, nb.idx, atoms, consts, dx, mix_p, term.exclusion_rows)
    g0, z0 = call(jnp.asarray(x), box, nb.idx, atoms, consts, dx, mix_p)
    g_ex, z_ex = cutoffs.ewald_exclusion_gradient_and_zeta(
        jnp.asarray(x), q, term.exclusion_idx, term.alpha, dx, jnp.asarray(dq)
    )
    assert np.abs(np.asarray(g_ex)).max() > 100.0 and np.abs(np.asarray(z_ex)).max() > 100.0
    np.testing.assert_allclose(np.asarray(g1 - g0), np.asarray(g_ex), rtol=0,
                               atol=1e-12 * float(np.abs(g_ex).max()))  # fmt: skip
    np.testing.assert_allclose(np.asarray(z1 - z0), np.asarray(z_ex), rtol=0,
                               atol=1e-12 * float(np.abs(z_ex).max()))  # fmt: skip
    with pytest.raises(Exception, match="needs PME"):
        consts_rf = [term.cutoff, -1.0, 1.0, 0.0]
        jax.block_until_ready(call(jnp.asarray(x), box, nb.idx, atoms, consts_rf, dx, mix_p,
                                   term.exclusion_rows))  # fmt: skip


def test_pme_reciprocal_gradient_in_the_custom_calls_matches_autodiff(water):
    system, x = water
    term = system.terms[-1]
    q = jnp.asarray(system.params)[term.charge_index]
    box = jnp.asarray(term.box)
    g = jax.jit(lambda y, c, b: cutoffs.pme_reciprocal_gradient(y, c, b, term.alpha, term.grid,
                                                                host=xla_cpu))(
        jnp.asarray(x), q, box
    )  # fmt: skip
    g_ref = jax.jit(jax.grad(lambda y, c, b: cutoffs.pme_reciprocal_energy(y, c, b, term.alpha,
                                                                           term.grid)))(
        jnp.asarray(x), q, box
    )  # fmt: skip
    assert np.abs(np.asarray(g - g_ref)).max() <= 1e-12 * float(jnp.abs(g_ref).max())


_SANITIZED = """
import sys, numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {tests!r})
import timemachine as tm
from timemachine import neighbours, structured
from timemachine.backends import xla_cpu
from conftest import TIP3P_FILES, tip3p_box
assert xla_cpu.available()[0], xla_cpu.available()
top, x = tip3p_box(1.6)
system, x = tm.load_system((top, x), forcefield=TIP3P_FILES, nonbonded_method="PME",
                           cutoff=0.75)
x = jnp.asarray(x)
k = [getattr(t, "uses_neighbours", False) for t in system.terms].index(True)
term = system.terms[k]
lists = jax.jit(lambda y: neighbours.build(system, y))(x)
wrt = system.select(["charge/*", "sigma/*", "epsilon/*"])
theta = jnp.asarray(system.params)
dx = jnp.asarray(np.random.default_rng(1).normal(size=(wrt.size,) + x.shape))
out = {{}}
for host in (True, False):
    call = xla_cpu if host else None
    fn = jax.jit(lambda y, d, nb, h=call: term.gradient_and_zeta(y, theta, d, wrt, nb, h))
    out[host] = [np.asarray(v) for v in fn(x, dx, lists[k])]
(gh, zh), (gj, zj) = out[True], out[False]
assert np.abs(gh - gj).max() <= 1e-12 * np.abs(gj).max()
assert np.abs(zh - zj).max() <= 1e-12 * np.abs(zj).max()
# the plain step's calls (pair forces, PME charge spread and force gather) for the whole
# System, against the term's XLA gradient above and the bonded terms' by autodiff
g_fast = np.asarray(jax.jit(lambda y: structured.gradient_fn(system)(y, theta, lists))(x))
others = [t for t in system.terms if t is not term]
g_other = np.asarray(jax.jit(jax.grad(lambda y: sum(t.energy(y, theta) for t in others)))(x))
assert np.abs(g_fast - (gj + g_other)).max() <= 1e-10 * np.abs(gj).max()
# without a box: the list build's cells in a virtual box around the atoms, every pair
# (generalized Born's list) and the masked pairs, against the dense JAX build
from timemachine.potentials import cutoffs
pos = np.asarray(x)
near = np.sum((pos[:, None] - pos[None]) ** 2, -1) < 0.36
mask = np.asarray(term.pair_mask)
for allowed in (None, mask):
    idx, over = xla_cpu.neighbour_build(x, None, 0.6, 160, mask=allowed)
    want = near & ~np.eye(len(pos), dtype=bool) & (True if allowed is None else mask)
    got = np.zeros_like(want)
    r, c = np.nonzero(np.asarray(idx) < len(pos))
    got[r, np.asarray(idx)[r, c]] = True
    assert not bool(over) and (got == want).all()
# the exclusion table in a periodic box under 2.5 radii across (every j by index; the
# radius under half the box, as load_system requires)
box = jnp.asarray(term.box)
idx, over = xla_cpu.neighbour_build(x, box, 0.79, 400, exclusions=term.exclusion_rows)
d = pos[:, None] - pos[None]
d = d - np.asarray(term.box) * np.round(d / np.asarray(term.box))
want = (np.sum(d * d, -1) < 0.79**2) & mask
got = np.zeros_like(want)
r, c = np.nonzero(np.asarray(idx) < len(pos))
got[r, np.asarray(idx)[r, c]] = True
assert not bool(over) and (got == want).all()
print(system.n_atoms, "atoms", wrt.size, "tangents", "clean")
"""


def test_periodic_custom_calls_run_clean_under_address_and_undefined_behaviour_sanitizers(
    sanitizer_env,
):
    """The Verlet-list and PME calls of tm_xla_cpu.cpp (the list build, the plain step's
    pair forces and PME charge spread and force gather, the ζ step's pairs with mixed
    partials, PME field gather and tangent spread and gather) built with ASan and UBSan
    inside XLA's compiled programs: a TIP3P box 1.6 nm across with PME, cutoff 0.75 nm,
    the tangents of its charges, σ and ε (6: a partial chunk); the results match the
    pure-JAX paths; the list build without a box (its virtual box's cells). The reaction
    field runs the same code with the erfc off."""
    import os
    import subprocess
    import sys

    from conftest import SANITIZER_FLAGS

    env = dict(sanitizer_env, TIMEMACHINE_XLA_CPU_FLAGS=SANITIZER_FLAGS)
    script = _SANITIZED.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert report.count("clean") == 1, report[-6000:]
