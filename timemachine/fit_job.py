"""``timemachine fit CONFIG``: fit force-field parameters to equilibrium averages, from a
checked configuration (``timemachine.config``, command "fit"), and validate the result in
OpenMM.

One job, whatever the system and the data:

1. builds the system of ``[system]`` (a PDB, or a peptide from its sequence) under its
   force field and implicit solvent, and minimises it;
2. loads the targets of ``[targets]`` (the shipped Graf 2007 couplings, a JSON target
   file, inline ``[[targets.entry]]`` tables) and sets the held-out ones aside;
3. fits the parameters ``[parameters].wrt`` with ``fit_equilibrium`` (``[estimator]``,
   ``[sampling]``, ``[optimizer]``), checkpointing every epoch (``--resume`` continues);
4. exports the fitted and the original models as OpenMM XML (``fitted.xml``,
   ``original.xml``; the native GBSAOBCForce when the system has OBC2);
5. validates both in OpenMM (``[validation]``: independent chains, the observables on
   OpenMM's frames, χ²/N with block-jackknife errors; the original model's run in a
   second process while the fit runs), and any ``compare`` force fields;
6. writes ``summary.json``, ``history.csv`` (beside the checkpoint's ``history.json``),
   the plots, and the self-contained ``report.html``.

``timemachine fit`` without a configuration (the main job, ``timemachine.nmr_fit``) runs
this job on the trialanine configuration its preset describes.

Files of the set-up are staged and moved into the output folder only once the fit has
run, so a run refused in its first epoch leaves nothing there.
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

from timemachine.config import (
    build_structure,
    build_system,
    build_targets,
    config_label,
    executor_of,
    nonbonded_options,
)

__all__ = ["HISTORY_COLUMNS", "run_fit_job", "write_history_csv"]

#: the citation shown for [targets].builtin data sets
BUILTIN_CITATIONS = {
    "graf2007": "Graf, Nguyen, Stock & Schwalbe, J. Am. Chem. Soc. 129, 1179 (2007)",
}


def _validate(cfg, files, time_ns, n_seeds, seed, n_workers=1, progress=False):
    """Validate one OpenMM model on the configuration's targets; a JSON-ready dict (runs
    in a worker process: it builds the structure and the targets again). ``progress``:
    ``validate_openmm``'s (None: a bar when stderr is a terminal)."""
    from timemachine.fitting.validation import validate_openmm

    i = cfg["integrator"]
    topology, x = build_structure(cfg)
    targets, fitted = build_targets(cfg, topology)
    res = validate_openmm(
        list(files),
        topology,
        x,
        targets,
        time_ns=time_ns,
        n_seeds=n_seeds,
        seed=seed,
        temperature=i["temperature"],
        friction=i["friction"],
        progress=progress,
        n_workers=n_workers,
        **nonbonded_options(cfg),
    )
    out = res.to_dict()
    held = {t.name for t in targets} - {t.name for t in fitted}
    if held:
        rows = [k for k, lab in enumerate(res.labels) if lab.split(":")[0] in held]
        r = (res.mean[rows] - res.value[rows]) / res.uncertainty[rows]
        out["holdout_chi2_per_n"] = float(np.mean(r * r))
    return out


def _describe(cfg):
    s = cfg["system"]
    what = s["sequence"] if s["pdb"] is None else os.path.basename(s["pdb"])
    files = " + ".join(os.path.basename(f) for f in s["forcefield"])
    solvent = {"obc2": " + OBC2", "none": ", vacuum"}[s["implicit_solvent"]]
    if s["nonbonded_method"] != "NoCutoff":
        solvent += f", {s['nonbonded_method']} {s['cutoff']:g} nm"
    return f"{what}, {files}{solvent}, {cfg['integrator']['temperature']:g} K"


def _executor_label(executor, n_workers):
    if executor == "dask":
        return f"dask (a local cluster of {n_workers or 2} workers)"
    return executor if executor == "in-process" else f"dask ({executor})"


def _citation(cfg, targets):
    t = cfg["targets"]
    if t["citation"]:
        return t["citation"]
    parts = [BUILTIN_CITATIONS[t["builtin"]]] if t["builtin"] else []
    if t["file"] is not None:
        with open(t["file"]) as fh:
            data = json.load(fh)
        cite = data.get("citation") if isinstance(data, dict) else None
        parts.append(cite or f"target file {os.path.basename(t['file'])}")
    if t["entry"] is not None:
        parts.append(f"{len(t['entry'])} targets given in {config_label(cfg)}")
    return "; ".join(parts)


#: the scalar columns of history.csv, in order (then one column per parameter θ_p)
HISTORY_COLUMNS = ("epoch", "loss", "chi2", "chi2_stderr", "prior", "sampled", "accepted",
                   "reweight_ess", "ess_min", "trust_radius", "wall_s")  # fmt: skip


