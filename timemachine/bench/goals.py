"""The goals of the benchmark issue, evaluated on a suite result: each one measured,
its target, and whether it is met."""

from __future__ import annotations

__all__ = ["goals"]


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
