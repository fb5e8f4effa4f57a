"""H·t through one dense symmetric Hessian in column tiles: the pure-JAX path of the
structured ζ (``bonded="jax"``)."""

import jax.numpy as jnp
import numpy as np


def dense_pair_product(a, b, dc, ext, tiles, evals, n_block, p, n):
    """H·t of the pair forms and the bonded blocks through one dense symmetric Hessian,
    (P, 3, N): the pure-JAX path (``bonded="jax"``).

    G = C - (bonded blocks), rows/columns ordered (a, i): C[ai, bj] = A d_a d_b + B δ_ab.
    The Hessian is diag_i(Σ_j C_ij) - G; the bonded part drops out of the row sums
    (translation invariance), so one product [t | E]·G gives both t·G and Σ_j C_ij.
    """
    blocks = (
        -jnp.concatenate([e["block"].reshape(-1) for e in evals if "block" in e])
        if n_block
        else None
    )
    # G by column tiles of atoms J: each (3N, 3|J|) tile is written, scattered into and
    # multiplied while it is in cache, where the whole (3N, 3N) G would go to memory
    pieces = []
    for j0, j1, local, entries in tiles:
        cols = slice(j0, j1)
        g = jnp.stack(
            [
                jnp.stack(
                    [
                        a[:, cols] * dc[i][:, cols] * dc[j][:, cols]
                        + (b[:, cols] if i == j else 0.0)
                        for j in range(3)
                    ],
                    1,
                )
                for i in range(3)
            ]
        ).reshape(-1)  # (3, N, 3, w) flattened; stack, not concatenate, keeps the GEMM fast
        if local.size:  # one tile (small N) takes every entry, in order: no gather
            g = g.at[local].add(blocks if len(tiles) == 1 else blocks[entries])
        pieces.append((ext @ g.reshape(3 * n, 3 * (j1 - j0))).reshape(-1, 3, j1 - j0))
    prod = jnp.concatenate(pieces, axis=2).reshape(-1, 3 * n)
    rowsum = prod[p:].reshape(3, 3, n)  # [b, a, i] = Σ_j C_ij[a, b]
    t3 = ext[:p].reshape(p, 3, n)
    hess_t = sum(rowsum[k][None, :, :] * t3[:, k : k + 1, :] for k in range(3))
    return hess_t - prod[:p].reshape(p, 3, n)


# Atoms per column tile of G: a (3N, 3·64) float64 tile is 2.7 MiB at N = 582 (villin),
# where the whole (3N, 3N) G is 23 MiB. Measured on villin, 2-core EPYC: the tiled ∇E+ζ
# took 12-18 ms per call at P = 79 against 13-32 ms for the untiled one, run alternately.
TILE_ATOMS = 64


def column_tiles(n, block_flat):
    """Static column tiles of G for atom columns [j0, j1): (j0, j1, flat indices into the
    (3, N, 3, j1 - j0) tile, indices into the concatenated bonded block entries) of each
    entry of ``block_flat`` that falls in the tile."""
    row, col = np.divmod(block_flat, 3 * n)
    b, j = np.divmod(col, n)
    out = []
    for j0 in range(0, n, TILE_ATOMS):
        j1 = min(j0 + TILE_ATOMS, n)
        entries = np.flatnonzero((j >= j0) & (j < j1))
        w = j1 - j0
        local = row[entries] * 3 * w + b[entries] * w + (j[entries] - j0)
        out.append((j0, j1, local, entries))
    return out
