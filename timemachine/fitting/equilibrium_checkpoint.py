"""The equilibrium fit's checkpoint: u, the trust region and optimiser state, the chains,
the stored frames and the history, written after every epoch and read back by
``fit_equilibrium(..., resume=True)``.

A fit over several systems keeps each one's chains and stored frames (system i's arrays
suffixed ``_i``, system 0's as in a one-system fit). The files are ``checkpoint.npz``
(the arrays) and ``checkpoint.json`` (the metadata below
with a SHA-256 of every array, of the npz and of itself), the previous pair kept as
``checkpoint.prev.*``: ``timemachine.checkpoints``. The reservoirs need no state of their
own: each epoch's is seeded by (integrator seed, epoch) and filled from that epoch's
chain segment, so the chains' state and the stored frames are all a resume needs.
"""

from __future__ import annotations

import os

import numpy as np

from timemachine.checkpoints import read_checkpoint, write_checkpoint

__all__ = ["CHECKPOINT", "HISTORY", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint.npz"
CHECKPOINT_BASE = "checkpoint"
HISTORY = "history.json"
_FORMAT = "timemachine.equilibrium-fit-checkpoint"


def _key(name, i):
    """The npz key of system i's array ``name`` (system 0 keeps the one-system names)."""
    return name if i == 0 else f"{name}_{i}"


def save_checkpoint(
    out_dir,
    *,
    fingerprint,
    settings,
    epoch,
    u,
    radius,
    history,
    samplers,
    accepted,
    quiet_epochs,
    horizon,
    opt_state,
    converged,
    stop_reason,
    keep_previous=True,
):
    """Write the checkpoint after ``epoch`` epochs to ``out_dir`` (docs/design.md, "File
    formats").

    Args:
        fingerprint, settings: the fit's settings (a dict) and their hash; a resume must
            match them.
        u: (P,) the optimiser's coordinates; radius: the trust radius ‖δu‖.
        samplers: each system's ``EpochSampler``: its chains' state (x, v (C, N, 3) nm
            and nm/ps, step (C,)), the frames stored for reweighting (x (R, N, 3) nm,
            params (P_all,)) or None, and the epochs they have been reused for.
        horizon: per system, the hybrid horizon in steps or None.
        opt_state: the optax state (Adam) or None; the rest is JSON metadata.
        keep_previous: keep the last good checkpoint as ``checkpoint.prev.*``.
    """
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
        "fingerprint": fingerprint,
        "settings": settings,
        "epoch": epoch,
        "radius": radius,
        "quiet_epochs": quiet_epochs,
        "reused": [sampler.reused for sampler in samplers],
        "horizon": list(horizon),
        "converged": converged,
        "stop_reason": stop_reason,
        "accepted": acc,
        "n_opt": len(arrays),
        "stored": [sampler.stored is not None for sampler in samplers],
        "history": history,
    }
    arrays["u"] = np.asarray(u, dtype=np.float64)
    for i, sampler in enumerate(samplers):
        stored, state = sampler.stored, sampler.chains.state
        arrays[_key("chain_x", i)] = np.asarray(state.x)
        arrays[_key("chain_v", i)] = np.asarray(state.v)
        arrays[_key("chain_step", i)] = np.asarray(state.step)
        arrays[_key("stored_x", i)] = (
            np.asarray(stored[0]) if stored is not None else np.zeros((0, 0, 3))
        )
        arrays[_key("stored_params", i)] = (
            np.asarray(stored[1]) if stored is not None else np.zeros(0)
        )
    write_checkpoint(os.path.join(out_dir, CHECKPOINT_BASE), arrays, meta, _FORMAT, keep_previous)


def load_checkpoint(out_dir):
    """The last good checkpoint in ``out_dir`` (verified; the previous one, with a
    ``CheckpointFallbackWarning``, when the last fails its checksums), as a dict of its
    metadata plus ``u``, ``opt_leaves``, ``path``, ``previous`` and ``systems``: per
    system, a dict of ``chain_x``, ``chain_v``, ``chain_step``, ``stored`` ((x, params)
    or None) and ``reused``; None if there is no checkpoint.

    Raises:
        CorruptCheckpointError: no copy passes its checksums (names the file).
        CheckpointError: the folder holds another kind of checkpoint.
    """
    ckpt = read_checkpoint(os.path.join(os.fspath(out_dir), CHECKPOINT_BASE), _FORMAT)
    if ckpt is None:
        return None
    out = dict(ckpt.meta)
    out["u"] = ckpt["u"]
    out["systems"] = [
        dict(
            chain_x=ckpt[_key("chain_x", i)],
            chain_v=ckpt[_key("chain_v", i)],
            chain_step=ckpt[_key("chain_step", i)],
            stored=(ckpt[_key("stored_x", i)], ckpt[_key("stored_params", i)]) if stored else None,
            reused=int(out["reused"][i]),
        )
        for i, stored in enumerate(out["stored"])
    ]
    out["opt_leaves"] = [ckpt[f"opt_{i}"] for i in range(int(out["n_opt"]))]
    out["path"], out["previous"] = ckpt.path, ckpt.previous
    return out
