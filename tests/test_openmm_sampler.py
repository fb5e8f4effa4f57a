"""OpenMM as the equilibrium sampler (issue 20): θ carried into an explicitly solvated
OpenMM System through the solute's torsions, ∂E/∂θ on its frames against OpenMM's own
central differences, a fluctuation fit epoch in TIP3P with PME, bitwise resume on the
Reference platform, and the settings it refuses."""

from __future__ import annotations

import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import ForceFieldError, InputError
from timemachine.fitting import OpenMMSampler, graf2007_targets
from timemachine.fitting.openmm_sampler import OpenMMChains, torsion_map

WRT = "torsion/C-N-CT-C/k*"


@pytest.fixture(scope="module")
def solvated():
    top, x = tm.build_peptide("AAA")
    return tm.solvate((top, x), padding=1.0, cutoff=0.9)


def _torsion_energy_openmm(omm, x, platform="Reference"):
    """OpenMM's PeriodicTorsionForce energy alone (kJ/mol) at x (N, 3) nm."""
    import openmm as mm
    import openmm.unit as unit

    alone = mm.System()  # the same particles with the torsion forces only
    for i in range(omm.getNumParticles()):
        alone.addParticle(omm.getParticleMass(i))
    for f in omm.getForces():
        if isinstance(f, mm.PeriodicTorsionForce):
            alone.addForce(mm.XmlSerializer.clone(f))
    ctx = mm.Context(alone, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName(platform))
    ctx.setPositions(x * unit.nanometer)
    e = ctx.getState(getEnergy=True).getPotentialEnergy()
    return e.value_in_unit(unit.kilojoule_per_mole)


def _perturbed(system, seed=0):
    theta = np.array(system.params)
    idx = system.select(["torsion/*/k*", "improper/*/k*"])
    rng = np.random.default_rng(seed)
    theta[idx] *= 1.0 + 0.3 * rng.standard_normal(idx.size)
    return theta


def test_theta_reaches_the_solvated_openmm_system_and_its_derivative_agrees(solvated):
    """At a perturbed θ, OpenMM's torsion energy of the whole box equals the solute
    System's torsion energy, and the engine's ∂E/∂θ of the φ barriers on the box's
    solute equals OpenMM's central differences of its own energy."""
    s = solvated
    n = s.solute.n_atoms
    assert s.positions.shape[0] > 600 and np.allclose(s.positions[:n], s.solute_x)
    samp = OpenMMSampler(s.openmm_system, s.positions, platform="Reference", minimize=False)
    chains = OpenMMChains(samp, s.solute, tm.LangevinIntegrator(300.0, 1.0, 0.002), n_chains=1)
    assert len(chains.map) == 72  # every torsion on trialanine, propers and impropers
    theta = _perturbed(s.solute)
    chains._set_theta(theta)
    ours = s.solute.energy_terms(s.positions[:n], theta)
    ours = ours["torsion"] + ours.get("improper", 0.0)
    theirs = _torsion_energy_openmm(chains.openmm_system, s.positions)
    assert abs(ours - theirs) <= 1e-9 * abs(theirs), (ours, theirs)
    # ∂E/∂θ_p: the engine's (jax.grad on the solute) against OpenMM's central differences
    import jax

    wrt = s.solute.select(WRT)
    grad = jax.grad(s.solute.energy_fn(), argnums=1)(np.asarray(s.positions[:n]), theta)[wrt]
    fd = []
    for p in wrt:
        h = 1e-4 * max(1.0, abs(theta[p]))
        e = []
        for sign in (1, -1):
            t = theta.copy()
            t[p] += sign * h
            chains._set_theta(t)
            e.append(_torsion_energy_openmm(chains.openmm_system, s.positions))
        fd.append((e[0] - e[1]) / (2 * h))
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-7, atol=1e-9)


