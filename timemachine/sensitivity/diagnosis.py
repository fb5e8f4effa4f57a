"""Blow-up diagnosis of a sensitivity run's saved frames.

Between chunks ``simulate`` hands each chunk's frames to ``check_frames``, which names the
first bad step, the atom and (for a sensitivity blow-up) the parameter, so a failed run
says where it failed (docs/design.md, "Conventions"). It runs before the chunk is written,
so no chunk file or checkpoint ever holds a bad frame: the folder's last checkpoint is the
last good chunk's, and ``SensitivityTrajectory.load`` reads the good frames.

A frame is bad when any of these holds (checked in this order at the first bad frame):
non-finite coordinates; non-finite velocities; a potential energy that is non-finite or
|E| > ``MAX_ENERGY`` = 1e10 kJ/mol (``timemachine.start_checks``: no physical state of
a protein comes within orders of magnitude of it, so the dynamics has overflowed); a
non-finite dx/dθ (always checked); |dx/dθ| > ``max_sensitivity`` (when given).
"""

from __future__ import annotations

import numpy as np

from timemachine.errors import SimulationError
from timemachine.start_checks import MAX_ENERGY

__all__ = ["MAX_ENERGY", "annotate", "check_batch", "check_frames"]


def _first(bad):
    """The first frame index where ``bad`` (F,) holds, or None."""
    return int(np.argmax(bad)) if bad.any() else None


def _runaway(arrays, finite, f):
    """(atom, how) for a frame f whose ``finite`` (F, N) mask has bad atoms: NaN spreads
    to every atom a bad one interacts with within a few steps, so with more than one bad
    atom name the one that moved most between the two frames before (x arrays)."""
    atom = int(np.argmax(~finite[f]))
    if (~finite[f]).sum() > 1 and f >= 2:
        with np.errstate(over="ignore", invalid="ignore"):
            moved = np.linalg.norm(arrays[f - 1] - arrays[f - 2], axis=-1)
        if np.isfinite(moved).all():
            return int(np.argmax(moved)), "ran away first"
    return atom, "first"


def _raise(message, step, atom, parameter=None):
    err = SimulationError(message)
    err.step, err.atom, err.parameter = int(step), None if atom is None else int(atom), parameter
    err.replica = err.epoch = None  # set by check_batch and the fits when they apply
    raise err


def check_frames(
    xs,
    dxs,
    steps,
    param_names,
    max_sensitivity,
    integrator,
    vs=None,
    energies=None,
    gradient=None,
    where="simulate",
):
    """Raise ``SimulationError`` at the first saved frame that blew up.

    Args:
        xs: (F, N, 3) positions, nm; dxs: (F, P, N, 3) dx/dθ, nm per unit of θ_p.
        steps: (F,) step of each frame; param_names: the P names of θ[wrt].
        max_sensitivity: the largest |dx/dθ| allowed, or None (not checked; non-finite
            dx/dθ is refused all the same).
        integrator: the run's ``LangevinIntegrator`` (its dt is named in the message).
        vs: (F, N, 3) velocities, nm/ps, or None (not checked).
        energies: (F,) potential energies, kJ/mol, or None (not checked).
        gradient: ``gradient(x) -> (N, 3)`` ∇E at θ, used only on a failure to name the
            atom of an energy overflow (the one with the largest |∇E|); None names none.
        where: what ran, the message's first words ("simulate", "run_replicas: replica 3").

    Raises:
        SimulationError: at the first bad frame (module docstring), naming the step, the
            atom (the one that ran away first; for an energy overflow the one with the
            largest |∇E|; for dx/dθ the largest entry's), the parameter for dx/dθ, and
            what to try. The error carries ``.step``, ``.atom`` and ``.parameter``
            (``.replica`` and ``.epoch`` None).
    """
    xs, dxs, steps = np.asarray(xs), np.asarray(dxs), np.asarray(steps)
    x_ok = np.isfinite(xs).all(axis=2)  # (F, N)
    v_ok = np.isfinite(vs).all(axis=2) if vs is not None else np.ones_like(x_ok)
    e_bad = np.zeros(xs.shape[0], bool)
    if energies is not None:
        e = np.asarray(energies)
        with np.errstate(invalid="ignore"):
            e_bad = ~(np.abs(e) <= MAX_ENERGY)  # NaN compares False
    with np.errstate(invalid="ignore"):
        mag = np.abs(dxs).max(axis=3) if dxs.size else np.zeros(xs.shape[:1] + (0,) + xs.shape[1:2])
    dx_nonfinite = ~np.isfinite(mag)  # (F, P, N)
    mag = np.where(np.isnan(mag), np.inf, mag)
    dx_over = (
        (mag > max_sensitivity).any(axis=(1, 2))
        if max_sensitivity is not None
        else np.zeros(xs.shape[0], bool)
    )
    checks = [
        ("x", ~x_ok.all(axis=1)),
        ("v", ~v_ok.all(axis=1)),
        ("energy", e_bad),
        ("dx", dx_nonfinite.any(axis=(1, 2))),
        ("dx_over", dx_over),
    ]
    firsts = [
        (f, rank, kind) for rank, (kind, bad) in enumerate(checks) if (f := _first(bad)) is not None
    ]
    if not firsts:
        return
    f, _, kind = min(firsts)
    step, dt = int(steps[f]), integrator.dt
    if kind in ("x", "v"):
        ok = x_ok if kind == "x" else v_ok
        atom, how = _runaway(xs, ok, f)
        what = "coordinates" if kind == "x" else "velocities"
        _raise(
            f"{where}: non-finite {what} at step {step} (first bad saved frame), atom "
            f"{atom} {how} ({int((~ok[f]).sum())} atoms bad), with dt = {dt} ps; minimize "
            f"first, use a smaller dt, or check θ",
            step,
            atom,
        )
    if kind == "energy":
        atom, largest = None, ""
        if gradient is not None:
            try:
                with np.errstate(all="ignore"):
                    g = np.linalg.norm(np.asarray(gradient(xs[f])), axis=-1)
                atom = int(np.argmax(np.where(np.isfinite(g), g, np.inf)))
                largest = f"; atom {atom} has the largest |∇E| ({g[atom]:.3g} kJ/mol/nm)"
            except Exception:  # the diagnosis must not hide the error it explains
                atom = None
        _raise(
            f"{where}: the potential energy overflowed at step {step} (first bad saved "
            f"frame): E = {float(energies[f]):.4g} kJ/mol, beyond |E| <= {MAX_ENERGY:g}"
            f"{largest}, with dt = {dt} ps; minimize first, use a smaller dt, or check θ",
            step,
            atom,
        )
    if kind == "dx":
        p, atom = (int(a) for a in np.argwhere(dx_nonfinite[f])[0])
        _raise(
            f"{where}: non-finite dx/dθ at step {step} (first bad saved frame) for "
            f"parameter {param_names[p]!r} at atom {atom}, while the coordinates are finite: "
            f"the sensitivities overflowed (they grow exponentially along chaotic "
            f"trajectories); use shorter runs, more friction or a smaller dt",
            step,
            atom,
            param_names[p],
        )
    p, atom = np.unravel_index(int(np.argmax(mag[f])), mag[f].shape)
    _raise(
        f"{where}: sensitivity blow-up at step {step}: |dx/dθ| = {mag[f, p, atom]:.3g} nm "
        f"per unit of parameter {param_names[p]!r} at atom {int(atom)} exceeds "
        f"max_sensitivity = {max_sensitivity:g}. Pathwise sensitivities of chaotic dynamics "
        f"grow exponentially: use shorter runs, more friction, or raise max_sensitivity",
        step,
        atom,
        param_names[p],
    )


