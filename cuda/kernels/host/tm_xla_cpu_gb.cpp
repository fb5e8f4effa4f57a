// XLA FFI custom call for the CPU: the plain-MD gradient of the all-pairs terms, OBC2
// (no cutoff) and LJ + Coulomb (no cutoff, with exclusions), in three passes over the
// unordered pairs, with the per-term maths of gbsa.cuh and nonbonded.cuh.
//
// Why: in XLA on CPU these terms are a few dozen (N, N) elementwise arrays per step, each
// written to memory and read back (villin's plain step was 1.8x OpenMM CPU's native
// GBSAOBCForce). Here every pair quantity lives in registers, each unordered pair is
// evaluated once for both of its atoms, and W pairs at a time are one SIMD operation.
//
// The passes (gbsa.cuh, with c_i = β_i b'_i or_i):
//   1. ψ_i = or_i Σ_j T(r, or_i, sr_j) [r + sr_j ≥ or_i]          → B_i = b(ψ_i), b'_i
//   2. β_i = e'(B_i) + Σ_j q_i q_j ∂h/∂B_i;   g += q_i q_j h_r d/r + φ'_LJC d/r  → c_i
//   3. g_k += Σ_j (c_k T'_kj + c_j T'_jk) d_kj / r
// T, h, e and b are gbsa.cuh's gb_integral, gb_pair, gb_self and gb_born, evaluated with
// Jets whose values are SIMD vectors of W pairs (the same templates the CUDA kernels and
// the host build use); φ'/r is nonbonded.cuh's lj_coulomb_d1_over_r.
//
// Determinism: the rows i of the upper triangle (pairs j > i) are dealt to UNITS fixed
// units (row i to unit i mod UNITS); each unit sums into its own per-atom arrays, rows in
// increasing order, and the units' arrays are added in unit order. The units are shared
// among XLA's intra-op threads, so the result is bitwise the same on any number of them.
//
// exp and log of W lanes are evaluated by polynomials (cpu_simd.cuh) (about 1 ulp; glibc's scalar
// functions would leave the loop scalar): the results agree with jax.grad of the JAX
// reference to round-off (≤ 1e-12 relative, tests/test_xla_cpu_gb.py), not bitwise.
//
// Operands (built once per System in timemachine/backends/xla_cpu_gb.py):
//   x (N,3) f64; GB: q, radius, scale (N) f64, or all empty (no OBC2);
//   LJ + Coulomb: q, sigma, epsilon (N) f64, or all empty (no all-pairs LJ + Coulomb);
//   excl_start (N+1) i32, excl (E) i32: the excluded partners j > i of row i, increasing;
//   attributes pre = -k_GB (1/ε_in - 1/ε_out), cache_bytes: the most memory pass 1 may
//   keep for pass 3 (8 N² bytes; 0: pass 3 evaluates the integrals again).
// Result: grad (N, 3), kJ/mol/nm (overwritten).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../cpu_simd.cuh"  // vd, vl, W; exp and log of vd; Scratch, parallel_units
#include "../gbsa.cuh"
#include "../nonbonded.cuh"

namespace ffi = xla::ffi;

namespace tmk {
// Jets of vd: the branch of max and |.| picked lane by lane
template <int K>
inline Jet<vd, K> sel(vl m, const Jet<vd, K>& a, const Jet<vd, K>& b) {
  Jet<vd, K> r;
  r.v = sel(m, a.v, b.v);
  for (int k = 0; k < K; ++k) r.d[k] = sel(m, a.d[k], b.d[k]);
  return r;
}
template <int K>
inline Jet<vd, K> tm_fabs(const Jet<vd, K>& a) {
  return sel(a.v < 0.0, -a, a);
}
template <int K>
inline Jet<vd, K> tm_max(const Jet<vd, K>& a, const Jet<vd, K>& b) {
  return sel(a.v >= b.v, a, b);
}
}  // namespace tmk

