// LJ + Coulomb within a cutoff, summed over a Verlet list, as OpenMM's NonbondedForce
// CutoffPeriodic / CutoffNonPeriodic (reaction field) and PME's direct space (erfc), and
// exactly timemachine/potentials/cutoffs.py (_pair_scalars,
// neighbour_pair_gradient_and_zeta):
//
//   u(r) = 4√ε_i√ε_j ((σ/r)¹² - (σ/r)⁶) S(r) + k_e q_i q_j c(r),   σ = (σ_i + σ_j)/2,
//   c(r) = 1/r + k_rf r² - c_rf   (reaction field)   or   erfc(α r)/r   (PME),
//
// S OpenMM's switch (1 below r_sw, 1 - 10t³ + 15t⁴ - 6t⁵ above, t = (r - r_sw)/(r_c - r_sw);
// S = 1 without one), and u = 0 for r ≥ r_c. d = x_i - x_j is the minimum image in a
// rectangular box (none without one). With B = u'/r and A = (dB/dr)/r, row i of the list:
//
//   ∇_i E = Σ_j B d,    ζ_p,i = Σ_j A (d · δ) d + B δ + (∂B/∂θ_p) d,    δ = t_p,i - t_p,j.
//
// B is linear in k_e q_i q_j and in 4√ε_i√ε_j, so its charge and ε derivatives are its
// Coulomb and LJ parts; σ enters through σ only (∂σ/∂σ_i = ½), with ∂B/∂σ = 0 at σ = 0;
// √ε has derivative 0 at ε = 0 (safe_sqrt). The list holds each pair in both rows, so a
// thread owns its row's sums: no atomics, no scatter.
#pragma once
#include "tm_common.cuh"

