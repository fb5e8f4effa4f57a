"""A self-contained HTML report of a fit: ``report.html``, one file a person opens offline.

:func:`write_fit_report` reads what the fit wrote into its output folder and writes
``OUT/report.html`` (atomically). It reads:

- ``summary.json`` (the main job's, ``timemachine.nmr_fit.run_nmr_fit``): the system and
  data, the settings (size, estimator, optimizer, prior σ, held-out types, wall times),
  the stop reason, the parameters with their original and fitted values, the engine's
  χ²/N before and after (``engine_chi2_per_n``) and the OpenMM validation of each model
  (``openmm_validation``: χ²/N with its jackknife error, the mean and error of every
  coupling, χ²/N per coupling type, the simulation settings);
- ``history.json`` (``FitResult.history_dict()``): the labels, targets and σ's, and per
  epoch the χ², the observables with their errors and the estimator diagnostics (minimum
  and per-observable ESS, R̂, the reweighting ESS, whether the epoch sampled or
  reweighted, whether the step was accepted, the trust radius, ...);
- ``loss.png``, ``observables.png``, ``parameters.png`` (``timemachine.fitting.plots``),
  embedded as base64 ``data:`` URIs in ``<img id="plot-loss">`` and so on.

Any of them may be missing (a fit run without validation, say, or another experiment's
summary): the report then says what it lacks instead of failing. The page uses inline CSS
only, no external scripts, fonts, style sheets or images; one small inline script marks
each image that decoded (``data-ok="1"``) so a headless browser can check it.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os

from timemachine.files import atomic_write_text

__all__ = ["PLOTS", "write_fit_report"]

#: the plots the report embeds: (file, id of the <img>, caption)
PLOTS = (
    ("loss.png", "plot-loss", "Loss and χ² per epoch"),
    ("observables.png", "plot-observables", "Observables per epoch against their targets ± σ"),
    ("parameters.png", "plot-parameters", "Parameters per epoch (last point: the fit's end)"),
)

#: per-epoch keys shown first in the diagnostics table, with their column titles
_EPOCH_COLUMNS = (
    ("epoch", "epoch"),
    ("sampled", "sampled"),
    ("chi2", "χ²/N"),
    ("chi2_stderr", "± err"),
    ("chi2_noise_bias", "noise bias"),
    ("prior", "prior"),
    ("loss", "loss"),
    ("ess_min", "ESS min"),
    ("rhat_max", "R̂ max"),
    ("reweight_ess", "reweighting ESS"),
    ("production_steps", "production steps"),
    ("accepted", "step accepted"),
    ("trust_radius", "trust radius"),
    ("predicted_decrease", "predicted decrease"),
    ("actual_decrease", "actual decrease"),
    ("model_decrease", "model decrease"),
    ("converged", "converged"),
    ("wall_s", "wall (s)"),
)

_CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1150px; color: #222;
       line-height: 1.35; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: 0.15em;
     margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f0f0f0; }
td.name, th.name { text-align: left; font-family: monospace; }
td.text, th.text { text-align: left; }
.scroll { overflow-x: auto; }
.good { color: #176d17; }
.bad { color: #a11; }
.note { color: #666; font-size: 0.9em; }
.missing { color: #a11; font-style: italic; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dl.settings dt { font-weight: bold; }
dl.settings dd { margin: 0; }
"""

# marks each decoded image, for a headless browser's DOM dump (inline: nothing external)
_SCRIPT = """
window.addEventListener("load", function () {
  document.querySelectorAll("img").forEach(function (img) {
    img.setAttribute("data-ok", img.complete && img.naturalWidth > 0 ? "1" : "0");
  });
  document.body.setAttribute("data-checked", "1");
});
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _num(x, digits=4) -> str:
    """A number for a table cell; blanks for None and non-numbers shown as text."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return _e(x)


def _pm(value, err, digits=4) -> str:
    if value is None:
        return ""
    if err is None:
        return _num(value, digits)
    return f"{_num(value, digits)} ± {_num(err, 2)}"


def _table(header, rows, name_cols=1, text_last=False) -> str:
    """An HTML table; cells are already-escaped strings; the first ``name_cols`` columns
    are left-aligned names, and the last one left-aligned prose when ``text_last``."""

    def cls(i, n):
        if i < name_cols:
            return ' class="name"'
        return ' class="text"' if text_last and i == n - 1 else ""

    def cells(row, tag):
        return "".join(f"<{tag}{cls(i, len(row))}>{c}</{tag}>" for i, c in enumerate(row))

    body = "\n".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f'<div class="scroll"><table>\n<tr>{cells(header, "th")}</tr>\n{body}\n</table></div>'


