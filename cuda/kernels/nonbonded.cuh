// Lennard-Jones + Coulomb, no cutoff, as OpenMM's NonbondedForce(NoCutoff) and
// timemachine/potentials/nonbonded.py: all pairs with a pair mask (exclusions), plus the
// scaled 1-4 exceptions (a pair list, evaluated by bonded.cuh with the same pair scalars).
//
//   φ(r) = 4 ε (s¹² - s⁶) + C qq / r,   s = σ/r,  σ = (σ_i + σ_j)/2,
//   ε = lj_scale √ε_i √ε_j,  qq = coulomb_scale q_i q_j    (√ with derivative 0 at 0)
//
// Pair Hessian block (docs/design.md, "Performance principles"):
//   ∂g_i/∂x_j = -(A d dᵀ + B I), A = (φ'' - φ'/r)/r², B = φ'/r.
// ζ for tangent p at atom i: Σ_j A d (d·δ) + B δ + ∂φ'/∂θ_p d/r, δ = t_pi - t_pj, d = x_i - x_j.
#pragma once
#include "tm_common.cuh"

namespace tmk {

// φ, φ', φ'' and, per channel c = (q_i, q_j, σ_i, σ_j, ε_i, ε_j), ∂φ/∂c and ∂φ'/∂c
struct PairScalars {
  double e, d1, d2;
  double de[6];
  double dd1[6];
};

TM_HD double safe_sqrt_derivative(double eps, double sqrt_eps) {
  return eps > 0.0 ? 0.5 / sqrt_eps : 0.0;
}

// the pair scalars from √ε_i, √ε_j and their derivatives h = ∂√ε/∂ε (0 at ε = 0): the
// all-pairs kernels read these per atom (NonbondedArgs.root_eps, droot_eps) instead of
// taking two square roots and two divisions per pair; the numbers are the same
TM_HD PairScalars lj_coulomb_pair_roots(double r, double qi, double qj, double si, double sj,
                                        double rei, double rej, double hi, double hj,
                                        double coulomb_scale, double lj_scale) {
  PairScalars o;
  const double inv_r = 1.0 / r, inv_r2 = inv_r * inv_r;
  const double s = 0.5 * (si + sj) * inv_r;
  const double s2 = s * s, s5 = s2 * s2 * s, s6 = s5 * s, s11 = s5 * s6, s12 = s6 * s6;
  const double eps = lj_scale * rei * rej;
  const double cq = COULOMB * coulomb_scale;
  const double coul = cq * qi * qj * inv_r;
  const double lj0 = 4.0 * (s12 - s6);                  // φ_LJ per unit ε
  const double lj1 = 4.0 * (6.0 * s6 - 12.0 * s12) * inv_r;  // ∂φ_LJ/∂r per unit ε
  o.e = eps * lj0 + coul;
  o.d1 = eps * lj1 - coul * inv_r;
  o.d2 = (4.0 * eps * (156.0 * s12 - 42.0 * s6) + 2.0 * coul) * inv_r2;
  // charges
  o.de[0] = cq * qj * inv_r;
  o.de[1] = cq * qi * inv_r;
  o.dd1[0] = -cq * qj * inv_r2;
  o.dd1[1] = -cq * qi * inv_r2;
  // σ_i and σ_j enter through σ = (σ_i + σ_j)/2: ∂s/∂σ_i = 1/(2r)
  const double ds = 2.0 * eps * (12.0 * s11 - 6.0 * s5) * inv_r;
  const double dds = 2.0 * eps * (36.0 * s5 - 144.0 * s11) * inv_r2;
  o.de[2] = o.de[3] = ds;
  o.dd1[2] = o.dd1[3] = dds;
  // ε_i, ε_j through √ε
  const double dsi = lj_scale * hi * rej;
  const double dsj = lj_scale * hj * rei;
  o.de[4] = lj0 * dsi;
  o.de[5] = lj0 * dsj;
  o.dd1[4] = lj1 * dsi;
  o.dd1[5] = lj1 * dsj;
  return o;
}

TM_HD PairScalars lj_coulomb_pair(double r, double qi, double qj, double si, double sj,
                                  double ei, double ej, double coulomb_scale, double lj_scale) {
  const double rei = tm_safe_sqrt(ei), rej = tm_safe_sqrt(ej);
  return lj_coulomb_pair_roots(r, qi, qj, si, sj, rei, rej, safe_sqrt_derivative(ei, rei),
                               safe_sqrt_derivative(ej, rej), coulomb_scale, lj_scale);
}

// φ'(r)/r of one all-pairs LJ + Coulomb pair (coulomb and lj scale 1), the scalar B_ij of
// its gradient g_i = Σ_j B_ij d_ij, for any scalar type T (double, or a SIMD vector of
// pairs in the CPU custom call host/tm_xla_cpu_gb.cpp): written, as
// timemachine.structured.nonbonded does, in powers of (σ/r)², so no odd power is needed.
//   inv_r2 = 1/r², sig = (σ_i + σ_j)/2, eps = √ε_i √ε_j, qq = q_i q_j
template <class T>
TM_HD T lj_coulomb_d1_over_r(const T& inv_r2, const T& inv_r, const T& sig, const T& eps,
                             const T& qq) {
  const T s2 = sig * sig * inv_r2;
  const T s6 = s2 * s2 * s2;
  const T s12 = s6 * s6;
  const T coul = COULOMB * qq * inv_r;
  return (eps * (4.0 * (6.0 * s6 - 12.0 * s12)) - coul) * inv_r2;
}

// ------------------------------------------------------------ all-pairs kernel bodies
struct NonbondedArgs {
  const double* x;           // (N, 3)
  const double* charge;      // (N,) e
  const double* sigma;       // (N,) nm
  const double* epsilon;     // (N,) kJ/mol
  const double* root_eps;    // (N,) √ε
  const double* droot_eps;   // (N,) ∂√ε/∂ε = 1/(2√ε), 0 where ε = 0
  const i32* slot_q;     // (N,) tangent p of atom i's charge type, or -1
  const i32* slot_sig;   // (N,)
  const i32* slot_eps;   // (N,)
  const u32* mask;      // (N, W) bit j%32 of word j/32: pair (i, j) interacts
  const double* dx;          // (P, N, 3)
  double* energy;            // (N,) ½ Σ_j φ_ij, or null
  double* grad;              // (N, 3) accumulated (+=), or null
  double* dedp;              // (N, 3) Σ_j ∂φ_ij/∂(q_i, σ_i, ε_i), or null
  double* zeta;              // (P, N, 3) accumulated (+=)
  i64 n_atoms;
  i64 n_words;
  i64 n_params;
};

TM_HD bool pair_on(const u32* mask, i64 n_words, i64 i, i64 j) {
  return (mask[i * n_words + (j >> 5)] >> (j & 31)) & 1u;
}

// thread i: row i of the pair sum (energy, gradient, ∂E/∂ per-atom parameters)
TM_HD void nonbonded_primal_body(i64 i, const NonbondedArgs& a) {
  if (i >= a.n_atoms) return;
  const double xi0 = a.x[3 * i], xi1 = a.x[3 * i + 1], xi2 = a.x[3 * i + 2];
  const double qi = a.charge[i], si = a.sigma[i], rei = a.root_eps[i], hi = a.droot_eps[i];
  double e = 0.0, g0 = 0.0, g1 = 0.0, g2 = 0.0, dq = 0.0, ds = 0.0, de = 0.0;
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == i || !pair_on(a.mask, a.n_words, i, j)) continue;
    const double d0 = xi0 - a.x[3 * j], d1 = xi1 - a.x[3 * j + 1], d2 = xi2 - a.x[3 * j + 2];
    const double r = tm_sqrt(d0 * d0 + d1 * d1 + d2 * d2);
    const PairScalars s = lj_coulomb_pair_roots(r, qi, a.charge[j], si, a.sigma[j], rei,
                                                a.root_eps[j], hi, a.droot_eps[j], 1.0, 1.0);
    const double b = s.d1 / r;
    e += s.e;
    g0 += b * d0;
    g1 += b * d1;
    g2 += b * d2;
    dq += s.de[0];
    ds += s.de[2];
    de += s.de[4];
  }
  if (a.energy) a.energy[i] = 0.5 * e;
  if (a.grad) {
    a.grad[3 * i] += g0;
    a.grad[3 * i + 1] += g1;
    a.grad[3 * i + 2] += g2;
  }
  if (a.dedp) {
    a.dedp[3 * i] = dq;
    a.dedp[3 * i + 1] = ds;
    a.dedp[3 * i + 2] = de;
  }
}

