"""Periodic boxes and cutoffs in the engine (issue 20): ``CutoffNonbonded`` (reaction
field as OpenMM's CutoffPeriodic and CutoffNonPeriodic, PME as OpenMM's with its α and
grid, OpenMM's LJ switch, the dispersion correction) against OpenMM's Reference platform
on trialanine in flexible TIP3P; its ζ against jax.jvp of the reference and central
differences of ∇E; dx/dθ through Langevin steps against central finite differences; the
settings it refuses."""

from __future__ import annotations

import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import ForceFieldError, InputError

FILES = ("amber99sbildn.xml", "tip3p.xml")


@pytest.fixture(scope="module")
def box():
    top, x = tm.build_peptide("AAA")
    return tm.solvate((top, x), padding=1.0, cutoff=0.9, constraints=None, rigid_water=False)


def _openmm(box, x, method, switch):
    """(energy kJ/mol, forces (N, 3) kJ/mol/nm) of OpenMM's Reference platform."""
    import openmm as mm
    import openmm.app as app
    import openmm.unit as unit

    kw = {} if switch is None else {"switchDistance": switch * unit.nanometer}
    omm = app.ForceField(*FILES).createSystem(
        box.topology, nonbondedMethod=getattr(app, method), nonbondedCutoff=0.9 * unit.nanometer,
        constraints=None, rigidWater=False, removeCMMotion=False, **kw,
    )  # fmt: skip
    ctx = mm.Context(omm, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x * unit.nanometer)
    st = ctx.getState(getEnergy=True, getForces=True)
    e = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return e, np.asarray(f)


def _assert_matches(system, x, e_ref, f_ref, tol=1e-9):
    """The System's energy and forces at x against OpenMM's: relative energy error and
    relative force RMS error ≤ tol; returns the energy."""
    e = float(system.energy(x))
    f = -np.asarray(system.gradient(x))
    assert abs(e - e_ref) <= tol * abs(e_ref), (e, e_ref)
    rms = np.sqrt(np.mean((f - f_ref) ** 2)) / np.sqrt(np.mean(f_ref**2))
    assert rms <= tol, rms
    return e


@pytest.mark.parametrize(
    "method, switch",
    [("CutoffPeriodic", 0.8), ("CutoffPeriodic", None), ("CutoffNonPeriodic", None),
     ("PME", None), ("PME", 0.8)],
)  # fmt: skip
def test_cutoff_energies_and_forces_match_openmm_reference(box, method, switch):
    system, x = tm.load_system(
        (box.topology, box.positions),
        forcefield=FILES,
        nonbonded_method=method,
        cutoff=0.9,
        switch_distance=switch,
    )
    assert any(t.kind == "nonbonded-cutoff" for t in system.terms)
    # a frame off the lattice of the solvation, with molecules across the box's faces
    x = x + np.random.default_rng(1).normal(0.0, 0.002, x.shape)
    _assert_matches(system, x, *_openmm(box, x, method, switch))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["PME", "CutoffPeriodic"])
def test_a_solvated_protein_of_8867_atoms_matches_openmm_reference(method):
    """Villin headpiece in its 4.9 × 4.6 × 3.9 nm box of 2,700 waters (OpenMM's test.pdb),
    flexible TIP3P: the energy and the force RMS to ≤ 1e-9 relative, densely and through
    the cell list, whose energy is the dense sum's within 1e-12."""
    import openmm.app as app
    from conftest import VILLIN_PDB

    pdb = app.PDBFile(VILLIN_PDB)
    system, x = tm.load_system(pdb, forcefield=FILES, nonbonded_method=method, cutoff=0.9)
    assert system.n_atoms == 8867
    ref = _openmm(pdb, x, method, None)
    e = _assert_matches(system, x, *ref)
    # the cell list (5 × 5 × 4 cells of edge ≥ r_c) sums the same pairs in another order
    if method == "CutoffPeriodic":
        import dataclasses

        from timemachine.potentials import cutoffs

        (term,) = [t for t in system.terms if t.kind == "nonbonded-cutoff"]
        cells = cutoffs.cell_grid(term.box, term.cutoff)
        assert cells == (5, 5, 4)
        capacity = cutoffs.cell_capacity(x, term.box, cells)
        listed = dataclasses.replace(term, cells=cells, cell_capacity=capacity)
        terms = [listed if t is term else t for t in system.terms]
        cell_system = tm.System(system.masses, terms, system.param_names, system.params)
        assert abs(_assert_matches(cell_system, x, *ref) - e) <= 1e-12 * abs(e)


