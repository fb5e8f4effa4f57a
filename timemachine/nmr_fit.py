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

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np

__all__ = ["NMR_SIZES", "NMR_TORSIONS", "check_nmr_args", "run_nmr_fit"]

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
        min_ess=5.0,  # a smoke test: 40 frames cannot give 20 independent ones
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


def _targets(topology, holdout=()):
    from timemachine.errors import InputError
    from timemachine.fitting.targets import graf2007_targets

    targets = graf2007_targets(topology)
    types = {t.spec.get("type") if t.spec else None for t in targets}
    unknown = sorted(set(holdout) - types)
    if unknown:
        raise InputError(
            f"--holdout {','.join(unknown)}: no such coupling type in the Graf 2007 data "
            f"(it has {', '.join(sorted(x for x in types if x))})"
        )
    fitted = [t for t in targets if t.spec.get("type") not in holdout]
    if not fitted:
        raise InputError("--holdout leaves no coupling to fit")
    return targets, fitted


def _validate(files, time_ns, n_seeds, seed, holdout, platform=None, n_workers=1):
    """Validate one OpenMM model on the Graf targets; a JSON-ready dict (runs in a worker)."""
    import timemachine as tm
    from timemachine.fitting.validation import validate_openmm

    topology, x = tm.build_peptide("AAA")
    targets, _ = _targets(topology, holdout)
    res = validate_openmm(
        list(files),
        topology,
        x,
        targets,
        time_ns=time_ns,
        n_seeds=n_seeds,
        seed=seed,
        platform=platform,
        progress=False,
        n_workers=n_workers,
    )
    out = res.to_dict()
    if holdout:
        held = [
            i for i, lab in enumerate(res.labels) if lab.split(":")[0] in _names(targets, holdout)
        ]
        r = (res.mean[held] - res.value[held]) / res.uncertainty[held]
        out["holdout_chi2_per_n"] = float(np.mean(r * r))
    return out


def _names(targets, holdout):
    return {t.name for t in targets if t.spec.get("type") in holdout}


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


