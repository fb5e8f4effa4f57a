"""Where the time of a step goes: the parts of a plain and of a sensitivity step, timed alone.

For one case and P (the first P torsion barrier types, as in ``derivatives``), each part
is jit-compiled on its own and timed as the best of ``repeats`` batches of calls (each
batch at least ``min_batch_s`` long, so one preemption on a shared machine does not decide
the number):

``gradient``            ∇_x E, the whole force field, closed form (``structured.gradient_fn``,
                        what a plain step costs, almost)
``gradient_autodiff``   the same by ``jax.grad`` of the energy (the reference)
``gradient/<kind>``     ∇_x E of each energy term alone by ``jax.grad`` (bonds, angles, torsions,
                        nonbonded all-pairs, OBC2, ...): which term dominates
``zeta``                ζ = H·dx/dθ + ∂²E/∂x∂θ for all P (``make_zeta``, structured)
``gradient_and_zeta``   both from one fused call (``make_gradient_and_zeta``)
``plain_step``          one step of ``timemachine.integrator.run`` (from a run of steps)
``sensitivity_step``    one step of ``simulate(method="exact")`` (from a run of steps)

``overhead_ms`` is sensitivity_step - gradient_and_zeta (simulate takes ∇E and ζ from the
one fused call): the propagation of dx/dθ, dv/dθ
and the loop. ``zeta_in_gradients`` is ζ's cost in units of one gradient, the number that
decides how the engine compares with 2P finite-difference trajectories.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.structured import gradient_fn

__all__ = ["profile_step", "time_call"]


def time_call(fn, *args, repeats: int = 3, min_batch_s: float = 0.2) -> float:
    """Seconds per call of the jitted ``fn(*args)`` (compiled first, not timed): the best
    of ``repeats`` batches, each batch as many calls as fill ``min_batch_s``."""
    from timemachine.bench.plain_md import best_of

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(min_batch_s / once))

    def batch():
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)

    wall, _, _ = best_of(batch, repeats)
    return wall / calls


def profile_step(case, n_params: int, integrator, repeats: int = 3, n_steps: int = 10) -> dict:
    """Time the parts of a plain and of an exact sensitivity step on ``case``.

    Args:
      case: a ``timemachine.bench.systems.Case``.
      n_params: P, the first P ``torsion/*/k*`` parameters (fewer if the system has fewer).
      integrator: ``tm.LangevinIntegrator``.
      repeats: best of this many batches per part.
      n_steps: steps of the runs that time the whole plain and sensitivity steps.

    Returns:
      dict: case, N, P, ``ms`` {part: ms per call}, zeta_in_gradients,
      step_in_gradients, overhead_ms, and ``dominant_term`` (the term kind whose gradient
      takes longest).
    """
    from timemachine.bench.plain_md import bench_ours
    from timemachine.bench.scaling import step_cost
    from timemachine.sensitivity.zeta import make_gradient_and_zeta, make_zeta

    system = case.system
    wrt = system.select("torsion/*/k*")[:n_params]
    x = jnp.asarray(case.positions)
    theta = jnp.asarray(system.params)
    dx = jnp.asarray(np.random.default_rng(0).normal(scale=1e-4, size=(wrt.size,) + x.shape))
    ms = {}
    energy = system.energy_fn()
    ms["gradient"] = 1e3 * time_call(jax.jit(gradient_fn(system)), x, theta, repeats=repeats)
    ms["gradient_autodiff"] = 1e3 * time_call(jax.jit(jax.grad(energy)), x, theta, repeats=repeats)
    for term in system.terms:
        key = f"gradient/{term.kind}"
        # several terms of one kind (rare) are timed together
        same = [t for t in system.terms if t.kind == term.kind]
        if key in ms:
            continue
        part = jax.jit(jax.grad(lambda y, th, ts=tuple(same): sum(t.energy(y, th) for t in ts)))
        ms[key] = 1e3 * time_call(part, x, theta, repeats=repeats)
    ms["zeta"] = 1e3 * time_call(jax.jit(make_zeta(system, wrt)), x, theta, dx, repeats=repeats)
    fused = jax.jit(make_gradient_and_zeta(system, wrt))
    ms["gradient_and_zeta"] = 1e3 * time_call(fused, x, theta, dx, repeats=repeats)
    plain = bench_ours(case, integrator, max(n_steps, 20), repeats)
    ms["plain_step"] = 1e-3 * plain["us_per_step"]
    ms["sensitivity_step"] = 1e3 * step_cost(case, integrator, wrt, n_steps, repeats)["s_per_step"]
    terms = {k: v for k, v in ms.items() if k.startswith("gradient/")}
    return {
        "case": case.name,
        "N": case.n_atoms,
        "P": int(wrt.size),
        "ms": ms,
        "zeta_in_gradients": ms["zeta"] / ms["gradient"],
        "step_in_gradients": ms["sensitivity_step"] / ms["gradient"],
        "overhead_ms": ms["sensitivity_step"] - ms["gradient_and_zeta"],
        "dominant_term": max(terms, key=terms.get).split("/", 1)[1] if terms else None,
    }
