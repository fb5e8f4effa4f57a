// XLA FFI custom call for the CPU: ∇E and ζ of every internal-coordinate term (bonds,
// angles, proper and improper torsions, 1-4 exceptions) in one pass over the distinct atom
// tuples, with the per-term maths of bonded.cuh (the same functions the CUDA kernels and
// the host build use), and, optionally, the all-pairs Hessian contraction of ζ.
//
// Why: on CPU the JAX structured ζ spends a large share of a small system's step in the
// hundreds of tiny XLA kernels that evaluate these 3k×3k blocks, and on a large one in
// scattering them into the dense Hessian. Here each tuple's Hessian block
//     f'' ∇q∇qᵀ + f' ∇²q
// is applied to the tangents without being formed: ∇²q·t is the derivative of the
// analytic ∇q along t, a Jet carrying LANES tangents at once through bonded.cuh's
// formula. Mixed partials ∂²E/∂x∂θ_p are scattered from the terms that use a chosen θ_p.
//
// The all-pairs part (LJ + Coulomb, OBC2's pair part): given the symmetric pair scalars
// A, B (N, N) that zeta.py computes in XLA, the block of pair (i, j) is A_ij d dᵀ + B_ij I
// (d = x_i - x_j), and
//     ζ_i += Σ_{j≠i} (A_ij d dᵀ + B_ij I)(t_i - t_j),
// summed over the upper triangle only (each pair updates both atoms), in tiles of atoms
// whose tangents stay in L1. That is half the flops of the dense (P, 3N)·(3N, 3N) product
// and no (3N, 3N) matrix in memory.
//
// Layout: the tangents and ζ are held as chunks of LANES tangents, (chunk, 3N, LANES),
// so every Jet or pair operation is one SIMD operation over LANES tangents and a chunk
// is one contiguous block. Chunks are independent: they are shared among XLA's intra-op
// threads (work-stealing, so a busy pool only means the caller does more of them). Each
// chunk is computed in the same order whichever thread runs it, so results are bitwise
// deterministic and independent of the thread count.
//
// Operands (built once per System and wrt in timemachine/backends/xla_cpu.py):
//   x (N,3) f64, theta (P_all) f64, dx (P,N,3) f64,
//   tuples (U,4) i32 atoms (unused slots 0), tuple_kind (U) i32 (bonded.cuh TermKind),
//   term_start (U+1) i32 (tuple u's terms are [term_start[u], term_start[u+1])),
//   pidx (T,6) i32 θ indices per channel, consts (T,2) f64, inv_wrt (P_all) i32
//   (tangent p of θ_m, or -1), pair_a, pair_b: (N,N) f64 symmetric, or empty (no pairs).
// Results: grad (N,3) and zeta (P,N,3), this call's contribution (overwritten); the
// pairs add to ζ only (their gradient is Σ_j B_ij d_ij, one GEMM in XLA).
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
#include <type_traits>
#include <vector>

#include "../bonded.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int LANES = 8;  // tangents per SIMD block: one AVX-512 or two AVX2 registers
constexpr int64_t TILE = 64;
constexpr int SCALAR_PARTS = 2;  // fixed split of the scalar pass, whatever the threads  // atoms per pair tile: 2 × 64 × 3 × LANES doubles = 24 KiB

// A dual number with LANES tangents as one GCC/Clang vector, so that each operation is a
// SIMD instruction (the generic tmk::Jet's loops stay scalar after unrolling). It has
// exactly the operations bonded.cuh's coordinate gradients use.
typedef double lanes __attribute__((vector_size(LANES * sizeof(double))));
struct VJet {
  double v;
  lanes d;
};
inline VJet operator+(VJet a, VJet b) { return {a.v + b.v, a.d + b.d}; }
inline VJet operator-(VJet a, VJet b) { return {a.v - b.v, a.d - b.d}; }
inline VJet operator-(VJet a) { return {-a.v, -a.d}; }
inline VJet operator*(VJet a, VJet b) { return {a.v * b.v, a.d * b.v + a.v * b.d}; }
inline VJet operator/(VJet a, VJet b) {
  const double inv = 1.0 / b.v, r = a.v * inv;
  return {r, (a.d - r * b.d) * inv};
}
inline VJet operator*(VJet a, double b) { return {a.v * b, a.d * b}; }
inline VJet operator*(double b, VJet a) { return {a.v * b, a.d * b}; }
inline VJet operator/(VJet a, double b) { return {a.v / b, a.d / b}; }
inline VJet operator/(double b, VJet a) {
  const double inv = 1.0 / a.v, r = b * inv;
  return {r, -(r * inv) * a.d};
}
inline VJet tm_sqrt(VJet a) {
  const double s = std::sqrt(a.v);
  return {s, a.d * (0.5 / s)};
}

