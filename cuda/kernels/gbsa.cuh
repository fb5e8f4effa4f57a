// OBC2 generalized Born + ACE surface term, exactly timemachine/potentials/gbsa.py
// (OpenMM's customgbforces.GBSAOBC2Force, Amber igb=5):
//
//   I_ij = [r + sr_j >= or_i] T(r, or_i, sr_j)      (the Born integrand)
//   ψ_i  = or_i Σ_j I_ij,   B_i = 1/(1/or_i - tanh(ψ - 0.8ψ² + 4.85ψ³)/radius_i)
//   E    = Σ_i e_i(B_i, q_i, radius_i) + ½ Σ_{i≠j} q_i q_j h(r_ij, B_i, B_j)
//   e    = ½ pre q²/B + ACE (radius + 0.14)² (radius/B)⁶,   h = pre/√(r² + B_iB_j e^{-r²/4B_iB_j})
//
// Gradient as a pair form (zeta.py, _OBC2Pairs): g_k = Σ_j φ'_kj d_kj/r with
//   φ'_kj = q_k q_j h_r + c_k T'_kj + c_j T'_jk,   c_i = β_i b'_i or_i,  β_i = ∂E/∂B_i.
// Three row passes (ψ → B; β → c; g) in the primal and three tangent passes (δψ → δB, δb';
// δβ → δc; δg = ζ). Partial derivatives of the scalar pieces (T, born, e, h) come from
// Jets through the same formulas, once per pair, and are contracted with PCHUNK tangents.
#pragma once
#include "tm_common.cuh"

