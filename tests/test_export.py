"""Fitted parameters written as OpenMM ForceField XML: OpenMM's energy equals ours."""

import numpy as np
import openmm as mm
import openmm.app as app
import openmm.unit as unit
import pytest

import timemachine as tm
from timemachine.errors import InputError


def _openmm_energy(xml, topology, x, steps=0):
    ff = app.ForceField(xml)
    system = ff.createSystem(
        topology,
        nonbondedMethod=app.NoCutoff,
        constraints=None,
        rigidWater=False,
        removeCMMotion=False,
    )
    integrator = mm.LangevinMiddleIntegrator(300.0, 1.0, 0.0005)
    ctx = mm.Context(system, integrator, mm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x * unit.nanometer)
    energy = (
        ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    )
    if steps:
        integrator.step(steps)
        after = ctx.getState(getPositions=True, getEnergy=True)
        assert np.isfinite(after.getPositions(asNumpy=True)._value).all()
        assert np.isfinite(after.getPotentialEnergy()._value)
    return energy


def _perturbed(system, patterns, scale=0.25, seed=0):
    rng = np.random.default_rng(seed)
    params = np.array(system.params)
    for pat in patterns:
        idx = system.select(pat)
        params[idx] *= 1.0 + scale * rng.uniform(-1.0, 1.0, idx.size)
    return params


@pytest.mark.parametrize("solvent,mode", [(None, "auto"), ("obc2", "auto"), ("obc2", "obc2")])
def test_exported_amber99sbildn_reproduces_our_energy(tmp_path, trialanine, solvent, mode):
    top, x = trialanine
    system, x = tm.load_system((top, x), implicit_solvent=solvent)
    params = _perturbed(
        system,
        ["torsion/*/k*", "improper/*/k*", "charge/*", "sigma/*", "epsilon/*", "bond/*", "angle/*"],
    )
    path = tm.export_forcefield(system, params, tmp_path / "fitted.xml", implicit_solvent=mode)
    ours = float(system.energy(x, params))
    assert abs(ours - float(system.energy(x))) > 10.0  # the change is visible
    theirs = _openmm_energy(path, top, x, steps=20)
    assert abs(theirs - ours) <= 1e-7 * abs(ours)
    # unchanged parameters give back the original force field's energy
    same = tm.export_forcefield(system, system.params, tmp_path / "same.xml", implicit_solvent=mode)
    e0 = float(system.energy(x))
    assert abs(_openmm_energy(same, top, x) - e0) <= 1e-7 * abs(e0)


def test_exported_amber14_per_residue_charges(tmp_path, trialanine):
    """amber14 gives charges per residue-template atom: those entries are edited."""
    top, x = trialanine
    ff = ("amber14-all.xml",)
    system, x = tm.load_system((top, x), forcefield=ff)
    params = _perturbed(system, ["charge/*", "torsion/*/k*"], seed=1)
    path = tm.export_forcefield(system, params, tmp_path / "ff14.xml", forcefield=ff)
    ours = float(system.energy(x, params))
    assert abs(_openmm_energy(path, top, x) - ours) <= 1e-7 * abs(ours)


def test_export_refuses_what_xml_cannot_carry(tmp_path, trialanine):
    top, x = trialanine
    system, _ = tm.load_system((top, x), implicit_solvent="obc2")
    params = np.array(system.params)
    i = system.index("gb/H(N)/radius")
    params[i] *= 1.1
    with pytest.raises(InputError, match=r"gb/H\(N\)/radius"):
        tm.export_forcefield(system, params, tmp_path / "x.xml", implicit_solvent="obc2")
    params = np.array(system.params)
    params[3] = np.nan
    with pytest.raises(InputError, match="nan"):
        tm.export_forcefield(system, params, tmp_path / "x.xml")
    assert not list(tmp_path.iterdir())  # nothing half-written
