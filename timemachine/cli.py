"""Command line: ``timemachine fit`` fits torsions (the main job); ``timemachine run`` simulates.

``timemachine fit CONFIG``, ``simulate CONFIG``, ``fdcheck CONFIG`` and ``run CONFIG`` read
a TOML configuration (``timemachine.config``; ``--set section.key=value`` and the flags
override single keys) and run a fit (``timemachine.fit_job``), a sensitivity trajectory or
its finite-difference check (``timemachine.sensitivity_jobs``), or a plain simulation.

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
import math
import sys

from timemachine.fitting.recovery import RECOVERY_SIZES, RECOVERY_TORSIONS, run_recovery
from timemachine.md_run import run_simulation


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, ``timemachine: error: ...``."""

    def error(self, message):
        print(
            f"timemachine: error: {message} (`{self.prog} --help` lists the options)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def _number(kind, minimum, inclusive, maximum=None):
    """An argparse type: ``kind`` (int or float), finite, >= or > ``minimum``, < ``maximum``."""
    bound = (
        (">= " if inclusive else "> ")
        + f"{minimum:g}"
        + (f" and < {maximum:g}" if maximum is not None else "")
    )
    what = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or value < minimum
            or (value == minimum and not inclusive)
            or (maximum is not None and value >= maximum)
        ):
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


_count = _number(int, 1, True)  # replicas, steps, epochs, workers
_seed = _number(int, 0, True)
_positive = _number(float, 0.0, False)
_nonnegative = _number(float, 0.0, True)


def _executor(text):
    """An argparse type: "in-process", "dask" or a Dask scheduler address."""
    from timemachine.config import EXECUTORS

    if text in EXECUTORS or "://" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"must be in-process, dask or a scheduler address (tcp://host:8786), got {text!r}"
    )


#: timemachine fit's flag defaults without a configuration (the main job's preset)
FIT_DEFAULTS = dict(experiment="nmr", estimator="fluctuation", optimizer="gauss-newton",
                    holdout="", prior_sigma=2.0, stop_chi2=1.0, compare=[], size="quick",
                    perturbation=0.3, torsions="phi", seed=0, backend="jax",
                    executor="in-process", out="timemachine-out")  # fmt: skip

#: with a configuration, the fit flags that set one key each: flag -> (section, key)
FIT_FLAG_KEYS = {
    "estimator": ("estimator", "kind"),
    "optimizer": ("optimizer", "kind"),
    "epochs": ("optimizer", "epochs"),
    "learning_rate": ("optimizer", "learning_rate"),
    "prior_sigma": ("optimizer", "prior_sigma"),
    "stop_chi2": ("optimizer", "stop_chi2"),
    "sample_steps": ("sampling", "sample_steps"),
    "validate_ns": ("validation", "ns"),
    "compare": ("validation", "compare"),
    "holdout": ("targets", "holdout"),
    "seed": ("integrator", "seed"),
    "out": ("output", "dir"),
}


def fit_args(args):
    """``timemachine fit``'s flags: without a configuration, ``FIT_DEFAULTS`` for those not
    given; with one, the flags stay as given (``run_fit_config`` maps them onto keys)."""
    from timemachine.config import ConfigError

    if args.config is None:
        if args.set:
            raise ConfigError("--set needs a configuration file: timemachine fit CONFIG --set ...")
        for key, default in FIT_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
    return args


def run_fit_config(args) -> dict:
    """``timemachine fit CONFIG``: read and check the configuration (``--set`` and the flags
    of ``FIT_FLAG_KEYS`` override single keys), then run the fit job
    (``timemachine.fit_job``)."""
    from timemachine.config import executor_keys, load_config, parse_override
    from timemachine.errors import InputError
    from timemachine.fit_job import run_fit_job

    settable = set(FIT_FLAG_KEYS) | {"config", "set", "resume", "quiet", "verbose", "command",
                                     "executor", "n_workers"}  # fmt: skip
    for name, value in vars(args).items():
        if name not in settable and value is not None:
            raise InputError(
                f"--{name.replace('_', '-')} applies to the fit without a configuration; "
                f"with {args.config} set its keys instead (--set section.key=value)"
            )
    overrides = [parse_override(text) for text in args.set]
    for flag, (section, key) in FIT_FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            if flag == "holdout":
                value = [h for h in value.split(",") if h]
            overrides.append((section, key, value))
    overrides += executor_keys(args.executor, args.n_workers)
    cfg = load_config(args.config, "fit", overrides)
    return run_fit_job(cfg, resume=args.resume, quiet=args.quiet)


