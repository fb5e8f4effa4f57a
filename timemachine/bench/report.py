"""Write a suite result: the goals, a markdown report, the JSON file and plots."""

from __future__ import annotations

import json
import os

import numpy as np

from timemachine.files import atomic_savefig, atomic_write_text

__all__ = ["goals", "markdown", "write_json", "plots", "write_report"]


def _us(rows, case, engine):
    for r in rows:
        if r["case"] == case and r["engine"] == engine:
            return r["us_per_step"]
    return None


def _goal(name, measured, target, met, detail):
    return {"goal": name, "measured": measured, "target": target, "met": met, "detail": detail}


def _profile(result, case):
    return next((p for p in result.get("profile", []) if p["case"] == case), None)


def _plain_where(result, case):
    """Where a plain step of ``case`` goes, from the profile (or "" without one)."""
    p = _profile(result, case)
    if p is None:
        return ""
    ms = p["ms"]
    kind = p["dominant_term"]
    return (
        f"; profile: step {ms['plain_step']:.3g} ms = gradient {ms['gradient']:.3g} ms "
        f"(of which {kind} {ms['gradient/' + kind]:.3g} ms) + integrator"
    )


def _cpu_ratio(rows, case, engine):
    a = next((r for r in rows if r["case"] == case and r["engine"] == "timemachine (JAX)"), None)
    b = next((r for r in rows if r["case"] == case and r["engine"] == engine), None)
    if a is None or b is None or "cpu_us_per_step" not in a or "cpu_us_per_step" not in b:
        return ""
    return f"; CPU-time ratio {a['cpu_us_per_step'] / b['cpu_us_per_step']:.3g}"


def goals(result: dict) -> list[dict]:
    """The issue's goals, evaluated on ratios measured in this one run.

    Wall-time ratios (each timing the best of its repeats); the detail adds the ratio of
    process CPU times and, for a missed goal, where the time goes (``profile``). A goal
    whose measurements are absent from the run is reported with met = None.
    """
    rows, out = result["plain_md"], []
    ours = "timemachine (JAX)"

    def ratio_goal(name, case, engine, factor, detail):
        a, b = _us(rows, case, ours), _us(rows, case, engine)
        if a is None or b is None:
            out.append(_goal(name, None, f"ours ≤ {factor}× {engine}", None, "not run"))
            return
        met = a / b <= factor
        detail += _cpu_ratio(rows, case, engine)
        if not met:
            detail += _plain_where(result, case)
        out.append(_goal(name, a / b, f"ours/{engine} ≤ {factor}", met, detail))

    ratio_goal(
        "villin vacuum faster than OpenMM Reference",
        "villin-vacuum",
        "OpenMM Reference",
        1.0,
        "µs/step ratio",
    )
    ratio_goal(
        "villin vacuum within 1.5× of OpenMM CPU",
        "villin-vacuum",
        "OpenMM CPU",
        1.5,
        "µs/step ratio",
    )
    ratio_goal(
        "villin OBC2 faster than OpenMM CPU",
        "villin-obc2",
        "OpenMM CPU",
        1.0,
        "µs/step ratio; OpenMM runs the System we load (obc2.xml, a CustomGBForce)",
    )
    ratio_goal(
        "villin OBC2 faster than OpenMM CPU, native GBSAOBCForce (same energy; stricter)",
        "villin-obc2",
        "OpenMM CPU GBSAOBCForce",
        1.0,
        "µs/step ratio",
    )
    ratio_goal(
        "trialanine vacuum within 2× of OpenMM Reference",
        "trialanine-vacuum",
        "OpenMM Reference",
        2.0,
        "µs/step ratio",
    )
    ratio_goal(
        "trialanine OBC2 within 2× of OpenMM Reference",
        "trialanine-obc2",
        "OpenMM Reference",
        2.0,
        "µs/step ratio",
    )

    deriv = [r for r in result["derivatives"] if r.get("case", "").startswith("villin")]
    by = {r["method"]: r for r in deriv}
    for method, factor in (("openmm-fd", 5.0), ("jaxmd-forward", 10.0)):
        r = by.get(method)
        name = f"villin dx/dθ ≥ {factor:g}× faster than {method}"
        if r is None or "error" in r or "timemachine" not in by:
            why = r["error"][:200] if r and "error" in r else "not run"
            out.append(_goal(name, None, f"speedup ≥ {factor:g}", None, why))
            continue
        ours_r = by["timemachine"]
        met = r["speedup_of_timemachine"] >= factor
        detail = (
            f"P = {r['P']}, {r['n_steps']} steps; its rel. error vs ours "
            f"{r['rel_error_vs_timemachine']:.2e}"
        )
        if "own_fd_rel_error" in ours_r:
            detail += f" (ours vs our own float64 FD {ours_r['own_fd_rel_error']:.1e})"
        if "cpu_s" in r and "cpu_s" in ours_r:
            detail += f"; CPU-time ratio {r['cpu_s'] / ours_r['cpu_s']:.3g}"
        p = _profile(result, r["case"])
        if not met and p is not None:
            ms = p["ms"]
            detail += (
                f"; profile: our step {ms['sensitivity_step']:.3g} ms = "
                f"{p['step_in_gradients']:.3g} gradients (∇E + ζ fused "
                f"{ms['gradient_and_zeta']:.3g} ms, ζ alone {ms['zeta']:.3g} ms = "
                f"{p['zeta_in_gradients']:.3g} gradients, gradient {ms['gradient']:.3g} ms, "
                f"rest {p['overhead_ms']:.3g} ms)"
            )
            omm = _us(rows, r["case"], "OpenMM CPU")
            if method == "openmm-fd" and omm is not None:
                detail += (
                    f" against 2P = {2 * r['P']} OpenMM CPU steps of {omm / 1e3:.3g} ms; "
                    f"the goal needs our step ≤ {2 * r['P'] * omm / 1e3 / factor:.3g} ms"
                )
        out.append(_goal(name, r["speedup_of_timemachine"], f"speedup ≥ {factor:g}", met, detail))
    rev = by.get("reverse")
    if rev is not None and "steps_to_24GiB" in rev:
        ours_bytes = by["timemachine"].get("state_bytes")
        out.append(
            _goal(
                "constant memory in steps where reverse mode grows",
                rev["steps_to_24GiB"],
                "report",
                True,
                f"reverse mode keeps {rev['bytes_per_step'] / 2**20:.2f} MiB per step, "
                f"24 GiB after ≈{rev['steps_to_24GiB']:.3g} steps; exact mode holds "
                f"{ours_bytes / 2**20:.2f} MiB at any length",
            )
        )
    return out