_CONTEXT = ("step", "atom", "parameter", "replica", "epoch")


def annotate(err, prefix="", suffix="", **attrs):
    """A new ``SimulationError`` with ``err``'s message between ``prefix`` and ``suffix``,
    its ``.step``, ``.atom``, ``.parameter``, ``.replica`` and ``.epoch`` (those it has,
    None for the others) kept and ``attrs`` set on top: context added on the way up
    (which replica, which epoch, what stays usable) without losing what was named."""
    new = SimulationError(f"{prefix}{err}{suffix}")
    for name in _CONTEXT:
        setattr(new, name, getattr(err, name, None))
    for name, value in attrs.items():
        setattr(new, name, value)
    return new


def check_batch(
    xs,
    dxs,
    steps,
    param_names,
    max_sensitivity,
    integrator,
    labels,
    vs=None,
    energies=None,
    gradient=None,
    where="run_replicas",
    member="replica",
):
    """``check_frames`` on each of M runs of one batch (replicas, chains); raise for the
    run that blew up at the earliest saved step (the lowest label on a tie).

    Args:
        xs: (M, F, N, 3); dxs: (M, F, P, N, 3) or None (plain MD: no dx/dθ);
            steps: (F,) or (M, F); vs: (M, F, N, 3) or None; energies: (M, F) or None.
        labels: (M,) how each run is named (its replica index).
        param_names, max_sensitivity, integrator, gradient: as in ``check_frames``.
        where, member: the message starts "{where}: {member} {label}: ...".

    Raises:
        SimulationError: ``check_frames``' diagnosis of that run, also carrying
            ``.replica`` (its label) and saying how many of the M runs were bad.
    """
    xs = np.asarray(xs)
    m, f = xs.shape[:2]
    steps = np.broadcast_to(np.asarray(steps), (m, f))
    if dxs is None:
        dxs = np.zeros((m, f, 0) + xs.shape[2:])
    bad = []
    for r in range(m):
        try:
            check_frames(
                xs[r],
                dxs[r],
                steps[r],
                param_names,
                max_sensitivity,
                integrator,
                vs=None if vs is None else vs[r],
                energies=None if energies is None else energies[r],
                gradient=gradient,
                where=f"{where}: {member} {int(labels[r])}",
            )
        except SimulationError as err:
            bad.append((err.step, r, err))
    if not bad:
        return
    _, r, err = min(bad, key=lambda b: b[:2])
    others = f" ({len(bad)} of {m} {member}s bad)" if len(bad) > 1 else ""
    raise annotate(err, suffix=others, replica=int(labels[r]))
