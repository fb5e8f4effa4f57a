"""OBC2 generalized Born with a cutoff, as OpenMM's ``CutoffNonPeriodic`` implicit solvent:
``implicit/obc2.xml`` with ``nonbondedCutoff`` builds a CustomGBForce (GBSAOBC2Force) whose
Born integral and pair sum take only the pairs with r < r_c, the pair term shifted by
-1/r_c, and sets the NonbondedForce's reaction field dielectric to 1.

Checked on an extended 13-residue peptide (201 atoms, 3.7 nm long, so that most pairs lie
beyond a 1 nm cutoff): energies and forces against OpenMM's Reference platform (the
CustomGBForce of obc2.xml, and the native GBSAOBCForce with the same cutoff); the term's ζ
(autodiff, no structured part) against jax.jvp of jax.grad of the reference energy and
central differences of ∇E; the settings that are refused."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import openmm as mm
import openmm.app as app
import openmm.unit as unit
import pytest

import timemachine as tm
from timemachine import potentials
from timemachine.errors import InputError
from timemachine.system import OBC2, System

SEQUENCE = "AKDEGRSTAKDEW"  # charged side chains: the GB pair term is large
FILES = ("amber99sbildn.xml", "implicit/obc2.xml")


@pytest.fixture(scope="module")
def peptide():
    """(topology, positions nm) of an extended (β) peptide of 13 residues, 201 atoms."""
    top, x = tm.build_peptide(SEQUENCE, phi=-140.0, psi=130.0)
    x = x + np.random.default_rng(3).normal(0.0, 0.002, x.shape)  # off the ideal geometry
    return top, x


def _openmm(top, x, method, cutoff):
    """{force class: (energy kJ/mol, forces (N, 3) kJ/mol/nm)} and 'total', OpenMM Reference."""
    kw = {} if cutoff is None else {"nonbondedCutoff": cutoff * unit.nanometer}
    omm = app.ForceField(*FILES).createSystem(
        top, nonbondedMethod=getattr(app, method), constraints=None, rigidWater=False,
        removeCMMotion=False, **kw,
    )  # fmt: skip
    return _evaluate(omm, x)


def _evaluate(omm, x):
    for i, f in enumerate(omm.getForces()):
        f.setForceGroup(i)
    ctx = mm.Context(omm, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x * unit.nanometer)
    out = {}
    groups = {type(f).__name__: {i} for i, f in enumerate(omm.getForces())}
    groups["total"] = set(range(omm.getNumForces()))
    for name, g in groups.items():
        st = ctx.getState(getEnergy=True, getForces=True, groups=g)
        e = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        f = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        out[name] = (e, np.asarray(f))
    return out


def _errors(e, f, e_ref, f_ref):
    """(relative energy error, force RMS error relative to the force RMS)."""
    rms = np.sqrt(np.mean((f - f_ref) ** 2)) / np.sqrt(np.mean(f_ref**2))
    return abs(e - e_ref) / abs(e_ref), float(rms)


def _gb(system):
    (gb,) = [t for t in system.terms if t.kind == "gb"]
    return gb


def _term_energy_forces(term, x, params):
    import jax

    e, g = jax.value_and_grad(term.energy)(np.asarray(x), np.asarray(params))
    return float(e), -np.asarray(g)


@pytest.fixture(scope="module")
def cut_system(peptide):
    top, x = peptide
    system, _ = tm.load_system(
        (top, x), implicit_solvent="obc2", nonbonded_method="CutoffNonPeriodic", cutoff=1.0
    )
    return system


def test_cutoff_gb_matches_openmm_reference(peptide, cut_system):
    """Total and GB-only energy and forces within 1e-9 relative of OpenMM's Reference
    platform (measured ~2e-14 and ~2e-15), and visibly different from the all-pairs GB."""
    top, x = peptide
    r = np.linalg.norm(x[:, None] - x[None, :], axis=-1)
    assert np.mean(r[np.triu_indices(len(x), 1)] >= 1.0) > 0.5  # the cutoff matters
    gb = _gb(cut_system)
    assert gb.cutoff == 1.0 and gb.structured is None and gb.kernel is None
    assert {t.kind for t in cut_system.terms} >= {"nonbonded-cutoff", "gb"}
    ref = _openmm(top, x, "CutoffNonPeriodic", 1.0)
    e = float(cut_system.energy(x))
    f = -np.asarray(cut_system.gradient(x))
    e_err, f_err = _errors(e, f, *ref["total"])
    assert e_err <= 1e-9 and f_err <= 1e-9, (e_err, f_err)
    e_gb, f_gb = _term_energy_forces(gb, x, cut_system.params)
    e_err, f_err = _errors(e_gb, f_gb, *ref["CustomGBForce"])
    assert e_err <= 1e-9 and f_err <= 1e-9, (e_err, f_err)
    # the same term without the cutoff is OpenMM's NoCutoff GB, far from the cutoff one
    e_all, _ = _term_energy_forces(dataclasses.replace(gb, cutoff=None), x, cut_system.params)
    assert abs(e_all - e_gb) > 100.0, (e_all, e_gb)
    assert gb.structured is None and dataclasses.replace(gb, cutoff=None).structured == "obc2"
    ref_all = _openmm(top, x, "NoCutoff", None)
    assert abs(e_all - ref_all["CustomGBForce"][0]) <= 1e-9 * abs(e_all)


@pytest.mark.slow
@pytest.mark.parametrize("cutoff", [0.8, 1.2])
def test_villin_cutoff_gb_matches_openmm_reference(cutoff):
    """The villin headpiece (examples/rg_villin, 582 atoms) in OBC2 with CutoffNonPeriodic:
    energy and force RMS within 1e-9 relative of OpenMM's Reference platform (measured
    ≤ 1e-13 and 2e-15)."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "rg_villin", "villin_hp35.pdb")
    pdb = app.PDBFile(path)
    x = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    system, _ = tm.load_system(
        pdb, implicit_solvent="obc2", nonbonded_method="CutoffNonPeriodic", cutoff=cutoff
    )
    assert _gb(system).cutoff == cutoff
    ref = _openmm(pdb.topology, x, "CutoffNonPeriodic", cutoff)
    e = float(system.energy(x))
    f = -np.asarray(system.gradient(x))
    e_err, f_err = _errors(e, f, *ref["total"])
    assert e_err <= 1e-9 and f_err <= 1e-9, (e_err, f_err)