namespace tmk {

constexpr double GB_DIELECTRIC_OFFSET = 0.009;  // nm
constexpr double GB_PROBE_RADIUS = 0.14;        // nm
constexpr double GB_ACE_FACTOR = 28.3919551;    // kJ/mol/nm²
constexpr double GB_ALPHA = 1.0, GB_BETA = 0.8, GB_GAMMA = 4.85;

template <class T>
TM_HD T gb_integral(const T& r, const T& or_i, const T& sr_j) {
  const T upper = r + sr_j;
  const T lower = tm_max(or_i, tm_fabs(r - sr_j));
  return 0.5 * (1.0 / lower - 1.0 / upper +
                0.25 * (r - sr_j * sr_j / r) * (1.0 / (upper * upper) - 1.0 / (lower * lower)) +
                0.5 * tm_log(lower / upper) / r);
}

// gb_integral and its derivative along r together, with two divisions and one log (the
// Jet of gb_integral takes nine): L = max(or_i, |r - sr_j|) as there, 1/L and 1/U from one
// reciprocal of L U, and inv_r = 1/r given (the pair loops share it). For any scalar type
// T whose tm_max, tm_fabs and comparisons work lane by lane (the CPU custom call's SIMD
// vectors, host/tm_xla_cpu_gb.cpp); equal to gb_integral(Jet) to round-off.
//   dT/dr = ½ [-L'/L² + 1/U² + ¼ (1 + sr²/r²)(1/U² - 1/L²) + ½ (r - sr²/r)(L'/L³ - 1/U³)
//              + ½ (L'/L - 1/U)/r - ½ ln(L/U)/r²],   L' = dL/dr ∈ {0, ±1}
TM_HD double tm_select(bool c, double a, double b) { return c ? a : b; }
template <class T>
TM_HD void gb_integral_d(const T& r, const T& inv_r, const T& or_i, const T& sr_j, T& t,
                         T& dt) {
  const T upper = r + sr_j;
  const T diff = r - sr_j;
  const T lower = tm_max(or_i, tm_fabs(diff));
  // L' = sign(r - sr_j) where |r - sr_j| is the larger, else 0 (as tm_max and the Jet of
  // tm_fabs pick their branches)
  const T dlower = tm_select(or_i >= tm_fabs(diff), T{}, tm_select(diff < 0.0, T{} - 1.0, T{} + 1.0));
  const T inv_lu = 1.0 / (lower * upper);
  const T inv_l = upper * inv_lu, inv_u = lower * inv_lu;
  const T inv_l2 = inv_l * inv_l, inv_u2 = inv_u * inv_u;
  const T s2r = sr_j * sr_j * inv_r;
  const T ln = tm_log(lower * inv_u);
  t = 0.5 * (inv_l - inv_u + 0.25 * (r - s2r) * (inv_u2 - inv_l2) + 0.5 * ln * inv_r);
  dt = 0.5 * (-dlower * inv_l2 + inv_u2 + 0.25 * (1.0 + s2r * inv_r) * (inv_u2 - inv_l2) +
              0.5 * (r - s2r) * (dlower * inv_l2 * inv_l - inv_u2 * inv_u) +
              0.5 * (dlower * inv_l - inv_u) * inv_r - 0.5 * ln * inv_r * inv_r);
}

// gb_integral with its first and second derivatives along r (the list ζ's pair scalars,
// host/tm_xla_cpu_gb.cpp). With a = r - sr²/r, Q = 1/U² - 1/L², λ = ln(L/U) and L'' = 0:
//   T'' = ½ [2L'²/L³ - 2/U³ + ¼ (a'' Q + 2 a' Q' + a Q'') + ½ (λ''/r - 2λ'/r² + 2λ/r³)],
//   a' = 1 + sr²/r², a'' = -2 sr²/r³, Q' = 2L'/L³ - 2/U³, Q'' = 6/U⁴ - 6L'²/L⁴,
//   λ' = L'/L - 1/U, λ'' = 1/U² - L'²/L²;
// T and T' as gb_integral_d's. Same scalar types as gb_integral_d.
template <class T>
TM_HD void gb_integral_d2(const T& r, const T& inv_r, const T& or_i, const T& sr_j, T& t,
                          T& dt, T& ddt) {
  const T upper = r + sr_j;
  const T diff = r - sr_j;
  const T lower = tm_max(or_i, tm_fabs(diff));
  const T dl = tm_select(or_i >= tm_fabs(diff), T{}, tm_select(diff < 0.0, T{} - 1.0, T{} + 1.0));
  const T dl2 = dl * dl;
  const T inv_lu = 1.0 / (lower * upper);
  const T inv_l = upper * inv_lu, inv_u = lower * inv_lu;
  const T inv_l2 = inv_l * inv_l, inv_u2 = inv_u * inv_u;
  const T inv_l3 = inv_l2 * inv_l, inv_u3 = inv_u2 * inv_u;
  const T s2r = sr_j * sr_j * inv_r;  // sr²/r
  const T a = r - s2r, da = 1.0 + s2r * inv_r, dda = -2.0 * s2r * inv_r * inv_r;
  const T q = inv_u2 - inv_l2, dq = 2.0 * (dl * inv_l3 - inv_u3);
  const T ddq = 6.0 * (inv_u2 * inv_u2 - dl2 * inv_l2 * inv_l2);
  const T ln = tm_log(lower * inv_u);
  const T dln = dl * inv_l - inv_u, ddln = inv_u2 - dl2 * inv_l2;
  const T inv_r2 = inv_r * inv_r;
  t = 0.5 * (inv_l - inv_u + 0.25 * a * q + 0.5 * ln * inv_r);
  dt = 0.5 * (-dl * inv_l2 + inv_u2 + 0.25 * (da * q + a * dq) + 0.5 * (dln - ln * inv_r) * inv_r);
  ddt = 0.5 * (2.0 * (dl2 * inv_l3 - inv_u3) + 0.25 * (dda * q + 2.0 * da * dq + a * ddq) +
               0.5 * (ddln - 2.0 * (dln - ln * inv_r) * inv_r) * inv_r);
}

// The partial derivatives of one pair's h = Q/f, f = √g, g = r² + u e^{-r²/4u}, u = B_i B_j,
// Q = q_i q_j pre, in closed form (the list ζ's pair scalars): with e = e^{-r²/4u},
//   g_r = r (2 - e/2), g_u = e (1 + r²/4u), g_rr = 2 - e/2 + r² e/4u, g_ru = -r³ e/8u²,
//   g_uu = r⁴ e/16u³;  h_x = -½ Q g^{-3/2} g_x,  h_xy = ¾ Q g^{-5/2} g_x g_y - ½ Q g^{-3/2} g_xy;
// by B_i and B_j through u: h_i = h_u B_j, h_ii = h_uu B_j², h_ij = h_uu u + h_u,
// h_ri = h_ru B_j, h_rj = h_ru B_i.
template <class T>
struct GBPairPartials {
  T r, i, rr, ri, rj, ii, ij;
};
template <class T>
TM_HD GBPairPartials<T> gb_pair_partials(const T& r, const T& bi, const T& bj, const T& qq,
                                         double pre) {
  const T u = bi * bj;
  const T inv_u = 1.0 / u;
  const T r2 = r * r;
  const T x4 = 0.25 * r2 * inv_u;  // r²/4u
  const T e = tm_exp(T{} - x4);
  const T g = r2 + u * e;
  const T inv_g = 1.0 / g;
  const T a1 = -0.5 * (qq * pre) * inv_g * tm_sqrt(inv_g);  // -½ Q g^{-3/2}
  const T a2 = -1.5 * a1 * inv_g;                            //  ¾ Q g^{-5/2}
  const T g_r = r * (2.0 - 0.5 * e), g_u = e * (1.0 + x4);
  const T g_rr = 2.0 - 0.5 * e + x4 * e, g_ru = -0.5 * r * x4 * e * inv_u;
  const T g_uu = x4 * x4 * e * inv_u;
  const T h_u = a1 * g_u, h_uu = a2 * g_u * g_u + a1 * g_uu, h_ru = a2 * g_r * g_u + a1 * g_ru;
  GBPairPartials<T> h;
  h.r = a1 * g_r;
  h.rr = a2 * g_r * g_r + a1 * g_rr;
  h.i = h_u * bj;
  h.ii = h_uu * bj * bj;
  h.ij = h_uu * u + h_u;
  h.ri = h_ru * bj;
  h.rj = h_ru * bi;
  return h;
}

// B(ψ, radius); the offset radius or = radius - 0.009 is a function of radius
template <class T>
TM_HD T gb_born(const T& psi, const T& radius) {
  const T offset_r = radius - GB_DIELECTRIC_OFFSET;
  const T t = tm_tanh(GB_ALPHA * psi - GB_BETA * (psi * psi) + GB_GAMMA * (psi * psi * psi));
  return 1.0 / (1.0 / offset_r - t / radius);
}

template <class T>
TM_HD T gb_self(const T& born, const T& q, const T& radius, double pre) {
  const T rb = radius / born;
  const T rb2 = rb * rb;
  const T rp = radius + GB_PROBE_RADIUS;
  return 0.5 * pre * (q * q) / born + GB_ACE_FACTOR * (rp * rp) * (rb2 * rb2 * rb2);
}

template <class T>
TM_HD T gb_pair(const T& r, const T& bi, const T& bj, double pre) {
  const T bb = bi * bj;
  return pre / tm_sqrt(r * r + bb * tm_exp(-(r * r) / (4.0 * bb)));
}

// -------------------------------------------------------------- Jet seeding helpers
typedef Jet<double, 1> J1;
typedef Jet<double, 3> J3;
typedef Jet<J1, 2> J12;
typedef Jet<J1, 3> J13;

TM_HD J1 seed1(double v, bool on) {
  J1 a;
  a.v = v;
  a.d[0] = on ? 1.0 : 0.0;
  return a;
}
TM_HD J3 seed3(double v, int k) {
  J3 a;
  a.v = v;
  for (int c = 0; c < 3; ++c) a.d[c] = c == k ? 1.0 : 0.0;
  return a;
}
// second order: inner tangent on if `inner`, outer tangent k (or none with k < 0)
template <int K>
TM_HD Jet<J1, K> seed2(double v, bool inner, int k) {
  Jet<J1, K> a;
  a.v = seed1(v, inner);
  for (int c = 0; c < K; ++c) a.d[c] = seed1(c == k ? 1.0 : 0.0, false);
  return a;
}

// --------------------------------------------------------------------- kernel bodies
struct GBArgs {
  const double* x;           // (N, 3)
  const double* charge;      // (N,) e
  const double* radius;      // (N,) nm
  const double* scale;       // (N,)
  const i32* slot_q;     // (N,) tangent p of atom i's GB charge type, or -1
  const i32* slot_rad;   // (N,)
  const i32* slot_scale; // (N,)
  const double* dx;          // (P, N, 3)
  double* psi;               // (N,) scratch: ψ
  double* born;              // (N,) B
  double* b1;                // (N,) ∂B/∂ψ
  double* beta;              // (N,) ∂E/∂B
  double* cfac;              // (N,) c = β b' or
  double* dborn;             // (P, N) δB
  double* db1;               // (P, N) δb'
  double* dcfac;             // (P, N) δc
  double* energy;            // (N,) or null
  double* grad;              // (N, 3) accumulated (+=), or null
  double* dedp;              // (N, 3) ∂E/∂(q_i, radius_i, scale_i), or null
  double* zeta;              // (P, N, 3) accumulated (+=)
  double pre;                // -COULOMB_GB (1/ε_in - 1/ε_out)
  i64 n_atoms;
  i64 n_params;
};

TM_HD double gb_offset(const GBArgs& a, i64 i) { return a.radius[i] - GB_DIELECTRIC_OFFSET; }
TM_HD double gb_sr(const GBArgs& a, i64 i) { return a.scale[i] * gb_offset(a, i); }
TM_HD double gb_dist(const GBArgs& a, i64 i, i64 j, double* d) {
  for (int c = 0; c < 3; ++c) d[c] = a.x[3 * i + c] - a.x[3 * j + c];
  return tm_sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
}

// pass 1, thread i: ψ_i, B_i, b'_i
TM_HD void gb_psi_body(i64 i, const GBArgs& a) {
  if (i >= a.n_atoms) return;
  const double or_i = gb_offset(a, i);
  double sum = 0.0, d[3];
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == i) continue;
    const double r = gb_dist(a, i, j, d), sr_j = gb_sr(a, j);
    if ((r + sr_j) - or_i >= 0.0) sum += gb_integral(r, or_i, sr_j);
  }
  const double psi = sum * or_i;
  const J1 b = gb_born(seed1(psi, true), seed1(a.radius[i], false));
  a.psi[i] = psi;
  a.born[i] = b.v;
  a.b1[i] = b.d[0];
}