namespace {

using tmk::Jet;
using tmk::sel;

constexpr int UNITS = 16;  // fixed, so that the sums do not depend on the thread count

template <int K>
inline Jet<vd, K> seed(vd v, int k) {  // tangent k on (k < 0: a constant)
  Jet<vd, K> a;
  a.v = v;
  for (int c = 0; c < K; ++c) a.d[c] = c == k ? bcast(1.0) : vd{};
  return a;
}

thread_local Scratch t_soa, t_units, t_cache, t_rows;

// per-atom arrays, structure of arrays, padded by W far-away atoms so that a block of W
// partners never reads past the end (their lanes are masked off)
struct Atoms {
  int64_t n;
  const double *x, *y, *z;
  const double *off, *sr, *born, *qgb, *cfac;  // OBC2: or, sr = scale or, B, q, c
  const double *qnb, *sig, *rte;               // LJ + Coulomb: q, σ, √ε
  const int32_t *excl_start, *excl;
  double pre;
};

struct Acc {  // one unit's sums
  double *a, *gx, *gy, *gz;  // a: ψ sums (pass 1) or β sums (pass 2)
  double* keep;              // 1, or 0 for the excluded partners of the current row
};

// distances of row i to the W partners at j0: d (three components) and r, and the lanes
// that are real partners
struct Block {
  vd dx, dy, dz, r2, r;
  vl valid;
};
inline Block block(const Atoms& at, int64_t i, int64_t j0) {
  Block b;
  b.dx = bcast(at.x[i]) - load(at.x + j0);
  b.dy = bcast(at.y[i]) - load(at.y + j0);
  b.dz = bcast(at.z[i]) - load(at.z + j0);
  b.r2 = b.dx * b.dx + b.dy * b.dy + b.dz * b.dz;
  b.r = tmk::tm_sqrt(b.r2);
  vl lane;
  for (int l = 0; l < W; ++l) lane[l] = j0 + l;
  b.valid = lane < at.n;
  return b;
}

// pass 1, row i: Σ_j T_ij into the ψ sum of i, T_ji into j's; with a cache, also
// T'_ij/r and T'_ji/r (0 where the pair does not enter) for pass 3, W of each per block
void psi_row(const Atoms& at, int64_t i, Acc& u, double* cache) {
  const vd or_i = bcast(at.off[i]), sr_i = bcast(at.sr[i]);
  vd acc = {};
  for (int64_t j0 = i + 1; j0 < at.n; j0 += W) {
    const Block b = block(at, i, j0);
    const vd or_j = load(at.off + j0), sr_j = load(at.sr + j0);
    const vd inv_r = 1.0 / b.r;
    vd tij, dij, tji, dji;
    tmk::gb_integral_d(b.r, inv_r, or_i, sr_j, tij, dij);
    tmk::gb_integral_d(b.r, inv_r, or_j, sr_i, tji, dji);
    const vl use_ij = b.valid & ((b.r + sr_j) - or_i >= 0.0);
    const vl use_ji = b.valid & ((b.r + sr_i) - or_j >= 0.0);
    acc += sel(use_ij, tij, vd{});
    add_to(u.a + j0, sel(use_ji, tji, vd{}));
    if (cache) {
      store(cache, sel(use_ij, dij * inv_r, vd{}));
      store(cache + W, sel(use_ji, dji * inv_r, vd{}));
      cache += 2 * W;
    }
  }
  u.a[i] += hsum(acc);
}

// pass 2, row i: β sums (∂h/∂B_i, ∂h/∂B_j) and the gradient of the pair terms that need
// no c: q_i q_j h_r and LJ + Coulomb
template <bool kGB, bool kNB>
void pair_row(const Atoms& at, int64_t i, Acc& u) {
  vd acc = {}, gx = {}, gy = {}, gz = {};
  if constexpr (kNB)
    for (int32_t e = at.excl_start[i]; e < at.excl_start[i + 1]; ++e) u.keep[at.excl[e]] = 0.0;
  for (int64_t j0 = i + 1; j0 < at.n; j0 += W) {
    const Block b = block(at, i, j0);
    const vd inv_r = 1.0 / b.r;
    vd f = {};  // φ'/r of the pair
    if constexpr (kGB) {
      const vd qq = bcast(at.qgb[i]) * load(at.qgb + j0);
      const Jet<vd, 3> h = tmk::gb_pair(seed<3>(b.r, 0), seed<3>(bcast(at.born[i]), 1),
                                        seed<3>(load(at.born + j0), 2), at.pre);
      acc += sel(b.valid, qq * h.d[1], vd{});
      add_to(u.a + j0, sel(b.valid, qq * h.d[2], vd{}));
      f = qq * h.d[0] * inv_r;
    }
    if constexpr (kNB) {
      const vd sig = 0.5 * (bcast(at.sig[i]) + load(at.sig + j0));
      const vd eps = bcast(at.rte[i]) * load(at.rte + j0);
      const vd qq = bcast(at.qnb[i]) * load(at.qnb + j0);
      const vd lj = tmk::lj_coulomb_d1_over_r(inv_r * inv_r, inv_r, sig, eps, qq);
      f += sel(load(u.keep + j0) != 0.0, lj, vd{});
    }
    f = sel(b.valid, f, vd{});
    const vd fx = f * b.dx, fy = f * b.dy, fz = f * b.dz;
    gx += fx;
    gy += fy;
    gz += fz;
    add_to(u.gx + j0, -fx);
    add_to(u.gy + j0, -fy);
    add_to(u.gz + j0, -fz);
  }
  if constexpr (kNB)
    for (int32_t e = at.excl_start[i]; e < at.excl_start[i + 1]; ++e) u.keep[at.excl[e]] = 1.0;
  u.a[i] += hsum(acc);
  u.gx[i] += hsum(gx);
  u.gy[i] += hsum(gy);
  u.gz[i] += hsum(gz);
}

// pass 3, row k: the Born-radius chain, (c_k T'_kj + c_j T'_jk) d/r, from pass 1's cache
// or (kCached false) evaluated again
template <bool kCached>
void chain_row(const Atoms& at, int64_t k, Acc& u, const double* cache) {
  const vd or_k = bcast(at.off[k]), sr_k = bcast(at.sr[k]), c_k = bcast(at.cfac[k]);
  vd gx = {}, gy = {}, gz = {};
  for (int64_t j0 = k + 1; j0 < at.n; j0 += W) {
    vd dx, dy, dz, akj, ajk;  // T'_kj/r, T'_jk/r where the pair enters, else 0
    if constexpr (kCached) {
      dx = bcast(at.x[k]) - load(at.x + j0);
      dy = bcast(at.y[k]) - load(at.y + j0);
      dz = bcast(at.z[k]) - load(at.z + j0);
      akj = load(cache);
      ajk = load(cache + W);
      cache += 2 * W;
    } else {
      const Block b = block(at, k, j0);
      const vd or_j = load(at.off + j0), sr_j = load(at.sr + j0);
      const vd inv_r = 1.0 / b.r;
      vd t;
      tmk::gb_integral_d(b.r, inv_r, or_k, sr_j, t, akj);
      tmk::gb_integral_d(b.r, inv_r, or_j, sr_k, t, ajk);
      akj = sel(b.valid & ((b.r + sr_j) - or_k >= 0.0), akj * inv_r, vd{});
      ajk = sel(b.valid & ((b.r + sr_k) - or_j >= 0.0), ajk * inv_r, vd{});
      dx = b.dx;
      dy = b.dy;
      dz = b.dz;
    }
    const vd s = c_k * akj + load(at.cfac + j0) * ajk;
    const vd fx = s * dx, fy = s * dy, fz = s * dz;
    gx += fx;
    gy += fy;
    gz += fz;
    add_to(u.gx + j0, -fx);
    add_to(u.gy + j0, -fy);
    add_to(u.gz + j0, -fz);
  }
  u.gx[k] += hsum(gx);
  u.gy[k] += hsum(gy);
  u.gz[k] += hsum(gz);
}

// Between the passes, shared by the all-pairs and the list calls (sum_a(i): atom i's sum
// over the units, in unit order):
// after pass 1, B_i = b(ψ_i) and b'_i from ψ_i = or_i Σ T
template <class SumA>
void born_from_psi(int64_t n, const double* off, const double* radius, SumA sum_a,
                   double* born, double* b1) {
  for (int64_t i = 0; i < n; ++i) {
    const tmk::J1 b =
        tmk::gb_born(tmk::seed1(sum_a(i) * off[i], true), tmk::seed1(radius[i], false));
    born[i] = b.v;
    b1[i] = b.d[0];
  }
}

// after pass 2, c_i = β_i b'_i or_i with β_i = e'(B_i) + the pair sums
template <class SumA>
void chain_factors(int64_t n, const double* born, const double* q, const double* radius,
                   const double* off, const double* b1, double pre, SumA sum_a, double* cfac) {
  for (int64_t i = 0; i < n; ++i) {
    const tmk::J1 e = tmk::gb_self(tmk::seed1(born[i], true), tmk::seed1(q[i], false),
                                   tmk::seed1(radius[i], false), pre);
    cfac[i] = (e.d[0] + sum_a(i)) * b1[i] * off[i];
  }
}

// the units' gradients added into g (N, 3), in unit order
template <class Unit>
void add_unit_gradients(int64_t n, Unit unit, double* g) {
  for (int k = 0; k < UNITS; ++k) {
    const Acc u = unit(k);
    for (int64_t i = 0; i < n; ++i) {
      g[3 * i] += u.gx[i];
      g[3 * i + 1] += u.gy[i];
      g[3 * i + 2] += u.gz[i];
    }
  }
}

ffi::Error PairGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> x,
                            ffi::Buffer<ffi::F64> q_gb, ffi::Buffer<ffi::F64> radius,
                            ffi::Buffer<ffi::F64> scale, ffi::Buffer<ffi::F64> q_nb,
                            ffi::Buffer<ffi::F64> sigma, ffi::Buffer<ffi::F64> epsilon,
                            ffi::Buffer<ffi::S32> excl_start, ffi::Buffer<ffi::S32> excl,
                            double pre, double cache_bytes, ffi::ResultBuffer<ffi::F64> grad) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != 3)
    return ffi::Error::InvalidArgument("tm_pair_gradient: x must have shape (N, 3)");
  const int64_t n = xd[0];
  const size_t un = (size_t)n;
  const bool gb = radius.element_count() > 0, nb = sigma.element_count() > 0;
  if (gb && (q_gb.element_count() != un || radius.element_count() != un ||
             scale.element_count() != un))
    return ffi::Error::InvalidArgument(
        "tm_pair_gradient: the OBC2 charge, radius and scale must be (" + std::to_string(n) +
        ",) or all empty");
  if (nb && (q_nb.element_count() != un || sigma.element_count() != un ||
             epsilon.element_count() != un || excl_start.element_count() != un + 1))
    return ffi::Error::InvalidArgument(
        "tm_pair_gradient: the LJ + Coulomb charge, sigma, epsilon must be (" +
        std::to_string(n) + ",) and excl_start (" + std::to_string(n + 1) + ",), or empty");
  if (nb && (size_t)excl_start.typed_data()[n] != excl.element_count())
    return ffi::Error::InvalidArgument("tm_pair_gradient: excl_start[N] != len(excl)");
  double* g = grad->typed_data();
  std::memset(g, 0, sizeof(double) * 3 * un);
  if (n < 2 || (!gb && !nb)) return ffi::Error::Success();

  // structure of arrays, padded with W far-away atoms (distinct positions, valid radii)
  const int64_t np = n + W;
  enum { X, Y, Z, OFF, SR, BORN, QGB, CFAC, QNB, SIG, RTE, PSI, B1, NSOA };
  double* soa = t_soa.get((size_t)NSOA * np);
  auto col = [&](int c) { return soa + (size_t)c * np; };
  const double* xs = x.typed_data();
  for (int64_t i = 0; i < np; ++i) {
    const bool real = i < n;
    col(X)[i] = real ? xs[3 * i] : 1e4 + 10.0 * (double)i;
    col(Y)[i] = real ? xs[3 * i + 1] : 0.0;
    col(Z)[i] = real ? xs[3 * i + 2] : 0.0;
    const double rad = gb && real ? radius.typed_data()[i] : 0.15;
    col(OFF)[i] = rad - tmk::GB_DIELECTRIC_OFFSET;
    col(SR)[i] = (gb && real ? scale.typed_data()[i] : 0.8) * col(OFF)[i];
    col(QGB)[i] = gb && real ? q_gb.typed_data()[i] : 0.0;
    col(BORN)[i] = 0.15;
    col(CFAC)[i] = 0.0;
    col(QNB)[i] = nb && real ? q_nb.typed_data()[i] : 0.0;
    col(SIG)[i] = nb && real ? sigma.typed_data()[i] : 0.3;
    col(RTE)[i] = nb && real ? std::sqrt(epsilon.typed_data()[i]) : 0.0;
  }
  Atoms at{n,         col(X),    col(Y),    col(Z),    col(OFF),
           col(SR),   col(BORN), col(QGB),  col(CFAC), col(QNB),
           col(SIG),  col(RTE),  nb ? excl_start.typed_data() : nullptr,
           nb ? excl.typed_data() : nullptr, pre};

  // the units' sums: a, gx, gy, gz, keep, np each
  const size_t per_unit = 5 * (size_t)np;
  double* ub = t_units.get(UNITS * per_unit);
  auto unit = [&](int k) {
    double* b = ub + k * per_unit;
    return Acc{b, b + np, b + 2 * np, b + 3 * np, b + 4 * np};
  };
  auto clear = [&](bool grads) {
    for (int k = 0; k < UNITS; ++k) {
      Acc u = unit(k);
      std::memset(u.a, 0, sizeof(double) * np);
      if (grads) std::memset(u.gx, 0, sizeof(double) * 3 * np);
      std::fill(u.keep, u.keep + np, 1.0);
    }
  };
  auto run = [&](auto&& row) {
    std::function<void(int)> work = [&](int k) {
      Acc u = unit(k);
      for (int64_t i = k; i < n - 1; i += UNITS) row(i, u);
    };
    parallel_units(pool, UNITS, work);
  };
  auto sum_a = [&](int64_t i) {
    double s = 0.0;
    for (int k = 0; k < UNITS; ++k) s += unit(k).a[i];
    return s;
  };

  // pass 1's cache of T'/r for pass 3: 2 W doubles per block of partners, while it stays
  // under cache_bytes; larger systems evaluate the integrals again in pass 3
  const int64_t blocks = (n - 1 + W - 1) / W * n;  // a bound: row i has ⌈(n-1-i)/W⌉
  const bool cached = gb && (double)blocks * 2 * W * sizeof(double) <= cache_bytes;
  double* cache = nullptr;
  int64_t* row_at = nullptr;
  if (cached) {
    row_at = reinterpret_cast<int64_t*>(t_rows.get(n));
    int64_t at_ = 0;
    for (int64_t i = 0; i < n; ++i) {
      row_at[i] = at_;
      at_ += (n - 1 - i + W - 1) / W * 2 * W;
    }
    cache = t_cache.get(std::max<int64_t>(at_, 1));
  }
  auto cache_row = [&](int64_t i) { return cached ? cache + row_at[i] : nullptr; };

  clear(true);
  if (gb) {  // pass 1: ψ → B, b'
    run([&](int64_t i, Acc& u) { psi_row(at, i, u, cache_row(i)); });
    born_from_psi(n, col(OFF), radius.typed_data(), sum_a, col(BORN), col(B1));
    for (int k = 0; k < UNITS; ++k) std::memset(unit(k).a, 0, sizeof(double) * np);
  }
  // pass 2: β and the c-free pair gradient
  if (gb && nb)
    run([&](int64_t i, Acc& u) { pair_row<true, true>(at, i, u); });
  else if (gb)
    run([&](int64_t i, Acc& u) { pair_row<true, false>(at, i, u); });
  else
    run([&](int64_t i, Acc& u) { pair_row<false, true>(at, i, u); });
  if (gb) {  // c = β b' or, then pass 3
    chain_factors(n, col(BORN), col(QGB), radius.typed_data(), col(OFF), col(B1), pre, sum_a,
                  col(CFAC));
    if (cached)
      run([&](int64_t i, Acc& u) { chain_row<true>(at, i, u, cache_row(i)); });
    else
      run([&](int64_t i, Acc& u) { chain_row<false>(at, i, u, nullptr); });
  }
  add_unit_gradients(n, unit, g);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- on a Verlet list
