"""OpenMM samples a force field; our observables and χ² score the frames."""

import json

import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import InputError, MissingFileError
from timemachine.fitting import JCoupling3HNHA, make_target
from timemachine.fitting.validation import validate_openmm

FILES = ("amber99sbildn.xml", "amber99_obc.xml")


@pytest.fixture(scope="module")
def ala3_targets(trialanine):
    top, x = trialanine
    j = JCoupling3HNHA(top)
    targets = [
        make_target(j, [5.68, 6.52], 0.36, name="3J(HN,HA)"),
        make_target(JCoupling3HNHA(top, residues=["ALA2"]), 5.68, 0.5, name="ALA2 only"),
    ]
    return top, x, targets


@pytest.fixture(scope="module")
def short_run(ala3_targets):
    top, x, targets = ala3_targets
    return validate_openmm(
        FILES,
        top,
        x,
        targets,
        time_ns=0.02,
        n_seeds=2,
        seed=7,
        save_every_ps=0.1,
        equilibration_ps=1.0,
        n_blocks=4,
        keep_frames=True,
        progress=False,
    )


def test_means_are_our_observables_on_the_frames(short_run, ala3_targets):
    top, _, targets = ala3_targets
    r = short_run
    assert r.frames.shape == (200, top.getNumAtoms(), 3) and r.n_frames == 200
    by_hand = np.concatenate(
        [np.stack([np.asarray(t.observable(f)) for f in r.frames]) for t in targets], axis=1
    )
    np.testing.assert_allclose(r.values, by_hand, rtol=1e-12)
    np.testing.assert_allclose(r.mean, by_hand.mean(axis=0), rtol=1e-12)
    assert r.labels[0] == "3J(HN,HA):J3_HN_HA ALA2" and len(r.labels) == 3
    assert np.isclose(r.simulated_ns, 0.02) and r.n_chains == 2


def test_chi2_and_errors_by_hand(short_run):
    r = short_run
    y = np.array([5.68, 6.52, 5.68])
    s = np.array([0.36, 0.36, 0.5])
    z2 = ((r.mean - y) / s) ** 2
    assert np.isclose(r.chi2, z2.sum(), rtol=1e-12)
    assert np.isclose(r.chi2_per_n, z2.mean(), rtol=1e-12)
    assert np.isclose(r.groups["3J(HN,HA)"]["chi2_per_n"], z2[:2].mean(), rtol=1e-12)
    assert np.isclose(r.groups["ALA2 only"]["chi2_per_n"], z2[2], rtol=1e-12)
    # block standard error: 4 blocks of 25 frames in each of the 2 chains
    blocks = r.values.reshape(8, 25, 3).mean(axis=1)
    np.testing.assert_allclose(r.stderr, blocks.std(axis=0, ddof=1) / np.sqrt(8), rtol=1e-12)
    # jackknife over the 8 blocks
    loo = (blocks.sum(axis=0) - blocks) / 7
    f = (((loo - y) / s) ** 2).mean(axis=1)
    se = np.sqrt(7 / 8 * ((f - f.mean()) ** 2).sum())
    assert np.isclose(r.chi2_per_n_stderr, se, rtol=1e-10)
    assert r.chi2_per_n_stderr > 0


def test_seeds_are_independent(short_run):
    r = short_run
    assert len(set(r.seeds)) == 2
    a, b = r.frames[:100], r.frames[100:]
    assert np.abs(a[0] - b[0]).max() > 1e-3  # different velocities from the first save
    assert not np.allclose(r.values[:100], r.values[100:])


def test_result_is_json(short_run):
    d = json.loads(json.dumps(short_run.to_dict()))
    assert d["forcefield_files"] == list(FILES)
    assert d["n_frames"] == 200 and d["ns_per_day"] > 0 and d["platform"]
    assert set(d["groups"]) == {"3J(HN,HA)", "ALA2 only"}
    # each chain's own averages, and their mean over equal-length chains is the total mean
    chains = np.asarray(d["chain_mean"])
    assert chains.shape == (2, len(d["mean"]))
    np.testing.assert_allclose(chains.mean(axis=0), d["mean"], rtol=1e-12)
    by_hand = np.mean(((chains[1] - d["value"]) / np.asarray(d["uncertainty"])) ** 2)
    assert d["chain_chi2_per_n"][1] == pytest.approx(by_hand, rel=1e-12)