inline lanes load_lanes(const double* p) {
  lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_lanes(double* p, lanes v) { std::memcpy(p, &v, sizeof v); }

// 64-byte aligned scratch that keeps its capacity between calls (one per calling thread)
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

struct Tables {
  const double* x;
  const double* theta;
  const int32_t* tuples;
  const int32_t* kind;
  const int32_t* start;
  const int32_t* pidx;
  const double* consts;
  const int32_t* inv_wrt;
};

// per-tuple results of the scalar pass that the tangent pass reuses: ∇q (12), f', f''
constexpr int GEOM = 14;

struct Mixed {  // one mixed-partial entry: ζ[row, lane] of a chunk += value
  int64_t row;
  int lane;
  double value;
};

// scratch of the thread that runs the call, reused between calls
thread_local Scratch t_dxt, t_zt, t_geom, t_grad;
thread_local std::vector<std::vector<Mixed>> t_mixed[SCALAR_PARTS];

// the scalar pass over one tuple of K atoms: ∇E into grad, ∇q, f', f'' into geom, and
// the mixed partials f'_θ ∇q into the bucket of the chunk of their tangent
template <int K>
void tuple_scalars(const Tables& tb, int64_t u, double* grad, double* geom, bool tangents,
                   std::vector<std::vector<Mixed>>& mixed) {
  const int kind = tb.kind[u];
  int atoms[K];
  double xl[K][3], g[K][3];
  for (int i = 0; i < K; ++i) {
    atoms[i] = tb.tuples[4 * u + i];
    for (int c = 0; c < 3; ++c) xl[i][c] = tb.x[3 * (int64_t)atoms[i] + c];
  }
  const double q = tmk::coord_value(kind, xl);
  tmk::coord_grad<double>(kind, xl, g);
  double d1 = 0.0, d2 = 0.0;
  for (int32_t t = tb.start[u]; t < tb.start[u + 1]; ++t) {
    double prm[6];
    const int32_t* pi = tb.pidx + 6 * (int64_t)t;
    for (int c = 0; c < tmk::kind_channels(kind); ++c) prm[c] = tb.theta[pi[c]];
    const tmk::TermScalars s = tmk::term_scalars(kind, q, prm, tb.consts + 2 * (int64_t)t);
    d1 += s.d1;
    d2 += s.d2;
    if (!tangents) continue;
    for (int c = 0; c < tmk::kind_channels(kind); ++c) {  // mixed partial ∂f'/∂θ_c ∇q
      const int32_t m = tb.inv_wrt[pi[c]];
      if (m < 0) continue;
      for (int i = 0; i < K; ++i)
        for (int a = 0; a < 3; ++a)
          mixed[m / LANES].push_back({3 * (int64_t)atoms[i] + a, m % LANES, s.dd1[c] * g[i][a]});
    }
  }
  for (int i = 0; i < K; ++i)
    for (int c = 0; c < 3; ++c) {
      grad[3 * (int64_t)atoms[i] + c] += d1 * g[i][c];
      geom[3 * i + c] = g[i][c];
    }
  geom[12] = d1;
  geom[13] = d2;
}

// the tangent pass over one tuple for one chunk: ζ += (f'' ∇q∇qᵀ + f' ∇²q) t, with ∇q
// differentiated along the LANES tangents (a Jet through the analytic gradient), so that
// ∇²q is never formed
template <int K>
void tuple_tangents(const Tables& tb, int64_t u, const double* geom, const double* t,
                    double* z) {
  const int kind = tb.kind[u];
  const double d1 = geom[12], d2 = geom[13];
  int64_t row[K][3];
  VJet xj[K][3], gj[K][3];
  lanes dq = {};
  for (int i = 0; i < K; ++i)
    for (int c = 0; c < 3; ++c) {
      row[i][c] = (3 * (int64_t)tb.tuples[4 * u + i] + c) * LANES;
      xj[i][c].v = tb.x[3 * (int64_t)tb.tuples[4 * u + i] + c];
      xj[i][c].d = load_lanes(t + row[i][c]);
      dq += geom[3 * i + c] * xj[i][c].d;
    }
  tmk::coord_grad<VJet>(kind, xj, gj);
  for (int i = 0; i < K; ++i)
    for (int c = 0; c < 3; ++c) {
      double* out = z + row[i][c];
      store_lanes(out, load_lanes(out) + (d2 * geom[3 * i + c]) * dq + d1 * gj[i][c].d);
    }
}

// f(std::integral_constant<int, K>) with K the atom count of a tuple of this kind
template <class F>
void by_atoms(int kind, F&& f) {
  if (kind == tmk::KIND_TORSION)
    f(std::integral_constant<int, 4>{});
  else if (kind == tmk::KIND_ANGLE)
    f(std::integral_constant<int, 3>{});
  else
    f(std::integral_constant<int, 2>{});
}

// ζ_i += Σ_j (A_ij d dᵀ + B_ij I)(t_i - t_j) and ζ_j -= the same, d = x_i - x_j, for
// i in [i0, i1), j in [j0, j1) with j > i: one tile of the upper triangle, one chunk
// noinline: inlined into the chunk loop, GCC 12 allocates its registers worse (measured
// 25 % slower on villin)
__attribute__((noinline)) void pair_tile(const double* x, const double* pa, const double* pb, int64_t n, int64_t i0,
               int64_t i1, int64_t j0, int64_t j1, const double* t, double* z) {
  for (int64_t i = i0; i < i1; ++i) {
    const double xi0 = x[3 * i], xi1 = x[3 * i + 1], xi2 = x[3 * i + 2];
    const double* ti = t + 3 * i * LANES;
    const lanes t0 = load_lanes(ti), t1 = load_lanes(ti + LANES), t2 = load_lanes(ti + 2 * LANES);
    lanes acc0 = {}, acc1 = {}, acc2 = {};
    const double* arow = pa + i * n;
    const double* brow = pb + i * n;
    for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
      const double d0 = xi0 - x[3 * j], d1 = xi1 - x[3 * j + 1], d2 = xi2 - x[3 * j + 2];
      const double aij = arow[j], bij = brow[j];
      const double* tj = t + 3 * j * LANES;
      double* zj = z + 3 * j * LANES;
      const lanes e0 = t0 - load_lanes(tj), e1 = t1 - load_lanes(tj + LANES),
                  e2 = t2 - load_lanes(tj + 2 * LANES);
      const lanes as = aij * (d0 * e0 + d1 * e1 + d2 * e2);
      const lanes f0 = as * d0 + bij * e0, f1 = as * d1 + bij * e1, f2 = as * d2 + bij * e2;
      acc0 += f0;
      acc1 += f1;
      acc2 += f2;
      store_lanes(zj, load_lanes(zj) - f0);
      store_lanes(zj + LANES, load_lanes(zj + LANES) - f1);
      store_lanes(zj + 2 * LANES, load_lanes(zj + 2 * LANES) - f2);
    }
    double* zi = z + 3 * i * LANES;
    store_lanes(zi, load_lanes(zi) + acc0);
    store_lanes(zi + LANES, load_lanes(zi + LANES) + acc1);
    store_lanes(zi + 2 * LANES, load_lanes(zi + 2 * LANES) + acc2);
  }
}