//
// The same three passes for OBC2 with a cutoff (OpenMM's CutoffNonPeriodic GB,
// timemachine/potentials/gbsa.py): only pairs with r < r_c enter ψ and the pair sum (the
// shift -1/r_c of the pair energy has no gradient), taken once each from the heads of the
// rows of a Verlet list of every pair (cutoffs.Neighbours: row i's partners j > i first,
// padded with N), W partners at a time, their coordinates and parameters gathered. The
// units, their order and the sums' order are the all-pairs call's: bitwise the same on
// any number of threads, for a given list.

// row i's head: its partners j > i within the cutoff, into jo (padded to a multiple of W
// with atom N, far away); returns their count
int64_t list_head(const Atoms& at, const int32_t* row, int64_t k, int64_t i, double rc2,
                  int64_t* jo) {
  int64_t m = 0;
  const double xi = at.x[i], yi = at.y[i], zi = at.z[i];
  for (int64_t s = 0; s < k; ++s) {
    const int64_t j = row[s];
    if (j >= at.n || j <= i) break;
    const double dx = xi - at.x[j], dy = yi - at.y[j], dz = zi - at.z[j];
    jo[m] = j;  // written always, kept within the cutoff
    m += dx * dx + dy * dy + dz * dz < rc2;
  }
  for (int64_t t = m; t < (m + W - 1) / W * W; ++t) jo[t] = at.n;
  return m;
}

