// Shared definitions for the timemachine kernels: host/device qualifiers, the maths
// functions every term uses, and Jet, a forward-mode dual number with K tangents.
//
// Everything here compiles three ways: nvcc (kernels), NVRTC (CuPy's RawModule, which
// has no C++ standard library), and a host C++17 compiler (the test suite builds the
// same functions for the CPU and compares them with the JAX reference).
#pragma once

#if defined(__CUDACC__)
#define TM_HD __host__ __device__ __forceinline__
#define TM_DEVICE 1
#else
#define TM_HD inline
#include <cmath>
#endif

namespace tmk {

// fixed-width integers without <cstdint>, which NVRTC does not provide
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef int i32;
static_assert(sizeof(u32) == 4 && sizeof(u64) == 8, "unexpected integer widths");

// Tangents per thread in the ζ kernels: each thread carries PCHUNK of the P tangents, so
// pair quantities are computed once per PCHUNK tangents and contracted with each in
// registers (docs/design.md, "Performance principles").
#ifndef TM_PCHUNK
#define TM_PCHUNK 8
#endif
constexpr int PCHUNK = TM_PCHUNK;

constexpr double COULOMB = 138.93545764438198;  // kJ nm/(mol e^2), OpenMM's ONE_4PI_EPS0
constexpr double COULOMB_GB = 138.935485;        // the constant in OpenMM's OBC2 expression
constexpr double BOLTZMANN = 0.008314462618;     // kJ/(mol K)

// ---------------------------------------------------------------- scalar maths (double)
TM_HD double tm_sqrt(double a) { return sqrt(a); }
TM_HD double tm_exp(double a) { return exp(a); }
TM_HD double tm_log(double a) { return log(a); }
TM_HD double tm_tanh(double a) { return tanh(a); }
TM_HD double tm_cos(double a) { return cos(a); }
TM_HD double tm_sin(double a) { return sin(a); }
TM_HD double tm_atan2(double y, double x) { return atan2(y, x); }
TM_HD double tm_fabs(double a) { return fabs(a); }
TM_HD double value_of(double a) { return a; }
// sqrt with derivative 0 at 0 (timemachine.potentials.nonbonded.safe_sqrt): ε = 0 atoms
TM_HD double tm_safe_sqrt(double a) { return sqrt(a); }

// ---------------------------------------------------------------- Jet: forward mode
// v + Σ_k d[k] ε_k with ε_k ε_l = 0. Jet<Jet<double, 1>, K> carries second derivatives:
// the inner tangent is one direction, the outer ones K others.
template <class T, int K>
struct Jet {
  T v;
  T d[K];
};

template <class T, int K>
TM_HD double value_of(const Jet<T, K>& a) {
  return value_of(a.v);
}

// zero of the same nested type as a (so that nested jets get zero inner tangents)
TM_HD double zero_like(double) { return 0.0; }
template <class T, int K>
TM_HD Jet<T, K> zero_like(const Jet<T, K>& a) {
  Jet<T, K> r;
  r.v = zero_like(a.v);
  for (int k = 0; k < K; ++k) r.d[k] = zero_like(a.v);
  return r;
}

template <class T, int K>
TM_HD Jet<T, K> jet_const(T v) {
  Jet<T, K> r;
  r.v = v;
  for (int k = 0; k < K; ++k) r.d[k] = zero_like(v);
  return r;
}

template <class T, int K>
TM_HD Jet<T, K> operator+(const Jet<T, K>& a, const Jet<T, K>& b) {
  Jet<T, K> r;
  r.v = a.v + b.v;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] + b.d[k];
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator-(const Jet<T, K>& a, const Jet<T, K>& b) {
  Jet<T, K> r;
  r.v = a.v - b.v;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] - b.d[k];
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator-(const Jet<T, K>& a) {
  Jet<T, K> r;
  r.v = -a.v;
  for (int k = 0; k < K; ++k) r.d[k] = -a.d[k];
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator*(const Jet<T, K>& a, const Jet<T, K>& b) {
  Jet<T, K> r;
  r.v = a.v * b.v;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * b.v + a.v * b.d[k];
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator/(const Jet<T, K>& a, const Jet<T, K>& b) {
  Jet<T, K> r;
  T inv = 1.0 / b.v;
  r.v = a.v * inv;
  for (int k = 0; k < K; ++k) r.d[k] = (a.d[k] - r.v * b.d[k]) * inv;
  return r;
}
// mixed with plain doubles
template <class T, int K>
TM_HD Jet<T, K> operator+(const Jet<T, K>& a, double b) {
  Jet<T, K> r = a;
  r.v = a.v + b;
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator+(double b, const Jet<T, K>& a) {
  return a + b;
}
template <class T, int K>
TM_HD Jet<T, K> operator-(const Jet<T, K>& a, double b) {
  Jet<T, K> r = a;
  r.v = a.v - b;
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator-(double b, const Jet<T, K>& a) {
  Jet<T, K> r;
  r.v = b - a.v;
  for (int k = 0; k < K; ++k) r.d[k] = -a.d[k];
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator*(const Jet<T, K>& a, double b) {
  Jet<T, K> r;
  r.v = a.v * b;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * b;
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator*(double b, const Jet<T, K>& a) {
  return a * b;
}
template <class T, int K>
TM_HD Jet<T, K> operator/(const Jet<T, K>& a, double b) {
  Jet<T, K> r;
  r.v = a.v / b;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] / b;
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> operator/(double b, const Jet<T, K>& a) {
  Jet<T, K> r;
  T inv = 1.0 / a.v;
  r.v = b * inv;
  for (int k = 0; k < K; ++k) r.d[k] = -(r.v * inv) * a.d[k];
  return r;
}

// chain rule: f(a) with f(a.v) = f0 and f'(a.v) = f1 (f1 of the inner type)
template <class T, int K>
TM_HD Jet<T, K> jet_chain(const Jet<T, K>& a, const T& f0, const T& f1) {
  Jet<T, K> r;
  r.v = f0;
  for (int k = 0; k < K; ++k) r.d[k] = f1 * a.d[k];
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> tm_sqrt(const Jet<T, K>& a) {
  T s = tm_sqrt(a.v);
  return jet_chain(a, s, 0.5 / s);
}
template <class T, int K>
TM_HD Jet<T, K> tm_safe_sqrt(const Jet<T, K>& a) {
  if (value_of(a.v) > 0.0) return tm_sqrt(a);
  Jet<T, K> r = zero_like(a);
  r.v = tm_safe_sqrt(a.v);
  return r;
}
template <class T, int K>
TM_HD Jet<T, K> tm_exp(const Jet<T, K>& a) {
  T e = tm_exp(a.v);
  return jet_chain(a, e, e);
}
template <class T, int K>
TM_HD Jet<T, K> tm_log(const Jet<T, K>& a) {
  return jet_chain(a, tm_log(a.v), 1.0 / a.v);
}
template <class T, int K>
TM_HD Jet<T, K> tm_tanh(const Jet<T, K>& a) {
  T t = tm_tanh(a.v);
  return jet_chain(a, t, 1.0 - t * t);
}
template <class T, int K>
TM_HD Jet<T, K> tm_fabs(const Jet<T, K>& a) {
  return value_of(a.v) < 0.0 ? -a : a;
}

// max as jnp.maximum picks its branch (ties never occur on the inputs we see: they need
// or_i == |r - sr_j| exactly)
template <class A>
TM_HD A tm_max(const A& a, const A& b) {
  return value_of(a) >= value_of(b) ? a : b;
}

// 3-vectors of any scalar type
template <class T>
TM_HD T dot3(const T* a, const T* b) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}
template <class T>
TM_HD void cross3(const T* a, const T* b, T* out) {
  out[0] = a[1] * b[2] - a[2] * b[1];
  out[1] = a[2] * b[0] - a[0] * b[2];
  out[2] = a[0] * b[1] - a[1] * b[0];
}

}  // namespace tmk