def test_a_fluctuation_epoch_in_tip3p_runs_its_chains_in_openmm(solvated):
    """One epoch of the fit with OpenMM chains (PME, HBond constraints, CPU platform):
    a finite χ² and a non-zero fluctuation gradient from the solute's frames."""
    s = solvated
    samp = OpenMMSampler(s.openmm_system, s.positions, platform="CPU")
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.002, seed=3)
    targets = graf2007_targets(s.solute.topology)
    r = tm.fit(s.solute, None, integ, targets, WRT, sampler=samp, epochs=1, n_chains=2,
               sample_steps=600, decorrelation_steps=200, save_every=100, min_ess=1.0,
               blocks=4, reservoir_size=12, progress=False)  # fmt: skip
    (rec,) = r.history
    assert rec["sampled"] and rec["production_steps"] >= 600
    assert np.isfinite(rec["chi2"]) and np.all(np.isfinite(rec["gradient"]))
    assert np.any(np.asarray(rec["gradient"]) != 0)
    # the OpenMM System handed in is left as it was (the sampler works on a copy)
    assert len(torsion_map(s.solute, s.openmm_system, s.solute.n_atoms)) == 72


def test_openmm_chains_on_the_reference_platform_resume_bit_for_bit(tmp_path):
    """The System itself in OpenMM (``OpenMMSampler.for_system``, what sampler="openmm"
    builds) on the Reference platform: two epochs in one go and one epoch then a resume
    give the same history, bit for bit (each segment's context is seeded from (seed,
    chain, step))."""
    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x))
    x = np.asarray(tm.minimize_system(system, x))
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.002, seed=4)
    targets = graf2007_targets(top)
    samp = OpenMMSampler.for_system(system, x, platform="Reference")
    kw = dict(sampler=samp, n_chains=2, sample_steps=400, decorrelation_steps=100,
              save_every=50, min_ess=1.0, blocks=4, reservoir_size=16,
              reweight_threshold=2.0, progress=False)  # fmt: skip
    whole = tm.fit(system, x, integ, targets, WRT, epochs=2, **kw)
    tm.fit(system, x, integ, targets, WRT, epochs=1, out_dir=tmp_path, **kw)
    resumed = tm.fit(system, x, integ, targets, WRT, epochs=2, out_dir=tmp_path, resume=True, **kw)
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a["chi2"] == b["chi2"] and a["gradient"] == b["gradient"]
        assert a["params"] == b["params"]
    # resuming with the engine's chains instead is refused, naming the sampler
    from timemachine.errors import CheckpointError

    with pytest.raises(CheckpointError, match="sampler"):
        tm.fit(system, x, integ, targets, WRT, epochs=3, out_dir=tmp_path, resume=True,
               **{**kw, "sampler": "jax"})  # fmt: skip


def test_for_system_keeps_the_systems_cutoff(tmp_path):
    """sampler="openmm" rebuilds the engine's System in OpenMM with its nonbonded method:
    OBC2 with CutoffNonPeriodic (the reaction field and the GB pairs within the cutoff, the
    LJ switch) gives OpenMM Reference the engine's energy and forces to 1e-9 (measured
    1e-11); with NoCutoff it would be hundreds of kJ/mol away. A periodic System is
    refused, naming the way."""
    import openmm as mm
    import openmm.unit as unit
    from conftest import TIP3P_FILES, tip3p_box

    top, x = tm.build_peptide("AKDEGRSTAKDEW", phi=-140.0, psi=130.0)  # 3.7 nm long
    system, x = tm.load_system((top, x), implicit_solvent="obc2", switch_distance=0.8,
                               nonbonded_method="CutoffNonPeriodic", cutoff=1.0)  # fmt: skip
    samp = OpenMMSampler.for_system(system, x, platform="Reference")
    ctx = mm.Context(samp.openmm_system, mm.VerletIntegrator(0.001),
                     mm.Platform.getPlatformByName("Reference"))  # fmt: skip
    ctx.setPositions(x * unit.nanometer)
    state = ctx.getState(getEnergy=True, getForces=True)
    e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    e_ref, f_ref = float(system.energy(x)), -np.asarray(system.gradient(x))
    assert abs(e - e_ref) <= 1e-9 * abs(e_ref), (e, e_ref)
    assert np.sqrt(np.mean((f - f_ref) ** 2)) <= 1e-9 * np.sqrt(np.mean(f_ref**2))
    no_cutoff, _ = tm.load_system((top, x), implicit_solvent="obc2")
    assert abs(float(no_cutoff.energy(x)) - e_ref) > 100.0
    box_top, box_x = tip3p_box(1.6)
    periodic, box_x = tm.load_system((box_top, box_x), forcefield=TIP3P_FILES,
                                     nonbonded_method="PME", cutoff=0.75)  # fmt: skip
    with pytest.raises(InputError, match=r"this one is periodic: pass sampler=OpenMMSampler"):
        OpenMMSampler.for_system(periodic, box_x, platform="Reference")


