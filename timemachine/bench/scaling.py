"""Cost of a sensitivity step against P and N, and memory of exact vs window mode.

A sensitivity step is one step of ``tm.sensitivity.simulate(method="exact")``: the
Langevin step plus ζ = H·dx/dθ + ∂²E/∂x∂θ for all P parameters and the propagation of
dx/dθ. Its time is divided by the time of a plain step (``timemachine.integrator.run``,
same system) to give the cost in plain steps. θ is drawn in a fixed order: the torsion
barriers (``torsion/*/k*``), then torsion phases, charges, LJ σ and ε, GB radii and
scales, angles and bonds, so P can reach 200 on villin.

Memory: ``expected_state_bytes`` of exact and window mode (window length k from 1 to the
default ``window_size``), next to ``state_memory_bytes`` of a state actually allocated by
``exact_init``/``window_init``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["parameter_pool", "step_cost", "scaling_in_p", "scaling_in_n", "memory_table"]

_ORDER = (
    "torsion/*/k*",
    "torsion/*/phase*",
    "charge/*",
    "sigma/*",
    "epsilon/*",
    "gb/*",
    "angle/*",
    "bond/*",
)


def parameter_pool(system) -> np.ndarray:
    """θ indices in the fixed order above, each once (int array)."""
    seen, out = set(), []
    for pattern in _ORDER:
        try:
            idx = system.select(pattern)
        except ValueError:  # a kind this system lacks (no GB in vacuum)
            continue
        for i in idx:
            if int(i) not in seen:
                seen.add(int(i))
                out.append(int(i))
    return np.asarray(out, dtype=np.int64)


def _per_step(run, n_steps: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``run(n)``, from runs of n and 2n steps: the
    difference cancels what a call costs apart from its steps (argument checks, copies,
    the saved frame), which on 33 atoms is several steps' worth. Falls back to the 2n run
    alone if noise makes the difference non-positive."""
    from timemachine.bench.plain_md import best_of

    run(n_steps), run(2 * n_steps)  # compiled (a plain run compiles per step count)
    wall_1, cpu_1, _ = best_of(lambda: run(n_steps), repeats)
    wall_2, cpu_2, _ = best_of(lambda: run(2 * n_steps), repeats)
    if wall_2 <= wall_1:
        return wall_2 / (2 * n_steps), cpu_2 / (2 * n_steps)
    return (wall_2 - wall_1) / n_steps, max(cpu_2 - cpu_1, 0.0) / n_steps


def _plain_step_s(case, integrator, n_steps, repeats=3):
    from timemachine.bench.plain_md import _gradient_fn, _run_ours, initial_velocities

    gradient_fn, v0 = _gradient_fn(case.system), initial_velocities(case, integrator)

    def run(n):
        return _run_ours(case, integrator, n, gradient_fn, v0)

    return _per_step(run, n_steps, repeats)[0]


def step_cost(case, integrator, wrt, n_steps: int, repeats: int = 3) -> dict:
    """Seconds per exact sensitivity step for θ indices ``wrt`` (after compiling), from
    the best of ``repeats`` runs of ``n_steps`` and of 2 · ``n_steps`` (``_per_step``)."""
    from timemachine.bench.derivatives import compiled_sensitivity_run

    go, compile_s = compiled_sensitivity_run(case, integrator, wrt)
    wall, cpu = _per_step(go, n_steps, repeats)
    return {"s_per_step": wall, "cpu_s_per_step": cpu, "compile_s": compile_s}


def scaling_in_p(case, integrator, p_values, n_steps: int, plain_steps: int) -> list[dict]:
    """Sensitivity-step cost for each P in ``p_values`` (capped at the pool size)."""
    pool = parameter_pool(case.system)
    plain = _plain_step_s(case, integrator, plain_steps)
    rows = []
    for p in p_values:
        if p > pool.size:
            rows.append({"case": case.name, "P": int(p), "skipped": f"only {pool.size} parameters"})
            continue
        cost = step_cost(case, integrator, pool[:p], n_steps)
        rows.append(
            {
                "case": case.name,
                "N": case.n_atoms,
                "P": int(p),
                "ms_per_step": 1e3 * cost["s_per_step"],
                "plain_ms_per_step": 1e3 * plain,
                "plain_steps_per_step": cost["s_per_step"] / plain,
                "compile_s": cost["compile_s"],
            }
        )
    return rows


def scaling_in_n(cases, integrator, n_params: int, n_steps: int, plain_steps: int) -> list[dict]:
    """Sensitivity-step cost at fixed P for each case (growing N)."""
    rows = []
    for case in cases:
        rows.extend(scaling_in_p(case, integrator, [n_params], n_steps, plain_steps))
    return rows


def memory_table(n_atoms: int, n_params: int, integrator, windows=None) -> list[dict]:
    """Bytes of the propagation state, exact and window mode, against the window k.

    Each row has ``expected_bytes`` (``expected_state_bytes``) and ``allocated_bytes``
    (``state_memory_bytes`` of a state built by ``exact_init``/``window_init``).
    """
    from timemachine.sensitivity.propagation import (
        exact_init,
        expected_state_bytes,
        state_memory_bytes,
        window_init,
        window_size,
    )

    default_k = window_size(integrator)
    if windows is None:
        windows = sorted({1, 10, 100, 1000, default_k})
    x = np.zeros((n_atoms, 3))
    rows = [
        {
            "method": "exact",
            "window": None,
            "N": n_atoms,
            "P": n_params,
            "expected_bytes": expected_state_bytes("exact", n_atoms, n_params)["total"],
            "allocated_bytes": state_memory_bytes(exact_init(x, x, n_params))["total"],
        }
    ]
    for k in windows:
        expected = expected_state_bytes("window", n_atoms, n_params, k)["total"]
        # allocating more than ~2 GiB only to measure it would crowd a shared machine
        allocated = (
            state_memory_bytes(window_init(x, x, n_params, int(k)))["total"]
            if expected < 2 * 2**30
            else None
        )
        rows.append(
            {
                "method": "window",
                "window": int(k),
                "default_window": int(k) == default_k,
                "N": n_atoms,
                "P": n_params,
                "expected_bytes": expected,
                "allocated_bytes": allocated,
            }
        )
    return rows
