"""Float64 (the default) or float32 dynamics: the ``precision`` option and its casts.

``simulate``, ``run_replicas`` (so ``tm.fit``) and ``fit_equilibrium`` take
``precision="float64" | "float32"``. In float32 the whole compiled step is single
precision: positions, velocities, dx/dθ, ζ, the energy terms' constants, θ and the
Langevin coefficients; the noise is the float64 stream rounded to float32, so a float32
run and a float64 run with the same seed see the same random forces to 6e-8 and can be
compared path by path. Everything outside the step stays float64: observables, estimators,
losses and optimisers read the float32 frames as float64 (OpenMM's "single" precision
keeps its integration in float32 too; its "mixed" does not).

What float32 gives is measured, not assumed: ``benchmarks/float32_accuracy.py`` compares
it with float64 on trialanine (OBC2) and villin (OBC2) for energies, forces, dx/dθ and fit
gradients and writes the table in docs/float32.md; ``FLOAT32_TOLERANCES`` are the bounds
the tests (tests/test_float32.py) hold it to. Where float32 cannot meet them it is
refused (``check_run_precision``): windows with ``window_tol`` below float32's resolution,
systems with custom terms, and the CUDA kernels (float64 only). Finite differences have
no float32 mode at all: a central difference at h = 1e-4 in float32 has a round-off
error of ~ε₃₂ |x| / h ≈ 1e-3 relative, larger than the truncation error it measures.
Pathwise dx/dθ of chaotic dynamics agrees with float64 only over short horizons (the
rounding difference grows like the sensitivities do); runs longer than
``FLOAT32_PATHWISE_PS`` warn with ``Float32Warning``.
"""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError

__all__ = [
    "FLOAT32_PATHWISE_PS",
    "FLOAT32_TOLERANCES",
    "Float32Warning",
    "cast_floats",
    "cast_system",
    "check_precision",
    "check_run_precision",
    "warn_long_float32",
]

PRECISIONS = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32)}

#: Bounds float32 is tested to against float64 at the same inputs (relative to the
#: float64 value's scale: max |error| / max |value| over atoms, parameters or entries).
#: Energies and forces: one evaluation at a float64 configuration rounded to float32;
#: dx/dθ: the end of a 0.3 ps run (200 steps of 1.5 fs) from the same start and noise;
#: fit gradient: one epoch's dL/dθ from the same starts and noise, pathwise (replicas of
#: 0.3 ps) or fluctuation over short chains (2 × 1.5 ps). Chains of tens of ps part as
#: any two chaotic trajectories do, and their fluctuation gradients then agree to within
#: the sampling error (measured in σ), not to this bound. Measured values are in
#: docs/float32.md (benchmarks/float32_accuracy.py).
FLOAT32_TOLERANCES = {
    "energy": 1e-5,
    "forces": 1e-4,
    "dx_dtheta": 1e-2,
    "fit_gradient": 1e-2,
}

#: Length (ps) past which a float32 sensitivity run warns: chaos amplifies the float32
#: rounding of the first steps (~1e-7) as it amplifies dx/dθ, so float32 and float64
#: trajectories part (trialanine, 300 K, γ = 1/ps: by ~1e-2 relative at about 1 ps).
FLOAT32_PATHWISE_PS = 1.0


class Float32Warning(UserWarning):
    """A float32 run outside the range where it is tested against float64."""


def check_precision(precision, where: str = "precision", *, refuse: str | None = None):
    """The NumPy dtype of ``precision`` ("float64" or "float32", or those dtypes).

    Args:
        precision: "float64", "float32", ``np.float64`` or ``np.float32``.
        where: the argument's name in messages.
        refuse: if given, the reason float32 is refused here (InputError for float32).

    Raises:
        InputError: another value, or float32 where ``refuse`` says why it cannot be used.
    """
    if isinstance(precision, str):
        name = precision
    elif precision in (np.float64, np.float32) or (
        isinstance(precision, np.dtype) and precision.name in PRECISIONS
    ):
        name = np.dtype(precision).name
    else:  # None, a bool, a number: np.dtype(None) would be float64, silently
        name = None
    if name not in PRECISIONS:
        raise InputError(f"{where} must be 'float64' or 'float32', got {precision!r}")
    dtype = PRECISIONS[name]
    if refuse is not None and dtype == np.float32:
        raise InputError(f"{where}='float32' is refused: {refuse}")
    return dtype