def _fmt(x, spec=".3g"):
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float, np.floating)):
        return format(x, spec)
    return str(x)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _plain_note(r):
    if "compile_s" in r and "max_dx_vs_reference_nm" in r:
        return (
            f"compile {r['compile_s']:.1f} s; "
            f"|x − x_Reference| {r['max_dx_vs_reference_nm']:.1e} nm"
            + (f" after {r['agreement_steps']} steps" if "agreement_steps" in r else "")
        )
    notes = []
    if r.get("threads"):
        notes.append(f"{r['threads']} threads")
    if "gb_energy_diff_kj_mol" in r:
        notes.append(f"E − E(CustomGBForce) {r['gb_energy_diff_kj_mol']:.1e} kJ/mol")
    return "; ".join(notes)


def markdown(result: dict) -> str:
    """The report as markdown: environment, goals, plain MD, dx/dθ, scaling, memory."""
    env = result["environment"]
    parts = ["# timemachine benchmark", ""]
    parts.append(
        f"{env['cpu_count']} CPU cores (load average at start {env['load_average'][0]:.1f}); "
        f"JAX {env['jax']} on {', '.join(env['jax_devices'])}; OpenMM {env['openmm']} "
        f"({', '.join(env['openmm_platforms'])}); JAX MD {env['jax_md'] or 'not installed'}. "
        + ("" if env["gpu"] else "No GPU: the GPU columns are absent. ")
        + (
            "CUDA backend: available."
            if env["cuda_backend"]["available"]
            else f"CUDA backend: unavailable ({env['cuda_backend'].get('reason', '')})."
        )
    )
    s = result["settings"]
    parts.append(
        f"Langevin T = {s['temperature']} K, γ = {s['friction']}/ps, δt = {s['dt']} ps, "
        f"amber99sbildn, NoCutoff, no constraints. Timings exclude compilation and Context "
        f"creation (reported in the JSON); each is the best of {s.get('repeats', 1)} runs, "
        f"wall time, with the process CPU time (all threads) of that run beside it. "
        f"Suite wall time {result.get('wall_s', 0):.0f} s; load average at the end "
        f"{_fmt(result.get('load_average_end', [None])[0], '.1f')}."
    )
    parts += ["", "## Goals", ""]
    parts.append(
        _table(
            ["goal", "measured", "target", "met", "detail"],
            [[g["goal"], g["measured"], g["target"], g["met"], g["detail"]] for g in goals(result)],
        )
    )
    parts += ["", "## Plain MD (µs per step)", ""]
    parts.append(
        _table(
            [
                "system",
                "atoms",
                "engine",
                "device",
                "steps",
                "µs/step",
                "CPU µs/step",
                "× ours",
                "notes",
            ],
            [
                [
                    r["case"],
                    r["n_atoms"],
                    r["engine"],
                    r["device"],
                    r["n_steps"],
                    r["us_per_step"],
                    r.get("cpu_us_per_step"),
                    r["ratio_to_timemachine"],
                    _plain_note(r),
                ]
                for r in result["plain_md"]
            ],
        )
    )
    parts += ["", "## dx/dθ over the same steps (P torsion barrier types)", ""]
    rows = []
    for r in result["derivatives"]:
        if "error" in r:
            rows.append(
                [
                    r["case"],
                    r["method"],
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    "failed: " + r["error"][-160:].replace("\n", " "),
                ]
            )
            continue
        note = {
            "timemachine": "exact mode"
            + (
                f"; vs own float64 FD {r['own_fd_rel_error']:.1e}"
                if "own_fd_rel_error" in r
                else ""
            ),
            "openmm-fd": (f"{r.get('trajectories')} trajectories, {r.get('threads', '?')} threads"),
            "jaxmd-forward": f"jacfwd through BAOAB; {r.get('energy', '')}",
            "reverse": f"dO/dθ of O = r·x_T only (all of dx_T/dθ: {3 * r['n_atoms']} passes)"
            + (f"; 24 GiB at ≈{r['steps_to_24GiB']:.3g} steps" if r.get("steps_to_24GiB") else ""),
        }[r["method"]]
        rows.append(
            [
                r["case"],
                r["method"],
                r["P"],
                r["n_steps"],
                r["time_s"],
                r.get("cpu_s"),
                r["speedup_of_timemachine"],
                r["peak_rss_bytes"] / 2**20,
                r["rel_error_vs_timemachine"],
                note,
            ]
        )
    parts.append(
        _table(
            [
                "system",
                "method",
                "P",
                "steps",
                "time s",
                "CPU s",
                "× ours",
                "peak RSS MiB",
                "rel. error vs ours",
                "notes",
            ],
            rows,
        )
    )
    sc = result["scaling"]
    for key, title in (("in_p", "Scaling in P"), ("in_n", "Scaling in N")):
        if sc.get(key):
            parts += ["", f"## {title} (exact sensitivity step)", ""]
            parts.append(
                _table(
                    ["system", "N", "P", "ms/step", "plain ms/step", "× plain step"],
                    [
                        [
                            r["case"],
                            r.get("N"),
                            r["P"],
                            r.get("ms_per_step"),
                            r.get("plain_ms_per_step"),
                            r.get("plain_steps_per_step"),
                        ]
                        for r in sc[key]
                    ],
                )
            )
    for p in result.get("profile", []):
        parts += ["", f"## Where the time goes: {p['case']} (N = {p['N']}, P = {p['P']})", ""]
        g = p["ms"]["gradient"]
        parts.append(
            _table(
                ["part", "ms", "× gradient"],
                [[k, v, v / g] for k, v in p["ms"].items()],
            )
        )
        parts.append("")
        parts.append(
            f"A sensitivity step costs {p['step_in_gradients']:.3g} gradients: ζ "
            f"{p['zeta_in_gradients']:.3g}, the rest (propagation, loop) "
            f"{p['overhead_ms']:.3g} ms. The largest term of the gradient: "
            f"{p['dominant_term']}."
            + (
                " (A negative rest means the parts, timed one after another, saw different "
                "load: compare within one row only.)"
                if p["overhead_ms"] < 0
                else ""
            )
        )
    if sc.get("memory"):
        m0 = sc["memory"][0]
        parts += ["", f"## State memory (N = {m0['N']}, P = {m0['P']})", ""]
        parts.append(
            _table(
                ["method", "window k", "expected MiB", "allocated MiB"],
                [
                    [
                        r["method"],
                        _fmt(r["window"]) + (" (default)" if r.get("default_window") else ""),
                        r["expected_bytes"] / 2**20,
                        None if r["allocated_bytes"] is None else r["allocated_bytes"] / 2**20,
                    ]
                    for r in sc["memory"]
                ],
            )
        )
    return "\n".join(parts) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _atomic_write(path, text):
    atomic_write_text(path, text)


