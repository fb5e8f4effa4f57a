// XLA FFI custom call for the CPU: ∇E and ζ of every internal-coordinate term (bonds,
// angles, proper and improper torsions, 1-4 exceptions) in one pass over the distinct atom
// tuples, with the per-term maths of bonded.cuh (the same functions the CUDA kernels and
// the host build use).
//
// Why: on CPU the JAX structured ζ spends a large share of a small system's step in the
// hundreds of tiny XLA kernels that evaluate these 3k×3k blocks, and on a large one in
// scattering them into the dense Hessian. Here each tuple's Hessian block
//     f'' ∇q∇qᵀ + f' ∇²q
// is applied to the tangents without being formed: ∇²q·t is the derivative of the
// analytic ∇q along t, a Jet carrying LANES tangents at once through bonded.cuh's
// formula. The tangents are held transposed, (3N, P) with P contiguous and padded to a
// multiple of LANES, so every Jet operation is one SIMD operation over LANES tangents.
// Mixed partials ∂²E/∂x∂θ_p are scattered from the terms that use a chosen θ_p.
// Tuples are visited in a fixed order on one thread: the sums are deterministic.
//
// Operands (built once per System and wrt in timemachine/backends/xla_cpu.py):
//   x (N,3) f64, theta (P_all) f64, dx (P,N,3) f64,
//   tuples (U,4) i32 atoms (unused slots 0), tuple_kind (U) i32 (bonded.cuh TermKind),
//   term_start (U+1) i32 (tuple u's terms are [term_start[u], term_start[u+1])),
//   pidx (T,6) i32 θ indices per channel, consts (T,2) f64, inv_wrt (P_all) i32
//   (tangent p of θ_m, or -1).
// Results: grad (N,3) and zeta (P,N,3), this group's contribution (overwritten).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../bonded.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int LANES = 8;  // tangents per SIMD block: one AVX-512 or two AVX2 registers

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

// one tuple of K atoms: gradient into grad, ζ rows into zt (3N, stride), P tangents in dxt
template <int K>
void tuple_gz(const Tables& tb, int64_t u, double* grad, const double* dxt, double* zt,
              int64_t p, int64_t stride) {
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
    if (p == 0) continue;
    for (int c = 0; c < tmk::kind_channels(kind); ++c) {  // mixed partial ∂f'/∂θ_c ∇q
      const int32_t m = tb.inv_wrt[pi[c]];
      if (m < 0) continue;
      for (int i = 0; i < K; ++i)
        for (int a = 0; a < 3; ++a)
          zt[(3 * (int64_t)atoms[i] + a) * stride + m] += s.dd1[c] * g[i][a];
    }
  }
  for (int i = 0; i < K; ++i)
    for (int c = 0; c < 3; ++c) grad[3 * (int64_t)atoms[i] + c] += d1 * g[i][c];
  if (p == 0) return;
  int64_t row[K][3];
  for (int i = 0; i < K; ++i)
    for (int c = 0; c < 3; ++c) row[i][c] = (3 * (int64_t)atoms[i] + c) * stride;
  // LANES tangents at a time: ∇q differentiated along each of them (a Jet of LANES
  // tangents through the analytic gradient), so ∇²q is never formed
  for (int64_t p0 = 0; p0 < stride; p0 += LANES) {
    VJet xj[K][3], gj[K][3];
    lanes dq = {};
    for (int i = 0; i < K; ++i)
      for (int c = 0; c < 3; ++c) {
        xj[i][c].v = xl[i][c];
        xj[i][c].d = load_lanes(dxt + row[i][c] + p0);
        dq += g[i][c] * xj[i][c].d;
      }
    tmk::coord_grad<VJet>(kind, xj, gj);
    for (int i = 0; i < K; ++i)
      for (int c = 0; c < 3; ++c) {
        double* out = zt + row[i][c] + p0;
        store_lanes(out, load_lanes(out) + (d2 * g[i][c]) * dq + d1 * gj[i][c].d);
      }
  }
}

// scratch for the transposed tangents and ζ rows; one per thread that runs the call
thread_local std::vector<double> t_dxt, t_zt;

