"""Langevin integrator (paper eqs. 3-4): coefficients, seeded noise, init/step, runs.

Pure functions of arrays; see ``langevin`` for the scheme and ``minimize`` for L-BFGS-B
energy minimisation.
"""

from timemachine.integrator.langevin import (
    LangevinCoefficients,
    LangevinIntegrator,
    LangevinState,
    LangevinTrajectory,
    kinetic_energy,
    kinetic_temperature,
    langevin_coefficients,
    langevin_init,
    langevin_step,
    langevin_update,
    maxwell_boltzmann_velocities,
    noise,
    on_step_kinetic_energy,
    run,
)
from timemachine.integrator.minimize import minimize

__all__ = [
    "LangevinCoefficients",
    "LangevinIntegrator",
    "LangevinState",
    "LangevinTrajectory",
    "on_step_kinetic_energy",
    "kinetic_energy",
    "kinetic_temperature",
    "langevin_coefficients",
    "langevin_init",
    "langevin_step",
    "langevin_update",
    "maxwell_boltzmann_velocities",
    "minimize",
    "noise",
    "run",
]