def run_nmr_fit(args) -> dict:
    """Run the main job with argparse-style ``args`` (see ``timemachine.cli``); returns the
    summary it writes to ``OUT/summary.json``. ``check_nmr_args`` runs first."""
    import timemachine as tm

    size = check_nmr_args(args)
    holdout = tuple(h for h in (args.holdout or "").split(",") if h)
    t0 = time.perf_counter()

    def log(message):
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:5.0f} s] {message}", flush=True)

    topology, x = tm.build_peptide("AAA")
    targets, fitted_targets = _targets(topology, holdout)
    system, x = tm.load_system((topology, x), implicit_solvent="obc2")
    x = tm.minimize_system(system, x)
    wrt = system.select(list(NMR_TORSIONS))
    names = [system.param_names[i] for i in wrt]
    n_values = sum(t.n_values for t in fitted_targets)
    log(
        f"timemachine fit (preset {args.size}): trialanine, amber99sbildn + OBC2, {len(names)} "
        f"φ/ψ torsion k's against {n_values} couplings of Graf et al. 2007 "
        f"({', '.join(t.name for t in fitted_targets)})"
        + (f"; held out: {', '.join(holdout)}" if holdout else "")
    )
    # files of the set-up are staged and moved into OUT only once the fit has run, so a
    # run refused in its first epoch (too few effective samples, say) leaves nothing there
    with tempfile.TemporaryDirectory(prefix="timemachine-fit-") as stage:
        from timemachine.files import atomic_write_text
        from timemachine.fitting.equilibrium import fit_equilibrium
        from timemachine.fitting.plots import plot_fit
        from timemachine.fitting.targets import save_targets

        save_targets(os.path.join(stage, "targets.json"), targets)
        original_xml = os.path.join(stage, "original.xml")
        tm.export_forcefield(system, system.params, original_xml)

        validate = size["validate_ns"] > 0
        pool = future_original = None
        if validate:
            log(
                f"OpenMM validation of the original model: {size['validate_ns']:g} ns over "
                f"{size['validate_seeds']} chains, in a second process while the fit runs"
            )
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
            future_original = pool.submit(
                _validate,
                (original_xml,),
                size["validate_ns"],
                size["validate_seeds"],
                args.seed + 1,
                holdout,
            )
        integrator = tm.LangevinIntegrator(
            temperature=300.0, friction=1.0, dt=0.002, seed=args.seed
        )
        bar = None
        if not args.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(  # disable=None: no bar when stderr is not a terminal
                total=size["epochs"], unit="epoch", desc="fit", dynamic_ncols=True, disable=None
            )

        def on_epoch(record):
            if bar is not None:
                how = "sampled" if record.get("sampled") else "reweighted"
                bar.set_postfix_str(
                    f"χ²/N={record['chi2']:.3g}±{record['chi2_stderr']:.2g} ({how})", refresh=False
                )
                bar.update(1)

        t_fit = time.perf_counter()
        try:
            result = fit_equilibrium(
                system,
                x,
                integrator,
                fitted_targets,
                wrt,
                estimator=args.estimator,
                optimizer=args.optimizer,
                epochs=size["epochs"],
                sample_steps=size["sample_steps"],
                save_every=SAVE_EVERY,
                decorrelation_steps=size["decorrelation_steps"],
                min_ess=size.get("min_ess", 20.0),
                max_extend=size.get("max_extend", 3),
                learning_rate=args.learning_rate,
                n_chains=size["chains"],
                prior_sigma=args.prior_sigma,
                stop_chi2=getattr(args, "stop_chi2", 1.0) or None,
                max_trust_radius=0.5,
                out_dir=args.out,
                resume=args.resume,
                progress=False,
                callback=on_epoch,
            )
        except BaseException:
            if pool is not None:  # stop the original's validation too: nothing to wait for
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        t_fit = time.perf_counter() - t_fit
        os.makedirs(args.out, exist_ok=True)
        fitted_xml = os.path.join(args.out, "fitted.xml")
        tm.export_forcefield(system, result.params, fitted_xml)
        plot_fit(result, args.out)
        history = result.history
        first = history[0]
        # the epoch that estimated χ² at the returned θ (the last accepted one)
        final = [r for r in history if np.allclose(r["params"], result.theta, rtol=0, atol=0)]
        final = final[-1] if final else history[-1]
        log(
            f"fit: {len(history)} epochs in {t_fit:.0f} s; χ²/N {first['chi2']:.3g} ± "
            f"{first['chi2_stderr']:.2g} -> {final['chi2']:.3g} ± {final['chi2_stderr']:.2g} "
            f"(epoch {final['epoch']}, {'sampled' if final.get('sampled') else 'reweighted'}; "
            f"{result.info['stop_reason']})"
        )

        validation = {}
        if validate:
            # the fitted model's chains use the cores the original's run leaves free
            if future_original.done():
                validation["original"] = future_original.result()
                pool.shutdown()
            workers = min(2 if "original" in validation else 1, os.cpu_count() or 1)
            log(f"OpenMM validation of the fitted model: {size['validate_ns']:g} ns")
            validation["fitted"] = _validate(
                (fitted_xml,),
                size["validate_ns"],
                size["validate_seeds"],
                args.seed + 2,
                holdout,
                n_workers=workers,
            )
            if "original" not in validation:
                validation["original"] = future_original.result()
                pool.shutdown()
            workers = min(2, os.cpu_count() or 1)
            for ff in getattr(args, "compare", None) or ():
                # the same implicit solvent (mbondi2 OBC2, native force) under another force field
                log(f"OpenMM validation of {ff} + the same OBC2 (for comparison)")
                other, _ = tm.load_system((topology, x), forcefield=(ff,), implicit_solvent="obc2")
                path = os.path.join(args.out, "compare-" + os.path.basename(ff))
                tm.export_forcefield(other, other.params, path, forcefield=(ff,))
                validation[ff] = _validate(
                    (path,),
                    size["validate_ns"],
                    size["validate_seeds"],
                    args.seed + 3,
                    holdout,
                    n_workers=workers,
                )
        for name in ("targets.json", "original.xml"):
            shutil.move(os.path.join(stage, name), os.path.join(args.out, name))
        if "original" in validation:
            validation["original"]["forcefield_files"] = [os.path.join(args.out, "original.xml")]
        wall = time.perf_counter() - t0
        summary = {
            "system": "trialanine (H3N+-AAA-COO-), amber99sbildn + OBC2, 300 K",
            "data": "Graf, Nguyen, Stock & Schwalbe, J. Am. Chem. Soc. 129, 1179 (2007)",
            "targets": list(result.labels),
            "held_out": list(holdout),
            "estimator": result.info["estimator"],
            "optimizer": args.optimizer,
            "stop_reason": result.info["stop_reason"],
            "parameters": names,
            "original": result.theta_initial.tolist(),
            "fitted": result.theta.tolist(),
            "engine_chi2_per_n": {
                "before": first["chi2"],
                "before_stderr": first["chi2_stderr"],
                "after": final["chi2"],
                "after_stderr": final["chi2_stderr"],
                "after_epoch": final["epoch"],
                "after_freshly_sampled": bool(final.get("sampled")),
                "prior_after": final.get("prior", 0.0),
                "prior_sigma_kj_per_mol": args.prior_sigma,
            },
            "effective_sample_sizes": [r.get("ess_min") for r in history],
            "reweighting_ess": [r.get("reweight_ess") for r in history],
            "epochs": len(history),
            "sampled_epochs": int(sum(bool(r.get("sampled")) for r in history)),
            "openmm_validation": validation,
            "openmm_forcefield_files": {"fitted": ["fitted.xml"], "original": ["original.xml"]},
            "report": "report.html",
            "size": args.size,
            "fit_wall_s": t_fit,
            "wall_s": wall,
        }
        atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2))
        from timemachine.fitting.report import write_fit_report

        write_fit_report(args.out)  # report.html, from the files just written
        _print_summary(summary, args)
        return summary


def _print_summary(s, args):
    e = s["engine_chi2_per_n"]
    print(f"\nsummary ({s['epochs']} epochs, {s['wall_s'] / 60:.1f} min):")
    print(
        f"  timemachine χ²/N (fit targets): {e['before']:.3f} ± {e['before_stderr']:.3f} -> "
        f"{e['after']:.3f} ± {e['after_stderr']:.3f}"
    )
    for name, v in s["openmm_validation"].items():
        extra = ""
        if "holdout_chi2_per_n" in v:
            extra = f"; held-out χ²/N {v['holdout_chi2_per_n']:.3f}"
        print(
            f"  OpenMM {name:>10}: χ²/N {v['chi2_per_n']:.3f} ± {v['chi2_per_n_stderr']:.3f} "
            f"over {len(v['labels'])} couplings, {v['simulated_ns']:g} ns{extra}"
        )
    width = max(len(n) for n in s["parameters"])
    for n, a, b in zip(s["parameters"], s["original"], s["fitted"], strict=True):
        print(f"  {n:<{width}}  {a:8.4f} -> {b:8.4f}")
    print(
        f"wrote {args.out}/: summary.json, history.json, fitted.xml (load it alone: "
        "ForceField('fitted.xml'); it carries the native GBSAOBCForce), original.xml, "
        "targets.json, checkpoint.npz, loss.png, observables.png, parameters.png, "
        "report.html (open it in a browser: the whole fit on one page)"
    )
