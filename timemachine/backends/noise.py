"""The CUDA backend's noise stream in NumPy: Philox4x32-10 and Box-Muller.

``philox_normal(seed, step, n_atoms, replica)`` gives the same standard normals n_t as
``cuda/kernels/philox.cuh`` (to the last bit or two of libm's log/cos/sin), so a JAX
reference run can consume exactly the noise the CUDA kernels draw. The JAX backend's own
stream (``timemachine.integrator.langevin.noise``, jax.random) is a different one: the
two backends agree on noise-free trajectories, or when both are fed this stream.

Counter (2·atom + call, replica, step mod 2³², step div 2³²), key (seed mod 2³²,
seed div 2³²); call 0 gives the x and y components, call 1 the z component.
"""

from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key):
    """Philox4x32-10 of counters ``ctr`` (..., 4) uint32 under ``key`` (2,) uint32 → (..., 4)."""
    c = [np.asarray(ctr, dtype=np.uint32)[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    with np.errstate(over="ignore"):
        for rnd in range(10):
            if rnd:
                k0, k1 = np.uint32(k0 + _W0), np.uint32(k1 + _W1)
            p0, p1 = _M0 * c[0], _M1 * c[2]
            hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
            hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
            c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return np.stack([x.astype(np.uint32) for x in c], axis=-1)


def _uniform_open(hi, lo):
    bits = (hi.astype(np.uint64) << np.uint64(21)) | (lo.astype(np.uint64) >> np.uint64(11))
    return (bits.astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def philox_normal(seed: int, step: int, n_atoms: int, replica: int = 0) -> np.ndarray:
    """Standard normals (n_atoms, 3) of the CUDA backend at (seed, step, replica)."""
    seed, step, replica = int(seed), int(step), int(replica)
    atoms = np.arange(n_atoms, dtype=np.uint64)
    out = np.empty((n_atoms, 3))
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    for call in range(2):
        ctr = np.empty((n_atoms, 4), dtype=np.uint32)
        ctr[:, 0] = ((np.uint64(2) * atoms + np.uint64(call)) & _MASK32).astype(np.uint32)
        ctr[:, 1] = replica & 0xFFFFFFFF
        ctr[:, 2] = step & 0xFFFFFFFF
        ctr[:, 3] = (step >> 32) & 0xFFFFFFFF
        w = philox4x32_10(ctr, key)
        u0 = _uniform_open(w[:, 0], w[:, 1])
        u1 = _uniform_open(w[:, 2], w[:, 3])
        rad = np.sqrt(-2.0 * np.log(u0))
        ang = 6.283185307179586 * u1
        out[:, 2 * call] = rad * np.cos(ang)
        if call == 0:
            out[:, 1] = rad * np.sin(ang)
    return out