def test_cutoff_gb_agrees_with_native_gbsaobcforce(peptide, cut_system):
    """OpenMM's native GBSAOBCForce (ReferenceObc.cpp) with CutoffNonPeriodic and the
    engine's radii and scales: the same definition, up to its Coulomb constant
    138.935456 against customgbforces' 138.935485 (2e-7 relative)."""
    top, x = peptide
    gb = _gb(cut_system)
    theta = np.asarray(cut_system.params)
    native = mm.GBSAOBCForce()
    native.setNonbondedMethod(mm.GBSAOBCForce.CutoffNonPeriodic)
    native.setCutoffDistance(1.0)
    native.setSolventDielectric(78.5)  # obc2.xml's (the native default is 78.3)
    for q, rad, s in zip(theta[gb.charge_index], theta[gb.radius_index], theta[gb.scale_index],
                         strict=True):  # fmt: skip
        native.addParticle(q, rad, s)
    omm = mm.System()
    for _ in range(len(x)):
        omm.addParticle(1.0)
    omm.addForce(native)
    e_ref, f_ref = _evaluate(omm, x)["total"]
    e_err, f_err = _errors(*_term_energy_forces(gb, x, theta), e_ref, f_ref)
    assert e_err <= 1e-6 and f_err <= 1e-6, (e_err, f_err)


