"""Write a suite result: the markdown report and the JSON file (with the goals evaluated by
``goals``), and the plots of ``plots``."""

from __future__ import annotations

import json
import os

import numpy as np

from timemachine.bench.goals import goals
from timemachine.bench.plots import plots
from timemachine.files import atomic_write_text

__all__ = ["goals", "markdown", "write_json", "plots", "write_report"]


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