// run work(0..units-1) on this thread and on up to units - 1 tasks of XLA's intra-op
// pool. Units are claimed from a counter, so a task that starts late (the pool is busy)
// finds nothing left and returns: the caller never waits for a unit nobody has claimed.
void parallel_units(ffi::ThreadPool& pool, int units, const std::function<void(int)>& work) {
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
      (*s.work)(k);  // only reached while the caller is still waiting for this unit
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int helpers = std::min<int64_t>(pool.num_threads(), units) - 1;
  for (int h = 0; h < helpers; ++h) pool.Schedule([st, run] { run(*st); });
  run(*st);
  while (st->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

ffi::Error GradientZetaImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> x,
                            ffi::Buffer<ffi::F64> theta, ffi::Buffer<ffi::F64> dx,
                            ffi::Buffer<ffi::S32> tuples, ffi::Buffer<ffi::S32> tuple_kind,
                            ffi::Buffer<ffi::S32> term_start, ffi::Buffer<ffi::S32> pidx,
                            ffi::Buffer<ffi::F64> consts, ffi::Buffer<ffi::S32> inv_wrt,
                            ffi::Buffer<ffi::F64> pair_a, ffi::Buffer<ffi::F64> pair_b,
                            ffi::ResultBuffer<ffi::F64> grad, ffi::ResultBuffer<ffi::F64> zeta) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != 3)
    return ffi::Error::InvalidArgument("tm_gradient_zeta: x must have shape (N, 3)");
  const int64_t n = xd[0];
  const auto dd = dx.dimensions();
  if (dd.size() != 3 || dd[1] != n || dd[2] != 3)
    return ffi::Error::InvalidArgument(
        "tm_gradient_zeta: dx must have shape (P, " + std::to_string(n) + ", 3)");
  const int64_t p = dd[0];
  const int64_t n_tuples = tuple_kind.element_count();
  if (tuples.element_count() != 4 * (size_t)n_tuples ||
      term_start.element_count() != (size_t)n_tuples + 1)
    return ffi::Error::InvalidArgument(
        "tm_gradient_zeta: tuples, tuple_kind and term_start disagree in length");
  const int64_t n_terms = term_start.typed_data()[n_tuples];
  if (pidx.element_count() != 6 * (size_t)n_terms || consts.element_count() != 2 * (size_t)n_terms)
    return ffi::Error::InvalidArgument(
        "tm_gradient_zeta: pidx and consts must have one row per term");
  if (inv_wrt.element_count() != theta.element_count())
    return ffi::Error::InvalidArgument("tm_gradient_zeta: inv_wrt must have one entry per θ");
  const bool pairs = pair_a.element_count() > 0;
  if (pair_a.element_count() != pair_b.element_count() ||
      (pairs && pair_a.element_count() != (size_t)(n * n)))
    return ffi::Error::InvalidArgument("tm_gradient_zeta: pair_a and pair_b must both be (" +
                                       std::to_string(n) + ", " + std::to_string(n) +
                                       ") or both empty");
  Tables tb{x.typed_data(),      theta.typed_data(),  tuples.typed_data(),
            tuple_kind.typed_data(), term_start.typed_data(), pidx.typed_data(),
            consts.typed_data(), inv_wrt.typed_data()};
  double* g = grad->typed_data();
  std::memset(g, 0, sizeof(double) * 3 * n);
  const int64_t chunks = (p + LANES - 1) / LANES;
  const int64_t rows = 3 * n, block = rows * LANES;
  // the scalar pass in SCALAR_PARTS fixed halves of the tuples (on two threads when the
  // pool has them): ∇E as part 0 + part 1, and what the tangent pass reuses; the mixed
  // partials of each part go to its own buckets, applied part by part (a fixed order)
  auto& mixed = t_mixed;
  double* geom = t_geom.get(GEOM * std::max<int64_t>(n_tuples, 1));
  double* g1 = t_grad.get(3 * n * (SCALAR_PARTS - 1));
  std::memset(g1, 0, sizeof(double) * 3 * n * (SCALAR_PARTS - 1));
  std::function<void(int)> scalars = [&](int part) {
    mixed[part].resize(chunks);
    for (auto& bucket : mixed[part]) bucket.clear();  // keeps capacity between calls
    double* gp = part == 0 ? g : g1 + 3 * n * (part - 1);
    for (int64_t u = n_tuples * part / SCALAR_PARTS; u < n_tuples * (part + 1) / SCALAR_PARTS;
         ++u) {
      by_atoms(tb.kind[u], [&](auto k) {
        tuple_scalars<decltype(k)::value>(tb, u, gp, geom + GEOM * u, p > 0, mixed[part]);
      });
    }
  };
  parallel_units(pool, SCALAR_PARTS, scalars);
  for (int part = 1; part < SCALAR_PARTS; ++part)
    for (int64_t k = 0; k < 3 * n; ++k) g[k] += g1[3 * n * (part - 1) + k];
  if (p == 0) return ffi::Error::Success();
  double* dxt = t_dxt.get(chunks * block);
  double* zt = t_zt.get(chunks * block);
  const double* src = dx.typed_data();
  double* z = zeta->typed_data();
  const double* xs = tb.x;
  const double* pa = pair_a.typed_data();
  const double* pb = pair_b.typed_data();
  // the chunks of one unit: [c0, c1); units are contiguous runs of chunks
  const int units = (int)std::min<int64_t>(chunks, std::max<int64_t>(pool.num_threads(), 1));
  std::function<void(int)> work = [&](int k) {
    const int64_t c0 = chunks * k / units, c1 = chunks * (k + 1) / units;
    for (int64_t c = c0; c < c1; ++c) {  // tangents in, ζ zeroed, mixed partials
      double* t = dxt + c * block;
      double* zc = zt + c * block;
      const int64_t width = std::min<int64_t>(LANES, p - c * LANES);
      std::memset(zc, 0, sizeof(double) * block);
      if (width < LANES) std::memset(t, 0, sizeof(double) * block);
      for (int64_t l = 0; l < width; ++l) {
        const double* s = src + (c * LANES + l) * rows;
        for (int64_t r = 0; r < rows; ++r) t[r * LANES + l] = s[r];
      }
      for (const auto& part : mixed)
        for (const Mixed& e : part[c]) zc[e.row * LANES + e.lane] += e.value;
    }
    for (int64_t u = 0; u < n_tuples; ++u)
      by_atoms(tb.kind[u], [&](auto k) {
        for (int64_t c = c0; c < c1; ++c)
          tuple_tangents<decltype(k)::value>(tb, u, geom + GEOM * u, dxt + c * block, zt + c * block);
      });
    if (pairs)
      for (int64_t i0 = 0; i0 < n; i0 += TILE)
        for (int64_t j0 = i0; j0 < n; j0 += TILE)
          for (int64_t c = c0; c < c1; ++c)
            pair_tile(xs, pa, pb, n, i0, std::min(i0 + TILE, n), j0, std::min(j0 + TILE, n),
                      dxt + c * block, zt + c * block);
    for (int64_t c = c0; c < c1; ++c) {  // ζ out, (P, N, 3)
      const double* zc = zt + c * block;
      const int64_t width = std::min<int64_t>(LANES, p - c * LANES);
      for (int64_t l = 0; l < width; ++l) {
        double* d = z + (c * LANES + l) * rows;
        for (int64_t r = 0; r < rows; ++r) d[r] = zc[r * LANES + l];
      }
    }
  };
  parallel_units(pool, units, work);
  return ffi::Error::Success();
}