ffi::Error BondedGradientZetaImpl(ffi::Buffer<ffi::F64> x, ffi::Buffer<ffi::F64> theta,
                                  ffi::Buffer<ffi::F64> dx, ffi::Buffer<ffi::S32> tuples,
                                  ffi::Buffer<ffi::S32> tuple_kind,
                                  ffi::Buffer<ffi::S32> term_start, ffi::Buffer<ffi::S32> pidx,
                                  ffi::Buffer<ffi::F64> consts, ffi::Buffer<ffi::S32> inv_wrt,
                                  ffi::ResultBuffer<ffi::F64> grad,
                                  ffi::ResultBuffer<ffi::F64> zeta) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != 3)
    return ffi::Error::InvalidArgument("tm_bonded_gradient_zeta: x must have shape (N, 3)");
  const int64_t n = xd[0];
  const auto dd = dx.dimensions();
  if (dd.size() != 3 || dd[1] != n || dd[2] != 3)
    return ffi::Error::InvalidArgument(
        "tm_bonded_gradient_zeta: dx must have shape (P, " + std::to_string(n) + ", 3)");
  const int64_t p = dd[0];
  const int64_t n_tuples = tuple_kind.element_count();
  if (tuples.element_count() != 4 * (size_t)n_tuples ||
      term_start.element_count() != (size_t)n_tuples + 1)
    return ffi::Error::InvalidArgument(
        "tm_bonded_gradient_zeta: tuples, tuple_kind and term_start disagree in length");
  const int64_t n_terms = term_start.typed_data()[n_tuples];
  if (pidx.element_count() != 6 * (size_t)n_terms || consts.element_count() != 2 * (size_t)n_terms)
    return ffi::Error::InvalidArgument(
        "tm_bonded_gradient_zeta: pidx and consts must have one row per term");
  if (inv_wrt.element_count() != theta.element_count())
    return ffi::Error::InvalidArgument(
        "tm_bonded_gradient_zeta: inv_wrt must have one entry per θ");
  Tables tb{x.typed_data(),      theta.typed_data(),  tuples.typed_data(),
            tuple_kind.typed_data(), term_start.typed_data(), pidx.typed_data(),
            consts.typed_data(), inv_wrt.typed_data()};
  double* g = grad->typed_data();
  std::memset(g, 0, sizeof(double) * 3 * n);
  const int64_t stride = (p + LANES - 1) / LANES * LANES;
  const int64_t rows = 3 * n;
  double* dxt = nullptr;
  double* zt = nullptr;
  if (p > 0) {
    t_dxt.assign(rows * stride, 0.0);
    t_zt.assign(rows * stride, 0.0);
    dxt = t_dxt.data();
    zt = t_zt.data();
    const double* src = dx.typed_data();
    for (int64_t pp = 0; pp < p; ++pp)
      for (int64_t r = 0; r < rows; ++r) dxt[r * stride + pp] = src[pp * rows + r];
  }
  for (int64_t u = 0; u < n_tuples; ++u) {
    const int kind = tb.kind[u];
    if (kind == tmk::KIND_TORSION)
      tuple_gz<4>(tb, u, g, dxt, zt, p, stride);
    else if (kind == tmk::KIND_ANGLE)
      tuple_gz<3>(tb, u, g, dxt, zt, p, stride);
    else
      tuple_gz<2>(tb, u, g, dxt, zt, p, stride);
  }
  double* z = zeta->typed_data();
  for (int64_t pp = 0; pp < p; ++pp)
    for (int64_t r = 0; r < rows; ++r) z[pp * rows + r] = zt[r * stride + pp];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmBondedGradientZeta, BondedGradientZetaImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F64>>()  // x
                                  .Arg<ffi::Buffer<ffi::F64>>()  // theta
                                  .Arg<ffi::Buffer<ffi::F64>>()  // dx
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tuples
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tuple_kind
                                  .Arg<ffi::Buffer<ffi::S32>>()  // term_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pidx
                                  .Arg<ffi::Buffer<ffi::F64>>()  // consts
                                  .Arg<ffi::Buffer<ffi::S32>>()  // inv_wrt
                                  .Ret<ffi::Buffer<ffi::F64>>()  // grad
                                  .Ret<ffi::Buffer<ffi::F64>>()  // zeta
);