def run_fit(args) -> dict:
    """``timemachine fit``: with a configuration, the fit it describes (``run_fit_config``);
    without, the NMR fit (``timemachine.nmr_fit``) or, with ``--experiment recovery``, the
    recovery experiment (``timemachine.fitting.recovery``); the summary dict."""
    from timemachine.backends import check_backend
    from timemachine.errors import InputError

    if args.config is not None:
        return run_fit_config(args)

    # a flag the chosen experiment would ignore is refused, not dropped
    only = {
        "recovery": [("replicas", args.replicas), ("steps", args.steps)],
        "nmr": [
            ("sample-steps", args.sample_steps),
            ("validate-ns", args.validate_ns),
            ("holdout", args.holdout or None),
            ("compare", args.compare or None),
        ],
    }
    for experiment, flags in only.items():
        for name, value in flags:
            if value is not None and args.experiment != experiment:
                hint = (
                    "; the nmr fit's chains and their length are set by --size and --sample-steps"
                    if experiment == "recovery"
                    else ""
                )
                raise InputError(
                    f"--{name} applies to --experiment {experiment}, not --experiment "
                    f"{args.experiment}{hint}"
                )
    if args.n_workers is not None and args.executor != "dask":
        raise InputError(
            f"--n-workers {args.n_workers}: applies to --executor dask (a local cluster), "
            f"not --executor {args.executor}"
        )
    check_backend(args.backend)  # before minutes of set-up, not after
    if args.experiment == "nmr":
        if args.backend != "jax":
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
        executor=args.executor,
        n_workers=args.n_workers,
        resume=args.resume,
        quiet=args.quiet,
    )


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress messages or bars (the summary stays)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", help="on failure, print the traceback too"
    )
    p = _Parser(prog="timemachine", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", parents=[common], help="minimise and simulate a peptide")
    r.add_argument(
        "config", nargs="?", default=None, help="a TOML configuration (optional; flags override)"
    )
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key of the configuration")  # fmt: skip
    # defaults (RUN_DEFAULTS) are applied after a configuration, so a flag given wins
    r.add_argument("--sequence", help="one-letter sequence to build (default AAA)")
    r.add_argument("--pdb", help="simulate this PDB instead of building a peptide")
    r.add_argument("--forcefield", nargs="+", help="default amber99sbildn.xml")
    r.add_argument("--implicit-solvent", choices=["obc2", "none"], help="default obc2")
    r.add_argument("--nonbonded-method", choices=["NoCutoff", "CutoffNonPeriodic"],
                   help="default NoCutoff (every pair)")  # fmt: skip
    r.add_argument("--cutoff", type=_positive, help="nm, with CutoffNonPeriodic (default 1.0)")
    r.add_argument("--temperature", type=_nonnegative, help="K (default 300)")
    r.add_argument("--friction", type=_nonnegative, help="1/ps (default 1)")
    r.add_argument("--dt", type=_positive, help="ps (default 0.001)")
    r.add_argument("--time", type=_positive, help="simulated time, ps (default 20)")
    r.add_argument(
        "--save-interval",
        type=_positive,
        help="ps between saved frames (at least --dt, at most --time; default 0.1)",
    )
    r.add_argument("--seed", type=_seed, help="default 0")
    r.add_argument("--out", help="output folder (default timemachine-out)")
    f = sub.add_parser(
        "fit",
        parents=[common],
        help="fit trialanine's φ/ψ torsion barriers to the NMR couplings of Graf et al. 2007 "
        "and validate the fitted force field in OpenMM (the main job; the default command)",
    )
    f.add_argument(
        "config",
        nargs="?",
        default=None,
        help="a TOML configuration of the fit (timemachine.config's schema; "
        "examples/ala3_nmr/fit.toml is the main job's); without one, the main job's preset",
    )
    f.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key of the configuration (a TOML value; repeatable)",
    )
    # flag defaults (FIT_DEFAULTS) are applied after parsing, so a flag given is seen
    f.add_argument(
        "--experiment",
        choices=["nmr", "recovery"],
        help="nmr (default): fit equilibrium averages to experimental couplings; recovery: "
        "fit φ barriers back from perturbed values to targets of the same protocol",
    )
    f.add_argument(
        "--estimator",
        choices=["fluctuation", "hybrid"],
        help="gradient of the equilibrium averages (nmr; default fluctuation)",
    )
    f.add_argument(
        "--optimizer",
        choices=["gauss-newton", "adam"],
        help="trust-region Gauss-Newton (default) or Adam (--learning-rate) (nmr)",
    )
    f.add_argument(
        "--holdout",
        help="comma-separated coupling types left out of the fit and scored in the "
        "validation, e.g. J3_HN_HA (nmr)",
    )
    f.add_argument(
        "--sample-steps",
        type=_count,
        default=None,
        help="production steps per chain per sampled epoch (nmr)",
    )
    f.add_argument(
        "--prior-sigma",
        type=_positive,
        help="width of the Gaussian prior on each fitted k, kJ/mol (nmr; default 2)",
    )
    f.add_argument(
        "--stop-chi2",
        type=_nonnegative,
        help="stop at the first fresh epoch whose χ²/N is below this by 2 standard errors "
        "(nmr; the discrepancy principle; 0 fits until χ² stops changing)",
    )
    f.add_argument(
        "--validate-ns",
        type=_nonnegative,
        default=None,
        help="OpenMM validation time per model, ns (nmr; 0 skips it)",
    )
    f.add_argument(
        "--compare",
        nargs="*",
        help="also validate these OpenMM force fields with amber99_obc.xml, e.g. "
        "amber99sbnmr.xml (nmr)",
    )
    f.add_argument(
        "--size",
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
    f.add_argument("--replicas", type=_count, default=None, help="replicas per epoch (recovery)")
    f.add_argument(
        "--steps", type=_count, default=None, help="Langevin steps per replica per epoch (recovery)"
    )
    f.add_argument("--epochs", type=_count, default=None, help="fit epochs (default: the preset's)")
    f.add_argument(
        "--learning-rate",
        type=_positive,
        default=None,
        help="Adam step, relative (default 0.05 recovery, 0.1 nmr)",
    )
    f.add_argument(
        "--perturbation",
        type=_number(float, 0.0, True, maximum=1.0),
        help="relative ± change of k, in [0, 1) (recovery)",
    )
    f.add_argument(
        "--torsions",
        choices=sorted(RECOVERY_TORSIONS),
        help="fitted torsion types: phi (C-N-CT-C, default) or phi+psi (also N-CT-C-N)",
    )
    f.add_argument("--seed", type=_seed)
    f.add_argument(
        "--backend",
        choices=["jax", "cuda"],
        help="where the replicas run: jax (CPU, or GPU through XLA; default) or cuda (the "
        "CUDA kernels through CuPy; needs an NVIDIA GPU)",
    )
    f.add_argument(
        "--executor",
        type=_executor,
        help="where the chains and replicas run: in-process (default; over this process's "
        "JAX devices), dask (a local Dask cluster of --n-workers processes) or the address "
        "of an existing cluster's scheduler, tcp://host:8786 ([executor] of a configuration)",
    )
    f.add_argument(
        "--n-workers",
        type=_count,
        default=None,
        help="worker processes of the local Dask cluster (--executor dask; default 2)",
    )
    f.add_argument("--out", help="output folder (default timemachine-out)")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    for name, what in (
        ("simulate", "a sensitivity trajectory (DCD, dx/dθ chunks, sensitivity norms)"),
        ("fdcheck", "analytic dx/dθ against central finite differences (table, plot)"),
    ):
        c = sub.add_parser(name, parents=[common], help=f"{what} from a TOML configuration")
        c.add_argument("config", help="the configuration file (timemachine.config's schema)")
        c.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one key of the file (a TOML value; repeatable)",
        )
        c.add_argument("--out", default=None, help="output folder (overrides [output].dir)")
        if name == "simulate":
            c.add_argument(
                "--resume", action="store_true", help="continue OUT/sensitivity to [simulate].steps"
            )
    return p


