"""Check analytic sensitivities dx/dθ on trialanine three ways (issue 3), with plots.

    python examples/sensitivity_checks.py [out_dir] [--steps 1000] [--seed 1]

(a) Analytic dx/dθ (``tm.simulate``, exact mode) against central finite differences of
    the same seeded trajectory (``tm.finite_difference``, common random numbers) after
    ``--steps`` steps of minimised trialanine in OBC2, all 18 torsion force constants,
    h = 1e-6 (relative). Prints ``tm.compare``'s table (‖analytic - FD‖/‖FD‖ per
    parameter) and saves ``fd_vs_analytic.png`` (analytic against FD, every component)
    and ``fd_vs_analytic.md`` (the table).
(b) The h-scan, in vacuum (a smooth energy; OBC2 is only C¹, see
    tests/test_finite_difference.py): the FD error against h, log-log. It falls as h²
    (truncation) to a minimum and rises again as ε/h (round-off). ``h_scan.png``.
(c) Window mode (paper eq. 9) against exact mode, vacuum, γ = 100/ps so that the
    window is short: ‖dx_window - dx_exact‖/‖dx_exact‖ over the saved frames against the
    window length k, with the bound a^k, a = exp(-γ δt). ``window_convergence.png``.

Output goes to ``out_dir`` (default ``timemachine-out/sensitivity-checks``); every file is
written atomically (a temporary file, then a rename). About 4 minutes of CPU time (8 min
of wall time on a shared, loaded 2-core machine), most of it compilation and the 2P
finite-difference runs of each h.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import timemachine as tm  # noqa: E402
from timemachine.files import atomic_savefig, atomic_write_text  # noqa: E402
from timemachine.sensitivity import plot_comparison  # noqa: E402

WRT = "torsion/*/k*"
H_SCAN = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
WINDOWS = (30, 40, 50, 75, 100, 150, 200, 300, 400)


def new_figure(size=(6.4, 4.6)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def log(msg):
    print(msg, flush=True)


def check_fd(structure, out_dir, n_steps, seed):
    """(a): the per-parameter table and the analytic-vs-FD plot, OBC2."""
    system, x = tm.load_system(
        structure, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2"
    )
    x0 = tm.minimize_system(system, x, tolerance=1.0, max_iterations=500, warn=False)
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=seed)
    traj = tm.simulate(system, x0, integrator, n_steps, wrt=WRT, save_every=n_steps // 10,
                       progress=False)  # fmt: skip
    fd = tm.finite_difference(system, x0, integrator, n_steps, wrt=WRT, h=1e-6)
    table = tm.compare(traj, fd)
    head = (
        f"trialanine (N = {system.n_atoms}) in OBC2, {n_steps} steps, 300 K, γ = 1/ps, "
        f"δt = 1 fs, seed {seed}; P = {len(table)} torsion k's; central FD, h = 1e-6 "
        f"(relative)\n"
    )
    log(f"\n(a) {head}\n{table}\n\nmax relative error {table.max_rel_error:.3e} (goal ≤ 1e-6)")
    atomic_write_text(os.path.join(out_dir, "fd_vs_analytic.md"), f"{head}\n{table}\n")
    path = os.path.join(out_dir, "fd_vs_analytic.png")
    plot_comparison(traj, fd, path, title=f"trialanine OBC2, step {n_steps}, h = 1e-6")
    return table


def h_scan(system, x0, out_dir, n_steps, seed):
    """(b): ‖analytic - FD(h)‖/‖FD(h)‖ over all torsion k's, against h."""
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=seed)
    traj = tm.simulate(system, x0, integrator, n_steps, wrt=WRT, save_every=n_steps,
                       progress=False)  # fmt: skip
    analytic = np.asarray(traj.dx_dtheta[-1])
    errors = []
    log(f"\n(b) h-scan, trialanine in vacuum, {n_steps} steps, all {analytic.shape[0]} torsion k's")
    for h in H_SCAN:
        fd = tm.finite_difference(system, x0, integrator, n_steps, wrt=WRT, h=h)
        err = float(np.linalg.norm(analytic - fd.dx_dtheta) / np.linalg.norm(fd.dx_dtheta))
        errors.append(err)
        slope = "" if len(errors) < 2 else f"  slope {math.log10(errors[-2] / err):+.2f}/decade"
        log(f"  h = {h:.0e}  error = {err:.3e}{slope}")
    hs, errors = np.array(H_SCAN), np.array(errors)
    fig, ax = new_figure()
    ax.loglog(hs, errors, "o-", label="‖analytic − FD‖ / ‖FD‖")
    ref = errors[0] * (hs / hs[0]) ** 2
    ax.loglog(hs, ref, "k--", lw=0.8, label="∝ h² (truncation)")
    best = int(np.argmin(errors))
    ro = errors[best] * hs[best] / hs
    ax.loglog(hs[best:], ro[best:], "k:", lw=0.8, label="∝ 1/h (round-off)")
    ax.set_ylim(0.3 * errors.min(), 3 * errors.max())
    ax.set_xlabel("relative step h")
    ax.set_ylabel("relative error of central FD")
    ax.set_title(f"trialanine vacuum, {n_steps} steps, {analytic.shape[0]} torsion k's")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, os.path.join(out_dir, "h_scan.png"), dpi=120)
    return hs, errors