def write_history_csv(path, history, names, labels) -> None:
    """The fit's history as CSV, one row per epoch: ``HISTORY_COLUMNS``, then θ (one
    column per parameter name), then each observable's estimate (one column per target
    label); written atomically. Empty cells: a value the epoch did not compute."""
    import csv
    import io

    from timemachine.files import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*HISTORY_COLUMNS, *names, *(f"<{lab}>" for lab in labels)])
    for rec in history:
        row = ["" if rec.get(c) is None else rec.get(c) for c in HISTORY_COLUMNS]
        obs = rec.get("observables") or [""] * len(labels)
        w.writerow([*row, *(repr(float(v)) for v in rec["params"]), *obs])
    atomic_write_text(path, buf.getvalue())


def _stop_pool(pool):
    """Stop the original model's validation: the fit failed, there is nothing to wait for."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def run_fit_job(cfg, *, resume=False, quiet=False, log=None, preset=None) -> dict:
    """Run the fit a checked configuration describes; returns the summary it writes to
    ``OUT/summary.json``.

    Args:
      cfg: ``load_config(path, "fit")`` (or a dict of the same form).
      resume: continue the fit from ``OUT/checkpoint.npz`` (same settings only).
      quiet: no progress messages or bars.
      log: ``log(message)`` for progress messages (default: print when not quiet).
      preset: the main job's preset name, recorded in the summary.

    Raises:
      ConfigError: a glob or holdout of the configuration matching nothing.
      InputError: a target the structure cannot compute, a checkpoint of another fit,
        too few effective samples.
      SimulationError: a chain went non-finite.
    """
    from timemachine.files import atomic_write_text
    from timemachine.fitting.equilibrium import fit_equilibrium
    from timemachine.fitting.plots import plot_fit
    from timemachine.fitting.report import write_fit_report
    from timemachine.fitting.targets import save_targets
    from timemachine.io import export_forcefield, load_system

    t0 = time.perf_counter()
    if log is None:

        def log(message):
            if not quiet:
                print(f"[{time.perf_counter() - t0:5.0f} s] {message}", flush=True)

    out = cfg["output"]["dir"] or "timemachine-out"
    est, smp, opt, val = cfg["estimator"], cfg["sampling"], cfg["optimizer"], cfg["validation"]
    executor, n_workers = executor_of(cfg)
    system, x, topology, wrt, integrator = build_system(cfg)
    targets, fitted_targets = build_targets(cfg, topology)
    held = [t.name for t in targets if t not in fitted_targets]
    names = [system.param_names[i] for i in wrt]
    n_values = sum(t.n_values for t in fitted_targets)
    log(
        f"timemachine fit{f' (preset {preset})' if preset else ''}: {_describe(cfg)}; "
        f"{len(names)} parameters against {n_values} values "
        f"({', '.join(t.name for t in fitted_targets)})"
        + (f"; held out: {', '.join(held)}" if held else "")
        + ("" if executor == "in-process" else f"; on {_executor_label(executor, n_workers)}")
    )
    with tempfile.TemporaryDirectory(prefix="timemachine-fit-") as stage:
        save_targets(os.path.join(stage, "targets.json"), targets)
        original_xml = os.path.join(stage, "original.xml")
        export_forcefield(system, system.params, original_xml)

        validate = val["ns"] > 0
        pool = future_original = None
        if validate:
            log(
                f"OpenMM validation of the original model: {val['ns']:g} ns over "
                f"{val['seeds']} chains, in a second process while the fit runs"
            )
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
            seed = cfg["integrator"]["seed"]
            future_original = pool.submit(
                _validate, cfg, (original_xml,), val["ns"], val["seeds"], seed + 1
            )
        bar = None
        if not quiet:
            from tqdm.auto import tqdm

            bar = tqdm(  # disable=None: no bar when stderr is not a terminal
                total=opt["epochs"], unit="epoch", desc="fit", dynamic_ncols=True, disable=None
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
                estimator=est["kind"],
                optimizer=opt["kind"],
                epochs=opt["epochs"],
                n_chains=smp["chains"],
                sample_steps=smp["sample_steps"],
                decorrelation_steps=smp["decorrelation_steps"],
                save_every=smp["save_every"],
                reservoir_size=smp["reservoir_size"],
                min_ess=smp["min_ess"],
                max_extend=smp["max_extend"],
                precision=smp["precision"],
                learning_rate=opt["learning_rate"],
                trust_radius=opt["trust_radius"],
                max_trust_radius=opt["max_trust_radius"],
                parametrization=opt["parametrization"],
                prior_sigma=opt["prior_sigma"] or None,
                stop_chi2=opt["stop_chi2"] or None,
                n_replicas=est["replicas"],
                horizon=est["horizon"],
                max_horizon=est["max_horizon"],
                executor=executor,
                n_workers=n_workers,
                out_dir=out,
                resume=resume,
                progress=False,
                callback=on_epoch,
            )
        except BaseException:
            if pool is not None:
                _stop_pool(pool)
            raise
        finally:
            if bar is not None:
                bar.close()
        t_fit = time.perf_counter() - t_fit
        os.makedirs(out, exist_ok=True)
        fitted_xml = os.path.join(out, "fitted.xml")
        export_forcefield(system, result.params, fitted_xml)
        plot_fit(result, out)
        write_history_csv(
            os.path.join(out, "history.csv"), result.history, names, list(result.labels)
        )
        history = result.history
        first = history[0]
        # the epoch that estimated χ² at the returned θ (the last accepted one)
        final = [r for r in history if np.array_equal(r["params"], result.theta)]
        final = final[-1] if final else history[-1]
        log(
            f"fit: {len(history)} epochs in {t_fit:.0f} s; χ²/N {first['chi2']:.3g} ± "
            f"{first['chi2_stderr']:.2g} -> {final['chi2']:.3g} ± {final['chi2_stderr']:.2g} "
            f"(epoch {final['epoch']}, {'sampled' if final.get('sampled') else 'reweighted'}; "
            f"{result.info['stop_reason']})"
        )

        validation = {}
        if validate:
            seed = cfg["integrator"]["seed"]
            # the fitted model's chains use the cores the original's run leaves free
            if future_original.done():
                validation["original"] = future_original.result()
                pool.shutdown()
            workers = min(2 if "original" in validation else 1, os.cpu_count() or 1)
            log(f"OpenMM validation of the fitted model: {val['ns']:g} ns")
            bars = False if quiet else None  # the original's run in its worker draws none
            validation["fitted"] = _validate(
                cfg, (fitted_xml,), val["ns"], val["seeds"], seed + 2, workers, bars
            )
            if "original" not in validation:
                validation["original"] = future_original.result()
                pool.shutdown()
            workers = min(2, os.cpu_count() or 1)
            solvent = cfg["system"]["implicit_solvent"]
            for ff in val["compare"]:
                # the same implicit solvent (native force) under another force field
                log(f"OpenMM validation of {ff} with the same implicit solvent (comparison)")
                other, _ = load_system(
                    build_structure(cfg),
                    forcefield=(ff,),
                    implicit_solvent=None if solvent == "none" else solvent,
                    **nonbonded_options(cfg),
                )
                path = os.path.join(out, "compare-" + os.path.basename(ff))
                export_forcefield(other, other.params, path, forcefield=(ff,))
                validation[ff] = _validate(
                    cfg, (path,), val["ns"], val["seeds"], seed + 3, workers, bars
                )
        for name in ("targets.json", "original.xml"):
            shutil.move(os.path.join(stage, name), os.path.join(out, name))
        if "original" in validation:
            validation["original"]["forcefield_files"] = [os.path.join(out, "original.xml")]
        summary = {
            "config": os.path.abspath(cfg["_file"]) if cfg.get("_file") else None,
            "system": _describe(cfg),
            "data": _citation(cfg, targets),
            "targets": list(result.labels),
            "held_out": held,
            "estimator": result.info["estimator"],
            "optimizer": opt["kind"],
            "executor": _executor_label(executor, n_workers),
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
                "prior_sigma": opt["prior_sigma"] or None,
            },
            "effective_sample_sizes": [r.get("ess_min") for r in history],
            "reweighting_ess": [r.get("reweight_ess") for r in history],
            "epochs": len(history),
            "sampled_epochs": int(sum(bool(r.get("sampled")) for r in history)),
            "openmm_validation": validation,
            "openmm_forcefield_files": {"fitted": ["fitted.xml"], "original": ["original.xml"]},
            "report": "report.html",
            "size": preset,
            "fit_wall_s": t_fit,
            "wall_s": time.perf_counter() - t0,
        }
        atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
        write_fit_report(out)  # report.html, from the files just written
        if not quiet:
            print_summary(summary, out)
        return summary


def print_summary(s, out):
    """The summary's χ²/N before and after, the validations and the parameter changes."""
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
            f"over {len(v['labels'])} values, {v['simulated_ns']:g} ns{extra}"
        )
    width = max(len(n) for n in s["parameters"])
    for n, a, b in zip(s["parameters"], s["original"], s["fitted"], strict=True):
        print(f"  {n:<{width}}  {a:8.4f} -> {b:8.4f}")
    print(
        f"wrote {out}/: summary.json, history.json and .csv, fitted.xml (load it alone: "
        "ForceField('fitted.xml')), original.xml, targets.json, checkpoint.npz, loss.png, "
        "observables.png, parameters.png, report.html (open it in a browser: the whole fit "
        "on one page)"
    )
