"""timemachine: forward-mode sensitivity molecular dynamics.

Runs Langevin dynamics on OpenMM force fields and carries dx/dθ, the derivative of every
coordinate with respect to typed force-field parameters, forward step by step.

    import timemachine as tm
    system, x = tm.load_system("protein.pdb", forcefield=("amber99sbildn.xml",),
                               implicit_solvent="obc2")
    system.energy(x), system.gradient(x), system.select("torsion/*/k*")
"""

import jax

jax.config.update("jax_enable_x64", True)

from timemachine import fitting  # noqa: E402

# registered at import: the CPU custom calls' plain-MD gradients and Verlet-list build
from timemachine.backends import xla_cpu_gb, xla_cpu_periodic  # noqa: E402, F401
from timemachine.errors import (  # noqa: E402
    CheckpointError,
    CheckpointFallbackWarning,
    CorruptCheckpointError,
    ForceFieldError,
    InputError,
    MissingFileError,
    SimulationError,
    TimemachineError,
)
from timemachine.fitting import fit  # noqa: E402
from timemachine.integrator import LangevinIntegrator, minimize  # noqa: E402
from timemachine.io import (  # noqa: E402
    build_peptide,
    export_forcefield,
    from_openmm,
    load_system,
    solvate,
    strip_solvent,
)
from timemachine.sensitivity import compare, finite_difference, simulate  # noqa: E402
from timemachine.structured import gradient_fn, minimize_system  # noqa: E402
from timemachine.system import System  # noqa: E402

# The System lives below the OpenMM layer, so the constructor that needs OpenMM is attached
# here rather than imported by timemachine.system itself.
System.from_openmm = staticmethod(from_openmm)
# Likewise the closed-form gradient, which sits one layer above the terms: system.gradient_fn()
# is timemachine.structured.gradient_fn(system), the pure ∇_x E(x, θ) (N, 3), kJ/mol/nm, of
# plain dynamics, cached per System.
System.gradient_fn = gradient_fn

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointFallbackWarning",
    "CorruptCheckpointError",
    "ForceFieldError",
    "InputError",
    "LangevinIntegrator",
    "MissingFileError",
    "SimulationError",
    "System",
    "TimemachineError",
    "build_peptide",
    "compare",
    "export_forcefield",
    "finite_difference",
    "fit",
    "fitting",
    "from_openmm",
    "load_system",
    "minimize",
    "minimize_system",
    "simulate",
    "solvate",
    "strip_solvent",
]
