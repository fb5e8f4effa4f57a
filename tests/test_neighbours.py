"""Verlet lists carried through the step programs (``timemachine.neighbours``, issue 20):
the list's energy, forces and ζ against the exact cutoff sums and jax.jvp of them;
chains and sensitivity trajectories on lists against the same runs on exact sums; the
rebuild rule (stale, scheduled, overflow); chunking at multiples of the period bit for
bit; the settings it refuses. dx/dθ on lists against central finite differences is
``tests/test_periodic.py``'s (its boxes load with lists by default)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tip3p_box, trialanine_rf_box

import timemachine as tm
from timemachine import neighbours
from timemachine.errors import InputError
from timemachine.potentials import cutoffs

FILES = ("amber99sbildn.xml", "tip3p.xml")


def _water(edge):
    return tip3p_box(edge)


@pytest.fixture(scope="module")
def water():
    """A 2.2 nm box of flexible TIP3P (1,038 atoms), PME 0.9 nm: (exact System, listed
    System, x)."""
    top, x = _water(2.2)
    exact, x = tm.load_system((top, x), forcefield=FILES, nonbonded_method="PME", cutoff=0.9,
                              neighbour_skin=0)  # fmt: skip
    x = np.asarray(tm.minimize_system(exact, x, tolerance=100.0, max_iterations=50, warn=False))
    return exact, neighbours.with_neighbour_list(exact, x, skin=0.1), x


@pytest.fixture(scope="module")
def peptide_box():
    """Trialanine in 227 flexible TIP3P waters with reaction field (714 atoms)."""
    return trialanine_rf_box()


def _term(system):
    (k,) = [k for k, t in enumerate(system.terms) if getattr(t, "uses_neighbours", False)]
    return k, system.terms[k]


def test_list_energy_and_forces_equal_the_exact_sum(water):
    exact, listed, x = water
    lists = neighbours.build(listed, jnp.asarray(x))
    theta = jnp.asarray(exact.params)
    e_exact = float(exact.energy(x))
    e_list = float(listed.energy_fn()(jnp.asarray(x), theta, lists))
    assert abs(e_list - e_exact) <= 1e-12 * abs(e_exact)
    k, term = _term(listed)
    g_ref = np.asarray(jax.jit(jax.grad(exact.terms[k].energy))(jnp.asarray(x), theta))
    g = np.asarray(term.gradient(jnp.asarray(x), theta, lists[k]))
    assert np.abs(g - g_ref).max() <= 1e-11 * np.sqrt(np.mean(g_ref**2))
    # the list holds more than the cutoff's pairs (the skin), each in both rows
    n = listed.n_atoms
    row = np.asarray(lists[k].idx)
    assert (row < n).sum() % 2 == 0 and not bool(lists[k].overflow)


def test_list_stays_exact_within_half_the_skin_and_goes_stale_beyond(water):
    exact, listed, x = water
    lists = neighbours.build(listed, jnp.asarray(x))
    rng = np.random.default_rng(1)
    moved = x + rng.uniform(-1, 1, x.shape) * 0.045 / np.sqrt(3)  # |δ| < 0.045 < skin/2
    assert not bool(neighbours.stale(listed, lists, jnp.asarray(moved)))
    theta = jnp.asarray(exact.params)
    e = float(listed.energy_fn()(jnp.asarray(moved), theta, lists))
    assert abs(e - float(exact.energy(moved))) <= 1e-12 * abs(e)
    far = x.copy()
    far[5] += np.array([0.06, 0.0, 0.0])  # one atom beyond skin/2
    assert bool(neighbours.stale(listed, lists, jnp.asarray(far)))
    # the step rule rebuilds a stale list, and on the scheduled steps
    k, _ = _term(listed)
    rebuilt = neighbours.step_lists(listed, lists, jnp.asarray(far), 3, 25)
    np.testing.assert_array_equal(np.asarray(rebuilt[k].reference), far)
    kept = neighbours.step_lists(listed, lists, jnp.asarray(moved), 3, 25)
    np.testing.assert_array_equal(np.asarray(kept[k].reference), x)
    scheduled = neighbours.step_lists(listed, lists, jnp.asarray(moved), 50, 25)
    np.testing.assert_array_equal(np.asarray(scheduled[k].reference), moved)


def test_overflowed_list_makes_the_energy_nan(water):
    import dataclasses

    _, listed, x = water
    k, term = _term(listed)
    small = list(listed.terms)
    small[k] = dataclasses.replace(term, neighbour_capacity=50)
    tight = tm.System(listed.masses, small, listed.param_names, listed.params, listed.topology)
    lists = neighbours.build(tight, jnp.asarray(x))
    assert bool(lists[k].overflow)
    assert np.isnan(float(tight.energy_fn()(jnp.asarray(x), jnp.asarray(tight.params), lists)))


@pytest.mark.parametrize("box", ["peptide_box", "water"])
@pytest.mark.parametrize("host", [False, True])
def test_structured_pair_zeta_matches_jvp_of_the_reference(box, host, request):
    """ζ on the list (per-pair scalars contracted with every tangent at once; with PME its
    reciprocal part written out, one batched spread, FFT and gather; the rest by
    linearize) against jax.jvp of ∇ of the exact energy: charges, σ, ε (H's ε is 0) and a
    torsion barrier, with random tangents; in XLA and in the CPU custom call."""
    from timemachine.backends import xla_cpu

    call = None
    if host:
        ok, why = xla_cpu.available()
        if not ok:
            pytest.skip(why)
        call = xla_cpu
    if box == "water":
        _, system, x = request.getfixturevalue("water")
        wrt = system.select(["charge/*", "sigma/*", "epsilon/*"])
        kinds = {"charge", "sigma", "epsilon"}
    else:
        system, x = request.getfixturevalue("peptide_box")
        wrt = system.select(["charge/*", "sigma/*", "epsilon/*", "torsion/*"])[::7]
        kinds = {"charge", "sigma", "epsilon", "torsion"}
    k, term = _term(system)
    assert kinds <= {system.param_names[i].split("/")[0] for i in wrt}
    lists = neighbours.build(system, jnp.asarray(x))
    theta = jnp.asarray(system.params)
    dx = jnp.asarray(np.random.default_rng(2).normal(size=(wrt.size,) + x.shape) * 0.1)
    g, z = jax.jit(lambda y, d, nb: term.gradient_and_zeta(y, theta, d, wrt, nb, call))(
        jnp.asarray(x), dx, lists[k]
    )
    grad = jax.grad(lambda y, p: term.energy(y, p), argnums=0)
    onehot = np.zeros((wrt.size, system.n_params))
    onehot[np.arange(wrt.size), wrt] = 1.0
    z_ref = jax.jit(jax.vmap(lambda t, o: jax.jvp(grad, (jnp.asarray(x), theta), (t, o))[1]))(
        dx, jnp.asarray(onehot)
    )
    g_ref = jax.jit(grad)(jnp.asarray(x), theta)
    assert np.abs(np.asarray(g - g_ref)).max() <= 1e-12 * np.abs(np.asarray(g_ref)).max()
    err = np.abs(np.asarray(z - z_ref)).max() / np.abs(np.asarray(z_ref)).max()
    assert err <= 1e-10, err


def test_chains_and_sensitivities_on_lists_match_the_exact_sums(water):
    from timemachine.fitting.sampling import EquilibriumChains

    exact, listed, x = water
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0005, seed=3)
    runs = {}
    for name, system in (("exact", exact), ("listed", listed)):
        chains = EquilibriumChains(system, x, integ, n_chains=2, save_every=40)
        runs[name] = chains.sample(np.asarray(system.params), 120).x
    assert np.abs(runs["exact"] - runs["listed"]).max() < 1e-10  # 120 steps, ~50 rebuilds
    wrt = exact.select(["charge/*", "epsilon/OW/*"])
    traj = {}
    for name, system in (("exact", exact), ("listed", listed)):
        traj[name] = tm.simulate(system, x, integ, 40, wrt=wrt, save_every=20, progress=False)
    d_ref = np.asarray(traj["exact"].dx_dtheta)
    d = np.asarray(traj["listed"].dx_dtheta)
    assert np.abs(d - d_ref).max() <= 1e-10 * np.abs(d_ref).max()


def test_chunks_at_multiples_of_the_period_reproduce_the_bits(water):
    _, listed, x = water
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0005, seed=4)
    assert int(neighbours.period(listed, integ.dt)) == 25
    wrt = listed.select(["charge/*"])
    whole = tm.simulate(listed, x, integ, 50, wrt=wrt, save_every=25, progress=False)
    first = tm.simulate(listed, x, integ, 25, wrt=wrt, save_every=25, progress=False)
    second = tm.simulate(listed, first.final_state, integ, 25, wrt=wrt, save_every=25,
                         progress=False)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(whole.x)[-1], np.asarray(second.x)[-1])
    np.testing.assert_array_equal(np.asarray(whole.dx_dtheta)[-1], np.asarray(second.dx_dtheta)[-1])


def test_bad_settings_are_refused(water):
    exact, _, x = water
    with pytest.raises(InputError, match="skin must be >= 0"):
        neighbours.with_neighbour_list(exact, x, skin=-0.1)
    with pytest.raises(InputError, match="twice cutoff \\+ skin"):
        neighbours.with_neighbour_list(exact, x, skin=0.3)
    top, xw = _water(2.2)
    with pytest.raises(InputError, match="neighbour_skin must be >= 0"):
        tm.load_system((top, xw), forcefield=FILES, nonbonded_method="PME", cutoff=0.9,
                       neighbour_skin=-1.0)  # fmt: skip


def test_partner_counts_are_the_lists_row_lengths(water, peptide_box):
    """``partner_counts`` (a k-d tree, which sizes the lists at load) gives every row's
    partners exactly as the list build counts them (``neighbour_counts``): a periodic
    water box with its exclusions, through cells and densely; trialanine in water with
    reaction field; and a non-periodic peptide's every pair (the cutoff GB's list)."""
    cases = []
    for system, x in ((water[1], water[2]), peptide_box):
        _, t = _term(system)
        radius = t.cutoff + t.skin
        box = np.asarray(t.box)
        table = cutoffs.exclusion_table(t.exclusion_idx, system.n_atoms)
        cases.append((x, box, radius, t.exclusion_idx, t.pair_mask, None, 0))
        cells = cutoffs.cell_grid(box, radius)
        if cells is not None:
            cap = cutoffs.cell_capacity(x, box, cells)
            cases.append((x, box, radius, t.exclusion_idx, table, cells, cap))
    top, x = tm.build_peptide("AKDEGRSTAK", phi=-140.0, psi=130.0)
    cases.append((x, None, 1.1, None, None, None, 0))
    x, box, radius, excl, allowed = cases[0][:5]
    x = x - x[0] - np.array([1e-17, 0.0, 0.0])  # an atom a rounding below 0: wraps to the edge
    cases.append((x, box, radius, excl, allowed, None, 0))
    for x, box, radius, excl, allowed, cells, cap in cases:
        want = cutoffs.neighbour_counts(x, allowed, box, radius, cells, cap)
        got = cutoffs.partner_counts(x, box, radius, excl)
        assert want.max() > 0
        np.testing.assert_array_equal(got, want)


def test_exclusion_table_lists_each_excluded_partner():
    pairs = np.array([[0, 1], [0, 2], [1, 2], [3, 4]])
    table = cutoffs.exclusion_table(pairs, 6)
    assert table.shape == (6, 2)
    assert sorted(table[0]) == [1, 2] and sorted(table[2]) == [0, 1]
    assert list(table[5]) == [-1, -1] and sorted(table[4]) == [-1, 3]


@pytest.mark.parametrize("box", ["peptide_box", "water"])
def test_host_pairs_and_pme_match_the_jax_reference(box, request):
    """The CPU custom call (``xla_cpu``: the Verlet-list pairs with their scalars computed
    in C++, PME's tangent spread and gather) against the JAX path it replaces, for 11
    tangents (one partial SIMD chunk): reaction field with a switch, and PME with 6 and 5
    tangents (an odd count: the last packed grid's imaginary part empty)."""
    from timemachine.backends import xla_cpu

    ok, why = xla_cpu.available()
    if not ok:
        pytest.skip(why)
    if box == "water":
        _, system, x = request.getfixturevalue("water")
        wrt = system.select(["charge/*", "sigma/*", "epsilon/*"])
    else:
        system, x = request.getfixturevalue("peptide_box")
        wrt = system.select(["charge/*", "sigma/*", "epsilon/*"])[:11]
    k, term = _term(system)
    lists = neighbours.build(system, jnp.asarray(x))
    theta = jnp.asarray(system.params)
    for w in (wrt, wrt[:5]) if box == "water" else (wrt,):
        dx = jnp.asarray(np.random.default_rng(6).normal(size=(w.size,) + x.shape))
        out = {}
        for host in (True, False):
            call = xla_cpu if host else None
            fn = jax.jit(lambda y, d, nb, h=call, w=w: term.gradient_and_zeta(y, theta, d, w,
                                                                              nb, h))  # fmt: skip
            out[host] = [np.asarray(v) for v in fn(jnp.asarray(x), dx, lists[k])]
        (g_host, z_host), (g_jax, z_jax) = out[True], out[False]
        assert np.abs(g_host - g_jax).max() <= 1e-13 * np.abs(g_jax).max()
        assert np.abs(z_host - z_jax).max() <= 1e-13 * np.abs(z_jax).max()
        assert np.abs(z_jax).max() > 1.0  # the tangents and mixed partials do contribute


def test_pme_potential_of_a_batch_packs_two_grids_per_complex_fft_exactly():
    """The ζ step's batched PME convolution (two real grids per complex FFT, each scaled
    by its largest |Q|) against one real FFT pair per grid: ≤ 1e-14 relative to each
    grid's own potential for grids 1e-6 to 1e5 in scale (an odd count, so one is paired
    with nothing), and exactly zero for a zero grid."""
    box = jnp.asarray([3.0, 3.1, 3.2])
    grid = (24, 25, 27)
    potential = cutoffs._pme_potential_fn(box, 3.1, grid, 5)
    scales = np.array([1.0, 1e-6, 1e5, 0.0, 3.0])
    q = np.random.default_rng(0).normal(size=(5,) + grid) * scales[:, None, None, None]
    batch = np.asarray(potential(jnp.asarray(q)))
    for k in range(5):
        one = np.asarray(potential(jnp.asarray(q[k])))  # one grid: the real FFT pair
        if scales[k] == 0.0:
            assert not batch[k].any() and not one.any()
        else:
            assert np.abs(batch[k] - one).max() <= 1e-14 * np.abs(one).max()


def test_ewald_exclusion_zeta_in_closed_form_matches_linearize(water):
    """The excluded pairs' erf correction: its closed-form ∇E and ζ (position tangents and
    both water charges' tangents) against ``jax.linearize`` of ``jax.grad`` of its energy,
    vmapped over the tangents, to 1e-13."""
    _, system, x = water
    _, term = _term(system)
    theta = jnp.asarray(system.params)
    wrt = system.select(["charge/*"])
    p = wrt.size
    onehot = jnp.zeros((p, theta.shape[0])).at[np.arange(p), wrt].set(1.0)
    dx = jnp.asarray(np.random.default_rng(2).normal(size=(p,) + x.shape))
    x = jnp.asarray(x)

    def energy(y, th):
        return cutoffs.ewald_exclusion_energy(y, th[term.charge_index], term.exclusion_idx,
                                              term.alpha)  # fmt: skip

    @jax.jit
    def reference(y, d):
        g, lin = jax.linearize(jax.grad(energy), y, theta)
        return g, jax.vmap(lin)(d, onehot)

    g_ref, z_ref = reference(x, dx)
    g, z = jax.jit(cutoffs.ewald_exclusion_gradient_and_zeta, static_argnums=3)(
        x, theta[term.charge_index], jnp.asarray(term.exclusion_idx), term.alpha, dx,
        onehot[:, term.charge_index],
    )  # fmt: skip
    assert np.abs(np.asarray(g - g_ref)).max() <= 1e-13 * float(jnp.abs(g_ref).max())
    assert np.abs(np.asarray(z - z_ref)).max() <= 1e-13 * float(jnp.abs(z_ref).max())
    assert float(jnp.abs(z_ref).max()) > 1.0


def test_the_bonded_call_stands_only_for_wholly_internal_coordinate_terms():
    """``coordinate_only`` picks the bonds, angles and torsions, and not the all-pairs
    Nonbonded term, whose coordinate groups are only its 1-4 exceptions (the rest of it
    stays in its own gradient: giving it to the bonded call would count the exceptions
    twice)."""
    from timemachine.structured.autodiff import coordinate_only

    system, _ = tm.load_system(tm.build_peptide("AAA"), forcefield=("amber99sbildn.xml",))
    picked = dict(zip([type(t).__name__ for t in system.terms], coordinate_only(system),
                      strict=False))  # fmt: skip
    assert picked["HarmonicBonds"] and picked["HarmonicAngles"] and picked["PeriodicTorsions"]
    assert picked["Nonbonded"] is False
    assert any(t.coordinate_groups("t") for t in system.terms if type(t).__name__ == "Nonbonded")
