"""The registry of structured all-pairs parts: term name → class.

A term class names its part in ``structured`` (``timemachine.system``); the class
registered under that name builds, for one term and the chosen parameters ``wrt``, a
callable ``part(x, r, inv_r, dc, params, mixed) -> (A, B, mixed, apply)``:

* A, B: (N, N) pair scalars of its Hessian through r, H_ij = -(A_ij d dᵀ + B_ij I), and of
  its gradient, g_i = Σ_j B_ij d_ij;
* mixed: the (P, N, 3) mixed partials ∂²E/∂x∂θ_p, with its own added;
* apply: None, or ``apply(ext (P+3, 3N)) -> (P, 3, N)`` for whatever part of H·t is not a
  pair form (OBC2's Born-radius chain).
"""

from __future__ import annotations

from timemachine.errors import InputError

PAIR_PARTS: dict[str, type] = {}


def register_pair_part(name: str):
    """Class decorator: register a structured all-pairs part under ``name``."""

    def register(cls):
        if name in PAIR_PARTS:
            raise InputError(f"structured part {name!r} is registered twice")
        PAIR_PARTS[name] = cls
        return cls

    return register


def pair_part(term, wrt):
    """The registered part of ``term`` (``term.structured``) for parameters ``wrt``."""
    try:
        cls = PAIR_PARTS[term.structured]
    except KeyError:
        raise InputError(
            f"{type(term).__name__} names structured part {term.structured!r}, which is not "
            f"registered (known: {sorted(PAIR_PARTS)})"
        ) from None
    return cls(term, wrt)