// pass 2, thread i: β_i = ∂E/∂B_i, c_i, and the energy of row i
TM_HD void gb_beta_body(i64 i, const GBArgs& a) {
  if (i >= a.n_atoms) return;
  const double qi = a.charge[i], bi = a.born[i];
  const J1 e = gb_self(seed1(bi, true), seed1(qi, false), seed1(a.radius[i], false), a.pre);
  double sum_h = 0.0, sum_hb = 0.0, d[3];
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == i) continue;
    const double r = gb_dist(a, i, j, d);
    const double qq = qi * a.charge[j];
    const J1 h = gb_pair(seed1(r, false), seed1(bi, true), seed1(a.born[j], false), a.pre);
    sum_h += qq * h.v;
    sum_hb += qq * h.d[0];
  }
  const double beta = e.d[0] + sum_hb;
  a.beta[i] = beta;
  a.cfac[i] = beta * a.b1[i] * gb_offset(a, i);
  if (a.energy) a.energy[i] = e.v + 0.5 * sum_h;
}

// pass 3, thread i: gradient row i and ∂E/∂(q_i, radius_i, scale_i)
TM_HD void gb_grad_body(i64 i, const GBArgs& a) {
  if (i >= a.n_atoms) return;
  const double qi = a.charge[i], bi = a.born[i], ci = a.cfac[i];
  const double or_i = gb_offset(a, i), sr_i = gb_sr(a, i);
  double g[3] = {0.0, 0.0, 0.0}, d[3];
  double dq = 0.0, sum_t = 0.0, sum_tor = 0.0, dsr = 0.0;
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == i) continue;
    const double r = gb_dist(a, i, j, d);
    const double qj = a.charge[j], or_j = gb_offset(a, j), sr_j = gb_sr(a, j);
    const J1 h = gb_pair(seed1(r, true), seed1(bi, false), seed1(a.born[j], false), a.pre);
    double dphi = qi * qj * h.d[0];
    dq += qj * h.v;
    if ((r + sr_j) - or_i >= 0.0) {
      const J3 t = gb_integral(seed3(r, 0), seed3(or_i, 1), seed3(sr_j, 2));
      dphi += ci * t.d[0];
      sum_t += t.v;
      sum_tor += t.d[1];
    }
    if ((r + sr_i) - or_j >= 0.0) {
      const J3 t = gb_integral(seed3(r, 0), seed3(or_j, 1), seed3(sr_i, 2));
      dphi += a.cfac[j] * t.d[0];
      dsr += a.cfac[j] * t.d[2];
    }
    const double b = dphi / r;
    for (int c = 0; c < 3; ++c) g[c] += b * d[c];
  }
  if (a.grad)
    for (int c = 0; c < 3; ++c) a.grad[3 * i + c] += g[c];
  if (a.dedp) {
    const double beta = a.beta[i];
    const J3 e = gb_self(seed3(bi, -1), seed3(qi, 0), seed3(a.radius[i], 1), a.pre);
    const J1 bor = gb_born(seed1(a.psi[i], false), seed1(a.radius[i], true));
    const double psibar = beta * a.b1[i];
    const double drad_direct = e.d[1] + beta * bor.d[0] + psibar * sum_t + ci * sum_tor;
    a.dedp[3 * i] = e.d[0] + dq;
    a.dedp[3 * i + 1] = drad_direct + a.scale[i] * dsr;
    a.dedp[3 * i + 2] = or_i * dsr;
  }
}