#: timemachine run's defaults, applied after the configuration file (if any)
RUN_DEFAULTS = dict(sequence="AAA", pdb=None, forcefield=["amber99sbildn.xml"],
                    implicit_solvent="obc2", nonbonded_method="NoCutoff", cutoff=None,
                    temperature=300.0, friction=1.0, dt=0.001,
                    time=20.0, save_interval=0.1, seed=0, out="timemachine-out")  # fmt: skip


def run_args(args):
    """``timemachine run``'s settings: the flags given, then the configuration's keys (if
    a file is given), then ``RUN_DEFAULTS``."""
    from timemachine.config import ConfigError, load_config, parse_override

    values = {}
    if args.config is not None:
        cfg = load_config(args.config, "run", [parse_override(t) for t in args.set])
        s, i = cfg["system"], cfg["integrator"]
        values = dict(pdb=s["pdb"], sequence=s["sequence"], forcefield=s["forcefield"],
                      implicit_solvent=s["implicit_solvent"],
                      nonbonded_method=s["nonbonded_method"], cutoff=s["cutoff"],
                      temperature=i["temperature"],
                      friction=i["friction"], dt=i["dt"], seed=i["seed"],
                      time=cfg["run"]["time"], save_interval=cfg["run"]["save_interval"],
                      out=cfg["output"]["dir"])  # fmt: skip
        if args.sequence is not None:
            values["pdb"] = None  # a sequence on the command line replaces the file's pdb
    elif args.set:
        raise ConfigError("--set needs a configuration file: timemachine run CONFIG --set ...")
    for key, default in RUN_DEFAULTS.items():
        if getattr(args, key, None) is None:
            value = values.get(key)
            setattr(args, key, default if value is None else value)
    return args