def test_exported_forcefield_validates(tmp_path, ala3_targets):
    top, x, targets = ala3_targets
    system, _ = tm.load_system((top, x), implicit_solvent="obc2")
    path = tm.export_forcefield(system, system.params, tmp_path / "fitted.xml")
    r = validate_openmm(
        (path,),
        top,
        x,
        targets[:1],
        time_ns=0.004,
        n_seeds=1,
        save_every_ps=0.2,
        equilibration_ps=0.2,
        n_blocks=2,
        platform="Reference",
    )
    assert r.n_frames == 20 and r.platform == "Reference"


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(forcefield_files=("nope.xml",)), MissingFileError, "nope.xml"),
        (dict(targets=[]), InputError, "targets"),
        (dict(time_ns=0.0), InputError, "time_ns"),
        (dict(time_ns=-1.0), InputError, "time_ns"),
        (dict(n_seeds=0), InputError, "n_seeds"),
        (dict(n_blocks=1000), InputError, "n_blocks"),
        (dict(platform="Quantum"), InputError, "Quantum"),
        (
            dict(forcefield_files=("amber99sbildn.xml", "amber99_obc.xml", "implicit/obc2.xml")),
            InputError,
            "more than once",
        ),
        (dict(nonbonded_method="PME"), InputError, "nonbonded_method='PME'"),
        (dict(cutoff=1.0), InputError, "cutoff=1.0 with NoCutoff"),
        (dict(nonbonded_method="CutoffNonPeriodic", cutoff=-0.5), InputError, "-0.5"),
    ],
)
def test_bad_input(ala3_targets, change, error, match):
    top, x, targets = ala3_targets
    kwargs = dict(forcefield_files=FILES, targets=targets, time_ns=0.002, save_every_ps=0.1)
    kwargs.update(change)
    files = kwargs.pop("forcefield_files")
    tgts = kwargs.pop("targets")
    with pytest.raises(error, match=match):
        validate_openmm(files, top, x, tgts, n_blocks=kwargs.pop("n_blocks", 2), **kwargs)


def test_the_validated_model_is_the_engines_with_its_cutoff(tmp_path):
    """A model fitted with CutoffNonPeriodic (GB pairs and reaction field within 0.8 nm)
    is validated as that model: ``openmm_system``, which ``validate_openmm`` samples, built
    from the exported XML with the same method and cutoff (no constraints), gives the
    engine's energy and forces to 1e-9 relative on an extended peptide longer than the
    cutoff, where NoCutoff's differ by more than 1%; the result records the settings."""
    import jax
    import openmm as mm
    import openmm.unit as unit

    from timemachine.fitting.validation import openmm_system

    top, x = tm.build_peptide("AKDEGRSTAK", phi=-140.0, psi=130.0)
    options = {"nonbonded_method": "CutoffNonPeriodic", "cutoff": 0.8}
    system, x = tm.load_system((top, x), implicit_solvent="obc2", **options)
    path = tm.export_forcefield(system, system.params, tmp_path / "fitted.xml")
    e, g = jax.value_and_grad(system.energy_fn())(x, jax.numpy.asarray(system.params))

    def openmm_energy_forces(omm):
        ctx = mm.Context(
            omm, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference")
        )
        ctx.setPositions(x * unit.nanometer)
        st = ctx.getState(getEnergy=True, getForces=True)
        kj = unit.kilojoule_per_mole
        forces = st.getForces(asNumpy=True).value_in_unit(kj / unit.nanometer)
        return st.getPotentialEnergy().value_in_unit(kj), forces

    e_omm, f_omm = openmm_energy_forces(openmm_system((path,), top, None, **options))
    assert abs(e_omm - float(e)) <= 1e-9 * abs(float(e))
    assert np.abs(f_omm + np.asarray(g)).max() <= 1e-9 * np.abs(f_omm).max()
    e_all, _ = openmm_energy_forces(openmm_system((path,), top, None))
    assert abs(e_all - float(e)) > 1e-2 * abs(float(e))
    j = JCoupling3HNHA(top)
    target = make_target(j, np.asarray(j(x)), 1.0, name="3J")
    r = validate_openmm((path,), top, x, [target], time_ns=0.002, n_seeds=1, save_every_ps=0.2,
                        equilibration_ps=0.2, n_blocks=2, platform="Reference", progress=False,
                        **options)  # fmt: skip
    assert r.n_frames == 10 and np.isfinite(r.chi2)
    assert r.settings["nonbonded_method"] == "CutoffNonPeriodic"
    assert r.settings["cutoff_nm"] == 0.8


def test_chains_on_worker_processes_give_the_same_numbers(ala3_targets):
    top, x, targets = ala3_targets
    settings = dict(
        time_ns=0.02,
        n_seeds=2,
        seed=3,
        save_every_ps=1.0,
        equilibration_ps=2.0,
        platform="Reference",
        n_blocks=2,
        progress=False,
    )
    one = validate_openmm(FILES, top, x, targets, **settings)
    two = validate_openmm(FILES, top, x, targets, n_workers=2, **settings)
    np.testing.assert_array_equal(two.values, one.values)  # same seeds, same platform
    assert two.chi2_per_n == one.chi2_per_n and two.seeds == one.seeds


def test_the_same_seeds_give_the_same_chains_whichever_platform_is_chosen(ala3_targets):
    # platform=None benchmarks the platforms and may pick any; given the one it picked, a
    # second call reproduces the first (the minimisation is on Reference either way)
    top, x, targets = ala3_targets
    settings = dict(
        time_ns=0.02, n_seeds=2, seed=5, save_every_ps=1.0, equilibration_ps=2.0, n_blocks=2
    )
    auto = validate_openmm(FILES, top, x, targets, platform=None, progress=False, **settings)
    name = auto.platform.split(" ")[0]
    threads = int(auto.platform.split("(")[1].split()[0]) if "(" in auto.platform else None
    again = validate_openmm(
        FILES, top, x, targets, platform=name, threads=threads, progress=False, **settings
    )
    if name == "CPU" and threads != 1:
        pytest.skip(f"the benchmark picked {auto.platform}: multi-threaded CPU is not bitwise")
    np.testing.assert_array_equal(again.values, auto.values)
