"""Uniform sampling of R frames from a stream of unknown length (Vitter's Algorithm R).

Time averages of observables and of their gradients use R frames (x_t, dx_t/dθ) drawn
uniformly from one trajectory, whatever its length: memory is O(R·P·N), not O(F·P·N).

Algorithm R (J. S. Vitter, ACM Trans. Math. Softw. 11, 37 (1985)): keep the first R items;
the n-th item (n > R) replaces a uniformly chosen slot with probability R/n. After any
number n of items, every R-subset of them is equally likely to be held.
"""

from __future__ import annotations

import numbers

import numpy as np

from timemachine.errors import InputError

__all__ = ["Reservoir", "reservoir_sample_trajectory"]


class Reservoir:
    """A uniform random sample of at most ``capacity`` items of a stream, seeded.

    Attributes:
        capacity: R, the most items held.
        n_seen: items offered so far.
        items: the items held (a list of length min(R, n_seen), in slot order).
    """

    def __init__(self, capacity: int, seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise InputError(f"reservoir capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._items: list = []
        self.n_seen = 0

    @property
    def items(self) -> list:
        return list(self._items)

    def next_slot(self) -> int | None:
        """Count one more stream item; the slot it goes to, or None if it is not kept.

        Lets a caller copy an item only when it is kept; ``offer`` is this plus the store.
        """
        self.n_seen += 1
        if self.n_seen <= self.capacity:
            return self.n_seen - 1
        j = int(self._rng.integers(0, self.n_seen))  # uniform over the n_seen seen so far
        return j if j < self.capacity else None

    def offer(self, item) -> int | None:
        """Offer the next item of the stream; returns the slot it went to, or None."""
        slot = self.next_slot()
        if slot is not None:
            self.put(slot, item)
        return slot

    def put(self, slot: int, item) -> None:
        """Store ``item`` in the slot ``next_slot`` returned."""
        if slot == len(self._items):
            self._items.append(item)
        else:
            self._items[slot] = item

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"Reservoir(capacity={self.capacity}, held={len(self)}, n_seen={self.n_seen})"


def _chunks(frames):
    """Yield (F_c, ...) numpy blocks of a frame array: ChunkedFrames chunk by chunk."""
    if hasattr(frames, "chunks"):
        yield from frames.chunks()
    else:
        yield np.asarray(frames)


def reservoir_sample_trajectory(traj, capacity: int, seed: int = 0):
    """R frames (x_t, dx_t/dθ, t) drawn uniformly from a ``SensitivityTrajectory``.

    A streamed trajectory (``out_dir``; frames are ``ChunkedFrames``) is read chunk by
    chunk, so memory stays O(R + one chunk) whatever its length.

    Args:
        traj: ``timemachine.sensitivity.SensitivityTrajectory`` (or anything with ``x``
            (F, N, 3), ``dx_dtheta`` (F, P, N, 3) and ``steps`` (F,)).
        capacity: R, frames to draw; a shorter trajectory gives all its F frames.
        seed: seed of the numpy Generator that chooses the frames.

    Returns:
        (x (R, N, 3) nm, dx_dtheta (R, P, N, 3) nm/[θ], steps (R,) int64), sorted by step.
    """
    for name in ("x", "dx_dtheta", "steps"):
        if not hasattr(traj, name):
            raise InputError(
                f"reservoir_sample_trajectory needs a trajectory with x, dx_dtheta and steps; "
                f"{type(traj).__name__} has no {name!r}"
            )
    steps = np.asarray(traj.steps, dtype=np.int64)
    if len(traj.x) != steps.shape[0] or len(traj.dx_dtheta) != steps.shape[0]:
        raise InputError(
            f"trajectory has {len(traj.x)} x frames, {len(traj.dx_dtheta)} dx_dtheta frames "
            f"and {steps.shape[0]} steps"
        )
    if steps.shape[0] == 0:
        raise InputError("reservoir_sample_trajectory: the trajectory has no frames")
    reservoir = Reservoir(capacity, seed)
    f = 0
    for xs, dxs in zip(_chunks(traj.x), _chunks(traj.dx_dtheta), strict=True):
        if xs.shape[0] != dxs.shape[0]:
            raise InputError(f"x and dx_dtheta chunks differ in length at frame {f}")
        for i in range(xs.shape[0]):
            slot = reservoir.next_slot()
            if slot is not None:
                # copies, so that no held frame keeps its whole chunk alive
                reservoir.put(slot, (np.array(xs[i]), np.array(dxs[i]), int(steps[f])))
            f += 1
    held = sorted(reservoir.items, key=lambda item: item[2])
    return (
        np.stack([h[0] for h in held]),
        np.stack([h[1] for h in held]),
        np.array([h[2] for h in held], dtype=np.int64),
    )