inline vd gather(const double* a, const int64_t* j) {
  vd v;
  for (int l = 0; l < W; ++l) v[l] = a[j[l]];
  return v;
}
inline void scatter_add(double* a, const int64_t* j, vd v) {
  for (int l = 0; l < W; ++l) a[j[l]] += v[l];
}

inline Block list_block(const Atoms& at, int64_t i, const int64_t* j) {
  Block b;
  b.dx = bcast(at.x[i]) - gather(at.x, j);
  b.dy = bcast(at.y[i]) - gather(at.y, j);
  b.dz = bcast(at.z[i]) - gather(at.z, j);
  b.r2 = b.dx * b.dx + b.dy * b.dy + b.dz * b.dz;
  b.r = tmk::tm_sqrt(b.r2);
  vl lane;
  for (int l = 0; l < W; ++l) lane[l] = j[l];
  b.valid = lane < at.n;
  return b;
}

// a pair force f d (f = φ'/r, d = x_i - x_j) onto row i's sums and, negated, onto the
// partners' in the unit's arrays
inline void add_pair_forces(Acc& u, const int64_t* js, const Block& b, vd f, vd& gx, vd& gy,
                            vd& gz) {
  const vd fx = f * b.dx, fy = f * b.dy, fz = f * b.dz;
  gx += fx;
  gy += fy;
  gz += fz;
  scatter_add(u.gx, js, -fx);
  scatter_add(u.gy, js, -fy);
  scatter_add(u.gz, js, -fz);
}

void psi_list_row(const Atoms& at, int64_t i, const int64_t* js, int64_t m, Acc& u) {
  const vd or_i = bcast(at.off[i]), sr_i = bcast(at.sr[i]);
  vd acc = {};
  for (int64_t s = 0; s < m; s += W) {
    const Block b = list_block(at, i, js + s);
    const vd or_j = gather(at.off, js + s), sr_j = gather(at.sr, js + s);
    const vd inv_r = 1.0 / b.r;
    vd tij, dij, tji, dji;
    tmk::gb_integral_d(b.r, inv_r, or_i, sr_j, tij, dij);
    tmk::gb_integral_d(b.r, inv_r, or_j, sr_i, tji, dji);
    acc += sel(b.valid & ((b.r + sr_j) - or_i >= 0.0), tij, vd{});
    scatter_add(u.a, js + s, sel(b.valid & ((b.r + sr_i) - or_j >= 0.0), tji, vd{}));
  }
  u.a[i] += hsum(acc);
}

void pair_list_row(const Atoms& at, int64_t i, const int64_t* js, int64_t m, Acc& u) {
  vd acc = {}, gx = {}, gy = {}, gz = {};
  for (int64_t s = 0; s < m; s += W) {
    const Block b = list_block(at, i, js + s);
    const vd qq = bcast(at.qgb[i]) * gather(at.qgb, js + s);
    const Jet<vd, 3> h = tmk::gb_pair(seed<3>(b.r, 0), seed<3>(bcast(at.born[i]), 1),
                                      seed<3>(gather(at.born, js + s), 2), at.pre);
    acc += sel(b.valid, qq * h.d[1], vd{});
    scatter_add(u.a, js + s, sel(b.valid, qq * h.d[2], vd{}));
    add_pair_forces(u, js + s, b, sel(b.valid, qq * h.d[0] / b.r, vd{}), gx, gy, gz);
  }
  u.a[i] += hsum(acc);
  u.gx[i] += hsum(gx);
  u.gy[i] += hsum(gy);
  u.gz[i] += hsum(gz);
}

void chain_list_row(const Atoms& at, int64_t k, const int64_t* js, int64_t m, Acc& u) {
  const vd or_k = bcast(at.off[k]), sr_k = bcast(at.sr[k]), c_k = bcast(at.cfac[k]);
  vd gx = {}, gy = {}, gz = {};
  for (int64_t s = 0; s < m; s += W) {
    const Block b = list_block(at, k, js + s);
    const vd or_j = gather(at.off, js + s), sr_j = gather(at.sr, js + s);
    const vd inv_r = 1.0 / b.r;
    vd t, akj, ajk;
    tmk::gb_integral_d(b.r, inv_r, or_k, sr_j, t, akj);
    tmk::gb_integral_d(b.r, inv_r, or_j, sr_k, t, ajk);
    akj = sel(b.valid & ((b.r + sr_j) - or_k >= 0.0), akj * inv_r, vd{});
    ajk = sel(b.valid & ((b.r + sr_k) - or_j >= 0.0), ajk * inv_r, vd{});
    add_pair_forces(u, js + s, b, c_k * akj + gather(at.cfac, js + s) * ajk, gx, gy, gz);
  }
  u.gx[k] += hsum(gx);
  u.gy[k] += hsum(gy);
  u.gz[k] += hsum(gz);
}

thread_local Scratch t_heads;

// The list calls' operands checked: x (N, 3), the charge, radius and scale (N,), the list
// idx (N, K), a cutoff > 0; sets n and k
ffi::Error check_gb_list_args(const std::string& name, ffi::Buffer<ffi::F64>& x,
                              ffi::Buffer<ffi::F64>& q_gb, ffi::Buffer<ffi::F64>& radius,
                              ffi::Buffer<ffi::F64>& scale, ffi::Buffer<ffi::S32>& idx,
                              double cutoff, int64_t* n_out, int64_t* k_out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != 3)
    return ffi::Error::InvalidArgument(name + ": x must have shape (N, 3)");
  const int64_t n = xd[0];
  const size_t un = (size_t)n;
  if (q_gb.element_count() != un || radius.element_count() != un ||
      scale.element_count() != un)
    return ffi::Error::InvalidArgument(name + ": the charge, radius and scale must be (" +
                                       std::to_string(n) + ",)");
  const auto id = idx.dimensions();
  if (id.size() != 2 || id[0] != n)
    return ffi::Error::InvalidArgument(name + ": idx must have shape (N, K)");
  if (!(cutoff > 0.0)) return ffi::Error::InvalidArgument(name + ": the cutoff must be > 0");
  *n_out = n;
  *k_out = id[1];
  return ffi::Error::Success();
}

