"""Several systems in one equilibrium fit, sharing the fitted parameters by name.

A force field's torsion types are shared by every molecule it describes, so a fit to
trialanine's couplings and to a second peptide's should move one set of torsion
parameters. ``FitSystem`` bundles a System with its starting positions and its targets;
``fit_equilibrium`` (and ``tm.fit``) take a list of them in place of one System.

The fitted parameters are the union, by name (``system.param_names``), of the parameters
each system's ``wrt`` globs select: a glob must match in at least one system, and a
system fits the shared parameters it has. Their starting values must agree wherever they
occur (the systems come from one force field). Each system keeps its own chains, stored
frames and estimates; the estimates of all systems, sampled independently, stack into one
vector of K = Σ K_s observables with a block-diagonal covariance, and J (K, P) puts each
system's d⟨O⟩/dθ in the columns of the parameters it has (zero elsewhere). The loss is the
χ² over all K targets, χ² = (1/K) Σ_k w_k ((⟨O_k⟩ - y_k)/σ_k)², so each target counts the
same whichever system it belongs to.
"""

from __future__ import annotations

import fnmatch
import os
from typing import NamedTuple

import numpy as np

from timemachine.errors import InputError
from timemachine.fitting.loss import TargetVector, target_vector
from timemachine.system import System

__all__ = ["FitSystem", "Member", "combine_estimates", "combine_targets", "fit_members"]


class FitSystem(NamedTuple):
    """One system of a fit over several systems.

    Attributes:
        system: a ``timemachine.System``.
        x0: (N, 3) or (C, N, 3) starting positions of its chains, nm.
        targets: list of ``Target`` (``timemachine.fitting.targets``) or a target-file
            path (read with ``system.topology``).
        name: a label for its records and errors (default "system<i>").
    """

    system: System
    x0: object
    targets: object
    name: str | None = None


class Member(NamedTuple):
    """A system of the fit, resolved.

    Attributes:
        name: its label; system, x0: as given; target: its ``TargetVector`` (K_s,).
        wrt: (P_s,) indices into the system's θ of the shared parameters it has.
        cols: (P_s,) their columns in the shared θ (P,).
        full0: (P_all_s,) the system's starting θ.
    """

    name: str
    system: System
    x0: object
    target: TargetVector
    wrt: np.ndarray
    cols: np.ndarray
    full0: np.ndarray

    def full(self, theta) -> np.ndarray:
        """(P_all_s,) the system's θ with the shared θ (P,) in its fitted slots."""
        full = self.full0.copy()
        full[self.wrt] = np.asarray(theta)[self.cols]
        return full


def _patterns(wrt, where):
    if isinstance(wrt, str):
        return [wrt]
    if isinstance(wrt, (list, tuple)) and wrt and all(isinstance(w, str) for w in wrt):
        return list(wrt)
    raise InputError(
        f"{where}: a fit over several systems selects its parameters by name: wrt must be "
        f"a glob or a list of globs (int indices differ between systems), got {wrt!r}"
    )