namespace tmk {

TM_HD double tm_rint(double a) { return rint(a); }  // half to even, as jnp.round
TM_HD double tm_erfc(double a) { return erfc(a); }

constexpr double SQRT_PI = 1.7724538509055159;  // √π, as np.sqrt(np.pi)

// the constants of the pair form (cutoffs.reaction_field_constants; α the Ewald parameter)
struct CutoffForm {
  double cutoff;           // r_c, nm
  double switch_distance;  // r_sw, nm (read when use_switch)
  double k_rf, c_rf;       // reaction field, nm⁻³ and nm⁻¹ (read unless pme)
  double alpha;            // α, nm⁻¹ (read when pme)
  bool use_switch;
  bool pme;
};

// d - box round(d / box): the nearest periodic image of one displacement component
TM_HD double minimum_image(double d, double box) { return d - box * tm_rint(d / box); }

// The radial functions of one pair, per unit 4√ε_i√ε_j (LJ) and per unit k_e q_i q_j
// (Coulomb), at distance r and mixed σ: cutoffs._pair_scalars (b_lj .. db_lj_s, the same
// expressions in the same order) and the energies and ∂/∂σ the primal pass needs.
// T is double, or (the CPU custom call) a SIMD vector of doubles with a where(mask, a, b)
// of its own declared before this header.
template <class T>
struct CutoffRadialT {
  T lj, c;      // u_lj = ((σ/r)¹² - (σ/r)⁶) S, u_c = c(r)
  T lj_s;       // ∂u_lj/∂σ
  T b_lj, db_lj;  // B_lj = u_lj'/r and dB_lj/dr
  T b_c, db_c;    // B_c, dB_c/dr
  T db_lj_s;      // ∂B_lj/∂σ
};
typedef CutoffRadialT<double> CutoffRadial;

TM_HD double where(bool mask, double a, double b) { return mask ? a : b; }

// cutoff_radial given erfc(α r) and exp(-α² r²) (read for PME only): a caller that
// evaluates those two for many pairs at once (the CPU custom call's SIMD batches) shares
// the rest of the maths
template <class T>
TM_HD CutoffRadialT<T> cutoff_radial_given(T r, T sig, const CutoffForm& f, T erfc_ar,
                                           T exp_a2r2) {
  CutoffRadialT<T> o;
  const T inv_r = 1.0 / r;
  const T inv_r2 = inv_r * inv_r;
  const T s2 = sig * sig * inv_r2;
  const T s6 = s2 * s2 * s2;
  const T s12 = s6 * s6;
  T lj = s12 - s6;                                 // L
  T d_lj = (-12.0 * s12 + 6.0 * s6) * inv_r;       // L'
  T dd_lj = (156.0 * s12 - 42.0 * s6) * inv_r2;    // L''
  const T inv_sig = where(sig > 0.0, 1.0 / sig, 0.0 * sig);   // σ = 0: no LJ, no σ derivative
  T lj_s = (12.0 * s12 - 6.0 * s6) * inv_sig;              // ∂L/∂σ
  T d_lj_s = (-144.0 * s12 + 36.0 * s6) * inv_r * inv_sig;  // ∂L'/∂σ
  if (f.use_switch) {
    const double w = f.cutoff - f.switch_distance;
    T t = (r - f.switch_distance) / w;
    t = where(t < 0.0, 0.0 * t, where(t > 1.0, 0.0 * t + 1.0, t));
    const T sw = 1.0 + t * t * t * (-10.0 + t * (15.0 - 6.0 * t));
    const T d_sw = t * t * (-30.0 + t * (60.0 - 30.0 * t)) / w;
    const T dd_sw = t * (-60.0 + t * (180.0 - 120.0 * t)) / (w * w);
    const T l0 = lj, l1 = d_lj, l2 = dd_lj;
    lj = l0 * sw;
    d_lj = l1 * sw + l0 * d_sw;
    dd_lj = l2 * sw + 2.0 * l1 * d_sw + l0 * dd_sw;
    d_lj_s = d_lj_s * sw + lj_s * d_sw;
    lj_s = lj_s * sw;
  }
  T c, d_c, dd_c;
  if (!f.pme) {
    c = inv_r + f.k_rf * r * r - f.c_rf;
    d_c = -inv_r2 + 2.0 * f.k_rf * r;
    dd_c = 2.0 * inv_r2 * inv_r + 2.0 * f.k_rf;
  } else {
    const T gauss = 2.0 * f.alpha / SQRT_PI * exp_a2r2;
    c = erfc_ar * inv_r;
    d_c = -erfc_ar * inv_r2 - gauss * inv_r;
    dd_c = 2.0 * erfc_ar * inv_r2 * inv_r + gauss * (2.0 * inv_r2 + 2.0 * f.alpha * f.alpha);
  }
  o.lj = lj;
  o.c = c;
  o.lj_s = lj_s;
  // B = u'/r and dB/dr = (u'' - u'/r)/r
  o.b_lj = d_lj * inv_r;
  o.db_lj = (dd_lj - d_lj * inv_r) * inv_r;
  o.b_c = d_c * inv_r;
  o.db_c = (dd_c - d_c * inv_r) * inv_r;
  o.db_lj_s = d_lj_s * inv_r;
  return o;
}

TM_HD CutoffRadial cutoff_radial(double r, double sig, const CutoffForm& f) {
  if (!f.pme) return cutoff_radial_given<double>(r, sig, f, 0.0, 0.0);
  return cutoff_radial_given<double>(r, sig, f, tm_erfc(f.alpha * r),
                                     tm_exp(-f.alpha * f.alpha * r * r));
}

// One pair inside the cutoff: u, B, A and, per channel c = (q_i, q_j, σ_i, σ_j, ε_i, ε_j),
// ∂u/∂c and ∂B/∂c. rei, rej are √ε_i, √ε_j and hi, hj their ε derivatives (0 at ε = 0).
struct CutoffPair {
  double u, b, a;
  double du[6];
  double db[6];
};

TM_HD CutoffPair cutoff_pair(double r, double qi, double qj, double si, double sj, double rei,
                             double rej, double hi, double hj, const CutoffForm& f) {
  CutoffPair o;
  const double sig = 0.5 * (si + sj);
  const double eps4 = 4.0 * rei * rej;
  const double qq = COULOMB * qi * qj;
  const CutoffRadial s = cutoff_radial(r, sig, f);
  o.u = eps4 * s.lj + qq * s.c;
  o.b = eps4 * s.b_lj + qq * s.b_c;
  o.a = (eps4 * s.db_lj + qq * s.db_c) / r;
  // charges: u and B are k_e q_i q_j times their Coulomb parts
  o.du[0] = s.c * COULOMB * qj;
  o.du[1] = s.c * COULOMB * qi;
  o.db[0] = s.b_c * COULOMB * qj;
  o.db[1] = s.b_c * COULOMB * qi;
  // σ_i, σ_j through σ = (σ_i + σ_j)/2
  o.du[2] = o.du[3] = 0.5 * eps4 * s.lj_s;
  o.db[2] = o.db[3] = 0.5 * eps4 * s.db_lj_s;
  // ε_i, ε_j through 4√ε_i√ε_j
  o.du[4] = s.lj * 4.0 * rej * hi;
  o.du[5] = s.lj * 4.0 * rei * hj;
  o.db[4] = s.b_lj * 4.0 * rej * hi;
  o.db[5] = s.b_lj * 4.0 * rei * hj;
  return o;
}

// ------------------------------------------------------------ Verlet-list kernel bodies
struct CutoffArgs {
  const double* x;          // (N, 3)
  const double* charge;     // (N,) e
  const double* sigma;      // (N,) nm
  const double* root_eps;   // (N,) √ε
  const double* droot_eps;  // (N,) ∂√ε/∂ε = 1/(2√ε), 0 where ε = 0
  const i32* slot_q;        // (N,) tangent p of atom i's charge, or -1
  const i32* slot_sig;      // (N,)
  const i32* slot_eps;      // (N,)
  const i32* nbr;           // (N, K) row i: the partners j of atom i, padded with N
  const double* dx;         // (P, N, 3)
  double* energy;           // (N,) ½ Σ_j u_ij, or null
  double* grad;             // (N, 3) accumulated (+=), or null
  double* dedp;             // (N, 3) Σ_j ∂u_ij/∂(q_i, σ_i, ε_i), or null
  double* zeta;             // (P, N, 3) accumulated (+=)
  double box_x, box_y, box_z;  // nm, read when periodic
  double cutoff, switch_distance, k_rf, c_rf, alpha;
  i64 periodic;             // 1: minimum image in the box; 0: no images
  i64 use_switch;           // 1: OpenMM's LJ switch from switch_distance
  i64 pme;                  // 1: erfc(α r)/r Coulomb; 0: reaction field
  i64 n_atoms;
  i64 capacity;             // K
  i64 n_params;
};

TM_HD CutoffForm cutoff_form(const CutoffArgs& a) {
  CutoffForm f;
  f.cutoff = a.cutoff;
  f.switch_distance = a.switch_distance;
  f.k_rf = a.k_rf;
  f.c_rf = a.c_rf;
  f.alpha = a.alpha;
  f.use_switch = a.use_switch != 0;
  f.pme = a.pme != 0;
  return f;
}

// d = x_i - x_j (minimum image) and r² of partner slot s of row i; false when the slot is
// padding (or atom i itself) or the pair lies at or beyond the cutoff
TM_HD bool cutoff_partner(i64 i, const double* xi, i64 s, const CutoffArgs& a, i64* j_out,
                          double* d, double* r_out) {
  const i64 j = a.nbr[i * a.capacity + s];
  if (j < 0 || j >= a.n_atoms || j == i) return false;
  d[0] = xi[0] - a.x[3 * j];
  d[1] = xi[1] - a.x[3 * j + 1];
  d[2] = xi[2] - a.x[3 * j + 2];
  if (a.periodic) {
    d[0] = minimum_image(d[0], a.box_x);
    d[1] = minimum_image(d[1], a.box_y);
    d[2] = minimum_image(d[2], a.box_z);
  }
  const double r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
  if (!(r2 < a.cutoff * a.cutoff)) return false;
  *j_out = j;
  *r_out = tm_sqrt(r2);
  return true;
}

// thread i: row i of the list (energy, gradient, ∂E/∂ per-atom parameters)
TM_HD void cutoff_primal_body(i64 i, const CutoffArgs& a) {
  if (i >= a.n_atoms) return;
  const CutoffForm f = cutoff_form(a);
  const double xi[3] = {a.x[3 * i], a.x[3 * i + 1], a.x[3 * i + 2]};
  const double qi = a.charge[i], si = a.sigma[i], rei = a.root_eps[i], hi = a.droot_eps[i];
  double e = 0.0, g0 = 0.0, g1 = 0.0, g2 = 0.0, dq = 0.0, ds = 0.0, de = 0.0;
  for (i64 s = 0; s < a.capacity; ++s) {
    i64 j;
    double d[3], r;
    if (!cutoff_partner(i, xi, s, a, &j, d, &r)) continue;
    const CutoffPair p = cutoff_pair(r, qi, a.charge[j], si, a.sigma[j], rei, a.root_eps[j], hi,
                                     a.droot_eps[j], f);
    e += p.u;
    g0 += p.b * d[0];
    g1 += p.b * d[1];
    g2 += p.b * d[2];
    dq += p.du[0];
    ds += p.du[2];
    de += p.du[4];
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

// ζ of atom i for the np tangents from p0, as nonbonded_zeta_row: the pair scalars once
// per listed pair, contracted with the chunk's tangents in registers; kMixed adds the
// mixed partials of the charges, σ and ε that are tangents
template <bool kMixed>
TM_HD void cutoff_zeta_row(i64 i, i64 p0, int np, const CutoffArgs& a) {
  const CutoffForm f = cutoff_form(a);
  double ti[PCHUNK][3], z[PCHUNK][3];
#pragma unroll
  for (int c = 0; c < PCHUNK; ++c)
    for (int k = 0; k < 3; ++k) {
      ti[c][k] = c < np ? a.dx[3 * ((p0 + c) * a.n_atoms + i) + k] : 0.0;
      z[c][k] = 0.0;
    }
  const double xi[3] = {a.x[3 * i], a.x[3 * i + 1], a.x[3 * i + 2]};
  const double qi = a.charge[i], si = a.sigma[i], rei = a.root_eps[i], hi = a.droot_eps[i];
  const int sqi = a.slot_q[i], ssi = a.slot_sig[i], sei = a.slot_eps[i];
  for (i64 s = 0; s < a.capacity; ++s) {
    i64 j;
    double d[3], r;
    if (!cutoff_partner(i, xi, s, a, &j, d, &r)) continue;
    const CutoffPair pr = cutoff_pair(r, qi, a.charge[j], si, a.sigma[j], rei, a.root_eps[j],
                                      hi, a.droot_eps[j], f);
    // lanes past np read tangent p0 (zeros in ti) and are never stored
#pragma unroll
    for (int c = 0; c < PCHUNK; ++c) {
      const double* tj = a.dx + 3 * ((p0 + (c < np ? c : 0)) * a.n_atoms + j);
      const double dl[3] = {ti[c][0] - tj[0], ti[c][1] - tj[1], ti[c][2] - tj[2]};
      double ad = pr.a * (d[0] * dl[0] + d[1] * dl[1] + d[2] * dl[2]);
      if constexpr (kMixed) {
        const int p = (int)(p0 + c);
        if (sqi == p) ad += pr.db[0];
        if (a.slot_q[j] == p) ad += pr.db[1];
        if (ssi == p) ad += pr.db[2];
        if (a.slot_sig[j] == p) ad += pr.db[3];
        if (sei == p) ad += pr.db[4];
        if (a.slot_eps[j] == p) ad += pr.db[5];
      }
      for (int k = 0; k < 3; ++k) z[c][k] += ad * d[k] + pr.b * dl[k];
    }
  }
#pragma unroll
  for (int c = 0; c < PCHUNK; ++c)
    if (c < np)
      for (int k = 0; k < 3; ++k) a.zeta[3 * ((p0 + c) * a.n_atoms + i) + k] += z[c][k];
}

// thread (i, chunk): ζ of atom i for tangents p = chunk·PCHUNK ... (+PCHUNK). Two entry
// points, as the all-pairs term's: with the mixed partials, and _xonly (no charge, σ or ε
// among the tangents)
template <bool kMixed>
TM_HD void cutoff_zeta_chunk(i64 i, i64 chunk, const CutoffArgs& a) {
  if (i >= a.n_atoms) return;
  const i64 p0 = chunk * PCHUNK;
  if (p0 >= a.n_params) return;
  const int np = (int)((a.n_params - p0) < PCHUNK ? (a.n_params - p0) : PCHUNK);
  cutoff_zeta_row<kMixed>(i, p0, np, a);
}
TM_HD void cutoff_zeta_body(i64 i, i64 chunk, const CutoffArgs& a) {
  cutoff_zeta_chunk<true>(i, chunk, a);
}
TM_HD void cutoff_zeta_body_xonly(i64 i, i64 chunk, const CutoffArgs& a) {
  cutoff_zeta_chunk<false>(i, chunk, a);
}

// ------------------------------------------------------------ building the list
// Row i of the Verlet list of x: every j ≠ i not in row i of the exclusion table with
// |d_ij| < radius (cutoff + skin; minimum image when periodic), in increasing j, padded
// with N; count[i] the partners found (> capacity: the row overflowed and holds the first
// capacity of them). O(N) per row (all j): the reference build for the host tests and
// for small systems. A thread writes only its own row.
struct ListArgs {
  const double* x;      // (N, 3)
  const i32* excluded;  // (N, M) atoms excluded from i, padded with -1 (cutoffs.exclusion_table)
  i32* nbr;             // (N, K) out
  i32* count;           // (N,) out
  double box_x, box_y, box_z;
  double radius;        // nm
  i64 periodic;
  i64 n_atoms;
  i64 n_excluded;       // M
  i64 capacity;         // K
};

TM_HD void cutoff_list_body(i64 i, const ListArgs& a) {
  if (i >= a.n_atoms) return;
  const double xi[3] = {a.x[3 * i], a.x[3 * i + 1], a.x[3 * i + 2]};
  const double r2max = a.radius * a.radius;
  i64 found = 0;
  for (i64 j = 0; j < a.n_atoms; ++j) {
    if (j == i) continue;
    double d[3] = {xi[0] - a.x[3 * j], xi[1] - a.x[3 * j + 1], xi[2] - a.x[3 * j + 2]};
    if (a.periodic) {
      d[0] = minimum_image(d[0], a.box_x);
      d[1] = minimum_image(d[1], a.box_y);
      d[2] = minimum_image(d[2], a.box_z);
    }
    if (!(d[0] * d[0] + d[1] * d[1] + d[2] * d[2] < r2max)) continue;
    bool skip = false;
    for (i64 m = 0; m < a.n_excluded; ++m) skip = skip || a.excluded[i * a.n_excluded + m] == j;
    if (skip) continue;
    if (found < a.capacity) a.nbr[i * a.capacity + found] = (i32)j;
    ++found;
  }
  for (i64 s = found; s < a.capacity; ++s) a.nbr[i * a.capacity + s] = (i32)a.n_atoms;
  a.count[i] = (i32)found;
}

}  // namespace tmk
