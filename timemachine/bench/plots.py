"""PNG plots of a suite result: plain MD, dx/dθ time, scaling in P and N, memory."""

from __future__ import annotations

import os

import numpy as np

from timemachine.files import atomic_savefig

__all__ = ["plots"]


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