def fit_members(systems, wrt, params=None):
    """Resolve a several-system fit: (members, the shared parameter names (P,), θ₀ (P,)).

    Args:
        systems: a non-empty list of ``FitSystem``.
        wrt: a glob or a list of globs, matched against each system's parameter names.
        params: None, or a list of (P_all_s,) starting θ per system.

    Raises:
        InputError: a bad entry (named by its index), a glob that matches no parameter of
            any system, two systems whose starting values of a shared parameter differ,
            or repeated names.
    """
    from timemachine.fitting.targets import load_targets

    if not isinstance(systems, (list, tuple)) or not systems:
        raise InputError(f"systems must be a non-empty list of FitSystem, got {systems!r}")
    patterns = _patterns(wrt, "wrt")
    if params is not None and (
        not isinstance(params, (list, tuple)) or len(params) != len(systems)
    ):
        raise InputError(
            f"params of a fit over {len(systems)} systems must be a list of one θ per "
            f"system (or None), got {type(params).__name__}"
        )
    names: list[str] = []
    theta0: list[float] = []
    origin: dict[str, tuple[str, float]] = {}
    matched = set()
    resolved = []
    for i, entry in enumerate(systems):
        if not isinstance(entry, FitSystem):
            raise InputError(
                f"systems[{i}] must be a timemachine.fitting.FitSystem(system, x0, targets), "
                f"got {type(entry).__name__}"
            )
        if not isinstance(entry.system, System):
            raise InputError(
                f"systems[{i}].system must be a timemachine.System, got "
                f"{type(entry.system).__name__}"
            )
        name = entry.name if entry.name is not None else f"system{i}"
        if not isinstance(name, str) or not name:
            raise InputError(f"systems[{i}].name must be a non-empty string, got {name!r}")
        if name in [r[0] for r in resolved]:
            raise InputError(f"systems[{i}].name = {name!r} repeats an earlier system's name")
        system = entry.system
        targets = entry.targets
        if isinstance(targets, (str, os.PathLike)):
            targets = load_targets(targets, system.topology)
        target = target_vector(targets)
        target = target._replace(labels=tuple(f"{name}:{label}" for label in target.labels))
        full0 = np.array(
            system.resolve_params(None if params is None else params[i]), dtype=np.float64
        )
        own = [p for p in patterns if fnmatch.filter(system.param_names, p)]
        matched.update(own)
        wrt_s = system.select(own) if own else np.zeros(0, dtype=np.int64)
        cols = []
        for j in wrt_s:
            pname = system.param_names[j]
            value = float(full0[j])
            if pname not in origin:
                origin[pname] = (name, value)
                names.append(pname)
                theta0.append(value)
            elif origin[pname][1] != value:
                first, v0 = origin[pname]
                raise InputError(
                    f"the shared parameter {pname} starts at {v0!r} in {first!r} but at "
                    f"{value!r} in {name!r}: the systems must come from one force field "
                    "(or pass params with equal values)"
                )
            cols.append(names.index(pname))
        resolved.append((name, system, entry.x0, target, wrt_s, np.asarray(cols, np.int64), full0))
    missing = [p for p in patterns if p not in matched]
    if missing:
        raise InputError(
            f"wrt pattern {missing[0]!r} matches no parameter of any of the systems "
            f"{[r[0] for r in resolved]}"
        )
    members = [Member(*r) for r in resolved]
    return members, tuple(names), np.asarray(theta0, dtype=np.float64)


def combine_targets(members) -> TargetVector:
    """The members' targets as one (K,) vector, in member order (no observable: each
    system evaluates its own on its own frames)."""
    targets = [m.target for m in members]
    edges = np.cumsum([0] + [t.value.shape[0] for t in targets])
    return TargetVector(
        observable=None,
        value=np.concatenate([t.value for t in targets]),
        uncertainty=np.concatenate([t.uncertainty for t in targets]),
        weight=np.concatenate([t.weight for t in targets]),
        labels=tuple(label for t in targets for label in t.labels),
        slices=tuple(slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)),
    )


def combine_estimates(estimates, members, n_params, labels, names):
    """One ``Estimate`` of the members' independent estimates: ⟨O⟩ (K,) stacked, its
    covariance block-diagonal, J and its standard errors (K, P) with each system's columns
    in the shared parameters' places (zero where a system lacks one)."""
    from timemachine.fitting.equilibrium_estimate import Estimate
    from timemachine.fitting.estimators import GradientEstimate

    k = sum(e.mean.shape[0] for e in estimates)
    cov = np.zeros((k, k))
    grad = np.zeros((k, n_params))
    stderr = np.zeros((k, n_params))
    lo = 0
    for est, m in zip(estimates, members, strict=True):
        hi = lo + est.mean.shape[0]
        cov[lo:hi, lo:hi] = est.cov
        grad[lo:hi, m.cols] = est.gradient.gradient
        stderr[lo:hi, m.cols] = est.gradient.stderr
        lo = hi
    mean = np.concatenate([e.mean for e in estimates])
    gradient = GradientEstimate(
        value=mean,
        value_stderr=np.sqrt(np.diag(cov)),
        gradient=grad,
        stderr=stderr,
        n_samples=int(sum(e.gradient.n_samples for e in estimates)),
        labels=tuple(labels),
        param_names=tuple(names),
        method=estimates[0].gradient.method,
        diagnostics=None,
    )
    return Estimate(mean, cov, gradient, None, {})