// The list calls' per-atom columns, rows [0, rows): the N atoms, then far-away padding
// atoms (distinct positions 10 nm apart, 10⁴ nm out: beyond the cutoff of every atom,
// with valid radii and no charge); B and c set to placeholders
struct GBColumns {
  double *x, *y, *z, *off, *sr, *q, *born, *cfac;
};
void fill_gb_columns(int64_t n, int64_t rows, const double* xs, const double* radius,
                     const double* scale, const double* q, const GBColumns& c) {
  for (int64_t i = 0; i < rows; ++i) {
    const bool real = i < n;
    c.x[i] = real ? xs[3 * i] : 1e4 + 10.0 * (double)i;
    c.y[i] = real ? xs[3 * i + 1] : 0.0;
    c.z[i] = real ? xs[3 * i + 2] : 0.0;
    c.off[i] = (real ? radius[i] : 0.15) - tmk::GB_DIELECTRIC_OFFSET;
    c.sr[i] = (real ? scale[i] : 0.8) * c.off[i];
    c.q[i] = real ? q[i] : 0.0;
    c.born[i] = 0.15;
    c.cfac[i] = 0.0;
  }
}

ffi::Error GbListGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> x,
                              ffi::Buffer<ffi::F64> q_gb, ffi::Buffer<ffi::F64> radius,
                              ffi::Buffer<ffi::F64> scale, ffi::Buffer<ffi::S32> idx,
                              double pre, double cutoff, ffi::ResultBuffer<ffi::F64> grad) {
  int64_t n, k;
  if (auto e = check_gb_list_args("tm_gb_list_gradient", x, q_gb, radius, scale, idx, cutoff,
                                  &n, &k);
      e.failure())
    return e;
  const size_t un = (size_t)n;
  double* g = grad->typed_data();
  std::memset(g, 0, sizeof(double) * 3 * un);
  if (n < 2) return ffi::Error::Success();

  // structure of arrays, padded with W far-away atoms (each beyond the cutoff of all)
  const int64_t np = n + W;
  enum { X, Y, Z, OFF, SR, BORN, QGB, CFAC, B1, NSOA };
  double* soa = t_soa.get((size_t)NSOA * np);
  auto col = [&](int c) { return soa + (size_t)c * np; };
  fill_gb_columns(n, np, x.typed_data(), radius.typed_data(), scale.typed_data(),
                  q_gb.typed_data(),
                  GBColumns{col(X), col(Y), col(Z), col(OFF), col(SR), col(QGB), col(BORN),
                            col(CFAC)});
  Atoms at{n,         col(X),    col(Y),    col(Z),    col(OFF), col(SR), col(BORN),
           col(QGB),  col(CFAC), nullptr,   nullptr,   nullptr,  nullptr, nullptr,
           pre};

  // the rows' heads within the cutoff, found once for the three passes
  const int64_t cap = (k + W - 1) / W * W;
  int64_t* heads = reinterpret_cast<int64_t*>(t_heads.get((size_t)(n * cap + n)));
  int64_t* counts = heads + n * cap;
  const int32_t* list = idx.typed_data();
  const double rc2 = cutoff * cutoff;
  {
    const int units = (int)std::max<int64_t>(1, std::min<int64_t>(4 * pool.num_threads(), n));
    std::function<void(int)> work = [&](int u) {
      for (int64_t i = n * u / units; i < n * (u + 1) / units; ++i)
        counts[i] = list_head(at, list + i * k, k, i, rc2, heads + i * cap);
    };
    parallel_units(pool, units, work);
  }

  const size_t per_unit = 4 * (size_t)np;  // a, gx, gy, gz
  double* ub = t_units.get(UNITS * per_unit);
  auto unit = [&](int u) {
    double* b = ub + u * per_unit;
    return Acc{b, b + np, b + 2 * np, b + 3 * np, nullptr};
  };
  std::memset(ub, 0, sizeof(double) * UNITS * per_unit);
  auto run = [&](auto&& row) {
    std::function<void(int)> work = [&](int u) {
      Acc acc = unit(u);
      for (int64_t i = u; i < n; i += UNITS) row(i, heads + i * cap, counts[i], acc);
    };
    parallel_units(pool, UNITS, work);
  };
  auto sum_a = [&](int64_t i) {
    double s = 0.0;
    for (int u = 0; u < UNITS; ++u) s += unit(u).a[i];
    return s;
  };
  // pass 1: ψ → B, b'
  run([&](int64_t i, const int64_t* js, int64_t m, Acc& u) { psi_list_row(at, i, js, m, u); });
  born_from_psi(n, col(OFF), radius.typed_data(), sum_a, col(BORN), col(B1));
  for (int u = 0; u < UNITS; ++u) std::memset(unit(u).a, 0, sizeof(double) * np);
  // pass 2: β and the pair gradient
  run([&](int64_t i, const int64_t* js, int64_t m, Acc& u) { pair_list_row(at, i, js, m, u); });
  chain_factors(n, col(BORN), col(QGB), radius.typed_data(), col(OFF), col(B1), pre, sum_a,
                col(CFAC));
  // pass 3: the Born-radius chain
  run([&](int64_t i, const int64_t* js, int64_t m, Acc& u) { chain_list_row(at, i, js, m, u); });
  add_unit_gradients(n, unit, g);
  return ffi::Error::Success();
}

// ------------------------------------------------- ζ on a Verlet list (tm_gb_list_zeta)
//
// ∇E and the Hessian-vector products H·t_p of the cutoff GB on its list for all P tangents
// at once: gbsa.obc2_neighbour_gradient_and_zeta (the reference, equal to round-off), the
// same three passes over whole rows (each pair in both of its atoms' rows, so a row writes
// only its own atom's sums: no units, bitwise the same on any number of threads):
//   A. I_i = Σ_j T_ij and δI_i = Σ_j T'_ij δr_ij        → B_i, δB_i = B'(I_i) δI_i
//   B. β_i = e'_i + Σ_j h_i(ij), δβ_i = (e''_i + Σ_j h_ii) δB_i + Σ_j (h_ij δB_j + h_ri δr_ij)
//                                                        → c_i = β_i B'_i, δc_i
//   C. ∇_i E = Σ_j φ_ij d_ij / r and
//      δ∇_i E = Σ_j [(δφ_ij - φ_ij δr_ij / r) d_ij + φ_ij (t_i - t_j)] / r
// with δr_ij = d_ij·(t_i - t_j)/r, φ_ij = h_r + c_i T'_ij + c_j T'_ji and
// δφ_ij = (h_rr + c_i T''_ij + c_j T''_ji) δr_ij + h_ri δB_i + h_rj δB_j + T'_ij δc_i + T'_ji δc_j.
// Each pass first evaluates its pair scalars W partners at a time (gb_integral_d2,
// gb_pair_partials: closed forms, gbsa.cuh) into the row's scratch, then contracts them
// with the tangents, W tangents at a time: the per-atom tangent arrays are kept as
// (N + 1, ·, PW) rows (P padded to PW, a multiple of W; row N is zero for padding).