def verdict(err, bound):
    """How a window-mode error compares with its a^k bound."""
    if err <= bound:
        return "≤ a^k"
    if err < 1e-13:
        return "> a^k: round-off floor"
    if err > 0.1:
        return "> a^k: unstable (a^k ω²/γ² not small)"
    return "> a^k"


def window_curve(system, x0, out_dir, n_steps, seed):
    """(c): window-mode error against k, with the a^k bound."""
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=100.0, dt=0.001, seed=seed)
    a = math.exp(-integrator.friction * integrator.dt)
    kw = dict(wrt=WRT, save_every=n_steps // 10, progress=False)
    exact = np.asarray(tm.simulate(system, x0, integrator, n_steps, **kw).dx_dtheta)
    log(f"\n(c) window vs exact, trialanine in vacuum, γ = 100/ps, δt = 1 fs (a = {a:.5f}), "
        f"{n_steps} steps")  # fmt: skip
    ks, errors = [], []
    for k in WINDOWS:
        try:
            win = tm.simulate(system, x0, integrator, n_steps, method="window", window=k, **kw)
        except tm.SimulationError as exc:  # a too-short window can go unstable
            log(f"  k = {k:4d}  a^k = {a**k:.2e}  unstable: {str(exc)[:90]}…")
            continue
        err = float(np.linalg.norm(np.asarray(win.dx_dtheta) - exact) / np.linalg.norm(exact))
        ks.append(k)
        errors.append(err)
        log(f"  k = {k:4d}  a^k = {a**k:.2e}  error = {err:.2e}  {verdict(err, a**k)}")
    ks, errors = np.array(ks), np.array(errors)
    fig, ax = new_figure()
    kk = np.linspace(min(WINDOWS), max(WINDOWS), 200)
    ax.semilogy(kk, a**kk, "k--", lw=0.8, label="bound a^k")
    floor = 1e-17
    ax.semilogy(ks, np.maximum(errors, floor), "o-", label="‖dx_window − dx_exact‖ / ‖dx_exact‖")
    for k, err in zip(ks, errors, strict=True):
        if err > a**k:
            ax.annotate(verdict(err, a**k), (k, max(err, floor)), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("window k (steps)")
    ax.set_ylabel("relative error against exact mode")
    ax.set_title(f"window mode, trialanine vacuum, γ = 100/ps, δt = 1 fs, {n_steps} steps")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, os.path.join(out_dir, "window_convergence.png"), dpi=120)
    return ks, errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="timemachine-out/sensitivity-checks")
    parser.add_argument("--steps", type=int, default=1000, help="steps per run (default 1000)")
    parser.add_argument("--seed", type=int, default=1, help="integrator seed (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.steps % 10:
        parser.error(f"--steps must be a positive multiple of 10, got {args.steps}")
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    random.seed(2024)  # build_peptide seeds Modeller's hydrogens itself; this is belt and braces
    structure = tm.build_peptide("AAA")
    table = check_fd(structure, args.out_dir, args.steps, args.seed)
    system, x = tm.load_system(structure, forcefield=("amber99sbildn.xml",))
    x0 = tm.minimize_system(system, x, tolerance=1.0, max_iterations=500, warn=False)
    h_scan(system, x0, args.out_dir, args.steps, args.seed)
    window_curve(system, x0, args.out_dir, args.steps, args.seed)
    log(f"\nwrote fd_vs_analytic.png, fd_vs_analytic.md, h_scan.png, window_convergence.png "
        f"to {args.out_dir} in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 0 if table.max_rel_error <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
