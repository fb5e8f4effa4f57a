// Counter-based noise: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011) and Box-Muller, so the standard normal n_t of atom i is a pure
// function of (seed, step, replica, atom): any chunking or resume gives the same bits.
//
// This stream is the CUDA backend's own; the JAX backend draws from jax.random. The same
// numbers come from timemachine.backends.noise.philox_normal (NumPy), which lets a JAX
// reference run consume exactly the CUDA noise.
#pragma once
#include "tm_common.cuh"

namespace tmk {

struct U32x4 {
  u32 v[4];
};

TM_HD void mulhilo32(u32 a, u32 b, u32* hi, u32* lo) {
  const u64 p = (u64)a * (u64)b;
  *hi = (u32)(p >> 32);
  *lo = (u32)p;
}

TM_HD U32x4 philox4x32_10(U32x4 ctr, u32 k0, u32 k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    u32 hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, ctr.v[0], &hi0, &lo0);
    mulhilo32(0xCD9E8D57u, ctr.v[2], &hi1, &lo1);
    U32x4 next;
    next.v[0] = hi1 ^ ctr.v[1] ^ k0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ ctr.v[3] ^ k1;
    next.v[3] = lo0;
    ctr = next;
  }
  return ctr;
}

// a double in (0, 1) from 53 bits of two words
TM_HD double uniform_open(u32 hi, u32 lo) {
  const u64 bits = ((u64)hi << 21) | (u64)(lo >> 11);
  return ((double)bits + 0.5) * (1.0 / 9007199254740992.0);
}

// the three standard normals of atom `atom` at (seed, step, replica)
TM_HD void atom_normals(u64 seed, i64 step, u64 replica, i64 atom, double* n) {
  const double two_pi = 6.283185307179586;
  for (int call = 0; call < 2; ++call) {
    U32x4 ctr;
    ctr.v[0] = (u32)(2 * atom + call);
    ctr.v[1] = (u32)replica;
    ctr.v[2] = (u32)((u64)step & 0xFFFFFFFFull);
    ctr.v[3] = (u32)((u64)step >> 32);
    const U32x4 w = philox4x32_10(ctr, (u32)(seed & 0xFFFFFFFFull), (u32)(seed >> 32));
    const double u0 = uniform_open(w.v[0], w.v[1]);
    const double u1 = uniform_open(w.v[2], w.v[3]);
    const double rad = tm_sqrt(-2.0 * tm_log(u0));
    const double ang = two_pi * u1;
    n[2 * call] = rad * tm_cos(ang);
    if (call == 0) n[1] = rad * tm_sin(ang);
  }
}

}  // namespace tmk