struct ZetaRows {  // what the passes share
  int64_t n, pw;
  const double *x, *y, *z, *off, *sr, *q;
  const int64_t* heads;  // (N, cap) partners within the cutoff, padded with N
  const int64_t* counts;
  int64_t cap;
  double pre;
  const double* t;   // (N + 1, 3, PW) tangents
  double* isum;      // (N,) I
  double* di;        // (N + 1, PW) δI
  double* born;      // (N + 1,) B
  double* hsum;      // (N,) Σ_j h_i
  double* hii;       // (N,) Σ_j h_ii
  double* ddb;       // (N, PW) Σ_j (h_ij δB_j + h_ri δr_ij)
  double* dborn;     // (N + 1, PW) δB
  double* cfac;      // (N + 1,) c = β B'
  double* dc;        // (N + 1, PW) δc
  double* grad;      // (N, 3)
  double* hvp;       // (N, 3, PW)
};

// row i's partners, all of them within the cutoff (the list holds both directions)
int64_t list_row(const ZetaRows& z, const int32_t* row, int64_t k, int64_t i, double rc2,
                 int64_t* jo) {
  int64_t m = 0;
  for (int64_t s = 0; s < k; ++s) {
    const int64_t j = row[s];
    if (j >= z.n || j == i) continue;
    const double dx = z.x[i] - z.x[j], dy = z.y[i] - z.y[j], dz = z.z[i] - z.z[j];
    jo[m] = j;
    m += dx * dx + dy * dy + dz * dz < rc2;
  }
  for (int64_t t = m; t < (m + W - 1) / W * W; ++t) jo[t] = z.n;
  return m;
}

struct PairBlock {  // W partners of row i: d, r, 1/r
  vd dx, dy, dz, r, inv_r;
};
inline PairBlock pair_block(const ZetaRows& z, int64_t i, const int64_t* j) {
  PairBlock b;
  b.dx = bcast(z.x[i]) - gather(z.x, j);
  b.dy = bcast(z.y[i]) - gather(z.y, j);
  b.dz = bcast(z.z[i]) - gather(z.z, j);
  b.r = tmk::tm_sqrt(b.dx * b.dx + b.dy * b.dy + b.dz * b.dz);
  b.inv_r = 1.0 / b.r;
  return b;
}

// the row's scratch: per partner, the displacement and up to five pair scalars
struct RowScratch {
  double *dx, *dy, *dz, *s0, *s1, *s2, *s3, *s4;
};
thread_local Scratch t_zrow;
RowScratch row_scratch(int64_t cap) {
  double* b = t_zrow.get(8 * (size_t)cap);
  return RowScratch{b, b + cap, b + 2 * cap, b + 3 * cap,
                    b + 4 * cap, b + 5 * cap, b + 6 * cap, b + 7 * cap};
}
inline void keep_d(const RowScratch& w, int64_t s, const PairBlock& b) {
  store(w.dx + s, b.dx);
  store(w.dy + s, b.dy);
  store(w.dz + s, b.dz);
}

// pass A, row i: I_i, δI_i
void zeta_integrals_row(const ZetaRows& z, int64_t i, const RowScratch& w) {
  const int64_t* js = z.heads + i * z.cap;
  const int64_t m = z.counts[i];
  const vd or_i = bcast(z.off[i]);
  vd acc = {};
  for (int64_t s = 0; s < m; s += W) {
    const PairBlock b = pair_block(z, i, js + s);
    const vd sr_j = gather(z.sr, js + s);
    vd t, dt;
    tmk::gb_integral_d(b.r, b.inv_r, or_i, sr_j, t, dt);
    vl lane;
    for (int l = 0; l < W; ++l) lane[l] = js[s + l];
    const vl use = (lane < z.n) & ((b.r + sr_j) - or_i >= 0.0);
    acc += sel(use, t, vd{});
    keep_d(w, s, b);
    store(w.s0 + s, sel(use, dt * b.inv_r, vd{}));
  }
  z.isum[i] = hsum(acc);
  const double* ti = z.t + i * 3 * z.pw;
  for (int64_t c = 0; c < z.pw; c += W) {
    const vd t0 = load(ti + c), t1 = load(ti + z.pw + c), t2 = load(ti + 2 * z.pw + c);
    vd a = {};
    for (int64_t s = 0; s < m; ++s) {
      const double* tj = z.t + js[s] * 3 * z.pw + c;
      a += w.s0[s] * (w.dx[s] * (t0 - load(tj)) + w.dy[s] * (t1 - load(tj + z.pw)) +
                      w.dz[s] * (t2 - load(tj + 2 * z.pw)));
    }
    store(z.di + i * z.pw + c, a);
  }
}

// pass B, row i: Σ_j h_i, Σ_j h_ii, Σ_j (h_ij δB_j + h_ri δr_ij)
void zeta_chain_row(const ZetaRows& z, int64_t i, const RowScratch& w) {
  const int64_t* js = z.heads + i * z.cap;
  const int64_t m = z.counts[i];
  vd sum_i = {}, sum_ii = {}, sx = {}, sy = {}, sz = {};
  for (int64_t s = 0; s < m; s += W) {
    const PairBlock b = pair_block(z, i, js + s);
    vl lane;
    for (int l = 0; l < W; ++l) lane[l] = js[s + l];
    const vl valid = lane < z.n;
    const vd qq = bcast(z.q[i]) * gather(z.q, js + s);
    const auto h = tmk::gb_pair_partials(b.r, bcast(z.born[i]), gather(z.born, js + s), qq, z.pre);
    sum_i += sel(valid, h.i, vd{});
    sum_ii += sel(valid, h.ii, vd{});
    const vd wri = sel(valid, h.ri * b.inv_r, vd{});
    sx += wri * b.dx;
    sy += wri * b.dy;
    sz += wri * b.dz;
    keep_d(w, s, b);
    store(w.s0 + s, sel(valid, h.ij, vd{}));
    store(w.s1 + s, wri);
  }
  z.hsum[i] = hsum(sum_i);
  z.hii[i] = hsum(sum_ii);
  const double rx = hsum(sx), ry = hsum(sy), rz = hsum(sz);
  const double* ti = z.t + i * 3 * z.pw;
  for (int64_t c = 0; c < z.pw; c += W) {
    vd a = rx * load(ti + c) + ry * load(ti + z.pw + c) + rz * load(ti + 2 * z.pw + c);
    for (int64_t s = 0; s < m; ++s) {
      const int64_t j = js[s];
      const double* tj = z.t + j * 3 * z.pw + c;
      a += w.s0[s] * load(z.dborn + j * z.pw + c) -
           w.s1[s] * (w.dx[s] * load(tj) + w.dy[s] * load(tj + z.pw) +
                      w.dz[s] * load(tj + 2 * z.pw));
    }
    store(z.ddb + i * z.pw + c, a);
  }
}

