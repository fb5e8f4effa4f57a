"""Energies and forces from OpenMM's Reference platform, per force and in total."""

import numpy as np
import openmm as mm
import openmm.unit as unit


def openmm_energies_forces(openmm_system, x):
    """{force class name: (energy kJ/mol, forces (N,3) kJ/mol/nm)} plus 'total'."""
    system = mm.XmlSerializer.clone(openmm_system)
    for i, f in enumerate(system.getForces()):
        f.setForceGroup(i)
    ctx = mm.Context(system, mm.VerletIntegrator(1e-3), mm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(np.asarray(x) * unit.nanometer)
    out = {}

    def read(groups):
        st = ctx.getState(getEnergy=True, getForces=True, groups=groups)
        return (
            st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer),
        )

    for i, f in enumerate(system.getForces()):
        out[type(f).__name__] = read({i})
    out["total"] = read(set(range(len(system.getForces()))))
    return out