def check_run_precision(precision, system, backend="jax", method="exact", window=None,
                        window_tol=1e-8):  # fmt: skip
    """The dtype of a sensitivity run (``simulate``, ``run_replicas``), float32 refused
    where it cannot meet ``FLOAT32_TOLERANCES``: with backend "cuda" (float64 kernels),
    with a custom term (its constants cannot be cast), and for a window whose
    ``window_tol`` is below float32's resolution (1e-6 relative). Called before the
    other checks of the run (so the CUDA refusal is met on a machine without a GPU too);
    ``warn_long_float32`` follows once the steps are checked.

    Raises:
        InputError: naming ``precision`` and why float32 is refused here.
    """
    dtype = check_precision(precision)
    if dtype == np.float32:
        if backend == "cuda":
            check_precision(precision, refuse="the CUDA kernels compute in float64 only")
        if method == "window" and window is None and window_tol < 1e-6:
            check_precision(
                precision,
                refuse=f"window_tol = {window_tol:g} is below float32's resolution (1e-6 "
                f"relative); pass window_tol >= 1e-6 or an explicit window",
            )
        if hasattr(system, "terms"):  # (a non-System is for check_run to name)
            cast_system(system, dtype)  # refuses custom terms before anything runs
    return dtype


def warn_long_float32(dtype, n_steps: int, dt: float, what: str = "simulate", stacklevel=3):
    """``Float32Warning`` when a float32 sensitivity run is longer than
    ``FLOAT32_PATHWISE_PS`` (its dx/dθ is then not the float64 one to the stated bound)."""
    if dtype == np.float32 and n_steps * dt > FLOAT32_PATHWISE_PS:
        warnings.warn(
            f"{what}: a float32 sensitivity run of {n_steps * dt:g} ps is longer than "
            f"{FLOAT32_PATHWISE_PS:g} ps, beyond which its dx/dθ is not tested to agree "
            f"with float64 (to {FLOAT32_TOLERANCES['dx_dtheta']:g} relative): chaos "
            f"amplifies float32 rounding as it amplifies the sensitivities. Use "
            f"precision='float64' for long pathwise derivatives",
            Float32Warning,
            stacklevel=stacklevel,
        )


def cast_floats(tree, dtype):
    """``tree`` with every floating array (NumPy or JAX, traced or not) cast to ``dtype``;
    integer, boolean and non-array leaves unchanged. With float64 the tree is returned as
    it is (no operation is added to a compiled program)."""
    if np.dtype(dtype) == np.float64:
        return tree

    def cast(a):
        if isinstance(a, (np.ndarray, jax.Array, np.floating)) and jnp.issubdtype(
            a.dtype, jnp.floating
        ):
            return jnp.asarray(a, dtype)
        return a

    return jax.tree_util.tree_map(cast, tree)


def cast_system(system, dtype):
    """A shallow copy of ``system`` whose terms' floating arrays are ``dtype`` (for the
    compiled step; masses and θ stay float64 on the System, cast where the step uses
    them). Custom terms (``System.add_term``) are closures that cannot be cast: float32 is
    refused for a system that has one."""
    if np.dtype(dtype) == np.float64:
        return system
    custom = [t.kind for t in system.terms if type(t).__name__ == "CustomTerm"]
    if custom:
        raise InputError(
            f"precision='float32' is refused for a system with custom terms ({custom[0]!r}): "
            f"their constants are closures that cannot be cast to float32"
        )
    out = copy.copy(system)
    out.terms = tuple(cast_floats(t, dtype) for t in system.terms)
    return out
