"""Local energy minimisation with L-BFGS-B on a JAX energy and gradient (float64).

Used to relax a structure before dynamics, as OpenMM's ``LocalEnergyMinimizer``.
Units: nm, kJ/mol, kJ/mol/nm.
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
import scipy.optimize

from timemachine.checks import check_int, check_vectors
from timemachine.errors import InputError, SimulationError
from timemachine.integrator.langevin import EnergyFn, GradientFn

__all__ = ["minimize"]


def _rms(g: np.ndarray) -> float:
    return float(np.sqrt(np.mean(g * g)))


def minimize(
    energy_fn: EnergyFn,
    gradient_fn: GradientFn,
    x0,
    tolerance: float = 1e-3,
    max_iterations: int = 10000,
) -> np.ndarray:
    """Minimise ``energy_fn`` from ``x0`` with scipy's L-BFGS-B, returning (N, 3) nm.

    Convergence is declared when the root-mean-square of all 3N gradient (force)
    components is <= ``tolerance`` in kJ/mol/nm, the criterion of OpenMM 8's
    ``LocalEnergyMinimizer``. scipy's own stopping rules (``gtol``, ``ftol``) are switched
    off so that this is the only one; if L-BFGS-B stops before reaching it (line search
    failure at the limit of float64, or ``max_iterations``) a ``RuntimeWarning`` gives the
    RMS force reached, and the best point found is returned.

    Args:
        energy_fn: x (N, 3) -> E, kJ/mol, traceable by JAX (it is jitted here).
        gradient_fn: x (N, 3) -> dE/dx (N, 3), kJ/mol/nm, traceable by JAX.
        x0: (N, 3) starting positions, nm, finite.
        tolerance: RMS force at convergence, kJ/mol/nm, > 0.
        max_iterations: maximum number of L-BFGS-B iterations, >= 1.

    Raises:
        InputError: x0 is not a finite (N, 3) array (the first bad atom is named), or a
            bad tolerance / max_iterations.
        SimulationError: the energy or gradient became NaN or infinite.
    """
    if not callable(energy_fn) or not callable(gradient_fn):
        raise InputError(
            f"energy_fn and gradient_fn must be callable, got {energy_fn!r} and {gradient_fn!r}"
        )
    x0 = check_vectors(x0, "x0")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise InputError(f"tolerance must be a finite number > 0 (kJ/mol/nm), got {tolerance!r}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise InputError(f"tolerance must be a finite number > 0 (kJ/mol/nm), got {tolerance!r}")
    max_iterations = check_int(max_iterations, "max_iterations", minimum=1)
    shape = x0.shape

    @jax.jit
    def energy_and_gradient(x):
        return energy_fn(x), gradient_fn(x)

    n_evals = 0
    best = {"e": math.inf, "x": x0.copy(), "rms": math.inf}

    def fun(flat: np.ndarray):
        nonlocal n_evals
        n_evals += 1
        x = flat.reshape(shape)
        e, g = energy_and_gradient(x)
        e = float(e)
        g = np.asarray(g, dtype=np.float64)
        if not math.isfinite(e) or not np.isfinite(g).all():
            bad = ~np.isfinite(g).all(axis=1)
            atom = f"; first non-finite gradient at atom {int(np.argmax(bad))}" if bad.any() else ""
            raise SimulationError(
                f"minimize: energy became {e!r} kJ/mol at function evaluation {n_evals}{atom}"
            )
        if e < best["e"]:
            best.update(e=e, x=x.copy(), rms=_rms(g))
        return e, g.ravel()

    def callback(intermediate_result):
        if best["rms"] <= tolerance:
            raise StopIteration

    _, g0 = fun(x0.ravel())
    if _rms(g0) <= tolerance:
        return x0
    result = scipy.optimize.minimize(
        fun,
        x0.ravel(),
        method="L-BFGS-B",
        jac=True,
        callback=callback,
        options={
            "maxiter": max_iterations,
            "maxfun": 10 * max_iterations,
            "gtol": 0.0,
            "ftol": 0.0,
            "maxls": 50,
        },
    )
    if best["rms"] > tolerance:
        warnings.warn(
            f"minimize stopped before the RMS force reached tolerance = {tolerance} kJ/mol/nm: "
            f"best RMS force {best['rms']:.3g} kJ/mol/nm after {result.nit} iterations "
            f"({result.message})",
            RuntimeWarning,
            stacklevel=2,
        )
    return best["x"]