def _plots(out_dir) -> str:
    parts = []
    for filename, img_id, caption in PLOTS:
        path = os.path.join(out_dir, filename)
        if not os.path.isfile(path):
            parts.append(f'<p class="missing">{_e(filename)} was not written by this run.</p>')
            continue
        with open(path, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        parts.append(
            f'<figure><img id="{img_id}" alt="{_e(filename)}: {_e(caption)}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(filename)}: {_e(caption)}</figcaption></figure>"
        )
    return "\n".join(parts)


def _chi2_section(summary) -> str:
    rows = []
    engine = summary.get("engine_chi2_per_n")
    if engine:
        rows.append(
            [
                "timemachine (fit targets)",
                _pm(engine.get("before"), engine.get("before_stderr")),
                _pm(engine.get("after"), engine.get("after_stderr")),
                _e(
                    f"epoch 0 → epoch {engine.get('after_epoch')} "
                    f"({'freshly sampled' if engine.get('after_freshly_sampled') else 'reweighted'}"
                    f"); prior term after: {_num(engine.get('prior_after'))}"
                ),
            ]
        )
    validation = summary.get("openmm_validation") or {}
    original, fitted = validation.get("original"), validation.get("fitted")
    if original or fitted:

        def cell(v):
            return _pm(v["chi2_per_n"], v.get("chi2_per_n_stderr")) if v else ""

        v = fitted or original
        rows.append(
            [
                "OpenMM validation",
                cell(original),
                cell(fitted),
                _e(
                    f"{len(v.get('labels', []))} couplings, {_num(v.get('simulated_ns'))} ns "
                    f"over {v.get('n_chains')} chains per model; errors: "
                    f"{v.get('chi2_stderr_method', 'jackknife')}"
                ),
            ]
        )
        held = [
            (name, v["holdout_chi2_per_n"])
            for name, v in (("original", original), ("fitted", fitted))
            if v and "holdout_chi2_per_n" in v
        ]
        if held:
            d = dict(held)
            rows.append(
                [
                    "OpenMM, held-out couplings",
                    _num(d.get("original")),
                    _num(d.get("fitted")),
                    _e(", ".join(summary.get("held_out") or [])),
                ]
            )
    others = [(k, v) for k, v in validation.items() if k not in ("original", "fitted")]
    for name, v in others:
        rows.append(
            [
                f"OpenMM, {_e(name)} (comparison)",
                _pm(v["chi2_per_n"], v.get("chi2_per_n_stderr")),
                "",
                "another force field under the same OBC2",
            ]
        )
    if not rows:
        return '<p class="missing">No χ² in summary.json.</p>'
    out = _table(["χ²/N", "before (original)", "after (fitted)", "notes"], rows, text_last=True)
    groups = _groups_table(validation)
    if groups:
        out += "\n<h3>OpenMM χ²/N per coupling type</h3>\n" + groups
    return out


def _groups_table(validation) -> str:
    models = [k for k in ("original", "fitted") if k in validation] + [
        k for k in validation if k not in ("original", "fitted")
    ]
    names = []
    for m in models:
        for g in validation[m].get("groups", {}):
            if g not in names:
                names.append(g)
    if not names:
        return ""
    rows = []
    for g in names:
        row = [_e(g)]
        for m in models:
            d = validation[m].get("groups", {}).get(g)
            row.append(_pm(d["chi2_per_n"], d.get("chi2_per_n_stderr")) if d else "")
        rows.append(row)
    return _table(["coupling type"] + [_e(m) for m in models], rows)


def _observables_section(history, summary) -> str:
    if not history or not history.get("labels"):
        return '<p class="missing">No observables in history.json.</p>'
    labels = history["labels"]
    values, sigmas = history["target_values"], history["target_uncertainties"]
    epochs = history.get("epochs") or []
    first = epochs[0] if epochs else {}
    last = _final_epoch(history, summary)
    validation = (summary or {}).get("openmm_validation") or {}
    models = [m for m in ("original", "fitted") if m in validation]
    held = set((summary or {}).get("held_out") or [])

    header = ["observable", "target ± σ", "engine, epoch 0", f"engine, epoch {last.get('epoch')}"]
    header += [f"OpenMM {m}" for m in models] + ["(fitted − target)/σ"]
    rows = []
    index = {lab: i for i, lab in enumerate(labels)}
    all_labels = list(labels)
    for m in models:  # held-out couplings are only in the validation
        all_labels += [lab for lab in validation[m]["labels"] if lab not in all_labels]
    for lab in all_labels:
        i = index.get(lab)
        if i is not None:
            target = _pm(values[i], sigmas[i])
        else:
            v = validation[models[0]]
            j = v["labels"].index(lab)
            target = _pm(v["value"][j], v["uncertainty"][j])
        # held_out names targets (or, in older summaries, coupling types)
        out_of_fit = lab.split(":")[0] in held or lab.split(":")[-1].split()[0] in held
        row = [_e(lab) + (" (held out)" if out_of_fit else "")]
        row.append(target)
        for rec in (first, last):
            if i is not None and rec.get("observables") is not None:
                errs = rec.get("observable_errors")
                row.append(_pm(rec["observables"][i], errs[i] if errs else None, 3))
            else:
                row.append("")
        z = None
        for m in models:
            vlab = validation[m]
            if lab in vlab["labels"]:
                j = vlab["labels"].index(lab)
                row.append(_pm(vlab["mean"][j], vlab["stderr"][j], 3))
                if m == "fitted":
                    z = (vlab["mean"][j] - vlab["value"][j]) / vlab["uncertainty"][j]
            else:
                row.append("")
        if z is None and i is not None and last.get("observables") is not None:
            z = (last["observables"][i] - values[i]) / sigmas[i]
        cls = "good" if z is not None and abs(z) <= 1 else "bad"
        row.append("" if z is None else f'<span class="{cls}">{z:+.2f}</span>')
        rows.append(row)
    note = (
        '<p class="note">Engine values are the fit\'s own estimates at the first and the '
        "final epoch, with their block errors; OpenMM values are independent chains' means "
        "with their standard errors. The last column uses the OpenMM fitted model when it "
        "was validated, else the engine's final epoch.</p>"
    )
    return _table(header, rows) + note


def _final_epoch(history, summary) -> dict:
    epochs = (history or {}).get("epochs") or []
    if not epochs:
        return {}
    after = ((summary or {}).get("engine_chi2_per_n") or {}).get("after_epoch")
    for r in epochs:
        if r.get("epoch") == after:
            return r
    return epochs[-1]


def _parameters_section(summary, history) -> str:
    summary, history = summary or {}, history or {}
    names = summary.get("parameters") or history.get("param_names")
    start = summary.get("original") or history.get("theta_initial")
    # the summary's fitted values are what fitted.xml holds (the last accepted point)
    fitted = summary.get("fitted") or history.get("theta_final")
    if not (names and start and fitted):
        return '<p class="missing">No parameters in summary.json or history.json.</p>'
    rows = []
    for n, a, b in zip(names, start, fitted, strict=False):
        rel = (b - a) / a * 100 if a else None
        rows.append(
            [
                _e(n),
                _num(a, 6),
                _num(b, 6),
                f"{b - a:+.4g}",
                "" if rel is None else f"{rel:+.1f} %",
            ]
        )
    return _table(["parameter", "start", "fitted", "change", "relative"], rows)


def _diagnostics_section(history) -> str:
    epochs = (history or {}).get("epochs") or []
    if not epochs:
        return '<p class="missing">No epochs in history.json.</p>'
    keys = [(k, t) for k, t in _EPOCH_COLUMNS if any(k in r for r in epochs)]
    known = {k for k, _ in _EPOCH_COLUMNS}
    for r in epochs:  # any other scalar the history holds
        for k, v in r.items():
            if k not in known and (v is None or isinstance(v, (bool, int, float, str))):
                known.add(k)
                keys.append((k, k))
    rows = []
    for r in epochs:
        row = []
        for k, _ in keys:
            v = r.get(k)
            if k == "sampled" and k in r:
                row.append("sampled" if v else "reweighted")
            else:
                row.append(_num(v))
        rows.append(row)
    out = _table([_e(t) for _, t in keys], rows, name_cols=0)
    per_obs = [r for r in epochs if r.get("ess") is not None or r.get("rhat") is not None]
    labels = history.get("labels") or []
    if per_obs and labels:
        rows = []
        for r in per_obs:
            ess, rhat = r.get("ess") or [], r.get("rhat") or []
            rows.append(
                [str(r.get("epoch"))]
                + [
                    f"{_num(ess[j], 3) if j < len(ess) else ''} / "
                    f"{_num(rhat[j], 3) if j < len(rhat) else ''}"
                    for j in range(len(labels))
                ]
            )
        out += "\n<h3>Per observable: ESS / R̂ (sampled epochs)</h3>\n"
        out += _table(["epoch"] + [_e(lab) for lab in labels], rows, name_cols=0)
    out += (
        '<p class="note">ESS: effective sample size of each observable over all chains '
        "(the minimum gates an epoch); R̂: the split-chain potential scale reduction (near 1 "
        "when the chains agree); reweighting ESS: the Kish size of the weights when an epoch "
        "reuses stored frames instead of sampling; step accepted: whether this epoch's "
        "trial point kept the loss within its error of the last accepted one (else the "
        "trust region shrinks and the step is retried from there).</p>"
    )
    return out


def _settings_section(summary, history) -> str:
    summary, history = summary or {}, history or {}
    e = summary.get("engine_chi2_per_n") or {}
    items = [
        ("system", summary.get("system")),
        ("configuration", summary.get("config")),
        ("data", summary.get("data")),
        ("preset", summary.get("size")),
        ("estimator", summary.get("estimator") or (history.get("info") or {}).get("estimator")),
        ("optimizer", summary.get("optimizer")),
        ("prior σ (parameters' units)", e.get("prior_sigma")),
        ("held-out targets", ", ".join(summary.get("held_out") or []) or "none"),
        ("epochs run", summary.get("epochs", len(history.get("epochs") or []) or None)),
        ("sampled epochs", summary.get("sampled_epochs")),
        ("fit wall time (s)", summary.get("fit_wall_s")),
        ("total wall time (s)", summary.get("wall_s")),
    ]
    validation = summary.get("openmm_validation") or {}
    v = validation.get("fitted") or validation.get("original")
    if v:
        items += [
            ("OpenMM platform", v.get("platform")),
            ("OpenMM ns per model", v.get("simulated_ns")),
            ("OpenMM chains per model", v.get("n_chains")),
            ("OpenMM equilibration (ps)", v.get("equilibration_ps")),
            ("OpenMM settings", ", ".join(f"{k}={x}" for k, x in v.get("settings", {}).items())),
        ]
    files = summary.get("openmm_forcefield_files") or {}
    if files:
        items.append(
            ("force-field files", "; ".join(f"{k}: {', '.join(f)}" for k, f in files.items()))
        )
    rows = "\n".join(
        f"<dt>{_e(k)}</dt><dd>{_num(v) if not isinstance(v, str) else _e(v)}</dd>"
        for k, v in items
        if v is not None and v != ""
    )
    return f'<dl class="settings">\n{rows}\n</dl>'


def _stop_text(stop) -> str:
    if not stop:
        return "not recorded"
    if stop == "epochs":
        return "epochs: the epoch budget was spent (the fit did not stop on its own)"
    return _e(stop)


def render_fit_report(out_dir) -> str:
    """The report's HTML for the fit in ``out_dir`` (see the module docstring)."""
    out_dir = os.fspath(out_dir)
    summary = _load_json(os.path.join(out_dir, "summary.json"))
    history = _load_json(os.path.join(out_dir, "history.json"))
    missing = [n for n, d in (("summary.json", summary), ("history.json", history)) if d is None]
    stop = (summary or {}).get("stop_reason") or ((history or {}).get("info") or {}).get(
        "stop_reason"
    )
    title = "timemachine fit report"
    system = (summary or {}).get("system")
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sections = [
        ("Stop reason", f'<p id="stop-reason">{_stop_text(stop)}</p>'),
        ("χ² before and after", _chi2_section(summary or {})),
        ("Plots", _plots(out_dir)),
        ("Observables against their targets", _observables_section(history, summary)),
        ("Parameter changes", _parameters_section(summary, history)),
        ("Estimator diagnostics per epoch", _diagnostics_section(history)),
        ("Settings", _settings_section(summary, history)),
    ]
    body = "\n".join(
        f'<section id="{_e(name.lower().replace(" ", "-"))}"><h2>{_e(name)}</h2>\n{content}'
        "\n</section>"
        for name, content in sections
    )
    warn = (
        f'<p class="missing">Missing from {_e(out_dir)}: {_e(", ".join(missing))}.</p>'
        if missing
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<p class="note">{_e(system or "")}{" · " if system else ""}written {_e(when)} from the files in
<code>{_e(os.path.abspath(out_dir))}</code></p>
{warn}
{body}
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_fit_report(out_dir) -> str:
    """Write ``out_dir/report.html`` from the fit's files there (atomically); its path.

    Reads ``summary.json``, ``history.json`` and the PNG plots in ``out_dir`` (see the
    module docstring); the page embeds the plots and needs nothing outside itself.
    """
    path = os.path.join(os.fspath(out_dir), "report.html")
    return atomic_write_text(path, render_fit_report(out_dir))