// tangent inputs of atom j for tangent p: δq, δradius, δsr = δscale or + scale δradius
struct GBTangent {
  double dq, drad, dsr;
};
TM_HD GBTangent gb_tangent(const GBArgs& a, i64 j, int p) {
  GBTangent t;
  t.dq = a.slot_q[j] == p ? 1.0 : 0.0;
  t.drad = a.slot_rad[j] == p ? 1.0 : 0.0;
  t.dsr = (a.slot_scale[j] == p ? gb_offset(a, j) : 0.0) + a.scale[j] * t.drad;
  return t;
}

TM_HD int gb_chunk(const GBArgs& a, i64 chunk) {
  const i64 left = a.n_params - chunk * PCHUNK;
  return left <= 0 ? 0 : (int)(left < PCHUNK ? left : PCHUNK);
}

TM_HD void gb_load_tangents(const GBArgs& a, i64 i, i64 p0, int np, double (*t)[3]) {
  for (int c = 0; c < PCHUNK; ++c)
    for (int k = 0; k < 3; ++k) t[c][k] = c < np ? a.dx[3 * ((p0 + c) * a.n_atoms + i) + k] : 0.0;
}

// δr_ij along tangent p: d̂·(t_pi - t_pj)
TM_HD double gb_dr(const GBArgs& a, const double* dhat, const double* ti, i64 p, i64 j) {
  const double* tj = a.dx + 3 * (p * a.n_atoms + j);
  return dhat[0] * (ti[0] - tj[0]) + dhat[1] * (ti[1] - tj[1]) + dhat[2] * (ti[2] - tj[2]);
}

