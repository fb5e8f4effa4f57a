"""The main job: fit trialanine's backbone torsions to experimental NMR couplings.

``timemachine fit`` (this module's ``run_nmr_fit``):

1. builds trialanine (uncapped, H3N+-Ala-Ala-Ala-COO-, as ``build_peptide("AAA")``) under
   amber99sbildn + OBC2 and minimises it;
2. loads the couplings of Graf et al., JACS 129, 1179 (2007) that ship with the package
   (``graf2007_targets``; σ the Karplus relations' own RMS);
3. fits the φ/ψ torsion barriers (the k's of C-N-CT-C, N-CT-C-N, CT-CT-N-C, CT-CT-C-N;
   11 parameters) to the equilibrium averages, with ``fit_equilibrium`` (persistent
   chains, the fluctuation estimator by default, a trust-region Gauss–Newton step, a stop
   when χ² no longer changes beyond its error);
4. exports the fitted force field as one OpenMM XML with the native GBSAOBCForce
   (``fitted.xml``; the unfitted model is written the same way as ``original.xml``);
5. validates both in OpenMM: independent chains (HBond constraints, 2 fs,
   LangevinMiddleIntegrator) for ``--validate-ns`` ns each, the couplings computed on
   OpenMM's frames with the project's observables, χ²/N with block-jackknife errors. The
   original model's validation runs in a second process while the fit runs;
6. writes ``report.html`` (``timemachine.fitting.report``): the whole fit on one page.

Held-out coupling types (``--holdout J3_HN_HA``) are left out of the fit and scored in the
validation: a cross-validation of the fitted force field.
"""

from __future__ import annotations

__all__ = ["NMR_SIZES", "NMR_TORSIONS", "check_nmr_args", "nmr_config", "run_nmr_fit"]

#: steps between the frames the fit keeps (``fit_equilibrium``'s save_every)
SAVE_EVERY = 250

#: the fitted torsion types: φ (C-N-CT-C, CT-CT-N-C) and ψ (N-CT-C-N, CT-CT-C-N)
NMR_TORSIONS = (
    "torsion/C-N-CT-C/k*",
    "torsion/N-CT-C-N/k*",
    "torsion/CT-CT-N-C/k*",
    "torsion/CT-CT-C-N/k*",
)

NMR_SIZES = {
    # name: epochs, production steps per chain per sampled epoch, decorrelation steps,
    #       OpenMM validation ns per model, validation chains (min_ess: fit_equilibrium's)
    "tiny": dict(
        epochs=2,
        sample_steps=5_000,
        decorrelation_steps=500,
        chains=2,
        validate_ns=0.02,
        validate_seeds=2,
        # a smoke test of the pipeline: two 7.5 ps chains cannot cross ψ's basins, so a
        # coupling's ESS is about the number of chains (1.2-1.3 for ²J(N,Cα) on an AMD
        # EPYC, where 5 failed; it passed elsewhere only when both chains happened to
        # start in one basin). The guard still runs and stops chains worth < 1 sample.
        min_ess=1.0,
    ),
    "quick": dict(
        epochs=10,
        sample_steps=125_000,
        decorrelation_steps=25_000,
        chains=4,
        validate_ns=5.0,
        validate_seeds=4,
        # ψ of ALA2 exchanges slowly: 4 × 0.25 ns can hold fewer than 20 effective
        # samples of its couplings, so the quick preset accepts 10 (after up to 2 more
        # segments) and the default one runs longer chains
        min_ess=10.0,
        max_extend=2,
    ),
    "default": dict(
        epochs=20,
        sample_steps=250_000,
        decorrelation_steps=50_000,
        chains=4,
        validate_ns=10.0,
        validate_seeds=8,
    ),
}


