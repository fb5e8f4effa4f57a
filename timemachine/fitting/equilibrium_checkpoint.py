"""The equilibrium fit's checkpoint: u, the trust region and optimiser state, the chains,
the stored frames and the history, written atomically to ``checkpoint.npz`` after every
epoch and read back by ``fit_equilibrium(..., resume=True)``."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from timemachine.errors import InputError
from timemachine.files import atomic_write_bytes

__all__ = ["CHECKPOINT", "HISTORY", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint.npz"
HISTORY = "history.json"
_FORMAT = "timemachine.equilibrium-fit-checkpoint"


def save_checkpoint(
    out_dir,
    *,
    fingerprint,
    epoch,
    u,
    radius,
    history,
    chains,
    stored,
    accepted,
    quiet_epochs,
    reused,
    horizon,
    opt_state,
    converged,
    stop_reason,
):
    arrays = {}
    if opt_state is not None:
        import jax

        for i, leaf in enumerate(jax.tree_util.tree_leaves(opt_state)):
            arrays[f"opt_{i}"] = np.asarray(leaf)
    acc = None
    if accepted is not None:
        acc = {
            key: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
            for key, v in accepted.items()
        }
    meta = {
        "format": _FORMAT,
        "fingerprint": fingerprint,
        "epoch": epoch,
        "radius": radius,
        "quiet_epochs": quiet_epochs,
        "reused": reused,
        "horizon": horizon,
        "converged": converged,
        "stop_reason": stop_reason,
        "accepted": acc,
        "n_opt": len([k for k in arrays if k.startswith("opt_")]),
        "history": history,
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        meta=np.array(json.dumps(meta)),
        u=np.asarray(u, dtype=np.float64),
        chain_x=np.asarray(chains.state.x),
        chain_v=np.asarray(chains.state.v),
        chain_step=np.asarray(chains.state.step),
        stored_x=np.asarray(stored[0]),
        stored_params=np.asarray(stored[1]),
        **arrays,
    )
    atomic_write_bytes(os.path.join(out_dir, CHECKPOINT), buf.getvalue())


def load_checkpoint(out_dir):
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != _FORMAT:
                raise InputError(f"{path} is not a timemachine equilibrium-fit checkpoint")
            out = dict(meta)
            for key in ("u", "chain_x", "chain_v", "chain_step", "stored_x", "stored_params"):
                out[key] = np.array(data[key])
            out["opt_leaves"] = [np.array(data[f"opt_{i}"]) for i in range(meta["n_opt"])]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path} cannot be read as a fit checkpoint: {exc}") from exc
    return out