def test_cutoff_gb_zeta_matches_jvp_and_central_differences(peptide, cut_system):
    """ζ_p = H·t_p + ∂²E/∂x∂θ_p for GB radii and scales, a charge and a torsion k: the
    production ζ (the cutoff GB through autodiff) against jax.jvp of jax.grad of the
    reference energy, ≤ 1e-10 relative, for the whole System and for the GB term alone
    (against ``potentials.obc2_energy`` called directly); and against central
    differences of ∇E along (t_p, e_p)."""
    import jax
    import jax.numpy as jnp

    from timemachine.sensitivity.zeta import make_zeta

    _, x = peptide
    system = cut_system
    names = system.param_names
    pick = [names.index("gb/C/radius"), names.index("gb/O/scale"), names.index("gb/H(N)/radius"),
            next(i for i, n in enumerate(names) if n.startswith("charge/")),
            next(i for i, n in enumerate(names) if n.startswith("torsion/"))]  # fmt: skip
    wrt = np.array(pick)
    theta = np.asarray(system.params)
    # small tangents: the GB force jumps at the cutoff, so the differences must not carry
    # a pair across it
    t = np.random.default_rng(2).normal(0.0, 1e-4, (wrt.size,) + x.shape)

    def jvp_zeta(energy, tangents):
        grad = jax.grad(energy, argnums=0)

        @jax.jit  # x and θ as arguments: closed over, XLA would constant-fold through them
        def zeta(xx, th, dxs):
            def one(dx, p):
                return jax.jvp(grad, (xx, th), (dx, jnp.eye(th.size)[p]))[1]

            return jax.vmap(one)(dxs, wrt)

        return np.asarray(zeta(x, theta, tangents))

    fast = np.asarray(jax.jit(make_zeta(system, wrt))(x, theta, t))
    ref = jvp_zeta(system.energy_fn(), t)
    assert np.abs(fast - ref).max() <= 1e-10 * np.abs(ref).max()

    gb = _gb(system)
    alone = System(system.masses, [gb], names, theta, system.topology)

    def gb_energy(xx, th):
        return potentials.obc2_energy(xx, th[gb.charge_index], th[gb.radius_index],
                                      th[gb.scale_index], cutoff=1.0)  # fmt: skip

    zeta_gb = jax.jit(make_zeta(alone, wrt))
    fast_gb = np.asarray(zeta_gb(x, theta, t))
    ref_gb = jvp_zeta(gb_energy, t)
    err = np.abs(fast_gb - ref_gb).max() / np.abs(ref_gb).max()
    assert err <= 1e-10, err
    # the mixed partials ∂²E/∂x∂θ_p alone (t = 0)
    zero = np.zeros_like(t)
    mixed, ref_mixed = np.asarray(zeta_gb(x, theta, zero)), jvp_zeta(gb_energy, zero)
    assert np.abs(ref_mixed).max() > 0
    assert np.abs(mixed - ref_mixed).max() <= 1e-10 * np.abs(ref_mixed).max()

    grad = jax.jit(jax.grad(gb_energy, argnums=0))
    for p in range(wrt.size):  # d/dε ∇E(x + ε t_p, θ + ε e_p) at ε = 0
        eps = 1e-5
        e_p = np.zeros_like(theta)
        e_p[wrt[p]] = 1.0
        fd = np.asarray(grad(x + eps * t[p], theta + eps * e_p))
        fd = (fd - np.asarray(grad(x - eps * t[p], theta - eps * e_p))) / (2 * eps)
        err = np.abs(fd - ref_gb[p]).max() / np.abs(ref_gb[p]).max()
        assert err <= 1e-6, (names[wrt[p]], err)


