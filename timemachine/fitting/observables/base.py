"""The observable interface: ``Observable`` (``obs(x (N, 3) nm) -> (K,)`` with ``labels``),
the atom-index check every observable uses, and the combinations ``ObservableFunction``
(any traceable function) and ``ObservableSet`` (several observables as one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError

__all__ = ["Observable", "ObservableFunction", "ObservableSet"]


class Observable:
    """Base class: ``obs(x (N, 3) nm) -> (K,) float64``; ``labels`` (K strings), ``n_values``.

    Subclasses set ``labels`` and ``_max_index`` (largest atom index used, or -1) and
    implement ``_evaluate(x)``.
    """

    labels: tuple[str, ...] = ()
    _max_index: int = -1

    @property
    def n_values(self) -> int:
        return len(self.labels)

    def __call__(self, x) -> jax.Array:
        x = jnp.asarray(x, dtype=jnp.float64)
        # shapes are static under jit/vmap, so this check costs nothing at run time
        if x.ndim != 2 or x.shape[1] != 3:
            raise InputError(
                f"{type(self).__name__} takes positions of shape (N, 3) nm, got {x.shape}"
            )
        if self._max_index >= x.shape[0]:
            raise InputError(
                f"{type(self).__name__} uses atom {self._max_index} but the positions have "
                f"only {x.shape[0]} atoms"
            )
        return self._evaluate(x)

    def _evaluate(self, x):
        raise NotImplementedError

    def __repr__(self):
        shown = ", ".join(self.labels[:3]) + (", …" if self.n_values > 3 else "")
        return f"{type(self).__name__}(K={self.n_values}: {shown})"


def _indices(value, name, ndim, width=None) -> np.ndarray:
    try:
        idx = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be an array of atom indices, got {value!r}") from exc
    if idx.size == 0:
        raise InputError(f"{name} is empty: it selects no atoms")
    if not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"{name} must hold integer atom indices, got dtype {idx.dtype}")
    if idx.ndim != ndim or (width is not None and idx.shape[-1] != width):
        shape = "(K, 4)" if width == 4 else f"{ndim}-D"
        raise InputError(f"{name} must have shape {shape}, got {idx.shape}")
    if (idx < 0).any():
        raise InputError(f"{name} has a negative atom index {int(idx.min())}")
    return idx.astype(np.int64)


class ObservableFunction(Observable):
    """Any JAX-traceable ``fn(x (N, 3)) -> (K,)`` (or a scalar, K = 1) with K labels."""

    def __init__(self, fn: Callable, labels: Sequence[str]):
        if not callable(fn):
            raise InputError(f"ObservableFunction needs a callable, got {fn!r}")
        self.fn = fn
        self.labels = (labels,) if isinstance(labels, str) else tuple(labels)

    def _evaluate(self, x):
        out = jnp.atleast_1d(jnp.asarray(self.fn(x), dtype=jnp.float64))
        if out.shape != (self.n_values,):
            raise InputError(
                f"ObservableFunction returned shape {out.shape} but has {self.n_values} labels"
            )
        return out


class ObservableSet(Observable):
    """Several observables as one: values and labels concatenated in order."""

    def __init__(self, observables: Sequence[Observable]):
        self.observables = tuple(observables)
        if not self.observables:
            raise InputError("ObservableSet needs at least one observable")
        for o in self.observables:
            if not callable(o) or not hasattr(o, "labels"):
                raise InputError(f"ObservableSet: {o!r} is not an observable")
        self.labels = tuple(lab for o in self.observables for lab in o.labels)
        self._max_index = max(getattr(o, "_max_index", -1) for o in self.observables)

    def _evaluate(self, x):
        return jnp.concatenate([jnp.atleast_1d(o(x)) for o in self.observables])
