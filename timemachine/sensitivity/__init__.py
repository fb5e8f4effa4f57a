"""Sensitivities dx/dθ through Langevin dynamics: ζ, exact and windowed propagation,
trajectories and finite-difference checks.

See docs/design.md, "The mathematics". This layer sits above ``timemachine.system`` and the
integrator and below ``timemachine.fitting``.
"""

from timemachine.sensitivity.finite_difference import (
    ComparisonTable,
    FiniteDifferenceResult,
    compare,
    finite_difference,
    plot_comparison,
)
from timemachine.sensitivity.propagation import (
    ExactState,
    WindowState,
    exact_init,
    exact_step,
    state_memory_bytes,
    window_init,
    window_size,
    window_step,
)
from timemachine.sensitivity.trajectory import SensitivityTrajectory, simulate

__all__ = [
    "ComparisonTable",
    "ExactState",
    "FiniteDifferenceResult",
    "SensitivityTrajectory",
    "WindowState",
    "compare",
    "exact_init",
    "exact_step",
    "finite_difference",
    "plot_comparison",
    "simulate",
    "state_memory_bytes",
    "window_init",
    "window_size",
    "window_step",
]