def test_cutoff_gb_on_its_verlet_list_is_the_exact_cutoff_sum(peptide, cut_system):
    """load_system gives the cutoff GB a Verlet list of every pair (no exclusions). On it
    the Born integrals and pairs (O(N K)) give the exact cutoff sum's energy and gradient
    (≤ 1e-12 relative; so OpenMM Reference's to 1e-9), at the positions it was built and
    after every atom moved up to skin/2; the written-out gradient equals autodiff of the
    list energy; ζ on the list (forward mode through that gradient) equals jax.jvp of the
    exact gradient to 1e-10; the compiled and JAX list builds hold the same partners; an
    overflowing list gives NaN."""
    import jax
    import jax.numpy as jnp

    from timemachine import neighbours
    from timemachine.potentials import cutoffs
    from timemachine.sensitivity.zeta import make_gradient_and_zeta

    top, x = peptide
    system = cut_system
    k = next(i for i, t in enumerate(system.terms) if t.kind == "gb")
    gb = system.terms[k]
    assert gb.uses_neighbours and gb.skin == 0.1 and 0 < gb.neighbour_capacity < len(x)
    theta = jnp.asarray(system.params)
    lists = jax.jit(lambda y: neighbours.build(system, y))(x)
    nb = lists[k]
    # every pair within cutoff + skin, in both rows, none excluded
    r = np.linalg.norm(x[:, None] - x[None, :], axis=-1)
    want = [set(np.flatnonzero((r[i] < 1.1) & (np.arange(len(x)) != i))) for i in range(len(x))]
    got = [set(row[row < len(x)].tolist()) for row in np.asarray(nb.idx)]
    assert got == want
    cutoffs.register_list_builder(None)  # the JAX build: the same partners
    try:
        jax_idx = np.asarray(gb.build_neighbours(jnp.asarray(x)).idx)
    finally:
        from timemachine.backends import xla_cpu_periodic

        cutoffs.register_list_builder(xla_cpu_periodic.build_list)
    assert [set(row[row < len(x)].tolist()) for row in jax_idx] == want

    ref = _openmm(top, x, "CutoffNonPeriodic", 1.0)["CustomGBForce"]
    move = np.random.default_rng(5).normal(size=x.shape)
    move *= 0.049 / np.linalg.norm(move, axis=1, keepdims=True)  # < skin/2 for every atom
    for y in (x, x + move):
        assert not bool(neighbours.stale(system, lists, jnp.asarray(y)))
        e_list = float(gb.energy(jnp.asarray(y), theta, nb))
        e_exact, g_exact = jax.value_and_grad(gb.energy)(jnp.asarray(y), theta)
        g_list = gb.gradient(jnp.asarray(y), theta, nb)
        g_auto = jax.grad(lambda z: gb.energy(z, theta, nb))(jnp.asarray(y))
        scale = float(jnp.abs(g_exact).max())
        assert abs(e_list - float(e_exact)) <= 1e-12 * abs(float(e_exact))
        assert float(jnp.abs(g_list - g_exact).max()) <= 1e-12 * scale
        assert float(jnp.abs(g_list - g_auto).max()) <= 1e-12 * scale
    e_err, f_err = _errors(float(gb.energy(jnp.asarray(x), theta, nb)),
                           -np.asarray(gb.gradient(jnp.asarray(x), theta, nb)), *ref)  # fmt: skip
    assert e_err <= 1e-9 and f_err <= 1e-9, (e_err, f_err)

    names = system.param_names
    wrt = np.array([names.index("gb/C/radius"), names.index("gb/O/scale"),
                    next(i for i, n in enumerate(names) if n.startswith("charge/"))])  # fmt: skip
    t = np.random.default_rng(2).normal(0.0, 1e-2, (wrt.size,) + x.shape)
    alone = System(system.masses, [gb], names, system.params, system.topology)
    _, zeta = jax.jit(make_gradient_and_zeta(alone, wrt))(x, theta, t, (nb,))
    grad = jax.grad(gb.energy, argnums=0)

    @jax.jit
    def ref_zeta(xx, th, dxs):
        return jax.vmap(lambda dx, p: jax.jvp(grad, (xx, th), (dx, jnp.eye(th.size)[p]))[1])(
            dxs, wrt
        )

    want_zeta = np.asarray(ref_zeta(x, theta, t))
    assert np.abs(np.asarray(zeta) - want_zeta).max() <= 1e-10 * np.abs(want_zeta).max()

    small = dataclasses.replace(gb, neighbour_capacity=8)
    over = small.build_neighbours(jnp.asarray(x))
    assert bool(over.overflow) and np.isnan(float(small.energy(jnp.asarray(x), theta, over)))
    assert np.isnan(np.asarray(small.gradient(jnp.asarray(x), theta, over))).all()


def test_the_plain_step_takes_the_list_custom_call(peptide, cut_system):
    """The plain-MD gradient of the cutoff GB on its list runs in the CPU custom call
    (``xla_cpu_gb.gb_list_gradient``, each pair once from the heads of the rows) and
    equals the JAX list gradient (its reference) to 1e-12, alone and in the System's
    ``gradient_fn``, whose jvp stays the reference's (force matching)."""
    import jax
    import jax.numpy as jnp

    from timemachine import neighbours
    from timemachine.backends import xla_cpu_gb
    from timemachine.structured import gradient_fn, make_gradient

    if not xla_cpu_gb.available()[0]:
        pytest.skip(xla_cpu_gb.available()[1])
    _, x = peptide
    system = cut_system
    x, theta = jnp.asarray(x), jnp.asarray(system.params)
    lists = neighbours.build(system, x)
    k = next(i for i, t in enumerate(system.terms) if t.kind == "gb")
    gb = system.terms[k]
    want = gb.gradient(x, theta, lists[k])
    got = jax.jit(lambda y: xla_cpu_gb.gb_list_gradient(gb, y, theta, lists[k]))(x)
    assert float(jnp.abs(got - want).max()) <= 1e-12 * float(jnp.abs(want).max())
    fast, ref = gradient_fn(system), make_gradient(system)
    assert "xla_cpu_periodic" in fast.__module__
    a, b = fast(x, theta, lists), ref(x, theta, lists)
    assert float(jnp.abs(a - b).max()) <= 1e-12 * float(jnp.abs(b).max())
    dx = jnp.asarray(np.random.default_rng(0).normal(size=x.shape))
    dp = jnp.zeros_like(theta).at[gb.radius_index[3]].set(1.0)
    t_fast = jax.jvp(lambda y, p: fast(y, p, lists), (x, theta), (dx, dp))[1]
    t_ref = jax.jvp(lambda y, p: ref(y, p, lists), (x, theta), (dx, dp))[1]
    np.testing.assert_array_equal(np.asarray(t_fast), np.asarray(t_ref))
    small = dataclasses.replace(gb, neighbour_capacity=8)
    over = small.build_neighbours(x)
    assert np.isnan(np.asarray(xla_cpu_gb.gb_list_gradient(small, x, theta, over))).all()


