"""OBC2 exported as OpenMM's native GBSAOBCForce: same energy and forces as our System."""

import time

import numpy as np
import openmm as mm
import openmm.app as app
import openmm.unit as unit
import pytest

import timemachine as tm
from timemachine.errors import InputError, MissingFileError
from timemachine.io.openmm_export import check_forcefield_files, openmm_forcefield_files


def _openmm(files, topology, x, platform="Reference"):
    system = app.ForceField(*files).createSystem(
        topology,
        nonbondedMethod=app.NoCutoff,
        constraints=None,
        rigidWater=False,
        removeCMMotion=False,
    )
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName(platform))
    ctx.setPositions(x * unit.nanometer)
    state = ctx.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return system, ctx, energy, np.asarray(forces)


def _torsions_scaled(system, factor=1.2):
    params = np.array(system.params)
    params[system.select("torsion/*/k*")] *= factor
    return params


@pytest.fixture(scope="module")
def ala3_obc2(trialanine):
    top, x = trialanine
    system, x = tm.load_system((top, x), implicit_solvent="obc2")
    return top, system, x


def test_native_is_the_default_and_reproduces_energy_and_forces(tmp_path, ala3_obc2):
    top, system, x = ala3_obc2
    params = _torsions_scaled(system)
    path = tm.export_forcefield(system, params, tmp_path / "fitted.xml")
    files = openmm_forcefield_files(path)
    assert files == (path,)
    assert openmm_forcefield_files(path, "native") == files
    text = open(path).read()
    assert "<GBSAOBCForce>" in text and "CustomGBForce" not in text
    omm, _, energy, forces = _openmm(files, top, x)
    kinds = {type(f).__name__ for f in omm.getForces()}
    assert "GBSAOBCForce" in kinds and "CustomGBForce" not in kinds
    ours = float(system.energy(x, params))
    assert abs(ours - float(system.energy(x))) > 1.0  # the change is visible
    assert abs(energy - ours) <= 1e-9 * abs(ours)  # measured: 1.3e-11
    f_ours = -np.asarray(system.gradient(x, params))
    assert np.abs(forces - f_ours).max() <= 1e-7 * np.abs(f_ours).max()


def test_native_carries_fitted_charges_and_gb_radii(tmp_path, ala3_obc2):
    top, system, x = ala3_obc2
    params = np.array(system.params)
    rng = np.random.default_rng(3)
    for pat in ("charge/*", "gb/*"):
        idx = system.select(pat)
        params[idx] *= 1.0 + 0.1 * rng.uniform(-1.0, 1.0, idx.size)
    path = tm.export_forcefield(system, params, tmp_path / "fitted.xml", implicit_solvent="native")
    _, _, energy, _ = _openmm((path,), top, x)
    ours = float(system.energy(x, params))
    assert abs(energy - ours) <= 1e-9 * abs(ours)


def test_script_mode_still_available(tmp_path, ala3_obc2):
    top, system, x = ala3_obc2
    params = _torsions_scaled(system)
    path = tm.export_forcefield(system, params, tmp_path / "fitted.xml", implicit_solvent="obc2")
    assert openmm_forcefield_files(path) == (path,)
    with pytest.raises(InputError, match="obc2"):
        openmm_forcefield_files(path, "native")
    omm, _, energy, _ = _openmm((path,), top, x)
    assert "CustomGBForce" in {type(f).__name__ for f in omm.getForces()}
    ours = float(system.energy(x, params))
    assert abs(energy - ours) <= 1e-12 * abs(ours)


def test_bundled_amber99_obc_is_another_model(ala3_obc2):
    """Why the export writes its own GB section: amber99_obc.xml differs from obc2.xml."""
    top, system, x = ala3_obc2
    _, _, energy, _ = _openmm(("amber99sbildn.xml", "amber99_obc.xml"), top, x)
    assert abs(energy - float(system.energy(x))) > 1.0  # 23 kJ/mol on trialanine


def test_double_solvation_is_refused(tmp_path, ala3_obc2):
    _, system, _ = ala3_obc2
    native = tm.export_forcefield(system, system.params, tmp_path / "native.xml")
    script = tm.export_forcefield(
        system, system.params, tmp_path / "script.xml", implicit_solvent="obc2"
    )
    for f in (native, script):
        with pytest.raises(InputError, match=r"amber99_obc\.xml") as e:
            check_forcefield_files((f, "amber99_obc.xml"))
        assert f in str(e.value)
        with pytest.raises(InputError, match="more than once"):
            check_forcefield_files((f, "implicit/obc2.xml"))
    assert check_forcefield_files((native,)) == (native,)
    assert check_forcefield_files(("amber99sbildn.xml", "amber99_obc.xml"))
    with pytest.raises(MissingFileError, match="nope.xml"):
        check_forcefield_files(("nope.xml",))
    with pytest.raises(MissingFileError, match="nope.xml"):
        openmm_forcefield_files(tmp_path / "nope.xml")


def test_bad_modes(tmp_path, trialanine, ala3_obc2):
    _, system, _ = ala3_obc2
    with pytest.raises(InputError, match="gbsa"):
        tm.export_forcefield(system, system.params, tmp_path / "x.xml", implicit_solvent="gbsa")
    vac, _ = tm.load_system(trialanine)
    with pytest.raises(InputError, match="no generalized-Born"):
        tm.export_forcefield(vac, vac.params, tmp_path / "x.xml", implicit_solvent="native")
    assert not list(tmp_path.iterdir())


def test_native_villin(tmp_path, villin):
    top, x = villin
    system, x = tm.load_system((top, x), implicit_solvent="obc2")
    params = _torsions_scaled(system)
    path = tm.export_forcefield(system, params, tmp_path / "villin.xml")
    _, _, energy, forces = _openmm((path,), top, x)
    ours = float(system.energy(x, params))
    assert abs(energy - ours) <= 1e-9 * abs(ours)


def _speed(files, topology, x, platform, seconds=1.0):
    _, ctx, _, _ = _openmm(files, topology, x, platform)
    ctx.getState(getForces=True)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ctx.getState(getEnergy=True, getForces=True)
        n += 1
    return (time.perf_counter() - t0) / n


def test_native_is_faster_than_the_script(tmp_path, ala3_obc2):
    top, system, x = ala3_obc2
    native = tm.export_forcefield(system, system.params, tmp_path / "n.xml")
    script = tm.export_forcefield(
        system, system.params, tmp_path / "s.xml", implicit_solvent="obc2"
    )
    for platform in ("Reference", "CPU"):
        t_native = _speed((native,), top, x, platform, 0.5)
        t_script = _speed((script,), top, x, platform, 0.5)
        print(f"{platform}: native {t_native * 1e6:.0f} us, script {t_script * 1e6:.0f} us")
        if platform == "Reference":
            assert t_native < t_script


def test_native_amber14_per_residue_charges(tmp_path, trialanine):
    """amber14 gives charges per residue atom: the GB section reads them from residues."""
    top, x = trialanine
    ff = ("amber14-all.xml",)
    system, x = tm.load_system((top, x), forcefield=ff, implicit_solvent="obc2")
    params = np.array(system.params)
    params[system.select("charge/*")] *= 1.05
    path = tm.export_forcefield(system, params, tmp_path / "ff14.xml", forcefield=ff)
    assert '<UseAttributeFromResidue name="charge"' in open(path).read()
    _, _, energy, _ = _openmm((path,), top, x)
    ours = float(system.energy(x, params))
    assert abs(energy - ours) <= 1e-9 * abs(ours)