def check_nmr_args(args) -> dict:
    """Refuse what ``run_nmr_fit`` cannot do as asked, before anything is built; the preset
    with ``args``' overrides.

    Raises:
        InputError: an unknown preset; epochs or sample steps not an integer >= 1, sample
            steps not a multiple of ``SAVE_EVERY``; a negative validation time or χ² stop,
            a prior width or learning rate not > 0; ``--compare`` without a validation.
        MissingFileError: a ``--compare`` force-field file that does not exist.
    """
    from timemachine.checks import check_int, check_real
    from timemachine.errors import InputError, MissingFileError
    from timemachine.io.forcefield_xml import check_forcefield_files

    if args.size not in NMR_SIZES:
        raise InputError(f"--size {args.size!r}: not one of {', '.join(sorted(NMR_SIZES))}")
    size = dict(NMR_SIZES[args.size])
    for key in ("epochs", "sample_steps", "validate_ns"):
        if getattr(args, key, None) is not None:
            size[key] = getattr(args, key)
    size["epochs"] = check_int(size["epochs"], "--epochs", minimum=1)
    size["sample_steps"] = check_int(size["sample_steps"], "--sample-steps", minimum=1)
    if size["sample_steps"] % SAVE_EVERY:
        raise InputError(
            f"--sample-steps {size['sample_steps']} must be a multiple of {SAVE_EVERY}, the "
            "steps between the frames the fit keeps"
        )
    size["validate_ns"] = check_real(size["validate_ns"], "--validate-ns", allow_zero=True)
    check_real(args.prior_sigma, "--prior-sigma", unit="kJ/mol")
    check_real(getattr(args, "stop_chi2", 1.0), "--stop-chi2", allow_zero=True)
    if args.learning_rate is not None:
        check_real(args.learning_rate, "--learning-rate")
    compare = tuple(getattr(args, "compare", None) or ())
    if compare and size["validate_ns"] == 0:
        raise InputError("--compare needs the OpenMM validation, which --validate-ns 0 skips")
    for ff in compare:
        try:
            check_forcefield_files((ff,))
        except MissingFileError as e:
            raise MissingFileError(f"--compare: {e}") from None
    return size


def nmr_config(args, size) -> dict:
    """The main job's settings as a fit configuration (``timemachine.config``'s form, as
    ``examples/ala3_nmr/fit.toml`` writes the quick preset): trialanine built from its
    sequence, amber99sbildn + OBC2, the φ/ψ k's against the Graf 2007 couplings."""
    from timemachine.config import default_config

    cfg = default_config("fit")
    cfg["_label"] = f"timemachine fit --size {args.size}"
    cfg["system"].update(sequence="AAA", implicit_solvent="obc2")
    cfg["integrator"].update(dt=0.002, seed=args.seed)
    cfg["parameters"]["wrt"] = list(NMR_TORSIONS)
    holdout = [h for h in (args.holdout or "").split(",") if h]
    cfg["targets"].update(builtin="graf2007", holdout=holdout)
    cfg["estimator"]["kind"] = args.estimator
    cfg["sampling"].update(
        chains=size["chains"],
        sample_steps=size["sample_steps"],
        decorrelation_steps=size["decorrelation_steps"],
        save_every=SAVE_EVERY,
        min_ess=size.get("min_ess", 20.0),
        max_extend=size.get("max_extend", 3),
    )
    cfg["optimizer"].update(
        kind=args.optimizer,
        epochs=size["epochs"],
        learning_rate=args.learning_rate,
        prior_sigma=args.prior_sigma,
        stop_chi2=getattr(args, "stop_chi2", 1.0),
        max_trust_radius=0.5,
    )
    cfg["validation"].update(
        ns=size["validate_ns"],
        seeds=size["validate_seeds"],
        compare=list(getattr(args, "compare", None) or ()),
    )
    from timemachine.config import executor_keys

    for section, key, value in executor_keys(
        getattr(args, "executor", None), getattr(args, "n_workers", None)
    ):
        cfg[section][key] = value
    cfg["output"]["dir"] = args.out
    return cfg


def run_nmr_fit(args) -> dict:
    """Run the main job with argparse-style ``args`` (see ``timemachine.cli``): the fit job
    (``timemachine.fit_job``) on ``nmr_config``; returns the summary it writes to
    ``OUT/summary.json``. ``check_nmr_args`` runs first."""
    from timemachine.fit_job import run_fit_job

    size = check_nmr_args(args)
    return run_fit_job(
        nmr_config(args, size), resume=args.resume, quiet=args.quiet, preset=args.size
    )