// The Verlet-list pair contraction of ζ (timemachine/potentials/cutoffs.py): row i of
// the list idx (N, K) holds atom i's partners j (padded with N at the end), every pair in
// both rows, with the pair scalars A_ij, B_ij (N, K) that XLA computes; then
//     ζ_i = Σ_j (A_ij d dᵀ + B_ij I)(t_i - t_j),   d = x_i - x_j (minimum image in box),
// a sum over row i alone: rows are independent (no scatter), and a row's sum runs in the
// list's order, so the result is bitwise the same for any split among threads.
// Mixed partials in the same pass: for each of the M parameter kinds m (charge, σ, ε),
// mix_i[m], mix_j[m] (N, K) are ∂B_ij/∂(atom i's, atom j's parameter of kind m) and
// mix_p[m] (N,) the tangent of atom a's parameter of kind m (-1: not chosen); then
//     ζ_p,i += Σ_j (mix_i[m]_ij [p = mix_p[m]_i] + mix_j[m]_ij [p = mix_p[m]_j]) d_ij,
// added for the tangents of this chunk (p in [p0, p0 + LANES)) only.
void neighbour_rows(const double* x, const double* box, const int32_t* idx, const double* pa,
                    const double* pb, int64_t n, int64_t k, int64_t i0, int64_t i1,
                    const double* t, double* z, int m_kinds, const double* mix_i,
                    const double* mix_j, const int32_t* mix_p, int64_t p0) {
  for (int64_t i = i0; i < i1; ++i) {
    const double xi0 = x[3 * i], xi1 = x[3 * i + 1], xi2 = x[3 * i + 2];
    const double* ti = t + 3 * i * LANES;
    const lanes t0 = load_lanes(ti), t1 = load_lanes(ti + LANES), t2 = load_lanes(ti + 2 * LANES);
    lanes acc0 = {}, acc1 = {}, acc2 = {};
    int64_t pi_[3];
    double own[3][3] = {};
    for (int m = 0; m < m_kinds; ++m) pi_[m] = (int64_t)mix_p[m * n + i] - p0;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t j = idx[i * k + s];
      if (j >= n) break;  // padding: the row's partners come first
      double d0 = xi0 - x[3 * j], d1 = xi1 - x[3 * j + 1], d2 = xi2 - x[3 * j + 2];
      if (box) {
        d0 -= box[0] * std::nearbyint(d0 / box[0]);
        d1 -= box[1] * std::nearbyint(d1 / box[1]);
        d2 -= box[2] * std::nearbyint(d2 / box[2]);
      }
      const double aij = pa[i * k + s], bij = pb[i * k + s];
      const double* tj = t + 3 * j * LANES;
      const lanes e0 = t0 - load_lanes(tj), e1 = t1 - load_lanes(tj + LANES),
                  e2 = t2 - load_lanes(tj + 2 * LANES);
      const lanes as = aij * (d0 * e0 + d1 * e1 + d2 * e2);
      acc0 += as * d0 + bij * e0;
      acc1 += as * d1 + bij * e1;
      acc2 += as * d2 + bij * e2;
      for (int m = 0; m < m_kinds; ++m) {
        const int64_t pj = (int64_t)mix_p[m * n + j] - p0;
        if (pj >= 0 && pj < LANES) {
          const double w = mix_j[(m * n + i) * k + s];
          acc0[pj] += w * d0;
          acc1[pj] += w * d1;
          acc2[pj] += w * d2;
        }
        if (pi_[m] >= 0 && pi_[m] < LANES) {
          const double w = mix_i[(m * n + i) * k + s];
          own[m][0] += w * d0;
          own[m][1] += w * d1;
          own[m][2] += w * d2;
        }
      }
    }
    for (int m = 0; m < m_kinds; ++m)
      if (pi_[m] >= 0 && pi_[m] < LANES) {
        acc0[pi_[m]] += own[m][0];
        acc1[pi_[m]] += own[m][1];
        acc2[pi_[m]] += own[m][2];
      }
    double* zi = z + 3 * i * LANES;
    store_lanes(zi, acc0);
    store_lanes(zi + LANES, acc1);
    store_lanes(zi + 2 * LANES, acc2);
  }
}

