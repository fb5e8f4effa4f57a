"""Blow-up diagnosis of a sensitivity run's saved frames.

Between chunks ``simulate`` hands each chunk's frames to ``check_frames``, which names the
first bad step, the atom and (for a sensitivity blow-up) the parameter, so a failed run
says where it failed (docs/design.md, "Conventions").
"""

from __future__ import annotations

import numpy as np

from timemachine.errors import SimulationError

__all__ = ["check_frames"]


def check_frames(xs, dxs, steps, param_names, max_sensitivity, integrator):
    """Raise ``SimulationError`` at the first saved frame that blew up.

    Args:
        xs: (F, N, 3) positions, nm; dxs: (F, P, N, 3) dx/dθ, nm per unit of θ_p.
        steps: (F,) step of each frame; param_names: the P names of θ[wrt].
        max_sensitivity: the largest |dx/dθ| allowed, or None (not checked).
        integrator: the run's ``LangevinIntegrator`` (its dt is named in the message).

    Raises:
        SimulationError: non-finite coordinates (the step and the atom that ran away
            first), or |dx/dθ| above ``max_sensitivity`` (step, parameter, atom); the
            error carries ``.step``, ``.atom`` and ``.parameter``.
    """
    finite = np.isfinite(xs).all(axis=2)  # (F, N)
    if not finite.all():
        f, atom = np.argwhere(~finite)[0]
        how = "first"
        if (~finite[f]).sum() > 1 and f >= 2:
            # NaN spreads to every atom a bad one interacts with within a few steps: name
            # the one that ran away, the largest move between the last two good frames
            with np.errstate(over="ignore", invalid="ignore"):
                moved = np.linalg.norm(xs[f - 1] - xs[f - 2], axis=-1)
            atom, how = int(np.argmax(moved)), "ran away first"
        err = SimulationError(
            f"simulate: non-finite coordinates at step {int(steps[f])} (first bad saved "
            f"frame), atom {int(atom)} {how} ({int((~finite[f]).sum())} atoms bad), with "
            f"dt = {integrator.dt} ps; minimize first or use a smaller dt"
        )
        err.step, err.atom, err.parameter = int(steps[f]), int(atom), None
        raise err
    if max_sensitivity is None:
        return
    mag = np.abs(dxs).max(axis=3)  # (F, P, N)
    mag = np.where(np.isnan(mag), np.inf, mag)
    over = (mag > max_sensitivity).any(axis=(1, 2))
    if over.any():
        f = int(np.argmax(over))
        p, atom = np.unravel_index(int(np.argmax(mag[f])), mag[f].shape)
        err = SimulationError(
            f"simulate: sensitivity blow-up at step {int(steps[f])}: |dx/dθ| = "
            f"{mag[f, p, atom]:.3g} nm per unit of parameter {param_names[p]!r} at atom "
            f"{int(atom)} exceeds max_sensitivity = {max_sensitivity:g}. Pathwise "
            f"sensitivities of chaotic dynamics grow exponentially: use shorter runs, more "
            f"friction, or raise max_sensitivity"
        )
        err.step, err.atom, err.parameter = int(steps[f]), int(atom), param_names[p]
        raise err
