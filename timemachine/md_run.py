"""The ``timemachine run`` job: minimise a peptide (or a PDB) and run Langevin dynamics.

``run_simulation`` builds (or reads) the structure, minimises it, runs the Langevin
integrator in chunks and writes a multi-model PDB (``trajectory.pdb``), a JSON summary
(``summary.json``) and a plot of energies and kinetic temperature
(``energy_temperature.png``).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

__all__ = ["check_simulation_args", "run_simulation"]


def _atomic_write(path, write):
    """Never half a file: ``timemachine.files.atomic_write``, binary for PNGs."""
    from timemachine.files import atomic_write

    atomic_write(path, write, binary=path.endswith(".png"))


def _plot(path, times, potential, kinetic, temperature, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(times, potential, label="potential")
    ax1.plot(times, potential + kinetic, label="total")
    ax1.set_ylabel("energy (kJ/mol)")
    ax1.legend()
    ax2.plot(times, temperature, lw=0.8, label="kinetic temperature")
    ax2.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g} K")
    ax2.set_xlabel("time (ps)")
    ax2.set_ylabel("T (K)")
    ax2.legend()
    fig.tight_layout()
    from timemachine.files import atomic_savefig

    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def check_simulation_args(args) -> None:
    """Refuse what ``run_simulation`` cannot do as asked, before anything is built.

    Raises:
        InputError: a time step, run time or save interval that is not a finite number > 0,
            a save interval shorter than the time step or longer than the run, a negative
            temperature or friction, a cutoff without a cutoff method.
        MissingFileError: a ``--forcefield`` or ``--pdb`` file that does not exist.
    """
    from timemachine.checks import check_real
    from timemachine.errors import InputError, MissingFileError
    from timemachine.io.forcefield_xml import check_forcefield_files

    dt = check_real(args.dt, "--dt", unit="ps")
    total = check_real(args.time, "--time", unit="ps")
    interval = check_real(args.save_interval, "--save-interval", unit="ps")
    check_real(args.temperature, "--temperature", allow_zero=True, unit="K")
    check_real(args.friction, "--friction", allow_zero=True, unit="1/ps")
    method = getattr(args, "nonbonded_method", "NoCutoff")
    if method == "NoCutoff" and getattr(args, "cutoff", None) is not None:
        raise InputError(
            f"--cutoff {args.cutoff:g} nm with --nonbonded-method NoCutoff, which takes every "
            "pair: use --nonbonded-method CutoffNonPeriodic"
        )
    if interval > total:
        raise InputError(
            f"--save-interval {interval:g} ps is longer than the run, --time {total:g} ps: "
            "no frame would be saved"
        )
    if interval < dt:
        raise InputError(
            f"--save-interval {interval:g} ps is shorter than the time step, --dt {dt:g} ps"
        )
    try:
        check_forcefield_files(tuple(args.forcefield))
    except MissingFileError as e:
        raise MissingFileError(f"--forcefield: {e}") from None
    if args.pdb and not os.path.isfile(args.pdb):
        raise MissingFileError(f"--pdb: no such file {args.pdb!r}")


def run_simulation(args) -> dict:
    """Run the job with argparse-style ``args`` (see ``timemachine.cli``: sequence or pdb,
    forcefield, implicit_solvent, temperature in K, friction in 1/ps, dt, time and
    save_interval in ps, seed, out, quiet); returns the summary it writes to
    ``OUT/summary.json`` (n_atoms, n_steps, simulated_ps, wall_s, us_per_step, the mean
    kinetic temperature of the second half in K, the final potential energy in kJ/mol).
    ``check_simulation_args`` runs first."""
    check_simulation_args(args)
    import jax
    import jax.numpy as jnp
    import openmm.app as app
    import openmm.unit as unit
    from tqdm import tqdm

    import timemachine as tm
    from timemachine.integrator import run
    from timemachine.structured import gradient_fn

    if args.pdb:
        structure = args.pdb
        label = os.path.basename(args.pdb)
    else:
        structure = tm.build_peptide(args.sequence, forcefield=tuple(args.forcefield))
        label = f"peptide {args.sequence}"
    solvent = None if args.implicit_solvent == "none" else args.implicit_solvent
    method = getattr(args, "nonbonded_method", "NoCutoff")
    system, x = tm.load_system(
        structure, forcefield=tuple(args.forcefield), implicit_solvent=solvent,
        nonbonded_method=method, cutoff=getattr(args, "cutoff", None),
    )  # fmt: skip
    log = (lambda message: None) if args.quiet else print
    log(
        f"{label}: {system.n_atoms} atoms, {system.n_params} typed parameters, "
        f"terms {[t.kind for t in system.terms]}"
    )
    energy = system.energy_fn()
    theta = jnp.asarray(system.params)
    e_fn = jax.jit(lambda y: energy(y, theta))
    gradient = gradient_fn(system)
    g_fn = jax.jit(lambda y: gradient(y, theta))
    e0 = float(e_fn(x))
    x = tm.minimize(e_fn, g_fn, x)
    log(f"minimised: {e0:.2f} -> {float(e_fn(x)):.2f} kJ/mol")

    integrator = tm.LangevinIntegrator(
        temperature=args.temperature, friction=args.friction, dt=args.dt, seed=args.seed
    )
    asked = int(round(args.time / args.dt))
    save_every = max(1, int(round(args.save_interval / args.dt)))
    n_steps = save_every * (asked // save_every)  # >= save_every: the interval <= the time
    if n_steps != asked:
        log(
            f"note: {args.time:g} ps is not a whole number of save intervals "
            f"({args.save_interval:g} ps): running {n_steps} steps, not {asked}"
        )
    # about 20 chunks for the progress bar; the last one takes the remainder
    chunk = save_every * max(1, n_steps // save_every // 20)
    chunks = [chunk] * (n_steps // chunk) + ([n_steps % chunk] if n_steps % chunk else [])
    frames, pe, ke, temps, steps = [], [], [], [], []
    state, t0 = x, time.perf_counter()
    # disable=None: no bar when stderr is not a terminal (a log file, a pipe)
    bar = tqdm(total=n_steps, unit="step", desc="Langevin", disable=True if args.quiet else None)
    with bar:
        for length in chunks:
            traj = run(
                g_fn,
                system.masses,
                state,
                integrator,
                length,
                save_every=save_every,
                energy_fn=e_fn,
            )
            state = traj.state
            frames.append(np.asarray(traj.x))
            pe.append(np.asarray(traj.potential_energy))
            ke.append(np.asarray(traj.kinetic_energy))
            temps.append(np.asarray(traj.temperature))
            steps.append(np.asarray(traj.steps))
            bar.update(length)
            bar.set_postfix(T=f"{temps[-1].mean():.0f}K")
    wall = time.perf_counter() - t0
    frames, pe, ke, temps, steps = map(np.concatenate, (frames, pe, ke, temps, steps))

    os.makedirs(args.out, exist_ok=True)
    top = system.topology

    def write_pdb(fh):
        app.PDBFile.writeHeader(top, fh)
        for i, f in enumerate(frames):
            app.PDBFile.writeModel(top, f * unit.nanometer, fh, modelIndex=i + 1)
        app.PDBFile.writeFooter(top, fh)

    _atomic_write(os.path.join(args.out, "trajectory.pdb"), write_pdb)
    times = steps * args.dt
    _plot(os.path.join(args.out, "energy_temperature.png"), times, pe, ke, temps, args.temperature)
    half = len(temps) // 2
    summary = {
        "structure": label,
        "forcefield": list(args.forcefield),
        "implicit_solvent": solvent,
        "nonbonded_method": method,
        "cutoff_nm": next(
            (float(t.cutoff) for t in system.terms if getattr(t, "cutoff", None) is not None), None
        ),  # fmt: skip
        "n_atoms": system.n_atoms,
        "n_steps": int(n_steps),
        "dt_ps": args.dt,
        "simulated_ps": float(n_steps * args.dt),
        "wall_s": wall,
        "us_per_step": 1e6 * wall / n_steps,
        "mean_temperature_K_second_half": float(temps[half:].mean()),
        "target_temperature_K": args.temperature,
        "final_potential_energy_kJ_mol": float(pe[-1]),
    }
    _atomic_write(
        os.path.join(args.out, "summary.json"), lambda fh: json.dump(summary, fh, indent=2)
    )
    print(
        f"{summary['simulated_ps']:.1f} ps in {wall:.1f} s ({summary['us_per_step']:.0f} µs/step); "
        f"<T> (2nd half) = {summary['mean_temperature_K_second_half']:.1f} K"
    )
    print(f"wrote {args.out}/trajectory.pdb, summary.json, energy_temperature.png")
    return summary
