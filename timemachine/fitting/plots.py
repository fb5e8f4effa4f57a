"""PNG plots of a fit: loss, observables with their targets, and parameters per epoch."""

from __future__ import annotations

import os

import numpy as np

from timemachine.files import atomic_savefig

__all__ = ["plot_fit"]


def _save(fig, path):
    import matplotlib.pyplot as plt

    try:
        atomic_savefig(fig, path, dpi=110)
    finally:
        plt.close(fig)


def plot_fit(history, out_dir, reference_params=None) -> list[str]:
    """Write ``loss.png``, ``observables.png`` and ``parameters.png`` into ``out_dir``.

    Args:
        history: a ``FitResult`` or its ``history_dict()`` (as in ``history.json``).
        out_dir: folder for the PNGs (files are written atomically).
        reference_params: optional (P,) values to mark on the parameter plot (e.g. the
            original force field's, in a recovery experiment).

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = history.history_dict() if hasattr(history, "history_dict") else history
    epochs = h["epochs"]
    if not epochs:
        return []
    os.makedirs(out_dir, exist_ok=True)
    e = np.array([r["epoch"] for r in epochs])
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(e, [r["loss"] for r in epochs], "o-", label="total loss")
    if epochs[0].get("chi2") is not None:
        ax.semilogy(e, [r["chi2"] for r in epochs], ".--", label="χ²")
    if any(r.get("force_matching") is not None for r in epochs):
        ax.semilogy(
            e, [r.get("force_matching", np.nan) for r in epochs], ".--", label="force matching"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss.png"))
    _save(fig, paths[-1])

    labels = h.get("labels") or []
    if labels and epochs[0].get("observables") is not None:
        k = len(labels)
        cols = min(3, k)
        rows = -(-k // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
        values = np.array([r["observables"] for r in epochs])
        errors = np.array([r.get("observable_errors") or [0.0] * k for r in epochs])
        for j in range(rows * cols):
            ax = axes.flat[j]
            if j >= k:
                ax.axis("off")
                continue
            y, s = h["target_values"][j], h["target_uncertainties"][j]
            ax.axhspan(y - s, y + s, color="tab:green", alpha=0.2, label="target ± σ")
            ax.axhline(y, color="tab:green", lw=1)
            ax.errorbar(e, values[:, j], yerr=errors[:, j], fmt="o-", ms=3, label="simulated")
            ax.set_title(labels[j], fontsize=9)
            ax.set_xlabel("epoch")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "observables.png"))
        _save(fig, paths[-1])

    names = h["param_names"]
    params = np.array([r["params"] for r in epochs] + [h["theta_final"]])
    steps = np.concatenate([e, [e[-1] + 1]])
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, name in enumerate(names):
        (line,) = ax.plot(steps, params[:, p], "o-", ms=3, label=name)
        if reference_params is not None:
            ax.axhline(reference_params[p], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("parameter value")
    if reference_params is not None:
        ax.set_title("dotted: reference values")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "parameters.png"))
    _save(fig, paths[-1])
    return paths
