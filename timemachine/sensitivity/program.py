"""The one compiled chunk program: blocks of sensitivity steps inside ``jax.jit``.

``make_chunk`` writes the step loop once: ``save_every`` steps of ``exact_step`` or
``window_step`` (``timemachine.sensitivity.propagation``) per block, many blocks per call,
the last state of each block saved as a frame. ``chunk_program`` jit-compiles it for
``simulate``; ``replica_program`` jit-compiles its ``jax.vmap`` over replicas for
``timemachine.fitting.run_replicas``, so a replica runs the same step as ``simulate``
(docs/design.md, "Performance principles", "One compiled program per chunk").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from timemachine import neighbours
from timemachine.precision import cast_floats, cast_system
from timemachine.sensitivity import zeta as zeta_module
from timemachine.sensitivity.propagation import exact_init, exact_step, window_init, window_step

__all__ = [
    "backend_program",
    "chunk_program",
    "frame_bytes",
    "make_chunk",
    "replica_program",
    "start_state",
]


def frame_bytes(n_atoms: int, n_params: int) -> int:
    """Bytes of one saved frame in the chunk program's buffers: x and v (N, 3), dx/dθ
    (P, N, 3), the step, v after the next step (N, 3) and the potential energy, float64."""
    return 8 * (2 * n_atoms * 3 + n_params * n_atoms * 3 + 4)


def start_state(method, x, v, n_params, k):
    """The propagation state at (x, v) with dx/dθ = dv/dθ = 0: ``exact_init`` for
    method "exact", else ``window_init`` with a window of k steps."""
    if method == "exact":
        return exact_init(x, v, n_params)
    return window_init(x, v, n_params, k)


def make_chunk(system, wrt_key, zeta_method, method, bonded="auto", dtype="float64"):
    """The chunk function (not compiled) for one (system, wrt, ζ method, mode, dtype).

    ``chunk(capacity, state, n_blocks, save_every, θ, coeffs, wcoeffs, seed, replica)``
    runs ``n_blocks <= capacity`` blocks of ``save_every`` steps from ``state`` and
    returns ``(final state, frames, look)``: frames are ``capacity``-long buffers of
    (x (N, 3) nm, v (N, 3) nm/ps, dx/dθ (P, N, 3), step, v after the block's first step,
    potential energy kJ/mol), the first ``n_blocks`` of them written; look is the state
    one step past the final one (its v is v_{t+1} of the last frame). Both counts are
    traced: the loops are ``while`` loops whose trip count XLA cannot see, so it never
    removes or unrolls a loop of one trip (which would fuse the step differently and
    change its bits). The step is therefore the same machine code for every chunking and
    every continuation, and only ``capacity`` (the frame buffers' length) is compiled for.

    ``dtype`` float32 (``timemachine.precision``) casts the terms' constants, and on entry
    the state, θ and coefficients, so the whole step and its frames are float32; the
    bonded terms then run in JAX (the C++ custom call is float64 only).
    """
    dtype = np.dtype(dtype)
    if dtype != np.float64:
        system, bonded = cast_system(system, dtype), "jax"
    energy_fn = system.energy_fn()
    gz_fn = zeta_module.make_gradient_and_zeta(
        system, np.asarray(wrt_key, dtype=np.int64), method=zeta_method, bonded=bonded
    )

    uses_lists = neighbours.has_neighbours(system)

    def chunk(capacity, state, n_blocks, save_every, theta, coeffs, wcoeffs, seed, replica):
        state, theta, coeffs, wcoeffs = cast_floats((state, theta, coeffs, wcoeffs), dtype)
        # Verlet lists (timemachine.neighbours), carried through the loops; () without
        period = neighbours.period(system, coeffs.dt)
        lists0 = neighbours.build(system, state.x) if uses_lists else ()

        def step(s, lists):
            if uses_lists:
                lists = neighbours.step_lists(system, lists, s.x, s.step, period)

            # ∇E and ζ from one fused call: the structured path gets ∇E from the same pair
            # scalars as ζ, which saves about one gradient per step over separate calls
            def gz(y, dx):
                return gz_fn(y, theta, dx, lists) if uses_lists else gz_fn(y, theta, dx)

            if method == "exact":
                s = exact_step(None, None, coeffs, s, seed, replica, gradient_and_zeta_fn=gz)
            else:
                s = window_step(
                    None, None, coeffs, wcoeffs, s, seed, replica, gradient_and_zeta_fn=gz
                )
            return s, lists

        def one(i, carry):
            s, lists, v_first = carry
            s, lists = step(s, lists)
            # v after the block's first step is v_{t+1} of the previous block's frame
            return s, lists, jnp.where(i == 0, s.v, v_first)

        def block(j, carry):
            s, lists, frames = carry
            s, lists, v_first = jax.lax.fori_loop(
                0, save_every, one, (s, lists, jnp.zeros_like(s.v))
            )
            if uses_lists:  # lists fresh at the frame (the next step would build the same)
                lists = neighbours.step_lists(system, lists, s.x, s.step, period)
                energy = energy_fn(s.x, theta, lists)
            else:
                energy = energy_fn(s.x, theta)
            saved = (s.x, s.v, s.dx_dtheta, s.step, v_first, energy)
            frames = tuple(
                jax.lax.dynamic_update_index_in_dim(buf, value, j, axis=0)
                for buf, value in zip(frames, saved, strict=True)
            )
            return s, lists, frames

        empty = tuple(
            jnp.zeros((capacity,) + jnp.shape(a), jnp.result_type(a))
            for a in (state.x, state.v, state.dx_dtheta, state.step, state.v, state.x[0, 0])
        )
        final, lists, frames = jax.lax.fori_loop(0, n_blocks, block, (state, lists0, empty))

        # v_{t+1} of the last frame (the next step's, same noise), for its kinetic energy.
        # It is the whole next step, in a loop of (traced) trip count 1, and all of its
        # state is returned (nothing of it can be pruned), so that XLA compiles it as the
        # step inside the next chunk's loop and its v has the same bits.
        once = jnp.minimum(save_every, 1)
        look, _ = jax.lax.fori_loop(0, once, lambda i, c: step(*c), (final, lists))
        return final, frames, look

    return chunk


@functools.lru_cache(maxsize=8)
def chunk_program(system, wrt_key, zeta_method, method, bonded="auto", dtype="float64"):
    """``make_chunk`` jit-compiled, ``capacity`` static: the program ``simulate`` runs."""
    chunk = make_chunk(system, wrt_key, zeta_method, method, bonded, dtype)
    return jax.jit(chunk, static_argnums=(0,))


@functools.lru_cache(maxsize=8)
def replica_program(system, wrt_key, zeta_method, method, dtype="float64"):
    """``make_chunk`` vmapped over replicas and jit-compiled, ``capacity`` static.

    ``run(capacity, states, n_blocks, save_every, θ, coeffs, wcoeffs, seed, replicas)``
    takes M states (leading axis M) and (M,) replica indices, the other arguments shared,
    and returns ``(final states, frames)`` with frames as in ``make_chunk``, each with a
    leading axis M. The look-ahead step is not returned, so XLA may drop it.
    """
    chunk = make_chunk(system, wrt_key, zeta_method, method, dtype=dtype)

    def run(capacity, states, n_blocks, save_every, theta, coeffs, wcoeffs, seed, replicas):
        batched = jax.vmap(
            functools.partial(chunk, capacity), in_axes=(0, None, None, None, None, None, None, 0)
        )
        final, frames, _ = batched(
            states, n_blocks, save_every, theta, coeffs, wcoeffs, seed, replicas
        )
        return final, frames

    return jax.jit(run, static_argnums=(0,))


def backend_program(backend, system, wrt, zeta_method, method, dtype="float64"):
    """The chunk program of ``backend``: ``chunk_program`` for "jax", the CUDA kernels'
    ``cupy_backend.make_program`` (same call and results; ζ is exact there; float64
    only) for "cuda"."""
    if backend == "cuda":
        from timemachine.backends import cupy_backend

        return cupy_backend.make_program(system, wrt, method)
    key = tuple(int(i) for i in wrt)
    return chunk_program(system, key, zeta_method, method, dtype=np.dtype(dtype).name)