// pass C, row i: ∇_i E and (H·t)_i
void zeta_forces_row(const ZetaRows& z, int64_t i, const RowScratch& w) {
  const int64_t* js = z.heads + i * z.cap;
  const int64_t m = z.counts[i];
  const vd or_i = bcast(z.off[i]), sr_i = bcast(z.sr[i]), c_i = bcast(z.cfac[i]);
  vd gx = {}, gy = {}, gz = {}, phi_sum = {};
  vd bx = {}, by = {}, bz = {}, cx = {}, cy = {}, cz = {};
  for (int64_t s = 0; s < m; s += W) {
    const PairBlock b = pair_block(z, i, js + s);
    vl lane;
    for (int l = 0; l < W; ++l) lane[l] = js[s + l];
    const vl valid = lane < z.n;
    const vd or_j = gather(z.off, js + s), sr_j = gather(z.sr, js + s);
    const vd c_j = gather(z.cfac, js + s);
    const vd qq = bcast(z.q[i]) * gather(z.q, js + s);
    const auto h = tmk::gb_pair_partials(b.r, bcast(z.born[i]), gather(z.born, js + s), qq, z.pre);
    vd t, ti1, ti2, tj1, tj2;
    tmk::gb_integral_d2(b.r, b.inv_r, or_i, sr_j, t, ti1, ti2);
    tmk::gb_integral_d2(b.r, b.inv_r, or_j, sr_i, t, tj1, tj2);
    const vl use_ij = valid & ((b.r + sr_j) - or_i >= 0.0);
    const vl use_ji = valid & ((b.r + sr_i) - or_j >= 0.0);
    ti1 = sel(use_ij, ti1, vd{});
    ti2 = sel(use_ij, ti2, vd{});
    tj1 = sel(use_ji, tj1, vd{});
    tj2 = sel(use_ji, tj2, vd{});
    const vd phi_r = sel(valid, (h.r + c_i * ti1 + c_j * tj1) * b.inv_r, vd{});
    const vd a =
        sel(valid, ((h.rr + c_i * ti2 + c_j * tj2) - phi_r) * b.inv_r * b.inv_r, vd{});
    const vd own_b = sel(valid, h.ri * b.inv_r, vd{}), own_c = ti1 * b.inv_r;
    gx += phi_r * b.dx;
    gy += phi_r * b.dy;
    gz += phi_r * b.dz;
    phi_sum += phi_r;
    bx += own_b * b.dx;
    by += own_b * b.dy;
    bz += own_b * b.dz;
    cx += own_c * b.dx;
    cy += own_c * b.dy;
    cz += own_c * b.dz;
    keep_d(w, s, b);
    store(w.s0 + s, a);
    store(w.s1 + s, phi_r);
    store(w.s2 + s, sel(valid, h.rj * b.inv_r, vd{}));
    store(w.s3 + s, tj1 * b.inv_r);
  }
  z.grad[3 * i] = hsum(gx);
  z.grad[3 * i + 1] = hsum(gy);
  z.grad[3 * i + 2] = hsum(gz);
  const double ps = hsum(phi_sum);
  const double rb[3] = {hsum(bx), hsum(by), hsum(bz)}, rc[3] = {hsum(cx), hsum(cy), hsum(cz)};
  const double* ti = z.t + i * 3 * z.pw;
  for (int64_t c = 0; c < z.pw; c += W) {
    const vd t0 = load(ti + c), t1 = load(ti + z.pw + c), t2 = load(ti + 2 * z.pw + c);
    const vd db_i = load(z.dborn + i * z.pw + c), dc_i = load(z.dc + i * z.pw + c);
    vd z0 = {}, z1 = {}, z2 = {};
    for (int64_t s = 0; s < m; ++s) {
      const int64_t j = js[s];
      const double* tj = z.t + j * 3 * z.pw + c;
      const vd u0 = load(tj), u1 = load(tj + z.pw), u2 = load(tj + 2 * z.pw);
      const double dx = w.dx[s], dy = w.dy[s], dz = w.dz[s], phi_r = w.s1[s];
      const vd sdot = dx * (t0 - u0) + dy * (t1 - u1) + dz * (t2 - u2);
      const vd coef = w.s0[s] * sdot + w.s2[s] * load(z.dborn + j * z.pw + c) +
                      w.s3[s] * load(z.dc + j * z.pw + c);
      z0 += coef * dx - phi_r * u0;
      z1 += coef * dy - phi_r * u1;
      z2 += coef * dz - phi_r * u2;
    }
    double* out = z.hvp + i * 3 * z.pw + c;
    store(out, z0 + ps * t0 + rb[0] * db_i + rc[0] * dc_i);
    store(out + z.pw, z1 + ps * t1 + rb[1] * db_i + rc[1] * dc_i);
    store(out + 2 * z.pw, z2 + ps * t2 + rb[2] * db_i + rc[2] * dc_i);
  }
}

thread_local Scratch t_zsoa, t_zheads, t_ztan;