def test_the_structured_list_zeta_is_jax_jvp_of_the_exact_gradient(peptide, cut_system):
    """``OBC2.gradient_and_zeta`` on the list (the Hessian-vector products from per-pair
    scalars and the Born-radius chain, ``gbsa.obc2_neighbour_gradient_and_zeta``; the
    mixed partials by forward mode of the list gradient): against jax.jvp of jax.grad of
    the exact cutoff energy (no list), ≤ 1e-12 relative, for tangents alone (a torsion k,
    which the term does not use, repeated), for the mixed partials alone (t = 0: a charge,
    a radius and a scale, one repeated), in small blocks (several per row set) and with
    no tangents at all; the gradient it returns is the exact one; and an overflowing list
    gives NaN."""
    import jax
    import jax.numpy as jnp

    from timemachine import neighbours
    from timemachine.potentials import gbsa

    _, x = peptide
    k = next(i for i, t in enumerate(cut_system.terms) if t.kind == "gb")
    gb = cut_system.terms[k]
    x, theta = jnp.asarray(x), jnp.asarray(cut_system.params)
    nb = neighbours.build(cut_system, x)[k]
    names = cut_system.param_names
    torsion = next(i for i, n in enumerate(names) if n.startswith("torsion/"))
    charge = next(i for i, n in enumerate(names) if n.startswith("charge/"))
    grad = jax.grad(gb.energy, argnums=0)  # the exact cutoff sum over all pairs

    def reference(wrt, t):
        one = jnp.eye(theta.size)

        def one_tangent(dx, p):
            return jax.jvp(grad, (x, theta), (dx, one[p]))[1]

        return np.asarray(jax.jit(jax.vmap(one_tangent))(t, wrt))

    rng = np.random.default_rng(4)
    radius, scale = names.index("gb/C/radius"), names.index("gb/O/scale")
    cases = {
        "tangents": (np.array([torsion, torsion, torsion]), rng.normal(0, 1e-2, (3, *x.shape))),
        "mixed": (np.array([charge, radius, scale, radius]), np.zeros((4, *x.shape))),
    }
    want_grad = np.asarray(grad(x, theta))
    for label, (wrt, t) in cases.items():
        want = reference(wrt, t)
        assert np.abs(want).max() > 0, label
        g, z = jax.jit(lambda y, th, dx, w=wrt: gb.gradient_and_zeta(y, th, dx, w, nb))(
            x, theta, jnp.asarray(t))  # fmt: skip
        assert np.abs(np.asarray(z) - want).max() <= 1e-12 * np.abs(want).max(), label
        assert np.abs(np.asarray(g) - want_grad).max() <= 1e-12 * np.abs(want_grad).max()
    wrt, t = cases["tangents"]
    small = gbsa.obc2_neighbour_gradient_and_zeta(
        x, *gb.per_atom(theta), nb, gb.cutoff, jnp.asarray(t), elements_per_block=3 * 2000
    )[1]  # fmt: skip
    assert np.abs(np.asarray(small) - reference(wrt, t)).max() <= 1e-12 * np.abs(small).max()
    g0, z0 = gb.gradient_and_zeta(x, theta, jnp.zeros((0, *x.shape)), np.zeros(0, int), nb)
    assert z0.shape == (0, *x.shape)
    assert np.abs(np.asarray(g0) - want_grad).max() <= 1e-12 * np.abs(want_grad).max()
    over = dataclasses.replace(gb, neighbour_capacity=8)
    g, z = over.gradient_and_zeta(x, theta, jnp.asarray(t), wrt, over.build_neighbours(x))
    assert np.isnan(np.asarray(g)).all() and np.isnan(np.asarray(z)).all()


