"""Benchmarks side by side with what users would otherwise use.

    python -m timemachine.bench [--quick] [--json PATH] [--out DIR]

1. Plain Langevin MD, µs per step: timemachine's JAX backend against OpenMM's Reference
   and CPU platforms (and CUDA/OpenCL where present), same force field and integrator
   (``plain_md``).
2. dx_T/dθ for P torsion barrier types over the same steps: timemachine's exact mode
   against central finite differences with OpenMM CPU, forward-mode autodiff through JAX
   MD's Langevin integrator and reverse mode through a ``lax.scan``; time, peak memory
   and relative error against ours (``derivatives``).
3. Scaling of a sensitivity step in P and N, and state memory of exact against window
   mode (``scaling``).

Systems are in ``systems``; ``report`` writes the markdown table, the JSON file and the
plots and evaluates the goals of the issue. On a GPU machine the JAX rows run on the GPU
(with CPU rows next to them) and OpenMM's GPU platforms are added.
"""

from timemachine.bench.report import goals, markdown, write_report
from timemachine.bench.suite import FULL, QUICK, Settings, check_settings, run_suite

__all__ = [
    "FULL",
    "QUICK",
    "Settings",
    "check_settings",
    "goals",
    "markdown",
    "run_suite",
    "write_report",
]