def test_what_the_openmm_sampler_cannot_do_is_refused_naming_it(solvated):
    s = solvated
    samp = OpenMMSampler(s.openmm_system, s.positions, platform="Reference", minimize=False)
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.002)
    targets = graf2007_targets(s.solute.topology)

    def fit(wrt=WRT, **kw):
        tm.fit(s.solute, None, integ, targets, wrt, epochs=1, n_chains=1, sample_steps=200,
               decorrelation_steps=0, save_every=50, blocks=2, progress=False,
               **{"sampler": samp, **kw})  # fmt: skip

    charge = next(n for n in s.solute.param_names if n.startswith("charge/"))
    with pytest.raises(InputError, match=rf"{charge}.*cannot be fitted with the OpenMM sampler"):
        fit(wrt=[WRT, charge])
    with pytest.raises(InputError, match=r"estimator='hybrid'.*fluctuation"):
        fit(estimator="hybrid")
    with pytest.raises(InputError, match=r"executor='dask'.*in this process"):
        fit(executor="dask")
    with pytest.raises(InputError, match=r"precision='float32'"):
        fit(precision="float32")
    with pytest.raises(InputError, match=r'sampler must be "jax", "openmm" or an OpenMMSampler'):
        fit(sampler="gromacs")
    with pytest.raises(InputError, match=r"positions must be \(714, 3\)"):
        OpenMMSampler(s.openmm_system, s.positions[:10])
    with pytest.raises(InputError, match=r"platform 'Metal' is not present"):
        OpenMMSampler(s.openmm_system, s.positions, platform="Metal")
    import openmm as mm

    npt = mm.XmlSerializer.clone(s.openmm_system)
    npt.addForce(mm.MonteCarloBarostat(1.0, 300.0))
    with pytest.raises(InputError, match=r"MonteCarloBarostat.*fixed box"):
        OpenMMSampler(npt, s.positions)
    # a System that is not the box's solute
    top4, x4 = tm.build_peptide("AAAA")
    other, _ = tm.load_system((top4, x4))
    with pytest.raises(ForceFieldError, match=r"mass|torsion"):
        OpenMMChains(samp, other, integ, n_chains=1)
    # a box too small for the cutoff, a cutoff <= 0, an unknown water model
    top, x = tm.build_peptide("AAA")
    with pytest.raises(InputError, match=r"less than twice the cutoff \(1.5 nm\)"):
        tm.solvate((top, x), padding=0.5, cutoff=1.5)
    with pytest.raises(InputError, match=r"cutoff must be > 0 nm, got 0"):
        tm.solvate((top, x), cutoff=0)
    with pytest.raises(InputError, match=r"water must be one of .*got 'tip9p'"):
        tm.solvate((top, x), water="tip9p")


def test_hydrogen_mass_repartitioning_is_accepted_and_other_masses_are_not(solvated):
    """A box built with ``hydrogen_mass=4`` (OpenMM's repartitioning: heavier hydrogens,
    lighter heavy atoms, the same total) samples the same positions' distribution, so the
    chains accept it; masses that differ otherwise are refused, naming the particle."""
    import openmm.unit as unit

    from timemachine.fitting.openmm_sampler import _check_masses

    top, x = tm.build_peptide("AAA")
    hmr = tm.solvate((top, x), padding=1.0, cutoff=0.9, hydrogen_mass=4.0)
    n = hmr.solute.n_atoms
    masses = np.asarray(hmr.solute.masses)
    sampled = np.array([hmr.openmm_system.getParticleMass(i).value_in_unit(unit.dalton)
                        for i in range(n)])  # fmt: skip
    hydrogens = masses < 1.1
    np.testing.assert_allclose(sampled[hydrogens], 4.0)
    assert abs(sampled.sum() - masses.sum()) < 1e-9
    _check_masses(sampled, masses)  # accepted
    swapped = sampled.copy()
    swapped[[0, 4]] = swapped[[4, 0]]
    with pytest.raises(ForceFieldError, match="not a hydrogen mass repartitioning"):
        _check_masses(swapped * 1.01, masses)
    with pytest.raises(InputError, match="hydrogen_mass must be > 0 amu"):
        tm.solvate((top, x), hydrogen_mass=-1.0)
