"""Command line: ``timemachine run`` simulates a peptide; ``timemachine fit`` fits torsions.

Until the fitting example lands, the main job is the simplest real one: build (or read) a
peptide, parametrise it with an OpenMM force field, minimise, and run Langevin dynamics,
writing a multi-model PDB, a JSON summary and a plot of energy and temperature.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def _atomic_write(path, write):
    """Write via a temporary file in the same folder, then rename: never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w" if not path.endswith(".png") else "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    _atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def run_simulation(args) -> dict:
    import jax
    import jax.numpy as jnp
    import openmm.app as app
    import openmm.unit as unit
    from tqdm import tqdm

    import timemachine as tm
    from timemachine.integrator import run

    if args.pdb:
        structure = args.pdb
        label = os.path.basename(args.pdb)
    else:
        structure = tm.build_peptide(args.sequence, forcefield=tuple(args.forcefield))
        label = f"peptide {args.sequence}"
    solvent = None if args.implicit_solvent == "none" else args.implicit_solvent
    system, x = tm.load_system(
        structure, forcefield=tuple(args.forcefield), implicit_solvent=solvent
    )
    print(
        f"{label}: {system.n_atoms} atoms, {system.n_params} typed parameters, "
        f"terms {[t.kind for t in system.terms]}"
    )
    energy = system.energy_fn()
    theta = jnp.asarray(system.params)
    e_fn = jax.jit(lambda y: energy(y, theta))
    g_fn = jax.jit(jax.grad(lambda y: energy(y, theta)))
    e0 = float(e_fn(x))
    x = tm.minimize(e_fn, g_fn, x)
    print(f"minimised: {e0:.2f} -> {float(e_fn(x)):.2f} kJ/mol")

    integrator = tm.LangevinIntegrator(
        temperature=args.temperature, friction=args.friction, dt=args.dt, seed=args.seed
    )
    n_steps = int(round(args.time / args.dt))
    save_every = max(1, int(round(args.save_interval / args.dt)))
    chunk = save_every * max(1, n_steps // save_every // 20)
    n_steps = chunk * max(1, n_steps // chunk)
    frames, pe, ke, temps, steps = [], [], [], [], []
    state, t0 = x, time.perf_counter()
    with tqdm(total=n_steps, unit="step", desc="Langevin", disable=args.quiet) as bar:
        for _ in range(n_steps // chunk):
            traj = run(
                g_fn, system.masses, state, integrator, chunk, save_every=save_every, energy_fn=e_fn
            )
            state = traj.state
            frames.append(np.asarray(traj.x))
            pe.append(np.asarray(traj.potential_energy))
            ke.append(np.asarray(traj.kinetic_energy))
            temps.append(np.asarray(traj.temperature))
            steps.append(np.asarray(traj.steps))
            bar.update(chunk)
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


# --------------------------------------------------------------------------- fit

#: The recovery experiment's observables (issue 5): ³J couplings report on φ, Rg on the
#: overall shape, the sequential Hα(i)–HN(i+1) NOEs on ψ.
RECOVERY_TARGETS = (
    ({"name": "3J(HN,HA)", "type": "J3_HN_HA"}, 0.5),
    ({"name": "3J(HN,C')", "type": "J3_HN_C"}, 0.5),
    ({"name": "3J(HN,CB)", "type": "J3_HN_CB"}, 0.5),
    ({"name": "Rg", "type": "Rg"}, 0.01),
    (
        {
            "name": "NOE HA(i)-HN(i+1)",
            "type": "NOE",
            "pairs": [
                ["resid 0 and name HA", "resid 1 and name H"],
                ["resid 1 and name HA", "resid 2 and name H"],
            ],
        },
        0.02,
    ),
)
#: φ torsion type of amber99sbildn (C-N-CT-C, periodicities 2 and 3)
RECOVERY_WRT = ("torsion/C-N-CT-C/k*",)


def recovery_problem(
    n_replicas,
    n_steps,
    perturbation=0.3,
    wrt=RECOVERY_WRT,
    equilibration=250,
    seed=0,
    friction=5.0,
    dt=0.002,
    progress=False,
):
    """The parameter-recovery experiment on trialanine in OBC2 (amber99sbildn).

    The torsion k's ``wrt`` are scaled by 1 ± ``perturbation`` (alternating signs); the
    replicas start from frames of a plain run at the perturbed force field (``equilibration``
    steps apart; 0: all from the minimised structure); the targets are the averages of the
    same protocol (same starts, replica noise and length) at the original force field, so the
    original θ is an exact minimiser of the fit's loss (common random numbers).

    Returns:
        dict with system, x0 (M, N, 3), integrator, targets, wrt, start (P_all,), truth (P_all,).
    """
    import jax
    import jax.numpy as jnp

    import timemachine as tm
    from timemachine.fitting import (
        make_target,
        observable_from_spec,
        observable_samples,
        run_replicas,
        target_vector,
    )
    from timemachine.integrator import run

    topology, x = tm.build_peptide("AAA")
    system, x = tm.load_system((topology, x), implicit_solvent="obc2")
    idx = system.select(list(wrt))
    truth = np.array(system.params)
    start = truth.copy()
    start[idx] *= 1.0 + perturbation * np.where(np.arange(idx.size) % 2, -1.0, 1.0)
    energy = system.energy_fn()
    theta = jnp.asarray(start)
    grad = jax.jit(jax.grad(lambda y: energy(y, theta)))
    x = tm.minimize(jax.jit(lambda y: energy(y, theta)), grad, x)
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=friction, dt=dt, seed=seed)
    if equilibration:
        traj = run(
            grad,
            system.masses,
            x,
            integrator,
            equilibration * (n_replicas + 4),
            save_every=equilibration,
        )
        x0 = np.asarray(traj.x)[-n_replicas:]
    else:
        x0 = np.broadcast_to(x, (n_replicas,) + x.shape).copy()
    observables = [observable_from_spec(spec, topology) for spec, _ in RECOVERY_TARGETS]
    probe = target_vector([make_target(o, np.zeros(len(o.labels)), 1.0) for o in observables])
    ref = run_replicas(
        system, x0, integrator, n_steps, wrt=idx, n_replicas=n_replicas, params=truth
    )
    values = observable_samples(probe.observable, ref.x, ref.dx_dtheta).mean
    targets, i = [], 0
    for (spec, sigma), obs in zip(RECOVERY_TARGETS, observables, strict=True):
        k = len(obs.labels)
        body = {key: v for key, v in spec.items() if key != "name"}
        targets.append(make_target(obs, values[i : i + k], sigma, name=spec["name"], spec=body))
        i += k
    return dict(
        system=system,
        x0=x0,
        integrator=integrator,
        targets=targets,
        wrt=idx,
        start=start,
        truth=truth,
    )


FIT_SIZES = {
    # name: (replicas, steps per epoch, epochs, equilibration spacing)
    "tiny": (2, 20, 2, 0),
    "quick": (8, 250, 12, 250),
    "default": (16, 500, 30, 250),
}


def run_fit(args) -> dict:
    import timemachine as tm
    from timemachine.fitting.plots import plot_fit
    from timemachine.fitting.targets import save_targets
    from timemachine.fitting.train import atomic_write_text

    replicas, steps, epochs, equil = FIT_SIZES[args.size]
    replicas = args.replicas or replicas
    steps = args.steps or steps
    epochs = args.epochs or epochs
    t0 = time.perf_counter()
    problem = recovery_problem(
        replicas, steps, args.perturbation, equilibration=equil, seed=args.seed
    )
    system, wrt = problem["system"], problem["wrt"]
    names = [system.param_names[i] for i in wrt]
    print(
        f"trialanine/OBC2: fitting {names} from ±{args.perturbation:.0%} perturbed values; "
        f"{replicas} replicas × {steps} steps × {epochs} epochs"
    )
    os.makedirs(args.out, exist_ok=True)
    save_targets(os.path.join(args.out, "targets.json"), problem["targets"])
    result = tm.fit(
        system,
        problem["x0"],
        problem["integrator"],
        problem["targets"],
        wrt,
        params=problem["start"],
        epochs=epochs,
        n_replicas=replicas,
        n_steps=steps,
        learning_rate=args.learning_rate,
        fresh_noise=False,
        out_dir=args.out,
        resume=args.resume,
        progress=not args.quiet,
    )
    wall = time.perf_counter() - t0
    tm.export_forcefield(system, result.params, os.path.join(args.out, "fitted.xml"))
    truth = problem["truth"][wrt]
    plot_fit(result, args.out, reference_params=truth)
    losses = [r["loss"] for r in result.history]
    summary = {
        "system": "trialanine (AAA), amber99sbildn + OBC2",
        "parameters": names,
        "original": truth.tolist(),
        "perturbed_start": problem["start"][wrt].tolist(),
        "fitted": result.theta.tolist(),
        "fitted_over_original": (result.theta / truth).tolist(),
        "loss_per_epoch": losses,
        "loss_reduction": 1.0 - losses[-1] / losses[0] if losses[0] > 0 else 0.0,
        "replicas": replicas,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "wall_s": wall,
    }
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2))
    for n, a, b, c in zip(names, truth, problem["start"][wrt], result.theta, strict=True):
        print(f"  {n}: original {a:.4f}  start {b:.4f}  fitted {c:.4f} ({c / a - 1:+.1%})")
    print(
        f"loss {losses[0]:.4g} -> {losses[-1]:.4g} ({summary['loss_reduction']:.0%} lower) "
        f"in {wall:.0f} s"
    )
    print(
        f"wrote {args.out}/history.json, summary.json, fitted.xml, targets.json, "
        "loss.png, observables.png, parameters.png"
    )
    return summary


