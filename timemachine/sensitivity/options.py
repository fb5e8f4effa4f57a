"""Argument checks and run set-up shared by ``simulate`` and ``fitting.run_replicas``.

Each check raises ``InputError`` naming the argument and its value. The set-up helpers
choose the window (docs/design.md, "The rolling window (eq. 9)"), the starting
propagation state and the chunking of a run (docs/design.md, "Performance principles").
"""

from __future__ import annotations

import numbers
import os

import jax.numpy as jnp
import numpy as np

from timemachine.backends import check_backend
from timemachine.checks import check_int, check_vectors
from timemachine.errors import InputError
from timemachine.integrator.langevin import LangevinIntegrator, langevin_init
from timemachine.sensitivity.program import start_state
from timemachine.sensitivity.propagation import (
    ExactState,
    WindowState,
    expected_state_bytes,
    window_coefficients,
    window_size,
)
from timemachine.start_checks import check_start
from timemachine.system import System

__all__ = [
    "check_max_sensitivity",
    "check_progress",
    "check_run",
    "check_state_memory",
    "check_steps",
    "chunk_blocks",
    "initial_state",
    "physical_memory",
    "window_setup",
]

METHODS = ("exact", "window")
ZETA_METHODS = ("structured", "reference")
# saved frames of one chunk are kept below this many bytes by default
CHUNK_BYTES = 64 * 2**20
# a default chunking aims for at least this many chunks (progress, blow-up checks)
MIN_CHUNKS = 16


def choose(value, name, options):
    if value not in options:
        raise InputError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_run(system, integrator, backend, method, zeta):
    """Check the arguments every sensitivity run takes → (method, zeta)."""
    check_backend(backend)
    if not isinstance(system, System):
        raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
    if not isinstance(integrator, LangevinIntegrator):
        raise InputError(
            f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
        )
    return choose(method, "method", METHODS), choose(zeta, "zeta", ZETA_METHODS)


def check_steps(n_steps, save_every):
    """→ (n_steps, save_every) as ints >= 1, n_steps a multiple of save_every."""
    n_steps = check_int(n_steps, "n_steps", minimum=1)
    save_every = check_int(save_every, "save_every", minimum=1)
    if n_steps % save_every:
        raise InputError(f"n_steps = {n_steps} must be a multiple of save_every = {save_every}")
    return n_steps, save_every


def check_progress(progress):
    if progress not in (None, True, False):
        raise InputError(f"progress must be True, False or None, got {progress!r}")
    return progress


def check_max_sensitivity(max_sensitivity):
    if max_sensitivity is not None and not (
        isinstance(max_sensitivity, numbers.Real) and max_sensitivity > 0
    ):
        raise InputError(f"max_sensitivity must be a number > 0 or None, got {max_sensitivity!r}")
    return max_sensitivity


def window_setup(method, window, window_tol, integrator):
    """→ (k, wcoeffs): the window in steps and its ``window_coefficients`` for method
    "window" (k defaults to ``window_size(integrator, window_tol)``), (None, None) for
    "exact", which takes no window."""
    if method == "window":
        if window is None:
            k = window_size(integrator, window_tol)
        else:
            k = check_int(window, "window", minimum=1)
        return k, window_coefficients(integrator, k)
    if window is not None:
        raise InputError(f"window = {window!r} is only used with method='window'")
    return None, None


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_state_memory(method, n, p, k):
    """``expected_state_bytes(method, n, p, k)``, refused (InputError) above half of the
    physical memory."""
    state_bytes = expected_state_bytes(method, n, p, k)
    phys = physical_memory()
    if phys is not None and state_bytes["total"] > phys // 2:
        shape = f"window k = {k} steps × " if k else ""
        raise InputError(
            f"the {method} state needs {state_bytes['total'] / 2**30:.1f} GiB "
            f"({shape}P = {p} × N = {n}), more than half of this machine's "
            f"{phys / 2**30:.1f} GiB; use a smaller window, fewer parameters or method='exact'"
        )
    return state_bytes


def chunk_blocks(n_blocks, frame_bytes, chunk_steps, save_every):
    """Blocks per compiled call: ``chunk_steps // save_every`` if given, else at least
    ``MIN_CHUNKS`` chunks of at most ``CHUNK_BYTES`` of frames each."""
    if chunk_steps is not None:
        chunk_steps = check_int(chunk_steps, "chunk_steps", minimum=1)
        if chunk_steps % save_every:
            raise InputError(
                f"chunk_steps = {chunk_steps} must be a multiple of save_every = {save_every}"
            )
        return min(n_blocks, chunk_steps // save_every)
    return min(n_blocks, max(1, CHUNK_BYTES // frame_bytes), max(1, -(-n_blocks // MIN_CHUNKS)))


def initial_state(system, x0, integrator, method, k, wrt, v0, replica, params=None):
    """The state a run starts from: x0 (N, 3) nm with v0 or Maxwell-Boltzmann velocities
    and zero sensitivities, or x0 a previous run's ``final_state``, checked against
    method, k and wrt. Positions x0 must pass ``timemachine.start_checks.check_start``
    at θ = ``params`` (no atoms too close, a finite, not enormous energy and gradient);
    a state is a run's own continuation and is not checked again."""
    n, p = system.n_atoms, wrt.size
    if isinstance(x0, (ExactState, WindowState)):
        want = ExactState if method == "exact" else WindowState
        if not isinstance(x0, want):
            raise InputError(
                f"x0 is a {type(x0).__name__} but method={method!r}; continue a run with the "
                f"method it was started with"
            )
        if v0 is not None:
            raise InputError("v0 must be None when x0 is a state (it carries velocities)")
        x = check_vectors(x0.x, "x0.x", n)
        v = check_vectors(x0.v, "x0.v", n, unit="nm/ps")
        step = check_int(int(np.asarray(x0.step)), "x0.step", minimum=0)
        shape = (p, n, 3)
        for name in ("dx_dtheta", "dv_dtheta"):
            if np.shape(getattr(x0, name)) != shape:
                raise InputError(
                    f"x0.{name} has shape {np.shape(getattr(x0, name))} but wrt selects {p} "
                    f"parameters: expected {shape}"
                )
        if method == "window" and np.shape(x0.zeta_window)[0] != k:
            raise InputError(
                f"x0 was run with window = {np.shape(x0.zeta_window)[0]} steps but window = {k}"
            )
        fields = {f: jnp.asarray(getattr(x0, f)) for f in x0._fields}
        fields.update(x=jnp.asarray(x), v=jnp.asarray(v), step=jnp.asarray(step, jnp.int64))
        return want(**fields)
    x0 = check_vectors(x0, "x0", n)
    check_start(system, x0, params, "x0")
    if v0 is not None:  # named as the caller's argument, not langevin_init's
        v0 = check_vectors(v0, "v0", n, unit="nm/ps")
    start = langevin_init(x0, system.masses, integrator, replica=replica, velocities=v0)
    return start_state(method, start.x, start.v, p, k)