def run_config_job(args) -> dict:
    """``simulate`` or ``fdcheck``: read and check the configuration (flags override single
    keys), then run the job (``timemachine.sensitivity_jobs``)."""
    from timemachine.config import load_config, parse_override
    from timemachine.sensitivity_jobs import run_fdcheck, run_simulate

    overrides = [parse_override(text) for text in args.set]
    if args.out is not None:
        overrides.append(("output", "dir", args.out))
    cfg = load_config(args.config, args.command, overrides)
    if args.command == "simulate":
        return run_simulate(cfg, resume=args.resume, quiet=args.quiet)
    return run_fdcheck(cfg, quiet=args.quiet)


def _one_line(error) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv=None) -> int:
    """Run the command line; the exit code: 0 done, 1 failed, 2 a usage error or a malformed
    configuration, 130 interrupted.

    A failure prints one line on stderr, ``timemachine: error: ...``; with ``--verbose`` the
    traceback comes before it."""
    import traceback

    from timemachine.config import ConfigError
    from timemachine.errors import TimemachineError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or all(a in ("-q", "--quiet", "-v", "--verbose") for a in argv):
        print(
            "timemachine: no command given; running the main job `timemachine fit` "
            "(`timemachine --help` lists the commands)",
            flush=True,
        )
        argv = ["fit"] + argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    verbose = args.verbose
    try:
        if args.command == "run":
            run_simulation(run_args(args))
        elif args.command in ("simulate", "fdcheck"):
            run_config_job(args)
        else:
            run_fit(fit_args(args))
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print("timemachine: interrupted", file=sys.stderr)
        return 130
    except TimemachineError as e:
        if verbose:
            traceback.print_exc()
        print(f"timemachine: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except Exception as e:  # a bug, or an error of a library below: still one line
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (rerun with --verbose for the traceback)"
        print(
            f"timemachine: error: unexpected {type(e).__name__}: {_one_line(e)}{hint}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