// The three tangent passes are templated on kSlots, whether any GB charge, radius or
// scale is a tangent. Each pass has two entry points, so that each is allocated registers
// for its own path: body (with the parameter terms) and body_xonly (without them, and
// without the Jet lanes only they read: torsion fits).
#define TM_GB_TANGENT_BODY(body, row)                          \
  template <bool kSlots>                                       \
  TM_HD void body##_chunk(i64 i, i64 chunk, const GBArgs& a) { \
    const int np = gb_chunk(a, chunk);                         \
    if (i >= a.n_atoms || np == 0) return;                     \
    row<kSlots>(i, chunk, np, a);                              \
  }                                                            \
  TM_HD void body(i64 i, i64 chunk, const GBArgs& a) {         \
    body##_chunk<true>(i, chunk, a);                           \
  }                                                            \
  TM_HD void body##_xonly(i64 i, i64 chunk, const GBArgs& a) { \
    body##_chunk<false>(i, chunk, a);                          \
  }

// tangent pass 1, thread (i, chunk): δψ_i → δB_i, δb'_i
template <bool kSlots>
TM_HD void gb_dpsi_row(i64 i, i64 chunk, int np, const GBArgs& a) {
  const i64 p0 = chunk * PCHUNK;
  double ti[PCHUNK][3], acc[PCHUNK], d[3], dhat[3];
  gb_load_tangents(a, i, p0, np, ti);
  for (int c = 0; c < PCHUNK; ++c) acc[c] = 0.0;
  const double or_i = gb_offset(a, i);
  double sum_t = 0.0;
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == i) continue;
    const double r = gb_dist(a, i, j, d), sr_j = gb_sr(a, j);
    if ((r + sr_j) - or_i < 0.0) continue;
    for (int c = 0; c < 3; ++c) dhat[c] = d[c] / r;
    const J3 t = gb_integral(seed3(r, 0), seed3(or_i, 1), seed3(sr_j, 2));
    sum_t += t.v;
    for (int c = 0; c < PCHUNK; ++c) {
      if (c >= np) break;
      const int p = (int)(p0 + c);
      if constexpr (kSlots) {
        const GBTangent tj = gb_tangent(a, j, p);
        const double drad_i = a.slot_rad[i] == p ? 1.0 : 0.0;
        acc[c] += t.d[0] * gb_dr(a, dhat, ti[c], p, j) + t.d[1] * drad_i + t.d[2] * tj.dsr;
      } else {
        acc[c] += t.d[0] * gb_dr(a, dhat, ti[c], p, j);
      }
    }
  }
  // B(ψ, radius) to second order: inner tangent ψ, outer (ψ, radius)
  const J12 b = gb_born(seed2<2>(a.psi[i], true, 0), seed2<2>(a.radius[i], false, 1));
  for (int c = 0; c < np; ++c) {
    const int p = (int)(p0 + c);
    const double drad = a.slot_rad[i] == p ? 1.0 : 0.0;
    const double dpsi = drad * sum_t + or_i * acc[c];
    a.dborn[(p0 + c) * a.n_atoms + i] = b.v.d[0] * dpsi + b.d[1].v * drad;
    a.db1[(p0 + c) * a.n_atoms + i] = b.d[0].d[0] * dpsi + b.d[1].d[0] * drad;
  }
}