@pytest.fixture(scope="module", params=["CutoffPeriodic", "PME"])
def periodic(box, request):
    system, x = tm.load_system((box.topology, box.positions), forcefield=FILES,
                               nonbonded_method=request.param, cutoff=0.9,
                               switch_distance=0.8)  # fmt: skip
    from timemachine import neighbours

    assert neighbours.has_neighbours(system)  # the step programs run on Verlet lists
    return system, np.asarray(x)  # Modeller's waters: close to their minima already


def test_periodic_zeta_matches_jvp_and_central_differences(periodic):
    """ζ_p = H·t_p + ∂²E/∂x∂θ_p for water's charge, σ and ε and a torsion k: the production
    ζ (the term's autodiff part) against jax.jvp of ∇E (the reference), and against
    central differences of ∇E along (t_p, e_p)."""
    import jax

    from timemachine.sensitivity.zeta import make_zeta

    system, x = periodic
    names = system.param_names
    charges = [i for i, n in enumerate(names) if n.startswith("charge/")]
    pick = [charges[-1], names.index("sigma/OW/sigma"), names.index("epsilon/OW/epsilon"),
            next(i for i, n in enumerate(names) if n.startswith("torsion/C-N-CT-C/k"))]  # fmt: skip
    wrt = np.array(pick)
    theta = np.asarray(system.params)
    # small tangents: the reaction field's force jumps at the cutoff, so the differences
    # must not carry a pair across it (expected crossings ~ N ρ 4π r_c² |ε t| ≈ 0.01)
    t = np.random.default_rng(2).normal(0.0, 1e-4, (wrt.size,) + x.shape)
    fast = np.asarray(jax.jit(make_zeta(system, wrt))(x, theta, t))
    ref = np.asarray(jax.jit(make_zeta(system, wrt, method="reference"))(x, theta, t))
    assert np.abs(fast - ref).max() <= 1e-10 * np.abs(ref).max()
    grad = jax.jit(jax.grad(system.energy_fn(), argnums=0))
    for p in range(wrt.size):  # d/dε ∇E(x + ε t_p, θ + ε e_p) at ε = 0
        eps = 2e-5  # truncation O(ε²) of σ's steep LJ within 1e-7
        e_p = np.zeros_like(theta)
        e_p[wrt[p]] = 1.0
        fd = np.asarray(grad(x + eps * t[p], theta + eps * e_p))
        fd = (fd - np.asarray(grad(x - eps * t[p], theta - eps * e_p))) / (2 * eps)
        err = np.abs(fd - ref[p]).max() / np.abs(ref[p]).max()
        assert err <= 1e-6, (names[wrt[p]], err)


def test_periodic_dx_dtheta_matches_central_finite_differences(periodic):
    """dx/dθ of the φ barriers over 200 steps of 0.5 fs (flexible water) in the periodic
    box against central differences of the same seeded trajectory."""
    system, x = periodic
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0005, seed=7)
    wrt = "torsion/C-N-CT-C/k*"
    traj = tm.simulate(system, x, integ, 200, wrt=wrt, save_every=100, progress=False)
    fd = tm.finite_difference(system, x, integ, 200, wrt=wrt, h=1e-4, save_every=100)
    table = tm.compare(traj, fd)
    assert table.max_rel_error <= 1e-6, str(table)


def test_bad_periodic_settings_are_refused_naming_them(box):
    structure = (box.topology, box.positions)
    with pytest.raises(InputError, match=r"less than twice the cutoff \(1.2 nm\)"):
        tm.load_system(structure, forcefield=FILES, nonbonded_method="CutoffPeriodic", cutoff=1.2)
    with pytest.raises(InputError, match=r"cutoff must be a number > 0 \(nm\), got -0.5"):
        tm.load_system(structure, forcefield=FILES, nonbonded_method="CutoffPeriodic", cutoff=-0.5)
    with pytest.raises(InputError, match=r"switch_distance must be in \[0, cutoff = 0.9\)"):
        tm.load_system(structure, forcefield=FILES, nonbonded_method="CutoffPeriodic",
                       cutoff=0.9, switch_distance=0.95)  # fmt: skip
    with pytest.raises(ForceFieldError, match=r"nonbonded_method='Ewald'.*and PME"):
        tm.load_system(structure, forcefield=FILES, nonbonded_method="Ewald", cutoff=0.9)
    top, x = tm.build_peptide("AAA")  # no periodic box
    for method in ("CutoffPeriodic", "PME"):
        with pytest.raises(InputError, match=rf"'{method}' needs a periodic box"):
            tm.load_system((top, x), nonbonded_method=method, cutoff=0.9)
    with pytest.raises(InputError, match=r"nonbonded_method must be one of .*got 'Cutoff'"):
        tm.load_system((top, x), nonbonded_method="Cutoff")
