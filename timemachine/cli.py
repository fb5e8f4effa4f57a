"""Command line: ``timemachine fit`` fits torsions (the main job); ``timemachine run`` simulates.

Argument parsing and dispatch only; each command's job lives in its own module.
``timemachine`` with no command runs ``timemachine fit``: the NMR fit of trialanine's φ/ψ
torsions to the Graf 2007 couplings with an OpenMM validation (``timemachine.nmr_fit``);
``--experiment recovery`` runs the parameter-recovery experiment of issue 5
(``timemachine.fitting.recovery``). ``timemachine run`` builds (or reads) a peptide,
minimises it and runs Langevin dynamics, writing a multi-model PDB, a JSON summary and a
plot (``timemachine.md_run``).
"""

from __future__ import annotations

import argparse
import sys

from timemachine.fitting.recovery import RECOVERY_SIZES, RECOVERY_TORSIONS, run_recovery
from timemachine.md_run import run_simulation


def run_fit(args) -> dict:
    """``timemachine fit``: the NMR fit (``timemachine.nmr_fit``) or, with ``--experiment
    recovery``, the recovery experiment (``timemachine.fitting.recovery``); the summary dict."""
    from timemachine.backends import check_backend

    check_backend(args.backend)  # before minutes of set-up, not after
    if args.experiment == "nmr":
        if args.backend != "jax":
            from timemachine.errors import InputError

            raise InputError(
                f"--backend {args.backend}: the nmr experiment's equilibrium chains run on "
                "JAX (a GPU through XLA when JAX has one); --experiment recovery runs the "
                "CUDA kernels"
            )
        from timemachine.nmr_fit import run_nmr_fit

        if args.learning_rate is None:
            args.learning_rate = 0.1
        return run_nmr_fit(args)
    if args.learning_rate is None:
        args.learning_rate = 0.05
    return run_recovery(
        args.out,
        size=args.size,
        replicas=args.replicas,
        steps=args.steps,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        perturbation=args.perturbation,
        torsions=args.torsions,
        seed=args.seed,
        backend=args.backend,
        resume=args.resume,
        quiet=args.quiet,
    )


def build_parser():
    p = argparse.ArgumentParser(prog="timemachine", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="minimise and simulate a peptide")
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
        "fit",
        help="fit trialanine's φ/ψ torsion barriers to the NMR couplings of Graf et al. 2007 "
        "and validate the fitted force field in OpenMM (the main job; the default command)",
    )
    f.add_argument(
        "--experiment",
        default="nmr",
        choices=["nmr", "recovery"],
        help="nmr (default): fit equilibrium averages to experimental couplings; recovery: "
        "fit φ barriers back from perturbed values to targets of the same protocol",
    )
    f.add_argument(
        "--estimator",
        default="fluctuation",
        choices=["fluctuation", "hybrid"],
        help="gradient of the equilibrium averages (nmr; default fluctuation)",
    )
    f.add_argument(
        "--optimizer",
        default="gauss-newton",
        choices=["gauss-newton", "adam"],
        help="trust-region Gauss-Newton (default) or Adam (--learning-rate) (nmr)",
    )
    f.add_argument(
        "--holdout",
        default="",
        help="comma-separated coupling types left out of the fit and scored in the "
        "validation, e.g. J3_HN_HA (nmr)",
    )
    f.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help="production steps per chain per sampled epoch (nmr)",
    )
    f.add_argument(
        "--prior-sigma",
        type=float,
        default=2.0,
        help="width of the Gaussian prior on each fitted k, kJ/mol (nmr; default 2)",
    )
    f.add_argument(
        "--stop-chi2",
        type=float,
        default=1.0,
        help="stop at the first fresh epoch whose χ²/N is below this by 2 standard errors "
        "(nmr; the discrepancy principle; 0 fits until χ² stops changing)",
    )
    f.add_argument(
        "--validate-ns",
        type=float,
        default=None,
        help="OpenMM validation time per model, ns (nmr; 0 skips it)",
    )
    f.add_argument(
        "--compare",
        nargs="*",
        default=[],
        help="also validate these OpenMM force fields with amber99_obc.xml, e.g. "
        "amber99sbnmr.xml (nmr)",
    )
    f.add_argument(
        "--size",
        default="quick",
        choices=sorted(RECOVERY_SIZES),
        help="replicas × steps × epochs preset: tiny (a smoke test), quick (the default, "
        "a few minutes), default (the full recovery experiment, ~15 min on 2 cores)",
    )
    f.add_argument(
        "--smoke",
        "--quick",  # kept for old command lines; the preset named quick is --size quick
        dest="size",
        action="store_const",
        const="tiny",
        help="same as --size tiny (seconds of dynamics)",
    )
    f.add_argument("--replicas", type=int, default=None, help="replicas per epoch")
    f.add_argument("--steps", type=int, default=None, help="Langevin steps per replica per epoch")
    f.add_argument("--epochs", type=int, default=None)
    f.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Adam step, relative (default 0.05 recovery, 0.1 nmr)",
    )
    f.add_argument("--perturbation", type=float, default=0.3, help="relative ± change of k")
    f.add_argument(
        "--torsions",
        default="phi",
        choices=sorted(RECOVERY_TORSIONS),
        help="fitted torsion types: phi (C-N-CT-C, default) or phi+psi (also N-CT-C-N)",
    )
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--backend",
        default="jax",
        choices=["jax", "cuda"],
        help="where the replicas run: jax (CPU, or GPU through XLA; default) or cuda (the "
        "CUDA kernels through CuPy; needs an NVIDIA GPU)",
    )
    f.add_argument("--out", default="timemachine-out", help="output folder")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    from timemachine.errors import TimemachineError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        print(
            "timemachine: no command given; running the main job `timemachine fit` "
            "(`timemachine --help` lists the commands)",
            flush=True,
        )
        argv = ["fit"]
    args = parser.parse_args(argv)
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