// ζ of atom i for the np tangents from p0; kMixed adds the mixed partials of the pair
// parameters that are tangents (without them the compiler drops their arithmetic)
template <bool kMixed>
TM_HD void nonbonded_zeta_row(i64 i, i64 p0, int np, const NonbondedArgs& a) {
  double ti[PCHUNK][3], z[PCHUNK][3];
#pragma unroll
  for (int c = 0; c < PCHUNK; ++c)
    for (int k = 0; k < 3; ++k) {
      ti[c][k] = c < np ? a.dx[3 * ((p0 + c) * a.n_atoms + i) + k] : 0.0;
      z[c][k] = 0.0;
    }
  const double xi0 = a.x[3 * i], xi1 = a.x[3 * i + 1], xi2 = a.x[3 * i + 2];
  const double qi = a.charge[i], si = a.sigma[i], rei = a.root_eps[i], hi = a.droot_eps[i];
  const int sqi = a.slot_q[i], ssi = a.slot_sig[i], sei = a.slot_eps[i];
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == i || !pair_on(a.mask, a.n_words, i, j)) continue;
    const double d[3] = {xi0 - a.x[3 * j], xi1 - a.x[3 * j + 1], xi2 - a.x[3 * j + 2]};
    const double r = tm_sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
    const PairScalars s = lj_coulomb_pair_roots(r, qi, a.charge[j], si, a.sigma[j], rei,
                                                a.root_eps[j], hi, a.droot_eps[j], 1.0, 1.0);
    const double inv_r = 1.0 / r;
    const double B = s.d1 * inv_r;
    const double A = (s.d2 - s.d1 * inv_r) * inv_r * inv_r;
    // every lane of the chunk, so that the loop unrolls and ti, z stay in registers; the
    // lanes past np read tangent p0 (zeros in ti) and are never stored