thread_local Scratch t_ndxt, t_nzt;

ffi::Error NeighbourZetaImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> x,
                             ffi::Buffer<ffi::F64> box, ffi::Buffer<ffi::S32> idx,
                             ffi::Buffer<ffi::F64> pair_a, ffi::Buffer<ffi::F64> pair_b,
                             ffi::Buffer<ffi::F64> dx, ffi::Buffer<ffi::F64> mix_i,
                             ffi::Buffer<ffi::F64> mix_j, ffi::Buffer<ffi::S32> mix_p,
                             ffi::ResultBuffer<ffi::F64> zeta) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != 3)
    return ffi::Error::InvalidArgument("tm_neighbour_zeta: x must have shape (N, 3)");
  const int64_t n = xd[0];
  const auto id = idx.dimensions();
  if (id.size() != 2 || id[0] != n)
    return ffi::Error::InvalidArgument("tm_neighbour_zeta: idx must have shape (N, K)");
  const int64_t k = id[1];
  if (pair_a.element_count() != (size_t)(n * k) || pair_b.element_count() != (size_t)(n * k))
    return ffi::Error::InvalidArgument("tm_neighbour_zeta: pair_a, pair_b must be (N, K)");
  if (box.element_count() != 0 && box.element_count() != 3)
    return ffi::Error::InvalidArgument("tm_neighbour_zeta: box must be (3,) or empty");
  const auto dd = dx.dimensions();
  if (dd.size() != 3 || dd[1] != n || dd[2] != 3)
    return ffi::Error::InvalidArgument(
        "tm_neighbour_zeta: dx must have shape (P, " + std::to_string(n) + ", 3)");
  const int64_t p = dd[0];
  const int m_kinds = (int)(mix_p.element_count() / std::max<int64_t>(n, 1));
  if (m_kinds > 3 || mix_p.element_count() != (size_t)(m_kinds * n) ||
      mix_i.element_count() != (size_t)(m_kinds * n * k) ||
      mix_j.element_count() != (size_t)(m_kinds * n * k))
    return ffi::Error::InvalidArgument(
        "tm_neighbour_zeta: mix_i, mix_j must be (M, N, K) and mix_p (M, N), M <= 3");
  if (p == 0) return ffi::Error::Success();
  const int64_t chunks = (p + LANES - 1) / LANES;
  const int64_t rows = 3 * n, block = rows * LANES;
  double* dxt = t_ndxt.get(chunks * block);
  double* zt = t_nzt.get(chunks * block);
  const double* src = dx.typed_data();
  double* z = zeta->typed_data();
  const double* bx = box.element_count() ? box.typed_data() : nullptr;
  // units: (chunk, row range) pairs, so that one chunk of tangents still splits
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), 8));
  const int units = (int)(chunks * parts);
  for (int64_t c = 0; c < chunks; ++c) {  // tangents in, as (chunk, 3N, LANES)
    double* t = dxt + c * block;
    const int64_t width = std::min<int64_t>(LANES, p - c * LANES);
    if (width < LANES) std::memset(t, 0, sizeof(double) * block);
    for (int64_t l = 0; l < width; ++l) {
      const double* s = src + (c * LANES + l) * rows;
      for (int64_t r = 0; r < rows; ++r) t[r * LANES + l] = s[r];
    }
  }
  std::function<void(int)> work = [&](int u) {
    const int64_t c = u / parts, part = u % parts;
    neighbour_rows(x.typed_data(), bx, idx.typed_data(), pair_a.typed_data(),
                   pair_b.typed_data(), n, k, n * part / parts, n * (part + 1) / parts,
                   dxt + c * block, zt + c * block, m_kinds, mix_i.typed_data(),
                   mix_j.typed_data(), mix_p.typed_data(), c * LANES);
  };
  parallel_units(pool, units, work);
  for (int64_t c = 0; c < chunks; ++c) {  // ζ out, (P, N, 3)
    const double* zc = zt + c * block;
    const int64_t width = std::min<int64_t>(LANES, p - c * LANES);
    for (int64_t l = 0; l < width; ++l) {
      double* d = z + (c * LANES + l) * rows;
      for (int64_t r = 0; r < rows; ++r) d[r] = zc[r * LANES + l];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmGradientZeta, GradientZetaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // x
                                  .Arg<ffi::Buffer<ffi::F64>>()  // theta
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dx
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tuples
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tuple_kind
                                  .Arg<ffi::Buffer<ffi::S32>>()  // term_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pidx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // consts
                                  .Arg<ffi::Buffer<ffi::S32>>()  // inv_wrt
                                  .Arg<ffi::Buffer<ffi::F64>>()  // pair_a
                                  .Arg<ffi::Buffer<ffi::F64>>()  // pair_b
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grad
                                  .Ret<ffi::Buffer<ffi::F64>>()  // zeta
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmNeighbourZeta, NeighbourZetaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // x
                                  .Arg<ffi::Buffer<ffi::F64>>()  // box
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // pair_a
                                  .Arg<ffi::Buffer<ffi::F64>>()  // pair_b
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // mix_i
                                  .Arg<ffi::Buffer<ffi::F64>>()  // mix_j
                                  .Arg<ffi::Buffer<ffi::S32>>()  // mix_p
                                  .Ret<ffi::Buffer<ffi::F64>>()  // zeta
);