def test_the_list_zeta_custom_call_is_its_jax_reference(peptide, cut_system):
    """``tm_gb_list_zeta`` (``xla_cpu_gb.gb_list_zeta``: the three row passes in compiled
    code, pair scalars in closed form) against its reference
    ``gbsa.obc2_neighbour_gradient_and_zeta``: ∇E and H·t to 1e-12 for P = 0 and 5
    tangents at 1 nm and P = 9 at 0.6 nm (W = 4 per vector: whole and padded vectors;
    rows of every length); through ``OBC2.gradient_and_zeta`` with the host (mixed
    partials added) against jax.jvp of the exact gradient; NaN on an overflowed list."""
    import jax
    import jax.numpy as jnp

    from timemachine import neighbours
    from timemachine.backends import xla_cpu, xla_cpu_gb
    from timemachine.potentials import gbsa

    if not xla_cpu_gb.available()[0]:
        pytest.skip(xla_cpu_gb.available()[1])
    top, x0 = peptide
    rng = np.random.default_rng(8)
    for cutoff, counts in ((1.0, (0, 5)), (0.6, (9,))):
        system = cut_system if cutoff == 1.0 else tm.load_system(
            (top, x0), implicit_solvent="obc2", nonbonded_method="CutoffNonPeriodic",
            cutoff=cutoff)[0]  # fmt: skip
        k = next(i for i, t in enumerate(system.terms) if t.kind == "gb")
        gb = system.terms[k]
        x, theta = jnp.asarray(x0), jnp.asarray(system.params)
        nb = neighbours.build(system, x)[k]
        for p in counts:
            t = jnp.asarray(rng.normal(0.0, 1e-2, (p, *x.shape)))
            got = jax.jit(functools.partial(xla_cpu_gb.gb_list_zeta, gb))(x, theta, nb, t)
            want = gbsa.obc2_neighbour_gradient_and_zeta(x, *gb.per_atom(theta), nb, cutoff, t)
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape
                if b.size:
                    err = float(jnp.abs(a - b).max()) / float(jnp.abs(b).max())
                    assert err <= 1e-12, (cutoff, p, err)
    names = cut_system.param_names
    k = next(i for i, t in enumerate(cut_system.terms) if t.kind == "gb")
    gb = cut_system.terms[k]
    x, theta = jnp.asarray(x0), jnp.asarray(cut_system.params)
    nb = neighbours.build(cut_system, x)[k]
    wrt = np.array([names.index("gb/C/radius"), next(i for i, n in enumerate(names)
                                                     if n.startswith("torsion/"))])  # fmt: skip
    t = jnp.asarray(rng.normal(0.0, 1e-2, (2, *x.shape)))
    _, z = jax.jit(lambda y, th, d: gb.gradient_and_zeta(y, th, d, wrt, nb, host=xla_cpu))(
        x, theta, t
    )  # fmt: skip
    grad = jax.grad(gb.energy, argnums=0)
    one = jnp.eye(theta.size)
    want = jax.vmap(lambda d, q: jax.jvp(grad, (x, theta), (d, one[q]))[1])(t, wrt)
    assert float(jnp.abs(z - want).max()) <= 1e-12 * float(jnp.abs(want).max())
    small = dataclasses.replace(gb, neighbour_capacity=8)
    g, z = xla_cpu_gb.gb_list_zeta(small, x, theta, small.build_neighbours(x), t)
    assert np.isnan(np.asarray(g)).all() and np.isnan(np.asarray(z)).all()
    with pytest.raises(Exception, match=r"tm_gb_list_zeta: the tangents must be \(P, N, 3\)"):
        jax.block_until_ready(xla_cpu_gb.gb_list_zeta(gb, x, theta, nb, t[:, :-1]))


