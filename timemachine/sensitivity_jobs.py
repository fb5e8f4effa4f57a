"""``timemachine simulate CONFIG`` and ``timemachine fdcheck CONFIG``: a sensitivity
trajectory, and its check against central finite differences, from a configuration file
(``timemachine.config``).

``simulate`` writes to the output folder:

* ``topology.pdb`` and ``trajectory.dcd`` (mdtraj): the saved frames' coordinates;
* ``sensitivity/``: dx/dθ chunk by chunk (``chunk_XXXXX.npz``, ``meta.json``,
  ``state.npz``; ``SensitivityTrajectory.load`` reads it, and ``--resume`` continues it
  bitwise);
* ``summary.json`` and ``sensitivity_norms.png``: ‖dx/dθ_p‖ (nm per unit of θ_p) of every
  parameter at every saved frame, the final and the largest.

``fdcheck`` runs the same trajectory in memory and central differences of it (common
random numbers, ``sensitivity.finite_difference``), and writes ``fdcheck.json``,
``fdcheck.csv`` and ``fdcheck.png`` (scatter of analytic against FD dx/dθ, and each
parameter's relative error). It fails (non-zero exit) if any parameter's relative error
exceeds ``[fdcheck].max_rel_error``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from timemachine.config import ConfigError, build_system
from timemachine.errors import SimulationError
from timemachine.files import atomic_savefig, atomic_write_text

__all__ = ["run_fdcheck", "run_simulate"]


def _out_dir(cfg, command):
    out = cfg["output"]["dir"] or os.path.join("timemachine-out", command)
    os.makedirs(out, exist_ok=True)
    return out


def _write_dcd(path, topology, xyz):
    """Frames (F, N, 3) nm as a DCD (mdtraj), written to a temporary name and renamed."""
    import mdtraj

    top = mdtraj.Topology.from_openmm(topology)
    tmp = path + ".part.dcd"
    mdtraj.Trajectory(np.asarray(xyz, np.float32), top).save_dcd(tmp)
    os.replace(tmp, path)


def _write_pdb(path, topology, x):
    """The topology with positions x (N, 3) nm as a PDB, written atomically."""
    import io

    import openmm.app as app
    import openmm.unit as unit

    buf = io.StringIO()
    app.PDBFile.writeFile(topology, (np.asarray(x) * 10.0) * unit.angstrom, buf)
    atomic_write_text(path, buf.getvalue())


def _norm_plot(path, times_ps, norms, names):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for p, name in enumerate(names):
        ax.plot(times_ps, np.maximum(norms[:, p], 1e-300), lw=1, label=name if p < 12 else None)
    ax.set_yscale("log")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("‖dx/dθ_p‖ (nm per unit θ_p)")
    ax.set_title(f"sensitivity norms, {len(names)} parameters")
    if names:
        ax.legend(fontsize=6, ncol=2)
    atomic_savefig(fig, path)


def run_simulate(cfg, resume=False, quiet=False) -> dict:
    """A sensitivity trajectory from a checked configuration (``load_config(...,
    "simulate")``); returns the summary it writes to ``OUT/summary.json``.

    ``resume``: continue the trajectory in ``OUT/sensitivity`` from its last good
    checkpoint (after a kill, or to a larger ``[simulate].steps``) instead of starting
    again; the result is bitwise that of one uninterrupted run. A folder with no
    checkpoint yet starts afresh.
    """
    from timemachine.sensitivity.frames import SensitivityTrajectory
    from timemachine.sensitivity.trajectory import simulate

    system, x, topology, wrt, integrator = build_system(cfg)
    run = cfg["simulate"]
    out = _out_dir(cfg, "simulate")
    sens_dir = os.path.join(out, "sensitivity")
    if not resume and os.path.isdir(sens_dir) and os.listdir(sens_dir):
        raise ConfigError(
            f"{sens_dir} already holds a trajectory: use --resume to continue it or choose "
            f"another [output].dir"
        )
    # --resume picks the run up from its last good checkpoint (or starts it, if it was
    # killed before the first one) and runs it to [simulate].steps, bit for bit
    simulate(
        system,
        x,
        integrator,
        run["steps"],
        wrt=wrt,
        save_every=run["save_every"],
        method=run["method"],
        backend=run["backend"],
        precision=run["precision"],
        out_dir=sens_dir,
        resume=resume,
        progress=not quiet,
    )
    traj = SensitivityTrajectory.load(sens_dir)
    names = list(traj.param_names)
    norms, xyz = [], []
    for dx in traj.dx_dtheta.chunks():
        norms.append(np.sqrt(np.sum(np.asarray(dx) ** 2, axis=(2, 3))))
    for xs in traj.x.chunks():
        xyz.append(np.asarray(xs))
    norms = np.concatenate(norms) if norms else np.zeros((0, len(names)))
    xyz = np.concatenate(xyz)
    if not np.isfinite(norms).all():
        raise SimulationError("dx/dθ holds non-finite values: the run went bad")
    times = np.asarray(traj.steps) * cfg["integrator"]["dt"]
    _write_pdb(os.path.join(out, "topology.pdb"), topology, x)
    _write_dcd(os.path.join(out, "trajectory.dcd"), topology, xyz)
    _norm_plot(os.path.join(out, "sensitivity_norms.png"), times, norms, names)
    summary = {
        "config": os.path.abspath(cfg["_file"]),
        "n_atoms": int(system.n_atoms),
        "steps": int(traj.steps[-1]),
        "frames": int(len(traj.steps)),
        "time_ps": float(times[-1]),
        "method": run["method"],
        "parameters": [
            {"name": n, "final_norm": float(norms[-1, p]), "max_norm": float(norms[:, p].max())}
            for p, n in enumerate(names)
        ],
        "files": ["topology.pdb", "trajectory.dcd", "sensitivity/", "sensitivity_norms.png"],
    }
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    if not quiet:
        print(f"simulate: {summary['steps']} steps, {summary['frames']} frames, "
              f"{len(names)} parameters -> {out}")  # fmt: skip
        for row in sorted(summary["parameters"], key=lambda r: -r["final_norm"])[:10]:
            print(f"  {row['name']:40s} ‖dx/dθ‖ final {row['final_norm']:.3e}  "
                  f"max {row['max_norm']:.3e}")  # fmt: skip
    return summary


def run_fdcheck(cfg, quiet=False) -> dict:
    """Analytic dx/dθ against central finite differences from a checked configuration
    (``load_config(..., "fdcheck")``); writes ``fdcheck.{json,csv,png}`` and returns the
    table as a dict.

    Raises:
      SimulationError: a parameter's relative error exceeds ``[fdcheck].max_rel_error``
        (after the files are written).
    """
    from timemachine.sensitivity.finite_difference import (
        compare,
        finite_difference,
        plot_comparison,
    )
    from timemachine.sensitivity.trajectory import simulate

    system, x, _, wrt, integrator = build_system(cfg)
    run = cfg["fdcheck"]
    out = _out_dir(cfg, "fdcheck")
    save_every = run["save_every"] or run["steps"]
    traj = simulate(
        system, x, integrator, run["steps"], wrt=wrt, save_every=save_every, progress=not quiet
    )
    fd = finite_difference(
        system, x, integrator, run["steps"], wrt=wrt, h=run["h"], save_every=save_every
    )
    table = compare(traj, fd)
    plot_comparison(traj, fd, os.path.join(out, "fdcheck.png"))
    rows = [dict(r) for r in table]
    worst = max(r["rel_error"] for r in rows)
    result = {
        "config": os.path.abspath(cfg["_file"]),
        "steps": run["steps"],
        "h": run["h"],
        "max_rel_error": run["max_rel_error"],
        "worst_rel_error": worst,
        "passed": bool(worst <= run["max_rel_error"]),
        "parameters": rows,
    }
    atomic_write_text(os.path.join(out, "fdcheck.json"), json.dumps(result, indent=2))
    csv = ["name,rel_error,fd_norm,analytic_norm"] + [
        f"{r['name']},{r['rel_error']:.6e},{r['fd_norm']:.6e},{r['analytic_norm']:.6e}"
        for r in rows
    ]
    atomic_write_text(os.path.join(out, "fdcheck.csv"), "\n".join(csv) + "\n")
    if not quiet:
        print(f"fdcheck: {len(rows)} parameters, {run['steps']} steps, h = {run['h']:g}")
        print(f"  {'parameter':40s} {'rel. error':>10s} {'‖FD‖':>10s}")
        for r in rows:
            print(f"  {r['name']:40s} {r['rel_error']:10.2e} {r['fd_norm']:10.3e}")
    if not result["passed"]:
        raise SimulationError(
            f"fdcheck: worst relative error {worst:.2e} exceeds [fdcheck].max_rel_error = "
            f"{run['max_rel_error']:g} (table in {os.path.join(out, 'fdcheck.csv')})"
        )
    return result