ffi::Error GbListZetaImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> x,
                          ffi::Buffer<ffi::F64> q_gb, ffi::Buffer<ffi::F64> radius,
                          ffi::Buffer<ffi::F64> scale, ffi::Buffer<ffi::S32> idx,
                          ffi::Buffer<ffi::F64> tangents, double pre, double cutoff,
                          ffi::ResultBuffer<ffi::F64> grad, ffi::ResultBuffer<ffi::F64> hvp) {
  int64_t n, k;
  if (auto e = check_gb_list_args("tm_gb_list_zeta", x, q_gb, radius, scale, idx, cutoff, &n,
                                  &k);
      e.failure())
    return e;
  const size_t un = (size_t)n;
  const auto td = tangents.dimensions();
  if (td.size() != 3 || td[1] != n || td[2] != 3)
    return ffi::Error::InvalidArgument("tm_gb_list_zeta: the tangents must be (P, N, 3)");
  const int64_t p = td[0];
  const int64_t pw = std::max<int64_t>(W, (p + W - 1) / W * W);
  double* g = grad->typed_data();
  double* out = hvp->typed_data();
  std::memset(g, 0, sizeof(double) * 3 * un);
  std::memset(out, 0, sizeof(double) * 3 * un * (size_t)p);
  if (n < 2) return ffi::Error::Success();

  // per-atom arrays, N + 1 long (atom N: the padding partner, far away, zero tangents)
  const int64_t n1 = n + 1;
  enum { X, Y, Z, OFF, SR, Q, ISUM, BORN, HSUM, HII, CFAC, NSOA };
  double* soa = t_zsoa.get((size_t)NSOA * n1);
  auto col = [&](int c) { return soa + (size_t)c * n1; };
  fill_gb_columns(n, n1, x.typed_data(), radius.typed_data(), scale.typed_data(),
                  q_gb.typed_data(),
                  GBColumns{col(X), col(Y), col(Z), col(OFF), col(SR), col(Q), col(BORN),
                            col(CFAC)});
  // the tangents and the per-atom tangent sums, (N + 1) rows of PW
  const size_t rows3 = (size_t)n1 * 3 * pw, rows1 = (size_t)n1 * pw;
  double* tb = t_ztan.get(rows3 + 4 * rows1 + (size_t)n * 3 * pw);
  std::memset(tb, 0, sizeof(double) * (rows3 + 4 * rows1));
  const double* ts = tangents.typed_data();
  for (int64_t q = 0; q < p; ++q)
    for (int64_t i = 0; i < n; ++i)
      for (int c = 0; c < 3; ++c) tb[(i * 3 + c) * pw + q] = ts[(q * n + i) * 3 + c];
  ZetaRows z{};
  z.n = n;
  z.pw = pw;
  z.x = col(X);
  z.y = col(Y);
  z.z = col(Z);
  z.off = col(OFF);
  z.sr = col(SR);
  z.q = col(Q);
  z.pre = pre;
  z.t = tb;
  z.di = tb + rows3;
  z.ddb = z.di + rows1;
  z.dborn = z.ddb + rows1;
  z.dc = z.dborn + rows1;
  z.hvp = z.dc + rows1;
  z.isum = col(ISUM);
  z.born = col(BORN);
  z.hsum = col(HSUM);
  z.hii = col(HII);
  z.cfac = col(CFAC);
  z.grad = g;

  // every row's partners within the cutoff, found once for the three passes
  z.cap = (k + W - 1) / W * W;
  int64_t* heads = reinterpret_cast<int64_t*>(t_zheads.get((size_t)(n * z.cap + n)));
  int64_t* counts = heads + n * z.cap;
  const int32_t* list = idx.typed_data();
  const double rc2 = cutoff * cutoff;
  z.heads = heads;
  z.counts = counts;
  // rows in fixed contiguous chunks; a row writes only its own atom's sums
  const int units = (int)std::max<int64_t>(1, std::min<int64_t>(4 * pool.num_threads(), n));
  auto rows = [&](auto&& row) {
    std::function<void(int)> work = [&](int u) {
      const RowScratch w = row_scratch(std::max<int64_t>(z.cap, W));
      for (int64_t i = n * u / units; i < n * (u + 1) / units; ++i) row(i, w);
    };
    parallel_units(pool, units, work);
  };
  rows([&](int64_t i, const RowScratch&) {
    counts[i] = list_row(z, list + i * k, k, i, rc2, heads + i * z.cap);
  });
  // A: I, δI → B, δB
  rows([&](int64_t i, const RowScratch& w) { zeta_integrals_row(z, i, w); });
  std::vector<double> b1(n), b2(n);
  for (int64_t i = 0; i < n; ++i) {
    // B(ψ) to second order in ψ = or I: dB/dI = or B'(ψ), d²B/dI² = or² B''(ψ)
    const tmk::J12 b = tmk::gb_born(tmk::seed2<2>(z.isum[i] * col(OFF)[i], true, 0),
                                    tmk::seed2<2>(radius.typed_data()[i], false, -1));
    const double o = col(OFF)[i];
    col(BORN)[i] = b.v.v;
    b1[i] = o * b.v.d[0];
    b2[i] = o * o * b.d[0].d[0];
    for (int64_t c = 0; c < pw; ++c) z.dborn[i * pw + c] = b1[i] * z.di[i * pw + c];
  }
  // B: β, δβ → c, δc
  rows([&](int64_t i, const RowScratch& w) { zeta_chain_row(z, i, w); });
  for (int64_t i = 0; i < n; ++i) {
    const tmk::J12 e = tmk::gb_self(tmk::seed2<2>(col(BORN)[i], true, 0),
                                    tmk::seed2<2>(col(Q)[i], false, -1),
                                    tmk::seed2<2>(radius.typed_data()[i], false, -1), pre);
    const double beta = e.v.d[0] + z.hsum[i], dd = e.d[0].d[0] + z.hii[i];
    col(CFAC)[i] = beta * b1[i];
    for (int64_t c = 0; c < pw; ++c) {
      const double dbeta = dd * z.dborn[i * pw + c] + z.ddb[i * pw + c];
      z.dc[i * pw + c] = dbeta * b1[i] + beta * b2[i] * z.di[i * pw + c];
    }
  }
  // C: ∇E and H·t
  rows([&](int64_t i, const RowScratch& w) { zeta_forces_row(z, i, w); });
  for (int64_t q = 0; q < p; ++q)
    for (int64_t i = 0; i < n; ++i)
      for (int c = 0; c < 3; ++c) out[(q * n + i) * 3 + c] = z.hvp[(i * 3 + c) * pw + q];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmPairGradient, PairGradientImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // x
                                  .Arg<ffi::Buffer<ffi::F64>>()  // q_gb
                                  .Arg<ffi::Buffer<ffi::F64>>()  // radius
                                  .Arg<ffi::Buffer<ffi::F64>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F64>>()  // q_nb
                                  .Arg<ffi::Buffer<ffi::F64>>()  // sigma
                                  .Arg<ffi::Buffer<ffi::F64>>()  // epsilon
                                  .Arg<ffi::Buffer<ffi::S32>>()  // excl_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // excl
                                  .Attr<double>("pre")
                                  .Attr<double>("cache_bytes")
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grad
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmGbListGradient, GbListGradientImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // x
                                  .Arg<ffi::Buffer<ffi::F64>>()  // q_gb
                                  .Arg<ffi::Buffer<ffi::F64>>()  // radius
                                  .Arg<ffi::Buffer<ffi::F64>>()  // scale
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Attr<double>("pre")
                                  .Attr<double>("cutoff")
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grad
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmGbListZeta, GbListZetaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // x
                                  .Arg<ffi::Buffer<ffi::F64>>()  // q_gb
                                  .Arg<ffi::Buffer<ffi::F64>>()  // radius
                                  .Arg<ffi::Buffer<ffi::F64>>()  // scale
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // tangents (P, N, 3)
                                  .Attr<double>("pre")
                                  .Attr<double>("cutoff")
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grad (N, 3)
                                  .Ret<ffi::Buffer<ffi::F64>>()  // H·t (P, N, 3)
);
