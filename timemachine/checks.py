"""Checks of user input shared by every layer: each returns the value in the type the code
uses (float, int, float64 array) or raises ``InputError`` naming the value and its place.

Public entry points check what they are given once, with these, and trust it below.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from timemachine.errors import InputError

__all__ = ["check_int", "check_masses", "check_real", "check_vectors"]


def check_real(value, name: str, *, allow_zero: bool = False, unit: str | None = None) -> float:
    """``value`` as a float; InputError naming ``name`` unless finite and > 0 (>= 0 with
    ``allow_zero``). ``unit`` is quoted in the message."""
    bound = (">= 0" if allow_zero else "> 0") + (f" ({unit})" if unit else "")
    if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.floating):
        value = float(value)  # numpy / JAX 0-d arrays
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(
            f"{name} must be a finite number {bound}, got {value!r} of type {type(value).__name__}"
        )
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_int(value, name: str, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int; InputError naming ``name`` unless an integer (not a bool) in
    [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(
            f"{name} must be an integer >= {minimum}, got {value!r} of type {type(value).__name__}"
        )
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise InputError(f"{name} must be an integer >= {minimum}{upper}, got {value}")
    return value


def check_masses(masses, name: str = "masses") -> np.ndarray:
    """Return masses as a float64 (N,) numpy array; InputError names the first bad atom."""
    if np.iscomplexobj(masses):
        raise InputError(f"{name} must be real masses (amu), got complex values")
    try:
        m = np.asarray(masses, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a 1-D array of N masses (amu), got {masses!r}") from exc
    if m.ndim != 1 or m.shape[0] == 0:
        raise InputError(f"{name} must be a 1-D array of N >= 1 masses (amu), got shape {m.shape}")
    bad = ~(np.isfinite(m) & (m > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{name}[{i}] = {float(m[i])!r}: every mass must be a finite number > 0 (amu); "
            f"atom {i} is the first bad one ({int(bad.sum())} in all)"
        )
    return m


def check_vectors(x, name: str, n_atoms: int | None = None, unit: str = "nm") -> np.ndarray:
    """Return an (N, 3) float64 numpy array; InputError for a wrong shape or a NaN/inf.

    ``n_atoms`` (from the masses) fixes N when given.
    """
    if np.iscomplexobj(x):  # numpy would drop the imaginary part with a warning
        raise InputError(f"{name} must be real (N, 3) coordinates ({unit}), got complex values")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be an (N, 3) array ({unit}), got {x!r}") from exc
    expected = f"({n_atoms}, 3)" if n_atoms is not None else "(N, 3)"
    if (
        arr.ndim != 2
        or arr.shape[1] != 3
        or arr.shape[0] == 0
        or (n_atoms is not None and arr.shape[0] != n_atoms)
    ):
        why = " to match masses" if n_atoms is not None else ""
        raise InputError(f"{name} must have shape {expected}{why} ({unit}), got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{name} has a non-finite value at atom {i}: {name}[{i}] = {arr[i].tolist()} "
            f"({int(bad.sum())} atoms in all)"
        )
    return arr