def build_parser():
    p = argparse.ArgumentParser(prog="timemachine", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="minimise and simulate a peptide (the default job)")
    r.add_argument("--sequence", default="AAA", help="one-letter sequence to build (default AAA)")
    r.add_argument("--pdb", default=None, help="simulate this PDB instead of building a peptide")
    r.add_argument("--forcefield", nargs="+", default=["amber99sbildn.xml"])
    r.add_argument("--implicit-solvent", default="obc2", choices=["obc2", "none"])
    r.add_argument("--temperature", type=float, default=300.0, help="K")
    r.add_argument("--friction", type=float, default=1.0, help="1/ps")
    r.add_argument("--dt", type=float, default=0.001, help="ps")
    r.add_argument("--time", type=float, default=20.0, help="simulated time, ps")
    r.add_argument("--save-interval", type=float, default=0.1, help="ps between saved frames")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="timemachine-out", help="output folder")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    f = sub.add_parser(
        "fit", help="fit trialanine's φ torsion barriers back from perturbed values (recovery)"
    )
    f.add_argument(
        "--size",
        default="quick",
        choices=sorted(FIT_SIZES),
        help="replicas/steps/epochs preset (default quick: a few minutes)",
    )
    f.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="tiny",
        help="the smallest run (seconds of dynamics; a smoke test)",
    )
    f.add_argument("--replicas", type=int, default=None, help="replicas per epoch")
    f.add_argument("--steps", type=int, default=None, help="Langevin steps per replica per epoch")
    f.add_argument("--epochs", type=int, default=None)
    f.add_argument("--learning-rate", type=float, default=0.05, help="Adam step (relative)")
    f.add_argument("--perturbation", type=float, default=0.3, help="relative ± change of k")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default="timemachine-out", help="output folder")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    from timemachine.errors import TimemachineError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["run"])
    try:
        if args.command == "run":
            run_simulation(args)
        elif args.command == "fit":
            run_fit(args)
        else:
            parser.print_help()
            return 2
    except TimemachineError as e:
        print(f"timemachine: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
