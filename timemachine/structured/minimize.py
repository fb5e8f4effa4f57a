"""Energy minimisation of a System with its closed-form gradient."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.integrator.minimize import minimize
from timemachine.structured.gradient import gradient_fn


def minimize_system(
    system,
    x0,
    params=None,
    tolerance: float = 1e-3,
    max_iterations: int = 10000,
    warn: bool = True,
) -> np.ndarray:
    """``minimize`` on a ``timemachine.System``'s energy at ``params``, with its closed-form
    gradient (:func:`timemachine.structured.gradient_fn`), returning (N, 3) nm.

    Args:
        system: ``timemachine.System``.
        x0: (N, 3) starting positions, nm.
        params: (P,) θ; default ``system.params``.
        tolerance, max_iterations: as ``minimize`` (RMS force in kJ/mol/nm).
        warn: False silences the ``RuntimeWarning`` of a run that stops before reaching
          ``tolerance`` (a loose relaxation before dynamics, where the best point found
          is what is wanted).

    Raises:
        InputError, SimulationError: as ``minimize``.
    """
    theta = jnp.asarray(system.params if params is None else params)
    energy, gradient = system.energy_fn(), gradient_fn(system)
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", RuntimeWarning)
        return minimize(
            jax.jit(lambda y: energy(y, theta)),
            jax.jit(lambda y: gradient(y, theta)),
            x0,
            tolerance=tolerance,
            max_iterations=max_iterations,
        )