def write_json(result: dict, path) -> None:
    """The result, with the evaluated goals, as JSON (written atomically). A result whose
    ``complete`` is False (the parts of a run so far) is written without goals."""
    data = dict(result, goals=goals(result)) if result.get("complete", True) else result
    _atomic_write(path, json.dumps(_jsonable(data), indent=1, allow_nan=True))


def plots(result: dict, out_dir) -> list[str]:
    """PNG plots in ``out_dir``: plain MD, dx/dθ time, scaling in P and N, memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = atomic_savefig(fig, os.path.join(out_dir, name), dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    rows = result["plain_md"]
    if rows:
        cases = list(dict.fromkeys(r["case"] for r in rows))

        def label(r):
            return r["engine"] if r["device"] in r["engine"] else f"{r['engine']} ({r['device']})"

        engines = list(dict.fromkeys(label(r) for r in rows))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(engines)
        for e, engine in enumerate(engines):
            ys = [
                next(
                    (r["us_per_step"] for r in rows if r["case"] == c and label(r) == engine),
                    np.nan,
                )
                for c in cases
            ]
            ax.bar(np.arange(len(cases)) + e * width, ys, width, label=engine)
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, cases, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("µs per step")
        ax.set_title("Plain Langevin MD")
        ax.legend(fontsize=8)
        save(fig, "plain_md.png")

    deriv = [r for r in result["derivatives"] if "error" not in r]
    if deriv:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{r['case']}\n{r['method']}" for r in deriv]
        ax.barh(labels, [r["time_s"] for r in deriv])
        ax.set_xscale("log")
        ax.set_xlabel("seconds (same steps, same P)")
        ax.set_title("dx/dθ")
        save(fig, "derivatives.png")

    sc = result["scaling"]
    for key, xkey, name in (("in_p", "P", "scaling_p.png"), ("in_n", "N", "scaling_n.png")):
        pts = [r for r in sc.get(key, []) if "ms_per_step" in r]
        if pts:
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.plot(
                [r[xkey] for r in pts],
                [r["ms_per_step"] for r in pts],
                "o-",
                label="sensitivity step",
            )
            ax.plot(
                [r[xkey] for r in pts],
                [r["plain_ms_per_step"] for r in pts],
                "s--",
                label="plain step",
            )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xkey)
            ax.set_ylabel("ms per step")
            ax.legend()
            save(fig, name)

    mem = sc.get("memory", [])
    rev = [r for r in result["derivatives"] if r.get("method") == "reverse" and "memory_steps" in r]
    if mem:
        fig, axes = plt.subplots(1, 2 if rev else 1, figsize=(10 if rev else 5, 4), squeeze=False)
        ax = axes[0, 0]
        win = [r for r in mem if r["method"] == "window"]
        ax.plot(
            [r["window"] for r in win],
            [r["expected_bytes"] / 2**20 for r in win],
            "o-",
            label="window mode",
        )
        ax.axhline(mem[0]["expected_bytes"] / 2**20, color="k", ls="--", label="exact mode")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("window k (steps)")
        ax.set_ylabel("state MiB")
        ax.legend()
        if rev:
            ax = axes[0, 1]
            for r in rev:
                steps = np.array([1, max(r["memory_steps"]), r.get("steps_to_24GiB") or 1])
                slope = r.get("bytes_per_step", 0.0)
                base = r["memory_bytes"][0] - slope * r["memory_steps"][0]
                ax.plot(steps, (base + slope * steps) / 2**30, "-", label=f"reverse, {r['case']}")
                ax.plot(r["memory_steps"], np.array(r["memory_bytes"]) / 2**30, "o")
            ours = [
                r
                for r in result["derivatives"]
                if r.get("method") == "timemachine" and "state_bytes" in r
            ]
            for r in ours[:1]:
                ax.axhline(
                    r["state_bytes"] / 2**30,
                    color="k",
                    ls="--",
                    label=f"timemachine exact mode, {r['case']} (any length)",
                )
            ax.axhline(24, color="r", ls=":", label="24 GiB")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("steps")
            ax.set_ylabel("GiB (XLA buffers)")
            ax.legend(fontsize=8)
        save(fig, "memory.png")
    return written


def write_report(result: dict, out_dir, json_path=None) -> dict:
    """Write report.md, results.json (or ``json_path``) and the plots into ``out_dir``.

    Returns {"markdown": path, "json": path, "plots": [paths]}.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.fspath(json_path) if json_path else os.path.join(out_dir, "results.json")
    write_json(result, json_path)
    md_path = os.path.join(out_dir, "report.md")
    _atomic_write(md_path, markdown(result))
    return {"markdown": md_path, "json": json_path, "plots": plots(result, out_dir)}