#pragma unroll
    for (int c = 0; c < PCHUNK; ++c) {
      const double* tj = a.dx + 3 * ((p0 + (c < np ? c : 0)) * a.n_atoms + j);
      const double dl[3] = {ti[c][0] - tj[0], ti[c][1] - tj[1], ti[c][2] - tj[2]};
      double ad = A * (d[0] * dl[0] + d[1] * dl[1] + d[2] * dl[2]);
      if constexpr (kMixed) {
        const int p = (int)(p0 + c);
        double mix = 0.0;
        if (sqi == p) mix += s.dd1[0];
        if (a.slot_q[j] == p) mix += s.dd1[1];
        if (ssi == p) mix += s.dd1[2];
        if (a.slot_sig[j] == p) mix += s.dd1[3];
        if (sei == p) mix += s.dd1[4];
        if (a.slot_eps[j] == p) mix += s.dd1[5];
        ad += mix * inv_r;
      }
      for (int k = 0; k < 3; ++k) z[c][k] += ad * d[k] + B * dl[k];
    }
  }
#pragma unroll
  for (int c = 0; c < PCHUNK; ++c)
    if (c < np)
      for (int k = 0; k < 3; ++k) a.zeta[3 * ((p0 + c) * a.n_atoms + i) + k] += z[c][k];
}

// thread (i, chunk): ζ of atom i for tangents p = chunk·PCHUNK ... (+PCHUNK); the pair
// scalars are computed once per pair and contracted with the chunk's tangents in registers.
// Two entry points, so that each is allocated registers for its own path: with the mixed
// partials (some charge, σ or ε is a tangent), and _xonly (none is: torsion fits).
template <bool kMixed>
TM_HD void nonbonded_zeta_chunk(i64 i, i64 chunk, const NonbondedArgs& a) {
  if (i >= a.n_atoms) return;
  const i64 p0 = chunk * PCHUNK;
  if (p0 >= a.n_params) return;
  const int np = (int)((a.n_params - p0) < PCHUNK ? (a.n_params - p0) : PCHUNK);
  nonbonded_zeta_row<kMixed>(i, p0, np, a);
}
TM_HD void nonbonded_zeta_body(i64 i, i64 chunk, const NonbondedArgs& a) {
  nonbonded_zeta_chunk<true>(i, chunk, a);
}
TM_HD void nonbonded_zeta_body_xonly(i64 i, i64 chunk, const NonbondedArgs& a) {
  nonbonded_zeta_chunk<false>(i, chunk, a);
}

}  // namespace tmk