def test_chains_and_sensitivities_on_the_gb_list_match_the_exact_sums(peptide, cut_system):
    """Two equilibrium chains (60 steps of 1 fs: lists rebuilt on schedule every 12 steps
    and whenever stale) and 30 steps of dx/dθ for GB radii and torsion barriers, on the
    Verlet lists and with them off (every pair, every step): the same to round-off."""
    from timemachine import neighbours
    from timemachine.fitting.sampling import EquilibriumChains

    _, x = peptide
    exact = neighbours.with_neighbour_list(cut_system, x, skin=0)
    assert neighbours.has_neighbours(cut_system) and not neighbours.has_neighbours(exact)
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.001, seed=3)
    assert int(neighbours.period(cut_system, integ.dt)) == 12
    chains = {}
    for name, system in (("exact", exact), ("listed", cut_system)):
        run = EquilibriumChains(system, x, integ, n_chains=2, save_every=30)
        chains[name] = run.sample(np.asarray(system.params), 60).x
    assert np.abs(chains["exact"] - chains["listed"]).max() < 1e-10
    wrt = cut_system.select(["gb/*/radius", "torsion/*/k*"])[:8]
    d = {name: np.asarray(tm.simulate(system, x, integ, 30, wrt=wrt, save_every=30,
                                      progress=False).dx_dtheta)
         for name, system in (("exact", exact), ("listed", cut_system))}  # fmt: skip
    assert np.abs(d["exact"]).max() > 0
    assert np.abs(d["listed"] - d["exact"]).max() <= 1e-10 * np.abs(d["exact"]).max()


@pytest.mark.slow
def test_cutoff_gb_dx_dtheta_matches_central_finite_differences(peptide, cut_system):
    """dx/dθ of two GB parameters over 100 Langevin steps of 0.5 fs against central
    differences of the same seeded trajectory (measured 3e-6 at h = 1e-6; the all-pairs
    GB gives 2e-7 there)."""
    _, x = peptide
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0005, seed=7)
    wrt = ["gb/C/radius", "gb/O/scale"]
    traj = tm.simulate(cut_system, x, integ, 100, wrt=wrt, save_every=50, progress=False)
    fd = tm.finite_difference(cut_system, x, integ, 100, wrt=wrt, h=1e-6, save_every=50)
    table = tm.compare(traj, fd)
    assert table.max_rel_error <= 1e-4, str(table)


def test_cutoff_gb_has_no_cuda_path(cut_system):
    """The CUDA tables refuse the cutoff GB term (its kernels know no cutoff) by name, and
    take the same term without it."""
    from timemachine.backends.tables import build_plan

    s = cut_system
    gb = _gb(s)
    alone = System(s.masses, [gb], s.param_names, s.params, s.topology)
    with pytest.raises(InputError, match=r"no kernel for system\.terms\[0\] \(gb\), a OBC2"):
        build_plan(alone, np.zeros(0, np.int64))
    plain = System(s.masses, [dataclasses.replace(gb, cutoff=None)], s.param_names, s.params)
    assert len(build_plan(plain, np.zeros(0, np.int64)).gb) == 1


def test_bad_cutoffs_and_methods_are_refused_naming_them(peptide):
    top, x = peptide
    idx = np.arange(len(x))
    for bad in (0.0, -1.0, float("nan"), float("inf"), "1.0", True):
        with pytest.raises(InputError, match=rf"OBC2 cutoff must be .* > 0 \(nm\), got {bad!r}"):
            OBC2(idx, idx, idx, cutoff=bad)
    with pytest.raises(InputError, match=r"cutoff must be .* > 0 \(nm\), got -0.5"):
        potentials.obc2_energy(x, np.zeros(len(x)), np.full(len(x), 0.15),
                               np.full(len(x), 0.8), cutoff=-0.5)  # fmt: skip
    structure = (top, x)
    kw = dict(implicit_solvent="obc2", nonbonded_method="CutoffNonPeriodic")
    with pytest.raises(InputError, match=r"cutoff must be a number > 0 \(nm\), got -0.5"):
        tm.load_system(structure, cutoff=-0.5, **kw)
    with pytest.raises(InputError, match=r"cutoff must be a number > 0 \(nm\), got 0"):
        tm.load_system(structure, cutoff=0, **kw)
    with pytest.raises(InputError, match=r"cutoff must be a finite number > 0 \(nm\), got inf"):
        tm.load_system(structure, cutoff=float("inf"), **kw)
    for method in ("PME", "CutoffPeriodic"):
        with pytest.raises(InputError, match=rf"nonbonded_method='{method}' with implicit_solv"):
            tm.load_system(structure, implicit_solvent="obc2", nonbonded_method=method, cutoff=1)