TM_GB_TANGENT_BODY(gb_dpsi_body, gb_dpsi_row)

// tangent pass 2, thread (i, chunk): δβ_i → δc_i
template <bool kSlots>
TM_HD void gb_dbeta_row(i64 i, i64 chunk, int np, const GBArgs& a) {
  const i64 p0 = chunk * PCHUNK;
  double ti[PCHUNK][3], acc[PCHUNK], dbi[PCHUNK], d[3], dhat[3];
  gb_load_tangents(a, i, p0, np, ti);
  const double qi = a.charge[i], bi = a.born[i];
  // e(B, q, radius): inner tangent B, outer (B, q, radius)
  const J13 e = gb_self(seed2<3>(bi, true, 0), seed2<3>(qi, false, 1),
                        seed2<3>(a.radius[i], false, 2), a.pre);
  for (int c = 0; c < PCHUNK; ++c) {
    acc[c] = 0.0;
    dbi[c] = 0.0;
    if (c < np) {
      const int p = (int)(p0 + c);
      const GBTangent t = gb_tangent(a, i, p);
      dbi[c] = a.dborn[(p0 + c) * a.n_atoms + i];
      acc[c] = e.d[0].d[0] * dbi[c] + e.d[1].d[0] * t.dq + e.d[2].d[0] * t.drad;
    }
  }
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == i) continue;
    const double r = gb_dist(a, i, j, d);
    for (int c = 0; c < 3; ++c) dhat[c] = d[c] / r;
    const double qj = a.charge[j];
    // ∂h/∂B_i and its partials along (r, B_i, B_j)
    const J13 h = gb_pair(seed2<3>(r, false, 0), seed2<3>(bi, true, 1),
                          seed2<3>(a.born[j], false, 2), a.pre);
    for (int c = 0; c < PCHUNK; ++c) {
      if (c >= np) break;
      const int p = (int)(p0 + c);
      const double dr = gb_dr(a, dhat, ti[c], p, j);
      const double dbj = a.dborn[(p0 + c) * a.n_atoms + j];
      if constexpr (kSlots) {
        const double dqi = a.slot_q[i] == p ? 1.0 : 0.0, dqj = a.slot_q[j] == p ? 1.0 : 0.0;
        acc[c] += (dqi * qj + qi * dqj) * h.v.d[0] +
                  qi * qj * (h.d[0].d[0] * dr + h.d[1].d[0] * dbi[c] + h.d[2].d[0] * dbj);
      } else {
        acc[c] += qi * qj * (h.d[0].d[0] * dr + h.d[1].d[0] * dbi[c] + h.d[2].d[0] * dbj);
      }
    }
  }
  const double or_i = gb_offset(a, i), beta = a.beta[i], b1 = a.b1[i];
  for (int c = 0; c < np; ++c) {
    const int p = (int)(p0 + c);
    const double drad = a.slot_rad[i] == p ? 1.0 : 0.0;
    const double db1 = a.db1[(p0 + c) * a.n_atoms + i];
    a.dcfac[(p0 + c) * a.n_atoms + i] = or_i * (acc[c] * b1 + beta * db1) + drad * beta * b1;
  }
}

