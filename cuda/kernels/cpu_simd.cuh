// What the CPU custom calls (cuda/kernels/host/tm_xla_cpu.cpp, tm_xla_cpu_gb.cpp) share:
// the SIMD vector of W doubles with the overloads that let the shared per-term templates
// (cutoff.cuh, gbsa.cuh, nonbonded.cuh) run on it, exp and log without library calls,
// reusable scratch, and the split of a call's work among XLA's intra-op threads.
// Host only: no GPU build includes it. It sits beside the kernel headers so that it is
// hashed into the libraries' cache keys and shipped with them.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

// W doubles: one AVX2 register (GCC splits wider vectors through the stack on AVX2
// machines, with store-forwarding stalls)
constexpr int W = 4;
typedef double vd __attribute__((vector_size(W * sizeof(double))));
typedef long long vl __attribute__((vector_size(W * sizeof(double))));

namespace tmk {
// SIMD overloads the shared templates find when their scalar type is vd (declared before
// the headers: a vector type has no namespace for argument-dependent lookup)
inline vd zero_like(vd) { return vd{}; }
inline vd sel(vl m, vd a, vd b) { return (vd)(((vl)a & m) | ((vl)b & ~m)); }
inline vd tm_sqrt(vd a) {
  vd r;
  for (int l = 0; l < W; ++l) r[l] = __builtin_sqrt(a[l]);  // vsqrtpd with -fno-math-errno
  return r;
}
inline vd tm_fabs(vd a) { return sel(a < 0.0, -a, a); }
inline vd tm_max(vd a, vd b) { return sel(a >= b, a, b); }
inline vd tm_select(vl m, vd a, vd b) { return sel(m, a, b); }

// e^x: x = k ln2 + r, |r| ≤ ln2/2, Taylor to r^13 (truncation < 5e-18 relative), times 2^k.
// Below -708 (where e^x is subnormal) it returns 0.
inline vd tm_exp(vd x) {
  const double magic = 6755399441055744.0;  // 1.5 · 2^52: adding it rounds to an integer
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  const vl under = x < -708.0;
  const vd xc = sel(under, vd{} - 708.0, sel(x > 709.0, vd{} + 709.0, x));
  const vd t = xc * 1.4426950408889634 + magic;
  const vd k = t - magic;
  const vd r = (xc - k * ln2_hi) - k * ln2_lo;
  static const double c[14] = {1.0,
                               1.0,
                               1.0 / 2,
                               1.0 / 6,
                               1.0 / 24,
                               1.0 / 120,
                               1.0 / 720,
                               1.0 / 5040,
                               1.0 / 40320,
                               1.0 / 362880,
                               1.0 / 3628800,
                               1.0 / 39916800,
                               1.0 / 479001600,
                               1.0 / 6227020800.0};
  vd p = vd{} + c[13];
  for (int m = 12; m >= 0; --m) p = p * r + c[m];
  const vl ki = (vl)t - (vl)(vd{} + magic);  // k as an integer: the low bits of t
  const vd scale = (vd)((ki + 1023) << 52);
  return sel(under, vd{}, p * scale);
}

// ln x for normal x > 0: x = 2^e m, m in [√½, √2), ln m = 2 atanh(f), f = (m-1)/(m+1),
// |f| ≤ 0.172, the series to f^21 (truncation < 3e-17 relative)
inline vd tm_log(vd x) {
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  const vl bits = (vl)x;
  vl e = (bits >> 52) - 1023;
  vd m = (vd)((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);
  const vl big = m > 1.4142135623730951;
  m = sel(big, m * 0.5, m);
  e -= big;  // big is -1 where true
  const vd f = (m - 1.0) / (m + 1.0);
  const vd s = f * f;
  vd p = vd{} + 2.0 / 21;
  for (int k = 9; k >= 1; --k) p = p * s + 2.0 / (2 * k + 1);
  const vd ln_m = 2.0 * f + f * s * p;
  const vd ed = __builtin_convertvector(e, vd);
  return ed * ln2_hi + (ln_m + ed * ln2_lo);
}
// the form cutoff.cuh's templates call
inline vd where(vl mask, vd a, vd b) { return sel(mask, a, b); }
}  // namespace tmk

namespace {

inline vd load(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
inline void add_to(double* p, vd v) { store(p, load(p) + v); }
inline double hsum(vd v) {
  double s = v[0];
  for (int l = 1; l < W; ++l) s += v[l];
  return s;
}
inline vd bcast(double a) { return vd{} + a; }

// 64-byte aligned scratch that keeps its capacity between calls
struct Scratch {
  double* p = nullptr;
  size_t cap = 0;
  double* get(size_t n) {
    if (n > cap) {
      std::free(p);
      cap = (n + 7) / 8 * 8;
      p = static_cast<double*>(std::aligned_alloc(64, cap * sizeof(double)));
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};
// run work(0..units-1) on this thread and on up to units - 1 tasks of XLA's intra-op pool.
// Units are claimed from a counter, so a task that starts late (the pool is busy) finds
// nothing left and returns: the caller never waits for a unit nobody has claimed.
void parallel_units(xla::ffi::ThreadPool& pool, int units, const std::function<void(int)>& work) {
  struct State {
    std::atomic<int> next{0}, done{0};
    int units = 0;
    const std::function<void(int)>* work = nullptr;
  };
  auto st = std::make_shared<State>();
  st->units = units;
  st->work = &work;
  auto run = [](State& s) {
    for (int k; (k = s.next.fetch_add(1, std::memory_order_relaxed)) < s.units;) {
      (*s.work)(k);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int helpers = std::min<int64_t>(pool.num_threads(), units) - 1;
  for (int h = 0; h < helpers; ++h) pool.Schedule([st, run] { run(*st); });
  run(*st);
  while (st->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace
