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

// LANES doubles as one GCC/Clang vector: the tangents per SIMD block of the bonded Jets
// (one AVX-512 or two AVX2 registers). The Verlet-list pairs go in batches of W (one
// AVX2 register, cpu_simd.cuh, included before cutoff.cuh so that its templates find
// where() for that vector).
constexpr int LANES = 8;
typedef double lanes __attribute__((vector_size(LANES * sizeof(double))));
#include "../cpu_simd.cuh"
#ifdef __AVX2__
#include <immintrin.h>
#endif  // vd, vl, W, where(); exp; Scratch, parallel_units
#include "../cutoff.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t TILE = 64;
constexpr int SCALAR_PARTS = 2;  // fixed split of the scalar pass, whatever the threads  // atoms per pair tile: 2 × 64 × 3 × LANES doubles = 24 KiB

// A dual number with LANES tangents as one GCC/Clang vector, so that each operation is a
// SIMD instruction (the generic tmk::Jet's loops stay scalar after unrolling). It has
// exactly the operations bonded.cuh's coordinate gradients use.
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

// The Verlet-list pairs of a cutoff nonbonded term (timemachine/potentials/cutoffs.py,
// neighbour_pair_gradient_and_zeta): ∇E and ζ row by row, the per-pair scalars computed
// here (not read from memory) with the closed forms of cutoffs._pair_scalars. Row i of
// the list idx (N, K) holds atom i's partners j (padded with N at the end), every pair in
// both rows; with u the pair energy, B = u'(r)/r and A = (dB/dr)/r,
//     ∇_i E = Σ_j B_ij d_ij,   ζ_i += Σ_j (A_ij d dᵀ + B_ij I)(t_i - t_j),
// d = x_i - x_j (minimum image in box), a sum over row i alone: rows are independent (no
// scatter) and a row's sum runs in the list's order, so the result is bitwise the same
// for any split among threads. Mixed partials in the same pass: B is linear in
// k_e q_i q_j and in 4√ε_i√ε_j, so ∂B/∂(a parameter of atom i or j) is the pair's
// Coulomb or LJ part times the other factor (σ: one derivative of the LJ part), added
// to the tangent of that atom's parameter of each kind (mix_p (3, N): charge, σ, ε;
// -1: not chosen).
// erfc(y) = erfcx(y) e^{-y²} for y in [0, ERFC_YMAX], erfcx(y) = e^{y²} erfc(y) by its
// Chebyshev series on [0, ERFC_YMAX] (ERFC_TERMS terms, interpolated at start-up from
// the C library's erfc and exp, as accurate as they are to a few ulp), evaluated on
// W values at once by Clenshaw's recurrence. erfcx is entire and varies slowly
// there: its coefficients fall below 1e-16 by the 30th (α r_c ≤ 4: Ewald tolerances down
// to ~1e-7; beyond, the C library's erfc runs).
constexpr int ERFC_TERMS = 30;
constexpr double ERFC_YMAX = 4.0;

struct ErfcxSeries {
  double c[ERFC_TERMS];
  ErfcxSeries() {
    const double pi = 3.14159265358979323846;
    double fx[ERFC_TERMS];
    for (int j = 0; j < ERFC_TERMS; ++j) {
      const double t = std::cos(pi * (j + 0.5) / ERFC_TERMS);
      const double y = 0.5 * (t + 1.0) * ERFC_YMAX;
      fx[j] = std::exp(y * y) * std::erfc(y);
    }
    for (int m = 0; m < ERFC_TERMS; ++m) {
      double sum = 0.0;
      for (int j = 0; j < ERFC_TERMS; ++j) sum += fx[j] * std::cos(pi * m * (j + 0.5) / ERFC_TERMS);
      c[m] = 2.0 * sum / ERFC_TERMS;
    }
    c[0] *= 0.5;
  }
};
const ErfcxSeries kErfcx;

// erfcx at U vectors at once: U independent Clenshaw recurrences, interleaved
template <int U>
inline void erfcx_series_n(const vd* y, vd* out) {
  vd t[U], t2[U], b1[U], b2[U];
  for (int u = 0; u < U; ++u) {
    t[u] = y[u] * (2.0 / ERFC_YMAX) - 1.0;
    t2[u] = 2.0 * t[u];
    b1[u] = vd{};
    b2[u] = vd{};
  }
  for (int m = ERFC_TERMS - 1; m >= 1; --m)
    for (int u = 0; u < U; ++u) {
      const vd b0 = kErfcx.c[m] + t2[u] * b1[u] - b2[u];
      b2[u] = b1[u];
      b1[u] = b0;
    }
  for (int u = 0; u < U; ++u) out[u] = kErfcx.c[0] + t[u] * b1[u] - b2[u];
}

constexpr int FU = 4;
constexpr int FB = FU * W;           // pairs per iteration of pass 2


// per atom, one 32-byte vector each (row N: the padding's, far from nothing, no charge)
struct PackedAtoms {
  const double* xyz;  // (N + 1, 4): x, y, z, 0
  const double* par;  // (N + 1, 4): q, σ, √ε, then 0 (plain step) or d√ε/dε (ζ)
};

// the W rows (one per partner) of 4 doubles turned into 3 vectors of their first 3 fields
inline void transpose3(const double* base, const int64_t* j, vd* out) {
  const vd r0 = load(base + 4 * j[0]), r1 = load(base + 4 * j[1]), r2 = load(base + 4 * j[2]),
           r3 = load(base + 4 * j[3]);
  typedef long long vm __attribute__((vector_size(W * sizeof(double))));
  const vd t0 = __builtin_shuffle(r0, r1, vm{0, 4, 2, 6});  // x0 x1 z0 z1
  const vd t1 = __builtin_shuffle(r0, r1, vm{1, 5, 3, 7});  // y0 y1 . .
  const vd t2 = __builtin_shuffle(r2, r3, vm{0, 4, 2, 6});  // x2 x3 z2 z3
  const vd t3 = __builtin_shuffle(r2, r3, vm{1, 5, 3, 7});  // y2 y3 . .
  out[0] = __builtin_shuffle(t0, t2, vm{0, 1, 4, 5});
  out[1] = __builtin_shuffle(t1, t3, vm{0, 1, 4, 5});
  out[2] = __builtin_shuffle(t0, t2, vm{2, 3, 6, 7});
}

inline vd vrint(vd v) {  // round half to even, |v| < 2^51 (as jnp.round)
  const double shifter = 6755399441055744.0;
  return (v + shifter) - shifter;
}

inline double rint_even(double v) {  // as vrint: round half to even, |v| < 2^51
  const double shifter = 6755399441055744.0;
  return (v + shifter) - shifter;  // IEEE: no -ffast-math, so not folded
}


// the W rows of 4 doubles turned into 4 vectors, one per field
inline void transpose4(const double* base, const int64_t* j, vd* out) {
  const vd r0 = load(base + 4 * j[0]), r1 = load(base + 4 * j[1]), r2 = load(base + 4 * j[2]),
           r3 = load(base + 4 * j[3]);
  typedef long long vm __attribute__((vector_size(W * sizeof(double))));
  const vd t0 = __builtin_shuffle(r0, r1, vm{0, 4, 2, 6});  // f0 of 0 1, f2 of 0 1
  const vd t1 = __builtin_shuffle(r0, r1, vm{1, 5, 3, 7});  // f1 of 0 1, f3 of 0 1
  const vd t2 = __builtin_shuffle(r2, r3, vm{0, 4, 2, 6});
  const vd t3 = __builtin_shuffle(r2, r3, vm{1, 5, 3, 7});
  out[0] = __builtin_shuffle(t0, t2, vm{0, 1, 4, 5});
  out[1] = __builtin_shuffle(t1, t3, vm{0, 1, 4, 5});
  out[2] = __builtin_shuffle(t0, t2, vm{2, 3, 6, 7});
  out[3] = __builtin_shuffle(t1, t3, vm{2, 3, 6, 7});
}

// x (N, 3) and atoms (4, N) as PackedAtoms in scratch (ζ: the fourth field d√ε/dε),
// row N the padding's: at 0, no charge, σ = 1, no ε
thread_local Scratch t_packed;
PackedAtoms pack_atoms(const double* xs, const double* ad, int64_t n, bool zeta) {
  double* packed = t_packed.get(8 * (n + 1));
  for (int64_t a = 0; a < n; ++a) {
    double* px = packed + 4 * a;
    double* pp = packed + 4 * (n + 1) + 4 * a;
    px[0] = xs[3 * a];
    px[1] = xs[3 * a + 1];
    px[2] = xs[3 * a + 2];
    px[3] = 0.0;
    pp[0] = ad[a];
    pp[1] = ad[n + a];
    pp[2] = ad[2 * n + a];
    pp[3] = zeta ? ad[3 * n + a] : 0.0;
  }
  for (int e = 0; e < 4; ++e) packed[4 * n + e] = packed[4 * (n + 1) + 4 * n + e] = 0.0;
  packed[4 * (n + 1) + 4 * n + 1] = 1.0;  // the padding's σ
  return PackedAtoms{packed, packed + 4 * (n + 1)};
}

// r, erfc(α r) and exp(-α² r²) of FU vectors of W pairs from their r² (PME; the
// reaction field's erfc and exp are 0): erfc's series and exp are chains of dependent
// multiply-adds, FU independent chains at once (pass 2 of both row kernels)
inline void radial_batch(const double* r2s, const tmk::CutoffForm& pc, bool fast_erfc, vd* r,
                         vd* erfc_ar, vd* gauss) {
  for (int u = 0; u < FU; ++u) {
    const vd r2 = load(r2s + u * W);
    r[u] = tmk::tm_sqrt(r2);
    gauss[u] = pc.pme ? tmk::tm_exp(-(pc.alpha * pc.alpha) * r2) : vd{};
  }
  if (!pc.pme) {
    for (int u = 0; u < FU; ++u) erfc_ar[u] = vd{};
  } else if (fast_erfc) {
    vd y[FU];
    for (int u = 0; u < FU; ++u) y[u] = pc.alpha * r[u];
    erfcx_series_n<FU>(y, erfc_ar);
    for (int u = 0; u < FU; ++u) erfc_ar[u] *= gauss[u];
  } else {
    for (int u = 0; u < FU; ++u)
      for (int l = 0; l < W; ++l) erfc_ar[u][l] = std::erfc(pc.alpha * r[u][l]);
  }
}

constexpr int PREFETCH = 16;  // pass 3's look-ahead, pairs
constexpr double TWO_OVER_SQRT_PI = 1.1283791670955126;
static_assert(PREFETCH <= FB, "the rows' scratch holds FB slots beyond the list");

// One row's partners within the cutoff (passes 1 and 2 of neighbour_pair_rows), each
// array (cap,): j, r², the displacement d, A d with A = (dB/dr)/r, B = u'/r and
// ∂B/∂(atom j's charge, σ, ε)
struct RowPairs {
  int64_t* j;
  double *r2, *d[3], *ad[3], *b, *mj[3];
  static int64_t doubles(int64_t cap) { return 12 * cap; }
  RowPairs(double* s, int64_t cap)
      : j(reinterpret_cast<int64_t*>(s)), r2(s + cap), d{s + 2 * cap, s + 3 * cap, s + 4 * cap},
        ad{s + 5 * cap, s + 6 * cap, s + 7 * cap}, b(s + 8 * cap),
        mj{s + 9 * cap, s + 10 * cap, s + 11 * cap} {}
};

// Pass 1 of a row's pairs: row i's partners within the cutoff, j and r² (minimum image)
// into jo and ro, those j > i alone (head_only: the plain step takes each pair once, from
// the heads of the rows) or all; padded to a multiple of FB (and PREFETCH beyond) with
// atom N at r = 1 (no charge, no ε: every scalar 0). Returns the count kept.
int64_t keep_partners(const double* x, const double* box, const double* inv_box,
                      const int32_t* row, int64_t k, int64_t n, int64_t i, double rc2,
                      bool head_only, int64_t* __restrict jo, double* __restrict ro) {
  const double xi0 = x[3 * i], xi1 = x[3 * i + 1], xi2 = x[3 * i + 2];
  const int64_t lo = head_only ? i : -1;  // partners j > lo
  int64_t m = 0, s = 0;
#ifdef __AVX2__
  // four slots at a time while all four are kept partners: the coordinates by AVX2
  // gathers, the same arithmetic as the scalar loop below
  const __m256d xv0 = _mm256_set1_pd(xi0), xv1 = _mm256_set1_pd(xi1), xv2 = _mm256_set1_pd(xi2);
  const __m128i lo4 = _mm_set1_epi32((int32_t)lo), hi = _mm_set1_epi32((int32_t)n);
  for (; s + 4 <= k; s += 4) {
    const __m128i j4 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + s));
    const __m128i keep = _mm_and_si128(_mm_cmpgt_epi32(j4, lo4), _mm_cmplt_epi32(j4, hi));
    if (_mm_movemask_ps(_mm_castsi128_ps(keep)) != 0xF) break;
    const __m128i j3 = _mm_add_epi32(_mm_add_epi32(j4, j4), j4);
    vd d[3];
    d[0] = (vd)_mm256_sub_pd(xv0, _mm256_i32gather_pd(x, j3, 8));
    d[1] = (vd)_mm256_sub_pd(xv1, _mm256_i32gather_pd(x + 1, j3, 8));
    d[2] = (vd)_mm256_sub_pd(xv2, _mm256_i32gather_pd(x + 2, j3, 8));
    if (box)
      for (int e = 0; e < 3; ++e) d[e] -= box[e] * vrint(d[e] * inv_box[e]);
    const vd r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    for (int l = 0; l < 4; ++l) {  // written always, kept within the cutoff
      jo[m] = row[s + l];
      ro[m] = r2[l];
      m += r2[l] < rc2;
    }
  }
#endif
  for (; s < k; ++s) {
    const int64_t j = row[s];
    if (j >= n || j <= lo) break;  // padding, or (head_only) the partners j < i
    double d0 = xi0 - x[3 * j], d1 = xi1 - x[3 * j + 1], d2 = xi2 - x[3 * j + 2];
    if (box) {  // d/L by a product: it rounds to a different image only at |d| ≈ L/2,
                // far beyond the cutoff (L ≥ 2 r_c)
      d0 -= box[0] * rint_even(d0 * inv_box[0]);
      d1 -= box[1] * rint_even(d1 * inv_box[1]);
      d2 -= box[2] * rint_even(d2 * inv_box[2]);
    }
    const double r2 = d0 * d0 + d1 * d1 + d2 * d2;
    jo[m] = j;  // written always, kept (m advanced) within the cutoff: no branch
    ro[m] = r2;
    m += r2 < rc2;
  }
  const int64_t mp = (m + FB - 1) / FB * FB + PREFETCH;  // + the prefetches' look-ahead
  for (int64_t t = m; t < mp; ++t) {
    jo[t] = n;
    ro[t] = 1.0;
  }
  return m;
}

// The tangents' vectors in pass 3 of neighbour_pair_rows: a whole chunk (LANES) in one
// register with AVX-512 (half the instructions of two AVX2 registers), else W lanes
#ifdef __AVX512F__
typedef lanes tv;
constexpr int TW = LANES;
#else
typedef vd tv;
constexpr int TW = W;
#endif
constexpr int NT = LANES / TW;  // vectors per chunk of tangents
constexpr int GROUP = 4 / NT;   // chunks per pass over a row's pairs: 12 registers of sums
inline tv load_t(const double* p) {
  tv v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_t(double* p, tv v) { std::memcpy(p, &v, sizeof v); }

// Pass 3 for chunks [c0, c0 + G) of row i: ζ_i = M_i t_i - Σ_j (A d dᵀ + B I) t_j, the
// G chunks' sums in registers over the kept pairs (list order), each partner's G · 3
// vectors one contiguous block of t (N, chunks, 3, LANES), fetched PREFETCH pairs ahead.
// mi: M_i's xx yy zz xy xz yz.
template <int G>
void tangent_group(const RowPairs& rp, int64_t m, const double* t, int64_t stride, int64_t c0,
                   int64_t i, const double* mi, double* z) {
  tv acc[G][3][NT] = {};
  const int64_t off = c0 * 3 * LANES;
  for (int64_t s = 0; s < m; ++s) {
    const double* tj = t + rp.j[s] * stride + off;
    const double* tn = t + rp.j[s + PREFETCH] * stride + off;  // padding: atom N, in bounds
    for (int q = 0; q < G * 3 * LANES; q += 8) __builtin_prefetch(tn + q);
    const double pb_ = rp.b[s], a0 = rp.ad[0][s], a1 = rp.ad[1][s], a2 = rp.ad[2][s];
    const double d0 = rp.d[0][s], d1 = rp.d[1][s], d2 = rp.d[2][s];
    for (int g = 0; g < G; ++g)
      for (int h = 0; h < NT; ++h) {
        const double* tg = tj + g * 3 * LANES + h * TW;
        const tv t0 = load_t(tg), t1 = load_t(tg + LANES), t2 = load_t(tg + 2 * LANES);
        const tv as = a0 * t0 + a1 * t1 + a2 * t2;
        acc[g][0][h] += as * d0;
        acc[g][0][h] += pb_ * t0;
        acc[g][1][h] += as * d1;
        acc[g][1][h] += pb_ * t1;
        acc[g][2][h] += as * d2;
        acc[g][2][h] += pb_ * t2;
      }
  }
  for (int g = 0; g < G; ++g)
    for (int h = 0; h < NT; ++h) {
      const double* ti = t + i * stride + off + g * 3 * LANES + h * TW;
      double* zi = z + i * stride + off + g * 3 * LANES + h * TW;
      const tv t0 = load_t(ti), t1 = load_t(ti + LANES), t2 = load_t(ti + 2 * LANES);
      store_t(zi, (mi[0] * t0 + mi[3] * t1 + mi[4] * t2) - acc[g][0][h]);
      store_t(zi + LANES, (mi[3] * t0 + mi[1] * t1 + mi[5] * t2) - acc[g][1][h]);
      store_t(zi + 2 * LANES, (mi[4] * t0 + mi[5] * t1 + mi[2] * t2) - acc[g][2][h]);
    }
}

// rows [i0, i1) of the list: grad (N, 3) and, for `chunks` chunks of tangents t (N + 1,
// chunks, 3, LANES; atom N's zero), ζ into z (N, chunks, 3, LANES). pa.par holds q, σ, √ε, d√ε/dε per atom; rp is
// the thread's scratch.
//  1. the row's partners within the cutoff (keep_partners);
//  2. their scalars, FU vectors of W pairs per iteration (as neighbour_force_rows),
//     into rp, with ∇_i E, the mixed partials of atom i's own parameters and the row's
//     matrix M_i = Σ_j A d dᵀ + B I summed;
//  2b. with PME and an exclusion table, row i's excluded partners appended to the kept
//     ones, their scalars those of Ewald's correction -k_e q_i q_j erf(α r)/r;
//  3. the tangents, GROUP chunks at a time (tangent_group): ζ_i = M_i t_i -
//     Σ_j (A d dᵀ + B I) t_j, the sums in registers over the kept pairs in list order
//     (the t_i - t_j form would take three more operations per pair and lane), then the
//     partners' mixed partials added in the same order.
void neighbour_pair_rows(const double* x, const double* box, const int32_t* idx, int64_t n,
                         int64_t k, const PackedAtoms& pa, const tmk::CutoffForm& pc,
                         bool fast_erfc, int64_t i0, int64_t i1, int64_t chunks,
                         const double* t, double* z, const int32_t* mix_p, const int32_t* excl,
                         int64_t mx, double* grad, RowPairs& rp) {
  const int64_t stride = chunks * 3 * LANES;  // one atom's tangents
  const double rc2 = pc.cutoff * pc.cutoff;
  double inv_box[3] = {0.0, 0.0, 0.0};
  if (box)
    for (int e = 0; e < 3; ++e) inv_box[e] = 1.0 / box[e];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t m = keep_partners(x, box, inv_box, idx + i * k, k, n, i, rc2, false, rp.j,
                                    rp.r2);
    const int64_t mp = (m + FB - 1) / FB * FB;
    const vd xi[3] = {bcast(x[3 * i]), bcast(x[3 * i + 1]), bcast(x[3 * i + 2])};
    const double* pi = pa.par + 4 * i;
    const double qi = tmk::COULOMB * pi[0], sgi = pi[1], sei4 = 4.0 * pi[2],
                 dsei4 = 4.0 * pi[3];
    vd gv[3] = {}, own[3][3] = {};  // ∇_i E; Σ_j ∂B/∂(atom i's parameter of kind m) d
    vd mv[6] = {}, bv = {};          // M_i's Σ_j A d dᵀ (xx yy zz xy xz yz) and Σ_j B
    for (int64_t s0 = 0; s0 < mp; s0 += FB) {  // pass 2
      vd r[FU], erfc_ar[FU], gauss[FU];
      radial_batch(rp.r2 + s0, pc, fast_erfc, r, erfc_ar, gauss);
      for (int u = 0; u < FU; ++u) {
        const int64_t s = s0 + u * W;
        vd d[3], pj[4];
        transpose3(pa.xyz, rp.j + s, d);
        transpose4(pa.par, rp.j + s, pj);
        for (int e = 0; e < 3; ++e) {  // the displacements again, as pass 1's
          d[e] = xi[e] - d[e];
          if (box) d[e] -= box[e] * vrint(d[e] * inv_box[e]);
          store(rp.d[e] + s, d[e]);
        }
        const vd sig = 0.5 * (sgi + pj[1]);
        const tmk::CutoffRadialT<vd> f =
            tmk::cutoff_radial_given<vd>(r[u], sig, pc, erfc_ar[u], gauss[u]);
        const vd eps4 = sei4 * pj[2], qq = qi * pj[0];
        const vd b = eps4 * f.b_lj + qq * f.b_c;
        const vd a = (eps4 * f.db_lj + qq * f.db_c) / r[u];
        store(rp.b + s, b);
        for (int e = 0; e < 3; ++e) {
          gv[e] += b * d[e];
          store(rp.ad[e] + s, a * d[e]);
        }
        if (chunks) {
          const vd ad0 = a * d[0], ad1 = a * d[1];
          mv[0] += ad0 * d[0];
          mv[1] += ad1 * d[1];
          mv[2] += (a * d[2]) * d[2];
          mv[3] += ad0 * d[1];
          mv[4] += ad0 * d[2];
          mv[5] += ad1 * d[2];
          bv += b;
        }
        if (!mix_p) continue;
        // ∂B/∂(atom i's, atom j's parameter) of each kind: charge, σ, ε
        const vd half_s = 0.5 * eps4 * f.db_lj_s;
        const vd mi[3] = {(tmk::COULOMB * f.b_c) * pj[0], half_s, (dsei4 * f.b_lj) * pj[2]};
        store(rp.mj[0] + s, qi * f.b_c);
        store(rp.mj[1] + s, half_s);
        store(rp.mj[2] + s, (sei4 * f.b_lj) * pj[3]);
        for (int mk = 0; mk < 3; ++mk)
          for (int e = 0; e < 3; ++e) own[mk][e] += mi[mk] * d[e];
      }
    }
    // PME: row i's excluded partners (excl, -1 after the last) join the row after its
    // listed ones, their u = -k_e q_i q_j erf(α r)/r with no periodic image (as
    // cutoffs.ewald_exclusion_gradient_and_zeta, their reference): the reciprocal sum's
    // share of pairs that must not interact. Scalars here, in table order.
    double gx[3] = {0.0, 0.0, 0.0}, mx6[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, bx_ = 0.0,
           own_q[3] = {0.0, 0.0, 0.0};
    int64_t me = m;
    for (int64_t s = 0; excl && s < mx; ++s) {
      const int32_t j = excl[i * mx + s];
      if (j < 0) break;
      const double d[3] = {x[3 * i] - x[3 * j], x[3 * i + 1] - x[3 * j + 1],
                           x[3 * i + 2] - x[3 * j + 2]};
      const double r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2], r = std::sqrt(r2);
      const double erf = std::erf(pc.alpha * r);
      const double gauss = TWO_OVER_SQRT_PI * pc.alpha * std::exp(-pc.alpha * pc.alpha * r2);
      const double s1 = gauss / r - erf / r2;  // s' of s = erf(α r)/r
      const double s2 = -2.0 * pc.alpha * pc.alpha * gauss - 2.0 * gauss / r2 + 2.0 * erf / (r2 * r);
      const double b_unit = -s1 / r, a_unit = -(s2 - s1 / r) / r2;  // per unit k_e q_i q_j
      const double qj = pa.par[4 * j], b = qi * qj * b_unit, a = qi * qj * a_unit;
      rp.j[me] = j;
      rp.b[me] = b;
      for (int e = 0; e < 3; ++e) {
        rp.d[e][me] = d[e];
        rp.ad[e][me] = a * d[e];
        gx[e] += b * d[e];
        own_q[e] += tmk::COULOMB * b_unit * qj * d[e];
      }
      mx6[0] += a * d[0] * d[0];
      mx6[1] += a * d[1] * d[1];
      mx6[2] += a * d[2] * d[2];
      mx6[3] += a * d[0] * d[1];
      mx6[4] += a * d[0] * d[2];
      mx6[5] += a * d[1] * d[2];
      bx_ += b;
      rp.mj[0][me] = qi * b_unit;
      rp.mj[1][me] = 0.0;
      rp.mj[2][me] = 0.0;
      ++me;
    }
    if (me > m)
      for (int64_t s = me; s < me + PREFETCH; ++s) rp.j[s] = n;  // pass 3's look-ahead
    for (int e = 0; e < 3; ++e) grad[3 * i + e] = hsum(gv[e]) + gx[e];
    if (chunks == 0) continue;
    const double bs = hsum(bv) + bx_, mxx = hsum(mv[0]) + mx6[0] + bs,
                 myy = hsum(mv[1]) + mx6[1] + bs, mzz = hsum(mv[2]) + mx6[2] + bs,
                 mxy = hsum(mv[3]) + mx6[3], mxz = hsum(mv[4]) + mx6[4],
                 myz = hsum(mv[5]) + mx6[5];
    const double mi[6] = {mxx, myy, mzz, mxy, mxz, myz};
    for (int64_t c0 = 0; c0 < chunks; c0 += GROUP) {  // pass 3
      switch (std::min<int64_t>(GROUP, chunks - c0)) {
        case 1: tangent_group<1>(rp, me, t, stride, c0, i, mi, z); break;
        case 2: tangent_group<2>(rp, me, t, stride, c0, i, mi, z); break;
        case 3: tangent_group<3>(rp, me, t, stride, c0, i, mi, z); break;
        default: tangent_group<GROUP>(rp, me, t, stride, c0, i, mi, z); break;
      }
    }
    if (!mix_p) continue;
    for (int64_t s = 0; s < me; ++s) {  // the partners' parameters, in list order
      const int64_t j = rp.j[s];
      for (int mk = 0; mk < 3; ++mk) {
        const int32_t pj = mix_p[mk * n + j];
        if (pj < 0) continue;
        double* zz = z + i * stride + (pj / LANES) * 3 * LANES + pj % LANES;
        const double v = rp.mj[mk][s];
        zz[0] += v * rp.d[0][s];
        zz[LANES] += v * rp.d[1][s];
        zz[2 * LANES] += v * rp.d[2][s];
      }
    }
    for (int mk = 0; mk < 3; ++mk) {  // atom i's own
      const int32_t pi_ = mix_p[mk * n + i];
      if (pi_ < 0) continue;
      double* zz = z + i * stride + (pi_ / LANES) * 3 * LANES + pi_ % LANES;
      for (int e = 0; e < 3; ++e) zz[e * LANES] += hsum(own[mk][e]) + (mk ? 0.0 : own_q[e]);
    }
  }
}

thread_local Scratch t_ndxt, t_nzt, t_zrows;

// What tm_neighbour_pairs and tm_neighbour_forces share: the list's arguments checked
// (x (N, 3), idx (N, K), atoms (4, N), consts (4,), box (3,) or empty), and consts read
// into the pair form (cutoff, switch distance or < 0, k_rf, α or 0 for the reaction
// field); fast_erfc where the SIMD erfc covers α r_c (beyond, the C library's runs).
struct ListArgs {
  int64_t n, k;
  tmk::CutoffForm pc;
  bool fast_erfc;
};

ffi::Error read_list_args(const std::string& name, ffi::Buffer<ffi::F64>& x,
                          ffi::Buffer<ffi::F64>& box, ffi::Buffer<ffi::S32>& idx,
                          ffi::Buffer<ffi::F64>& atoms, ffi::Buffer<ffi::F64>& consts,
                          ListArgs* out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != 3)
    return ffi::Error::InvalidArgument(name + ": x must have shape (N, 3)");
  const int64_t n = xd[0];
  const auto id = idx.dimensions();
  if (id.size() != 2 || id[0] != n)
    return ffi::Error::InvalidArgument(name + ": idx must have shape (N, K)");
  if (atoms.element_count() != (size_t)(4 * n))
    return ffi::Error::InvalidArgument(name + ": atoms must be (4, N)");
  if (consts.element_count() != 4)
    return ffi::Error::InvalidArgument(name + ": consts must be (4,)");
  if (box.element_count() != 0 && box.element_count() != 3)
    return ffi::Error::InvalidArgument(name + ": box must be (3,) or empty");
  const double* cd = consts.typed_data();
  out->n = n;
  out->k = id[1];
  out->pc.cutoff = cd[0];
  out->pc.switch_distance = cd[1];
  out->pc.use_switch = cd[1] >= 0;
  out->pc.k_rf = cd[2];
  out->pc.c_rf = 0.0;  // a constant shift of the energy: no derivative needs it
  out->pc.alpha = cd[3];
  out->pc.pme = cd[3] != 0;
  out->fast_erfc = cd[3] * cd[0] <= ERFC_YMAX;
  return ffi::Error::Success();
}

ffi::Error NeighbourPairsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> x,
                              ffi::Buffer<ffi::F64> box, ffi::Buffer<ffi::S32> idx,
                              ffi::Buffer<ffi::F64> atoms, ffi::Buffer<ffi::F64> consts,
                              ffi::Buffer<ffi::F64> dx, ffi::Buffer<ffi::S32> mix_p,
                              ffi::Buffer<ffi::S32> excl, ffi::ResultBuffer<ffi::F64> grad,
                              ffi::ResultBuffer<ffi::F64> zeta) {
  ListArgs la;
  if (auto e = read_list_args("tm_neighbour_pairs", x, box, idx, atoms, consts, &la);
      e.failure())
    return e;
  const int64_t n = la.n, k = la.k;
  const auto dd = dx.dimensions();
  if (dd.size() != 3 || dd[1] != n || dd[2] != 3)
    return ffi::Error::InvalidArgument(
        "tm_neighbour_pairs: dx must have shape (P, " + std::to_string(n) + ", 3)");
  const int64_t p = dd[0];
  if (mix_p.element_count() != 0 && mix_p.element_count() != (size_t)(3 * n))
    return ffi::Error::InvalidArgument("tm_neighbour_pairs: mix_p must be (3, N) or empty");
  const int32_t* mp = mix_p.element_count() ? mix_p.typed_data() : nullptr;
  if (mp)
    for (int64_t a = 0; a < 3 * n; ++a)
      if (mp[a] >= p) return ffi::Error::InvalidArgument("tm_neighbour_pairs: mix_p >= P");
  const auto ed = excl.dimensions();
  if (excl.element_count() != 0 && (ed.size() != 2 || ed[0] != n))
    return ffi::Error::InvalidArgument("tm_neighbour_pairs: excl must be (N, M) or empty");
  const int32_t* ex = excl.element_count() ? excl.typed_data() : nullptr;
  const int64_t mx = ex ? ed[1] : 0;
  if (ex && !la.pc.pme)
    return ffi::Error::InvalidArgument("tm_neighbour_pairs: excl (Ewald's exclusion "
                                       "correction) needs PME (alpha > 0)");
  for (int64_t a = 0; a < n * mx; ++a)
    if (ex[a] >= n || ex[a] == a / mx)
      return ffi::Error::InvalidArgument("tm_neighbour_pairs: excl holds an atom >= N or "
                                         "an atom excluded from itself");
  const tmk::CutoffForm& pc = la.pc;
  const bool fast_erfc = la.fast_erfc;
  const int64_t chunks = (p + LANES - 1) / LANES;
  const int64_t rows = 3 * n, stride = chunks * 3 * LANES;
  // tangents in, as (N + 1, chunks, 3, LANES): each atom's one contiguous block (atom N,
  // the padding's, zero)
  double* dxt = t_ndxt.get(std::max<int64_t>((n + 1) * stride, 1));
  double* zt = t_nzt.get(std::max<int64_t>(n * stride, 1));
  const double* src = dx.typed_data();
  const double* bx = box.element_count() ? box.typed_data() : nullptr;
  std::memset(dxt, 0, sizeof(double) * (n + 1) * stride);
  for (int64_t pp = 0; pp < p; ++pp) {
    const double* s = src + pp * rows;
    double* t = dxt + (pp / LANES) * 3 * LANES + pp % LANES;
    for (int64_t a = 0; a < n; ++a)
      for (int e = 0; e < 3; ++e) t[a * stride + e * LANES] = s[3 * a + e];
  }
  const PackedAtoms pa = pack_atoms(x.typed_data(), atoms.typed_data(), n, true);
  // units: row ranges, each with every chunk (the scalars are computed once per pair)
  const int units = (int)std::max<int64_t>(1, std::min<int64_t>(4 * pool.num_threads(), n));
  const int64_t cap = (k + FB - 1) / FB * FB + FB + mx;  // + the excluded partners
  double* g = grad->typed_data();
  std::function<void(int)> work = [&](int u) {
    RowPairs rp(t_zrows.get(RowPairs::doubles(cap)), cap);
    neighbour_pair_rows(x.typed_data(), bx, idx.typed_data(), n, k, pa, pc, fast_erfc,
                        n * u / units, n * (u + 1) / units, chunks, dxt, zt, mp, ex, mx, g,
                        rp);
  };
  parallel_units(pool, units, work);
  double* z = zeta->typed_data();
  for (int64_t pp = 0; pp < p; ++pp) {  // ζ out, (P, N, 3)
    double* d = z + pp * rows;
    const double* zc = zt + (pp / LANES) * 3 * LANES + pp % LANES;
    for (int64_t a = 0; a < n; ++a)
      for (int e = 0; e < 3; ++e) d[3 * a + e] = zc[a * stride + e * LANES];
  }
  return ffi::Error::Success();
}

// Smooth PME's reciprocal ζ (timemachine/potentials/cutoffs.py,
// pme_reciprocal_gradient_and_zeta): the two steps that XLA runs slowly on the CPU, a
// scatter and a gather of (atoms × order³) rows of P tangents.
//
// Atom j's stencil is the tensor product of its B-spline weights w[j][d][a] along the
// three axes at grid indices idx[j][d][a], with dw the weights' x-derivatives (already
// scaled by K_d / L_d). Per tangent p,
//   spread:  δQ_p(g) += W_j(g) dq_p,j + q_j Σ_e ∂_e W_j(g) dx_p,j,e
//   gather:  F_p,i,d = Σ_g δΨ_p(g) ∂_d W_i(g)
// Both go chunk by chunk of LANES tangents, a unit each: the chunk's grid is held as
// (K³, LANES), a grid point's tangents one cache line and the whole grid (K³ · 64 bytes,
// 0.9 MB at 24³) small enough to stay in cache while every atom's stencil visits it;
// every lane sums in atom order whichever unit or thread runs it, so results are
// bitwise the same on any number of threads.
struct PmeStencil {
  const double* w;     // (N, 3, n)
  const double* dw;    // (N, 3, n)
  const int32_t* idx;  // (N, 3, n)
  int64_t n, order, ky, kz;
};

// One chunk's spread: coef (N, 4, LANES) dq and q dx_{x,y,z}; buf (K³, LANES), added
// to. Per (x, y) row of a stencil, u = Σ of the three weights' products with dq, q dx_x,
// q dx_y and v = w_x w_y q dx_z, then each z point takes w_z u + ∂w_z v (separable).
void pme_spread_chunk(const PmeStencil& st, const double* coef, double* buf) {
  const int64_t o = st.order;
  for (int64_t j = 0; j < st.n; ++j) {
    const double* wj = st.w + j * 3 * o;
    const double* gj = st.dw + j * 3 * o;
    const int32_t* ij = st.idx + j * 3 * o;
    const double* cj = coef + j * 4 * LANES;
    tv c0[NT], c1[NT], c2[NT], c3[NT];
    for (int h = 0; h < NT; ++h) {
      c0[h] = load_t(cj + h * TW);
      c1[h] = load_t(cj + LANES + h * TW);
      c2[h] = load_t(cj + 2 * LANES + h * TW);
      c3[h] = load_t(cj + 3 * LANES + h * TW);
    }
    for (int64_t a = 0; a < o; ++a) {
      const double wx = wj[a], gx = gj[a];
      const int64_t rx = (int64_t)ij[a] * st.ky;
      for (int64_t b = 0; b < o; ++b) {
        const double wy = wj[o + b], gy = gj[o + b];
        const double p0 = wx * wy, p1 = gx * wy, p2 = wx * gy;
        tv u[NT], v[NT];
        for (int h = 0; h < NT; ++h) {
          u[h] = p0 * c0[h] + p1 * c1[h] + p2 * c2[h];
          v[h] = p0 * c3[h];
        }
        const int64_t rxy = (rx + ij[o + b]) * st.kz;
        for (int64_t z = 0; z < o; ++z) {
          const double wz = wj[2 * o + z], gz = gj[2 * o + z];
          double* g = buf + (rxy + ij[2 * o + z]) * LANES;
          for (int h = 0; h < NT; ++h)
            store_t(g + h * TW, load_t(g + h * TW) + wz * u[h] + gz * v[h]);
        }
      }
    }
  }
}

// One chunk's gather: buf (K³, LANES) δΨ; out (N, 3, LANES); order ≤ 8.
void pme_gather_chunk(const PmeStencil& st, const double* buf, double* out) {
  const int64_t o = st.order;
  for (int64_t i = 0; i < st.n; ++i) {
    const double* wi = st.w + i * 3 * o;
    const double* gi = st.dw + i * 3 * o;
    const int32_t* ii = st.idx + i * 3 * o;
    tv f0[NT] = {}, f1[NT] = {}, f2[NT] = {};
    for (int64_t a = 0; a < o; ++a) {
      const int64_t rx = (int64_t)ii[a] * st.ky;
      for (int64_t b = 0; b < o; ++b) {
        const int64_t rxy = (rx + ii[o + b]) * st.kz;
        const double wx = wi[a], gx = gi[a], wy = wi[o + b], gy = gi[o + b];
        const double px = gx * wy, py = wx * gy, pz = wx * wy;
        for (int h = 0; h < NT; ++h) {  // the z sums in registers
          tv s0 = {}, s1 = {};
          for (int64_t z = 0; z < o; ++z) {
            const tv v = load_t(buf + (rxy + ii[2 * o + z]) * LANES + h * TW);
            s0 += wi[2 * o + z] * v;
            s1 += gi[2 * o + z] * v;
          }
          f0[h] += px * s0;
          f1[h] += py * s0;
          f2[h] += pz * s1;
        }
      }
    }
    for (int h = 0; h < NT; ++h) {
      store_t(out + i * 3 * LANES + h * TW, f0[h]);
      store_t(out + i * 3 * LANES + LANES + h * TW, f1[h]);
      store_t(out + i * 3 * LANES + 2 * LANES + h * TW, f2[h]);
    }
  }
}

ffi::Error check_stencil(const char* name, ffi::Buffer<ffi::F64>& w, ffi::Buffer<ffi::F64>& dw,
                         ffi::Buffer<ffi::S32>& idx, int64_t* n, int64_t* order) {
  const auto wd = w.dimensions();
  if (wd.size() != 3 || wd[1] != 3)
    return ffi::Error::InvalidArgument(std::string(name) + ": w must have shape (N, 3, order)");
  *n = wd[0];
  *order = wd[2];
  if (*order < 1 || *order > 8)
    return ffi::Error::InvalidArgument(std::string(name) + ": the spline order must be 1..8");
  if (dw.element_count() != w.element_count() || idx.element_count() != w.element_count())
    return ffi::Error::InvalidArgument(std::string(name) + ": dw, idx must be shaped as w");
  return ffi::Error::Success();
}

thread_local Scratch t_pcoef, t_pbuf, t_pout;

ffi::Error PmeSpreadImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> w, ffi::Buffer<ffi::F64> dw,
                         ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F64> charge,
                         ffi::Buffer<ffi::F64> dq, ffi::Buffer<ffi::F64> dx,
                         ffi::ResultBuffer<ffi::F64> grid) {
  int64_t n, order;
  if (auto e = check_stencil("tm_pme_spread", w, dw, idx, &n, &order); e.failure()) return e;
  const auto gd = grid->dimensions();
  if (gd.size() != 4) return ffi::Error::InvalidArgument("tm_pme_spread: grid is (P, Kx, Ky, Kz)");
  const int64_t p = gd[0], kx = gd[1], ky = gd[2], kz = gd[3], ng = kx * ky * kz;
  if (charge.element_count() != (size_t)n || dq.element_count() != (size_t)(p * n) ||
      dx.element_count() != (size_t)(p * n * 3))
    return ffi::Error::InvalidArgument("tm_pme_spread: charge (N,), dq (P, N), dx (P, N, 3)");
  if (p == 0) return ffi::Error::Success();
  const int64_t chunks = (p + LANES - 1) / LANES;
  double* coefs = t_pcoef.get(chunks * n * 4 * LANES);  // per chunk (N, 4, LANES)
  double* bufs = t_pbuf.get(chunks * ng * LANES);       // per chunk (K³, LANES)
  const double* q = charge.typed_data();
  const double* dqd = dq.typed_data();
  const double* dxd = dx.typed_data();
  double* out = grid->typed_data();
  const PmeStencil st{w.typed_data(), dw.typed_data(), idx.typed_data(), n, order, ky, kz};
  std::function<void(int)> work = [&](int c) {
    double* coef = coefs + c * n * 4 * LANES;
    double* buf = bufs + c * ng * LANES;
    const int64_t width = std::min<int64_t>(LANES, p - c * LANES);
    for (int64_t j = 0; j < n; ++j) {  // dq and q dx of the chunk's tangents
      double* cj = coef + j * 4 * LANES;
      for (int64_t l = 0; l < LANES; ++l) {
        const int64_t pp = c * LANES + l;
        const bool on = l < width;
        cj[l] = on ? dqd[pp * n + j] : 0.0;
        for (int e = 0; e < 3; ++e)
          cj[(1 + e) * LANES + l] = on ? q[j] * dxd[(pp * n + j) * 3 + e] : 0.0;
      }
    }
    std::memset(buf, 0, sizeof(double) * ng * LANES);
    pme_spread_chunk(st, coef, buf);
    for (int64_t l = 0; l < width; ++l) {  // out (P, K³)
      double* o = out + (c * LANES + l) * ng;
      for (int64_t g = 0; g < ng; ++g) o[g] = buf[g * LANES + l];
    }
  };
  parallel_units(pool, (int)chunks, work);
  return ffi::Error::Success();
}

ffi::Error PmeGatherImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> potential,
                         ffi::Buffer<ffi::F64> w, ffi::Buffer<ffi::F64> dw,
                         ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F64> field) {
  int64_t n, order;
  if (auto e = check_stencil("tm_pme_gather", w, dw, idx, &n, &order); e.failure()) return e;
  const auto pd = potential.dimensions();
  if (pd.size() != 4)
    return ffi::Error::InvalidArgument("tm_pme_gather: potential is (P, Kx, Ky, Kz)");
  const int64_t p = pd[0], ky = pd[2], kz = pd[3], ng = pd[1] * ky * kz;
  if (field->element_count() != (size_t)(p * n * 3))
    return ffi::Error::InvalidArgument("tm_pme_gather: field is (P, N, 3)");
  if (p == 0) return ffi::Error::Success();
  const int64_t chunks = (p + LANES - 1) / LANES;
  double* bufs = t_pbuf.get(chunks * ng * LANES);     // per chunk (K³, LANES)
  double* outs = t_pout.get(chunks * n * 3 * LANES);  // per chunk (N, 3, LANES)
  const double* src = potential.typed_data();
  double* f = field->typed_data();
  const PmeStencil st{w.typed_data(), dw.typed_data(), idx.typed_data(), n, order, ky, kz};
  std::function<void(int)> work = [&](int c) {
    double* buf = bufs + c * ng * LANES;
    double* out = outs + c * n * 3 * LANES;
    const int64_t width = std::min<int64_t>(LANES, p - c * LANES);
    for (int64_t l = 0; l < LANES; ++l) {  // δΨ of the chunk in, as (K³, LANES)
      if (l < width) {
        const double* s = src + (c * LANES + l) * ng;
        for (int64_t g = 0; g < ng; ++g) buf[g * LANES + l] = s[g];
      } else {
        for (int64_t g = 0; g < ng; ++g) buf[g * LANES + l] = 0.0;
      }
    }
    pme_gather_chunk(st, buf, out);
    for (int64_t l = 0; l < width; ++l) {  // field (P, N, 3)
      double* fl = f + (c * LANES + l) * n * 3;
      for (int64_t i = 0; i < n; ++i)
        for (int e = 0; e < 3; ++e) fl[3 * i + e] = out[(3 * i + e) * LANES + l];
    }
  };
  parallel_units(pool, (int)chunks, work);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ the plain step
// Plain MD needs ∇E alone, so its calls skip the tangents' layout and work. The pair
// forces of a Verlet list (cutoffs.neighbour_pair_gradient is the JAX reference) take
// every pair once, from the heads of the rows (a row lists its partners j > i first):
//  1. row i's partners j > i within the cutoff, with their minimum-image displacements
//     and parameters, copied into contiguous arrays (scalar loads: the partners are
//     scattered in memory; a quarter of a list's entries are in the skin);
//  2. the pair scalars over those arrays, FU vectors of W pairs per iteration: erfc's
//     series and exp are chains of dependent multiply-adds, and FU independent chains
//     keep the floating-point units busy where one chain would wait on each result.
// Row i's force is its partial sums, one per SIMD slot, summed in a fixed order; the
// opposite force on each j goes to a buffer of the unit (a fixed range of rows) in pair
// order, and the buffers are summed in unit order: the result does not depend on the
// number of threads.
constexpr int64_t FORCE_UNITS = 8;  // row ranges, whatever the number of threads

// rows [i0, i1): their pairs' forces into own (row i's, written) and opp ((N + 1, 3), the
// partners' opposite forces, added; row N takes the padding's zeros). Pass 1 keeps the
// partners j > i within the cutoff (j and r², into oj, or2); pass 2 reads their
// coordinates and parameters as packed rows.
void neighbour_force_rows(const double* x, const double* box, const int32_t* idx, int64_t n,
                          int64_t k, const PackedAtoms& pa, const tmk::CutoffForm& pc,
                          bool fast_erfc, int64_t i0, int64_t i1, double* own, double* opp,
                          int64_t* oj, double* or2) {
  const double rc2 = pc.cutoff * pc.cutoff;
  double inv_box[3] = {0.0, 0.0, 0.0};
  if (box)
    for (int e = 0; e < 3; ++e) inv_box[e] = 1.0 / box[e];
  for (int64_t i = i0; i < i1; ++i) {
    const double xi0 = x[3 * i], xi1 = x[3 * i + 1], xi2 = x[3 * i + 2];
    const int64_t m = keep_partners(x, box, inv_box, idx + i * k, k, n, i, rc2, true, oj, or2);
    const int64_t mp = (m + FB - 1) / FB * FB;
    const vd xi[3] = {bcast(xi0), bcast(xi1), bcast(xi2)};
    const double qi = tmk::COULOMB * pa.par[4 * i], sgi = pa.par[4 * i + 1],
                 sei = 4.0 * pa.par[4 * i + 2];
    vd gv[3] = {};
    for (int64_t s0 = 0; s0 < mp; s0 += FB) {  // pass 2
      vd r[FU], erfc_ar[FU], gauss[FU];
      radial_batch(or2 + s0, pc, fast_erfc, r, erfc_ar, gauss);
      for (int u = 0; u < FU; ++u) {
        const int64_t* js = oj + s0 + u * W;
        vd d[3], pj[3];
        transpose3(pa.xyz, js, d);
        transpose3(pa.par, js, pj);
        for (int e = 0; e < 3; ++e) {  // the displacements again, as pass 1's
          d[e] = xi[e] - d[e];
          if (box) d[e] -= box[e] * vrint(d[e] * inv_box[e]);
        }
        const vd sig = 0.5 * (sgi + pj[1]);
        const tmk::CutoffRadialT<vd> f =
            tmk::cutoff_radial_given<vd>(r[u], sig, pc, erfc_ar[u], gauss[u]);
        const vd b = (sei * pj[2]) * f.b_lj + (qi * pj[0]) * f.b_c;
        const vd f0 = b * d[0], f1 = b * d[1], f2 = b * d[2];
        gv[0] += f0;
        gv[1] += f1;
        gv[2] += f2;
        for (int l = 0; l < W; ++l) {
          double* o = opp + 3 * js[l];
          o[0] -= f0[l];
          o[1] -= f1[l];
          o[2] -= f2[l];
        }
      }
    }
    for (int e = 0; e < 3; ++e) own[3 * i + e] = hsum(gv[e]);
  }
}

thread_local Scratch t_rows, t_opp;

ffi::Error NeighbourForcesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> x,
                               ffi::Buffer<ffi::F64> box, ffi::Buffer<ffi::S32> idx,
                               ffi::Buffer<ffi::F64> atoms, ffi::Buffer<ffi::F64> consts,
                               ffi::ResultBuffer<ffi::F64> grad) {
  ListArgs la;
  if (auto e = read_list_args("tm_neighbour_forces", x, box, idx, atoms, consts, &la);
      e.failure())
    return e;
  const int64_t n = la.n, k = la.k;
  const tmk::CutoffForm& pc = la.pc;
  const bool fast_erfc = la.fast_erfc;
  const double* ad = atoms.typed_data();
  const double* bx = box.element_count() ? box.typed_data() : nullptr;
  const int64_t cap = (k + FB - 1) / FB * FB + FB;
  const int64_t units = std::max<int64_t>(1, std::min<int64_t>(FORCE_UNITS, n));
  const double* xs = x.typed_data();
  const PackedAtoms pa = pack_atoms(xs, ad, n, false);
  const int64_t stride = 3 * (n + 1);
  double* opp = t_opp.get(units * stride);  // each unit's opposite forces
  double* g = grad->typed_data();
  std::function<void(int)> work = [&](int u) {
    const int64_t i0 = n * u / units, i1 = n * (u + 1) / units;
    double* o = opp + u * stride;
    std::memset(o + 3 * i0, 0, sizeof(double) * 3 * (n + 1 - i0));  // j > i ≥ i0 only
    double* rows = t_rows.get(2 * cap);
    neighbour_force_rows(xs, bx, idx.typed_data(), n, k, pa, pc, fast_erfc, i0, i1, g, o,
                         reinterpret_cast<int64_t*>(rows), rows + cap);
  };
  parallel_units(pool, (int)units, work);
  // ∇_i E = row i's own sum + the units' opposite forces on i, in unit order (unit u's
  // buffer holds rows ≥ its first row)
  std::function<void(int)> reduce = [&](int u) {
    const int64_t a0 = n * u / units, a1 = n * (u + 1) / units;
    for (int64_t v = 0; v < units; ++v) {
      const int64_t from = std::max<int64_t>(a0, n * v / units);
      const double* o = opp + v * stride;
      for (int64_t r = 3 * from; r < 3 * a1; ++r) g[r] += o[r];
    }
  };
  parallel_units(pool, (int)units, reduce);
  return ffi::Error::Success();
}

// one row of the list being built: the partners j > i, then those j < i, each in the
// order found, the first K kept, padded with N; finish() is true on overflow
struct RowFill {
  std::vector<int32_t> upper, lower;
  int64_t k, i = 0;
  explicit RowFill(int64_t k_) : k(k_) {
    upper.reserve(k);
    lower.reserve(k);
  }
  void start(int64_t row) {
    i = row;
    upper.clear();
    lower.clear();
  }
  void add(int64_t j) { (j > i ? upper : lower).push_back((int32_t)j); }
  bool finish(int32_t* out, int64_t n) const {
    const int64_t nu = std::min<int64_t>((int64_t)upper.size(), k);
    const int64_t nl = std::min<int64_t>((int64_t)lower.size(), k - nu);
    std::copy(upper.begin(), upper.begin() + nu, out);
    std::copy(lower.begin(), lower.begin() + nl, out + nu);
    std::fill(out + nu + nl, out + k, (int32_t)n);
    return (int64_t)(upper.size() + lower.size()) > k;
  }
};

thread_local Scratch t_cellx, t_runr2;  // the members' coordinates; a run's r²

// The Verlet list of cutoffs.build_neighbours: every allowed pair within `radius`, in
// both rows, each row's partners j > i first, then those j < i, the first K kept, padded
// with N. The allowed pairs are an exclusion table's (N, M) complement (mask empty) or
// an (N, N) mask, or every pair (an (N, 0) table). In a periodic box 2.5 radii across,
// or without one (a virtual box around the atoms), atom i's candidates are the atoms of
// the cells around its own (below); otherwise every j by index (the JAX build's order).
// The partners are the JAX build's; their order within each part differs where
// the cells do. overflow (int32) is 1 when a row had more than K partners (the cells
// hold every atom: no cell overflows, unlike the JAX table).
ffi::Error NeighbourBuildImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> x,
                              ffi::Buffer<ffi::F64> box, ffi::Buffer<ffi::S32> allowed,
                              ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F64> radius_in,
                              ffi::ResultBuffer<ffi::S32> out,
                              ffi::ResultBuffer<ffi::S32> overflow) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != 3)
    return ffi::Error::InvalidArgument("tm_neighbour_build: x must have shape (N, 3)");
  const int64_t n = xd[0];
  const auto od = out->dimensions();
  if (od.size() != 2 || od[0] != n)
    return ffi::Error::InvalidArgument("tm_neighbour_build: the list must be (N, K)");
  const int64_t k = od[1];
  if (radius_in.element_count() != 1)
    return ffi::Error::InvalidArgument("tm_neighbour_build: radius must be (1,)");
  const double radius = radius_in.typed_data()[0];
  if (box.element_count() != 0 && box.element_count() != 3)
    return ffi::Error::InvalidArgument("tm_neighbour_build: box must be (3,) or empty");
  const double* xs = x.typed_data();
  const double* bx = box.element_count() ? box.typed_data() : nullptr;
  // no periodic box (CutoffNonPeriodic, generalized Born): the cells of a virtual one,
  // each edge the atoms' extent plus the radius and at least 2.5 radii. No image of an
  // atom then comes within the radius of another along any axis, so the minimum image
  // keeps exactly the true pairs, each at its true distance (|d| < r < L/2). Dense where
  // x is not finite or so spread out that the cells would outnumber 8 per atom.
  double vbox[3];
  if (!bx && n > 0) {
    bool finite = true;
    for (int64_t a = 0; a < 3 * n; ++a) finite = finite && std::isfinite(xs[a]);
    double cells = 1.0;
    for (int e = 0; finite && e < 3; ++e) {
      double lo = xs[e], hi = xs[e];
      for (int64_t i = 1; i < n; ++i) {
        lo = std::min(lo, xs[3 * i + e]);
        hi = std::max(hi, xs[3 * i + e]);
      }
      vbox[e] = std::max(hi - lo + 1.001 * radius, 2.501 * radius);
      cells *= std::floor(vbox[e] / (0.5 * radius));
    }
    if (finite && radius > 0.0 && cells <= 8.0 * (double)n + 64.0) bx = vbox;
  }
  // a box (periodic, or the virtual one) 2.5 radii across takes the cell list (below),
  // whichever the JAX build would use (it sums densely where its own cells would hold a
  // third of the box, and without a periodic box always)
  bool use_cells = bx != nullptr;
  for (int e = 0; use_cells && e < 3; ++e) use_cells = std::floor(bx[e] / (0.5 * radius)) >= 5;
  // the allowed pairs: the exclusion table's rows (mask empty), the (N, N) mask, or every
  // pair (an (N, 0) table and no mask: generalized Born, which excludes nothing)
  const auto ad = allowed.dimensions();
  const bool every_pair = mask.element_count() == 0 && ad.size() == 2 && ad[1] == 0;
  const bool has_table = mask.element_count() == 0 && !every_pair;
  if (has_table && (ad.size() != 2 || ad[0] != n))
    return ffi::Error::InvalidArgument("tm_neighbour_build: the exclusion table must be (N, M)");
  if (!has_table && !every_pair && mask.element_count() != (size_t)(n * n))
    return ffi::Error::InvalidArgument("tm_neighbour_build: the mask must be (N, N)");
  const double r2max = radius * radius;
  int32_t* list = out->typed_data();
  std::atomic<int> over{0};
  double inv_box[3] = {0.0, 0.0, 0.0};
  if (bx)
    for (int e = 0; e < 3; ++e) inv_box[e] = 1.0 / bx[e];
  auto within = [&](int64_t i, int64_t j) {  // d/L by a product, as neighbour_force_rows
    double r2 = 0.0;
    for (int e = 0; e < 3; ++e) {
      double d = xs[3 * i + e] - xs[3 * j + e];
      if (bx) d -= bx[e] * rint_even(d * inv_box[e]);
      r2 += d * d;
    }
    return r2 < r2max;
  };
  const bool* mk = (has_table || every_pair) ? nullptr : mask.typed_data();
  // the allowed pairs: the exclusion table's row, or the mask's (j ≠ i checked apart)
  const int64_t m = has_table ? ad[1] : 0;
  const int32_t* ex = allowed.typed_data();
  auto permitted = [&](int64_t i, int64_t j) {
    bool excluded = mk != nullptr && !mk[i * n + j];
    for (int64_t q = 0; q < m; ++q) excluded |= ex[i * m + q] == j;
    return !excluded;
  };
  if (!use_cells) {
    const int units = (int)std::max<int64_t>(1, std::min<int64_t>(4 * pool.num_threads(), n));
    std::function<void(int)> work = [&](int u) {
      RowFill fill(k);
      for (int64_t i = n * u / units; i < n * (u + 1) / units; ++i) {
        fill.start(i);
        for (int64_t j = 0; j < n; ++j)
          if (j != i && within(i, j) && permitted(i, j)) fill.add(j);
        if (fill.finish(list + i * k, n)) over.store(1, std::memory_order_relaxed);
      }
    };
    parallel_units(pool, units, work);
    overflow->typed_data()[0] = over.load();
    return ffi::Error::Success();
  }
  // cells of edge ≥ radius/2 and the 5³ cells around each atom's own: fewer candidates
  // than the JAX build's 3³ cells of edge ≥ radius ((2.5 r)³ against (3 r)³), fewer
  // still as a neighbouring cell wholly beyond the radius from the atom is skipped. Every
  // edge holds ≥ 5 cells (use_cells), so the 5 offsets along it are distinct.
  constexpr int64_t reach = 2;
  int64_t cn[3];
  for (int e = 0; e < 3; ++e) cn[e] = (int64_t)std::floor(bx[e] / (0.5 * radius));
  const int64_t cx = cn[0], cy = cn[1], cz = cn[2], nc = cx * cy * cz;
  double edge[3];
  for (int e = 0; e < 3; ++e) edge[e] = bx[e] / (double)cn[e];
  // bin the atoms: wrapped into the box, floor, clipped to the last cell; by index
  std::vector<int32_t> cell_of(n), start(nc + 1, 0), members(n);
  std::vector<double> wrapped(3 * n);
  for (int64_t i = 0; i < n; ++i) {
    int64_t c3[3];
    for (int e = 0; e < 3; ++e) {
      const double w = xs[3 * i + e] - bx[e] * std::floor(xs[3 * i + e] / bx[e]);
      wrapped[3 * i + e] = w;
      c3[e] = std::min<int64_t>((int64_t)std::floor(w / bx[e] * (double)cn[e]), cn[e] - 1);
    }
    cell_of[i] = (int32_t)((c3[0] * cy + c3[1]) * cz + c3[2]);
    ++start[cell_of[i] + 1];
  }
  for (int64_t c = 0; c < nc; ++c) start[c + 1] += start[c];
  {
    std::vector<int32_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) members[fill[cell_of[i]]++] = (int32_t)i;
  }
  // the members' coordinates in cell order, so that a run's distances are one SIMD loop
  double* cell_x = t_cellx.get(3 * n);
  for (int64_t s = 0; s < n; ++s)
    for (int e = 0; e < 3; ++e) cell_x[e * n + s] = xs[3 * members[s] + e];
  const int units = (int)std::max<int64_t>(1, std::min<int64_t>(4 * pool.num_threads(), n));
  std::function<void(int)> work = [&](int u) {
    double* r2v = t_runr2.get(n + 1);
    RowFill fill(k);
    for (int64_t i = n * u / units; i < n * (u + 1) / units; ++i) {
      const int64_t c = cell_of[i];
      const int64_t ci[3] = {c / (cy * cz), (c / cz) % cy, c % cz};
      const double xi[3] = {xs[3 * i], xs[3 * i + 1], xs[3 * i + 2]};
      // the atom's distance to the slab of offset o along each axis (0 for its own)
      double gap2[3][5];
      for (int e = 0; e < 3; ++e)
        for (int64_t o = -reach; o <= reach; ++o) {
          const double w = wrapped[3 * i + e];
          double g = 0.0;
          if (o > 0) g = (double)(ci[e] + o) * edge[e] - w;
          if (o < 0) g = w - (double)(ci[e] + o + 1) * edge[e];
          g = std::max(g, 0.0);
          gap2[e][o + reach] = g * g;
        }
      fill.start(i);
      // a run of members: the cells along z of one (x, y) column are consecutive, so the
      // included offsets along z (an interval: the gap grows with |offset|) are one or,
      // where they wrap around the box, two runs
      auto scan = [&](int64_t s0, int64_t len) {
        double* __restrict r2 = r2v;
        const double* __restrict c0 = cell_x + s0;
        const double* __restrict c1 = cell_x + n + s0;
        const double* __restrict c2 = cell_x + 2 * n + s0;
        for (int64_t s = 0; s < len; ++s) {  // as within(): one SIMD loop over the run
          double d0 = xi[0] - c0[s], d1 = xi[1] - c1[s], d2 = xi[2] - c2[s];
          d0 -= bx[0] * rint_even(d0 * inv_box[0]);
          d1 -= bx[1] * rint_even(d1 * inv_box[1]);
          d2 -= bx[2] * rint_even(d2 * inv_box[2]);
          r2[s] = d0 * d0 + d1 * d1 + d2 * d2;
        }
        for (int64_t s = 0; s < len; ++s) {
          if (!(r2[s] < r2max)) continue;
          const int64_t j = members[s0 + s];
          if (j != i && permitted(i, j)) fill.add(j);
        }
      };
      for (int64_t a = -reach; a <= reach; ++a)
        for (int64_t b = -reach; b <= reach; ++b) {
          const double g_ab = gap2[0][a + reach] + gap2[1][b + reach];
          if (g_ab >= r2max) continue;
          int64_t lo = -reach, hi = reach;  // the offsets along z within reach
          while (g_ab + gap2[2][lo + reach] >= r2max) ++lo;
          while (g_ab + gap2[2][hi + reach] >= r2max) --hi;
          const int64_t column = (((ci[0] + a + cx) % cx) * cy + (ci[1] + b + cy) % cy) * cz;
          const int64_t z0 = ci[2] + lo, z1 = ci[2] + hi;  // inclusive, unwrapped
          if (z0 < 0) {  // wraps below: [z0 + cz, cz) and [0, z1]
            scan(start[column + z0 + cz], start[column + cz] - start[column + z0 + cz]);
            scan(start[column], start[column + z1 + 1] - start[column]);
          } else if (z1 >= cz) {  // wraps above: [z0, cz) and [0, z1 - cz]
            scan(start[column + z0], start[column + cz] - start[column + z0]);
            scan(start[column], start[column + z1 - cz + 1] - start[column]);
          } else {
            scan(start[column + z0], start[column + z1 + 1] - start[column + z0]);
          }
        }
      if (fill.finish(list + i * k, n)) over.store(1, std::memory_order_relaxed);
    }
  };
  parallel_units(pool, units, work);
  overflow->typed_data()[0] = over.load();
  return ffi::Error::Success();
}

// Smooth PME's reciprocal force, plain: Q = Σ_j q_j W_j spread on the grid (one pass in
// atom order: bitwise the same on any number of threads), and after the convolution
// (XLA's FFT) ∇_i E = q_i Σ_g Ψ(g) ∇W_i(g), rows split among the threads.
ffi::Error PmeChargeSpreadImpl(ffi::Buffer<ffi::F64> w, ffi::Buffer<ffi::F64> dw,
                               ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F64> charge,
                               ffi::ResultBuffer<ffi::F64> grid) {
  int64_t n, order;
  if (auto e = check_stencil("tm_pme_charge_spread", w, dw, idx, &n, &order); e.failure())
    return e;
  const auto gd = grid->dimensions();
  if (gd.size() != 3) return ffi::Error::InvalidArgument("tm_pme_charge_spread: grid is (Kx, Ky, Kz)");
  if (charge.element_count() != (size_t)n)
    return ffi::Error::InvalidArgument("tm_pme_charge_spread: charge must be (N,)");
  const int64_t ky = gd[1], kz = gd[2], o = order;
  double* q_grid = grid->typed_data();
  std::memset(q_grid, 0, sizeof(double) * gd[0] * ky * kz);
  const double* ws = w.typed_data();
  const int32_t* is = idx.typed_data();
  const double* q = charge.typed_data();
  for (int64_t j = 0; j < n; ++j) {
    const double* wj = ws + j * 3 * o;
    const int32_t* ij = is + j * 3 * o;
    for (int64_t a = 0; a < o; ++a) {
      const double qa = q[j] * wj[a];
      for (int64_t b = 0; b < o; ++b) {
        const double qab = qa * wj[o + b];
        double* row = q_grid + ((int64_t)ij[a] * ky + ij[o + b]) * kz;
        for (int64_t z = 0; z < o; ++z) row[ij[2 * o + z]] += qab * wj[2 * o + z];
      }
    }
  }
  return ffi::Error::Success();
}

// Atom i's Σ_g Ψ(g) ∇W_i(g) (f, 3) and, with H, Σ_g Ψ(g) ∇∇W_i(g) (h: xx yy zz xy xz
// yz) from the grid potential Ψ (K_x, K_y, K_z): separable, along z the sums of w, ∂w
// (and ∂²w) per (x, y) row of the stencil, then the products of the x and y factors.
// wi, gi, hi: the atom's (3, order) weights and their first and second derivatives.
template <bool H>
inline void pme_field_at(const double* psi, int64_t ky, int64_t kz, int64_t o,
                         const double* wi, const double* gi, const double* hi,
                         const int32_t* ii, double* f, double* h) {
  double fx = 0.0, fy = 0.0, fz = 0.0, hxx = 0.0, hyy = 0.0, hzz = 0.0, hxy = 0.0, hxz = 0.0,
         hyz = 0.0;
  for (int64_t a = 0; a < o; ++a)
    for (int64_t b = 0; b < o; ++b) {
      const double* row = psi + ((int64_t)ii[a] * ky + ii[o + b]) * kz;
      double s0 = 0.0, s1 = 0.0, s2 = 0.0;
      for (int64_t z = 0; z < o; ++z) {
        const double v = row[ii[2 * o + z]];
        s0 += wi[2 * o + z] * v;
        s1 += gi[2 * o + z] * v;
        if (H) s2 += hi[2 * o + z] * v;
      }
      const double wx = wi[a], gx = gi[a], wy = wi[o + b], gy = gi[o + b];
      fx += gx * wy * s0;
      fy += wx * gy * s0;
      fz += wx * wy * s1;
      if (H) {
        hxx += hi[a] * wy * s0;
        hyy += wx * hi[o + b] * s0;
        hzz += wx * wy * s2;
        hxy += gx * gy * s0;
        hxz += gx * wy * s1;
        hyz += wx * gy * s1;
      }
    }
  f[0] = fx, f[1] = fy, f[2] = fz;
  if (H) h[0] = hxx, h[1] = hyy, h[2] = hzz, h[3] = hxy, h[4] = hxz, h[5] = hyz;
}

ffi::Error PmeForceGatherImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> potential,
                              ffi::Buffer<ffi::F64> w, ffi::Buffer<ffi::F64> dw,
                              ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F64> charge,
                              ffi::ResultBuffer<ffi::F64> grad) {
  int64_t n, order;
  if (auto e = check_stencil("tm_pme_force_gather", w, dw, idx, &n, &order); e.failure())
    return e;
  const auto pd = potential.dimensions();
  if (pd.size() != 3)
    return ffi::Error::InvalidArgument("tm_pme_force_gather: potential is (Kx, Ky, Kz)");
  if (charge.element_count() != (size_t)n || grad->element_count() != (size_t)(3 * n))
    return ffi::Error::InvalidArgument("tm_pme_force_gather: charge (N,), grad (N, 3)");
  const int64_t ky = pd[1], kz = pd[2], o = order;
  const double* psi = potential.typed_data();
  const double* ws = w.typed_data();
  const double* gs = dw.typed_data();
  const int32_t* is = idx.typed_data();
  const double* q = charge.typed_data();
  double* g = grad->typed_data();
  const int units = (int)std::max<int64_t>(1, std::min<int64_t>(4 * pool.num_threads(), n));
  std::function<void(int)> work = [&](int u) {
    for (int64_t i = n * u / units; i < n * (u + 1) / units; ++i) {
      double f[3];
      pme_field_at<false>(psi, ky, kz, o, ws + i * 3 * o, gs + i * 3 * o, nullptr,
                          is + i * 3 * o, f, nullptr);
      g[3 * i] = q[i] * f[0];
      g[3 * i + 1] = q[i] * f[1];
      g[3 * i + 2] = q[i] * f[2];
    }
  };
  parallel_units(pool, units, work);
  return ffi::Error::Success();
}

// The ζ step's grid field at each atom from the charges' potential Ψ (K_x, K_y, K_z):
// g0 (N, 3) = Σ_g Ψ(g) ∇W_i(g) and h0 (N, 3, 3) = Σ_g Ψ(g) ∇∇W_i(g) (pme_field_at), ddw
// the weights' second derivatives (scaled by (K_d / L_d)²).
ffi::Error PmeFieldGatherImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F64> potential,
                              ffi::Buffer<ffi::F64> w, ffi::Buffer<ffi::F64> dw,
                              ffi::Buffer<ffi::F64> ddw, ffi::Buffer<ffi::S32> idx,
                              ffi::ResultBuffer<ffi::F64> field,
                              ffi::ResultBuffer<ffi::F64> hessian) {
  int64_t n, order;
  if (auto e = check_stencil("tm_pme_field_gather", w, dw, idx, &n, &order); e.failure())
    return e;
  const auto pd = potential.dimensions();
  if (pd.size() != 3)
    return ffi::Error::InvalidArgument("tm_pme_field_gather: potential is (Kx, Ky, Kz)");
  if (ddw.element_count() != w.element_count() || field->element_count() != (size_t)(3 * n) ||
      hessian->element_count() != (size_t)(9 * n))
    return ffi::Error::InvalidArgument(
        "tm_pme_field_gather: ddw shaped as w, field (N, 3), hessian (N, 3, 3)");
  const int64_t ky = pd[1], kz = pd[2], o = order;
  const double* psi = potential.typed_data();
  const double* ws = w.typed_data();
  const double* gs = dw.typed_data();
  const double* hs = ddw.typed_data();
  const int32_t* is = idx.typed_data();
  double* f = field->typed_data();
  double* hh = hessian->typed_data();
  const int units = (int)std::max<int64_t>(1, std::min<int64_t>(4 * pool.num_threads(), n));
  std::function<void(int)> work = [&](int u) {
    for (int64_t i = n * u / units; i < n * (u + 1) / units; ++i) {
      double hv[6];
      pme_field_at<true>(psi, ky, kz, o, ws + i * 3 * o, gs + i * 3 * o, hs + i * 3 * o,
                         is + i * 3 * o, f + 3 * i, hv);
      double* h = hh + 9 * i;  // (3, 3), symmetric
      h[0] = hv[0], h[1] = hv[3], h[2] = hv[4];
      h[3] = hv[3], h[4] = hv[1], h[5] = hv[5];
      h[6] = hv[4], h[7] = hv[5], h[8] = hv[2];
    }
  };
  parallel_units(pool, units, work);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmNeighbourPairs, NeighbourPairsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // x
                                  .Arg<ffi::Buffer<ffi::F64>>()  // box
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // atoms (4, N)
                                  .Arg<ffi::Buffer<ffi::F64>>()  // consts (4,)
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dx
                                  .Arg<ffi::Buffer<ffi::S32>>()  // mix_p
                                  .Arg<ffi::Buffer<ffi::S32>>()  // excl (N, M) or empty
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grad
                                  .Ret<ffi::Buffer<ffi::F64>>()  // zeta
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmPmeSpread, PmeSpreadImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // w
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dw
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // charge
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dq
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grid
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmPmeGather, PmeGatherImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // potential
                                  .Arg<ffi::Buffer<ffi::F64>>()  // w
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dw
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Ret<ffi::Buffer<ffi::F64>>()  // field
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmNeighbourForces, NeighbourForcesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // x
                                  .Arg<ffi::Buffer<ffi::F64>>()  // box
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // atoms (4, N)
                                  .Arg<ffi::Buffer<ffi::F64>>()  // consts (4,)
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grad
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmNeighbourBuild, NeighbourBuildImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()   // x
                                  .Arg<ffi::Buffer<ffi::F64>>()   // box
                                  .Arg<ffi::Buffer<ffi::S32>>()   // exclusion table
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask (N, N) or empty
                                  .Arg<ffi::Buffer<ffi::F64>>()   // radius (1,)
                                  .Ret<ffi::Buffer<ffi::S32>>()   // list (N, K)
                                  .Ret<ffi::Buffer<ffi::S32>>()   // overflow ()
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmPmeChargeSpread, PmeChargeSpreadImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // w
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dw
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // charge
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grid
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmPmeForceGather, PmeForceGatherImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // potential
                                  .Arg<ffi::Buffer<ffi::F64>>()  // w
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dw
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // charge
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grad
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmPmeFieldGather, PmeFieldGatherImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // potential
                                  .Arg<ffi::Buffer<ffi::F64>>()  // w
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dw
                                  .Arg<ffi::Buffer<ffi::F64>>()  // ddw
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Ret<ffi::Buffer<ffi::F64>>()  // field (N, 3)
                                  .Ret<ffi::Buffer<ffi::F64>>()  // hessian (N, 3, 3)
);