TM_GB_TANGENT_BODY(gb_dbeta_body, gb_dbeta_row)

// tangent pass 3, thread (k, chunk): ζ_k += δg_k = Σ_j δφ'_kj d̂ + φ'_kj (δd - d̂ δr)/r
template <bool kSlots>
TM_HD void gb_zeta_row(i64 k, i64 chunk, int np, const GBArgs& a) {
  const i64 p0 = chunk * PCHUNK;
  double tk[PCHUNK][3], z[PCHUNK][3], dbk[PCHUNK], dck[PCHUNK], d[3], dhat[3];
  GBTangent tgk[kSlots ? PCHUNK : 1];
  gb_load_tangents(a, k, p0, np, tk);
  for (int c = 0; c < PCHUNK; ++c) {
    for (int m = 0; m < 3; ++m) z[c][m] = 0.0;
    dbk[c] = c < np ? a.dborn[(p0 + c) * a.n_atoms + k] : 0.0;
    dck[c] = c < np ? a.dcfac[(p0 + c) * a.n_atoms + k] : 0.0;
    if constexpr (kSlots) tgk[c] = gb_tangent(a, k, (int)(p0 + c));
  }
  const double qk = a.charge[k], bk = a.born[k], ck = a.cfac[k];
  const double or_k = gb_offset(a, k), sr_k = gb_sr(a, k);
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == k) continue;
    const double r = gb_dist(a, k, j, d);
    for (int c = 0; c < 3; ++c) dhat[c] = d[c] / r;
    const double qj = a.charge[j], cj = a.cfac[j], or_j = gb_offset(a, j), sr_j = gb_sr(a, j);
    const double qq = qk * qj;
    // h_r and its partials along (r, B_k, B_j)
    const J13 h = gb_pair(seed2<3>(r, true, 0), seed2<3>(bk, false, 1),
                          seed2<3>(a.born[j], false, 2), a.pre);
    // T'_kj, T'_jk and their partials along (r, or, sr)
    J13 tkj = seed2<3>(0.0, false, -1), tjk = seed2<3>(0.0, false, -1);
    if ((r + sr_j) - or_k >= 0.0)
      tkj = gb_integral(seed2<3>(r, true, 0), seed2<3>(or_k, false, 1), seed2<3>(sr_j, false, 2));
    if ((r + sr_k) - or_j >= 0.0)
      tjk = gb_integral(seed2<3>(r, true, 0), seed2<3>(or_j, false, 1), seed2<3>(sr_k, false, 2));
    const double dphi = qq * h.v.d[0] + ck * tkj.v.d[0] + cj * tjk.v.d[0];
    const double inv_r = 1.0 / r;
    for (int c = 0; c < PCHUNK; ++c) {
      if (c >= np) break;
      const double* tjv = a.dx + 3 * ((p0 + c) * a.n_atoms + j);
      const double dd[3] = {tk[c][0] - tjv[0], tk[c][1] - tjv[1], tk[c][2] - tjv[2]};
      const double dr = dhat[0] * dd[0] + dhat[1] * dd[1] + dhat[2] * dd[2];
      const double dbj = a.dborn[(p0 + c) * a.n_atoms + j];
      const double dcj = a.dcfac[(p0 + c) * a.n_atoms + j];
      double ddphi;
      if constexpr (kSlots) {
        const GBTangent tj = gb_tangent(a, j, (int)(p0 + c));
        ddphi =
            (tgk[c].dq * qj + qk * tj.dq) * h.v.d[0] +
            qq * (h.d[0].d[0] * dr + h.d[1].d[0] * dbk[c] + h.d[2].d[0] * dbj) +
            dck[c] * tkj.v.d[0] +
            ck * (tkj.d[0].d[0] * dr + tkj.d[1].d[0] * tgk[c].drad + tkj.d[2].d[0] * tj.dsr) +
            dcj * tjk.v.d[0] +
            cj * (tjk.d[0].d[0] * dr + tjk.d[1].d[0] * tj.drad + tjk.d[2].d[0] * tgk[c].dsr);
      } else {
        ddphi = qq * (h.d[0].d[0] * dr + h.d[1].d[0] * dbk[c] + h.d[2].d[0] * dbj) +
                dck[c] * tkj.v.d[0] + ck * (tkj.d[0].d[0] * dr) +
                dcj * tjk.v.d[0] + cj * (tjk.d[0].d[0] * dr);
      }
      for (int m = 0; m < 3; ++m)
        z[c][m] += ddphi * dhat[m] + dphi * (dd[m] - dhat[m] * dr) * inv_r;
    }
  }
  for (int c = 0; c < np; ++c)
    for (int m = 0; m < 3; ++m) a.zeta[3 * ((p0 + c) * a.n_atoms + k) + m] += z[c][m];
}

TM_GB_TANGENT_BODY(gb_zeta_body, gb_zeta_row)

}  // namespace tmk
