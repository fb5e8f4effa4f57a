// Bonded terms with OpenMM's functional forms (timemachine/potentials/bonded.py), and the
// scaled 1-4 nonbonded exceptions, which share their pair-list layout.
//
// Every term is E = f(q(x[idx]); θ[pidx], consts) of one internal coordinate q:
//   bond      q = r,  f = ½ k (q - r0)²            pidx (r0, k)
//   angle     q = θ,  f = ½ k (q - θ0)²            pidx (θ0, k)
//   torsion   q = φ,  f = k (1 + cos(n q - φ0))    pidx (φ0, k), consts (n)
//   exception q = r,  f = LJ + Coulomb (nonbonded.cuh)  pidx (q_i, q_j, σ_i, σ_j, ε_i, ε_j),
//             consts (coulomb_scale, lj_scale)
// Hessian of a term: f'' ∇q∇qᵀ + f' ∇²q. ζ for tangent t_p (the term's atoms of dx/dθ_p)
//   ζ_p = f'' ∇q (∇q·t_p) + f' (∇²q t_p) + Σ_c [pidx_c is θ_p] ∂f'/∂θ_c ∇q,
// with ∇²q t_p the directional derivative of the analytic ∇q (a Jet through the same
// formula); q, ∇q, f', f'' are computed once per term and contracted with every tangent.
#pragma once
#include "nonbonded.cuh"
#include "tm_common.cuh"

namespace tmk {

enum TermKind : i32 { KIND_BOND = 0, KIND_ANGLE = 1, KIND_TORSION = 2, KIND_EXCEPTION = 3 };

TM_HD int kind_atoms(int kind) { return kind == KIND_ANGLE ? 3 : (kind == KIND_TORSION ? 4 : 2); }
TM_HD int kind_channels(int kind) { return kind == KIND_EXCEPTION ? 6 : 2; }
TM_HD int kind_consts(int kind) {
  return kind == KIND_EXCEPTION ? 2 : (kind == KIND_TORSION ? 1 : 0);
}

// ------------------------------------------------------------ coordinate gradients ∇q
// pair: q = |x0 - x1|
template <class T>
TM_HD void pair_coord_grad(const T (*xl)[3], T (*g)[3]) {
  T d[3];
  for (int c = 0; c < 3; ++c) d[c] = xl[0][c] - xl[1][c];
  T r = tm_sqrt(dot3(d, d));
  for (int c = 0; c < 3; ++c) {
    g[0][c] = d[c] / r;
    g[1][c] = -g[0][c];
  }
}

// angle at atom 1: q = atan2(|u × w|, u·w), u = x0 - x1, w = x2 - x1
template <class T>
TM_HD void angle_coord_grad(const T (*xl)[3], T (*g)[3]) {
  T u[3], w[3], n[3];
  for (int c = 0; c < 3; ++c) {
    u[c] = xl[0][c] - xl[1][c];
    w[c] = xl[2][c] - xl[1][c];
  }
  cross3(u, w, n);
  T s = tm_sqrt(dot3(n, n));
  T cs = dot3(u, w);
  T cu = cs / dot3(u, u), cw = cs / dot3(w, w);
  for (int c = 0; c < 3; ++c) {
    g[0][c] = (cu * u[c] - w[c]) / s;
    g[2][c] = (cw * w[c] - u[c]) / s;
    g[1][c] = -g[0][c] - g[2][c];
  }
}

// dihedral (IUPAC sign): Blondel & Karplus, J. Comput. Chem. 17, 1132 (1996)
template <class T>
TM_HD void dihedral_coord_grad(const T (*xl)[3], T (*g)[3]) {
  T f[3], gg[3], h[3], a[3], b[3];
  for (int c = 0; c < 3; ++c) {
    f[c] = xl[0][c] - xl[1][c];
    gg[c] = xl[1][c] - xl[2][c];
    h[c] = xl[3][c] - xl[2][c];
  }
  cross3(f, gg, a);
  cross3(h, gg, b);
  T a2 = dot3(a, a), b2 = dot3(b, b);
  T gn = tm_sqrt(dot3(gg, gg));
  T fg = dot3(f, gg) / (a2 * gn);
  T hg = dot3(h, gg) / (b2 * gn);
  T ca = gn / a2, cb = gn / b2;
  for (int c = 0; c < 3; ++c) {
    g[0][c] = -ca * a[c];
    g[3][c] = cb * b[c];
    g[1][c] = -g[0][c] + fg * a[c] - hg * b[c];
    g[2][c] = -g[3][c] - fg * a[c] + hg * b[c];
  }
}

template <class T>
TM_HD void coord_grad(int kind, const T (*xl)[3], T (*g)[3]) {
  if (kind == KIND_ANGLE)
    angle_coord_grad(xl, g);
  else if (kind == KIND_TORSION)
    dihedral_coord_grad(xl, g);
  else
    pair_coord_grad(xl, g);
}

// the coordinate value, with the reference's formula (atan2 keeps 0 and π finite)
TM_HD double coord_value(int kind, const double (*xl)[3]) {
  if (kind == KIND_ANGLE) {
    double u[3], w[3], n[3];
    for (int c = 0; c < 3; ++c) {
      u[c] = xl[0][c] - xl[1][c];
      w[c] = xl[2][c] - xl[1][c];
    }
    cross3(u, w, n);
    return tm_atan2(tm_sqrt(dot3(n, n)), dot3(u, w));
  }
  if (kind == KIND_TORSION) {
    double b1[3], b2[3], b3[3], n1[3], n2[3];
    for (int c = 0; c < 3; ++c) {
      b1[c] = xl[1][c] - xl[0][c];
      b2[c] = xl[2][c] - xl[1][c];
      b3[c] = xl[3][c] - xl[2][c];
    }
    cross3(b1, b2, n1);
    cross3(b2, b3, n2);
    double y = tm_sqrt(dot3(b2, b2)) * dot3(b1, n2);
    return tm_atan2(y, dot3(n1, n2));
  }
  double d[3];
  for (int c = 0; c < 3; ++c) d[c] = xl[1][c] - xl[0][c];
  return tm_sqrt(dot3(d, d));
}

// ------------------------------------------------------------ f(q) and its derivatives
struct TermScalars {
  double e;       // f
  double d1;      // f'
  double d2;      // f''
  double de[6];   // ∂f/∂θ_c
  double dd1[6];  // ∂f'/∂θ_c
};

TM_HD TermScalars term_scalars(int kind, double q, const double* p, const double* cst) {
  TermScalars s;
  for (int c = 0; c < 6; ++c) s.de[c] = s.dd1[c] = 0.0;
  if (kind == KIND_BOND || kind == KIND_ANGLE) {
    double dq = q - p[0], k = p[1];
    s.e = 0.5 * k * dq * dq;
    s.d1 = k * dq;
    s.d2 = k;
    s.de[0] = -k * dq;
    s.de[1] = 0.5 * dq * dq;
    s.dd1[0] = -k;
    s.dd1[1] = dq;
  } else if (kind == KIND_TORSION) {
    double n = cst[0], k = p[1];
    double arg = n * q - p[0];
    double cs = tm_cos(arg), sn = tm_sin(arg);
    s.e = k * (1.0 + cs);
    s.d1 = -k * n * sn;
    s.d2 = -k * n * n * cs;
    s.de[0] = k * sn;
    s.de[1] = 1.0 + cs;
    s.dd1[0] = k * n * cs;
    s.dd1[1] = -n * sn;
  } else {
    PairScalars ps = lj_coulomb_pair(q, p[0], p[1], p[2], p[3], p[4], p[5], cst[0], cst[1]);
    s.e = ps.e;
    s.d1 = ps.d1;
    s.d2 = ps.d2;
    for (int c = 0; c < 6; ++c) {
      s.de[c] = ps.de[c];
      s.dd1[c] = ps.dd1[c];
    }
  }
  return s;
}

// ------------------------------------------------------------ kernel bodies
// One TermArgs per term kind. Per-term outputs go to "slots": slot (offset + t·k + a) holds
// term t's contribution to its a-th atom; the gather kernel (gather.cuh) sums each atom's
// slots in a fixed order, so the accumulation is deterministic and exact float64.
struct TermArgs {
  const i32* idx;      // (n, k) atoms
  const i32* pidx;     // (n, C) indices into θ
  const double* consts;    // (n, NC) fixed constants
  const double* theta;     // (P_all,)
  const i32* inv_wrt;  // (P_all,) tangent p of θ_m, or -1
  const double* x;         // (N, 3) nm
  const double* dx;        // (P, N, 3) dx/dθ
  double* energy;          // (n,) per-term energy, or null
  double* grad_slots;      // (S, 3), or null
  double* dedp;            // (n, C) ∂E_t/∂θ_c, or null
  double* zeta_slots;      // (P, S, 3)
  i64 n_terms;
  i64 n_atoms;
  i64 n_params;     // P, the tangents
  i64 n_slots;      // S
  i64 slot_offset;  // first slot of this kind
  i64 kind;
};

TM_HD void load_term(const TermArgs& a, i64 t, int k, int nc, int nconst, int* atoms,
                     double (*xl)[3], double* p, double* cst) {
  for (int i = 0; i < k; ++i) {
    atoms[i] = a.idx[t * k + i];
    for (int c = 0; c < 3; ++c) xl[i][c] = a.x[3 * (i64)atoms[i] + c];
  }
  for (int c = 0; c < nc; ++c) p[c] = a.theta[a.pidx[t * nc + c]];
  for (int c = 0; c < nconst; ++c) cst[c] = a.consts[t * nconst + c];
}

// term t of a's kind at x: its atoms, positions xl, coordinate gradient g = ∇q and the
// scalars (energy, f', f'', ∂f/∂θ_c, ∂f'/∂θ_c), shared by the primal and the ζ bodies
TM_HD TermScalars evaluate_term(const TermArgs& a, i64 t, int* atoms, double (*xl)[3],
                                double (*g)[3]) {
  const int kind = (int)a.kind;
  double p[6], cst[2];
  load_term(a, t, kind_atoms(kind), kind_channels(kind), kind_consts(kind), atoms, xl, p, cst);
  coord_grad<double>(kind, xl, g);
  return term_scalars(kind, coord_value(kind, xl), p, cst);
}

// thread t: energy, gradient slots and ∂E/∂θ of term t
TM_HD void terms_primal_body(i64 t, const TermArgs& a) {
  if (t >= a.n_terms) return;
  const int kind = (int)a.kind, k = kind_atoms(kind), nc = kind_channels(kind);
  int atoms[4];
  double xl[4][3], g[4][3];
  const TermScalars s = evaluate_term(a, t, atoms, xl, g);
  if (a.energy) a.energy[t] = s.e;
  if (a.grad_slots)
    for (int i = 0; i < k; ++i)
      for (int c = 0; c < 3; ++c) a.grad_slots[3 * (a.slot_offset + t * k + i) + c] = s.d1 * g[i][c];
  if (a.dedp)
    for (int c = 0; c < nc; ++c) a.dedp[t * nc + c] = s.de[c];
}

// thread t: ζ slots of term t for all P tangents (term data stays in registers)
TM_HD void terms_zeta_body(i64 t, const TermArgs& a) {
  if (t >= a.n_terms) return;
  const int kind = (int)a.kind, k = kind_atoms(kind), nc = kind_channels(kind);
  int atoms[4];
  double xl[4][3], g[4][3];
  const TermScalars s = evaluate_term(a, t, atoms, xl, g);
  int slot[6];
  for (int c = 0; c < nc; ++c) slot[c] = a.inv_wrt[a.pidx[t * nc + c]];
  typedef Jet<double, 1> J;
  for (i64 pp = 0; pp < a.n_params; ++pp) {
    J xj[4][3], gj[4][3];
    double dq = 0.0;
    for (int i = 0; i < k; ++i)
      for (int c = 0; c < 3; ++c) {
        const double tc = a.dx[3 * (pp * a.n_atoms + atoms[i]) + c];
        xj[i][c].v = xl[i][c];
        xj[i][c].d[0] = tc;
        dq += g[i][c] * tc;
      }
    coord_grad<J>(kind, xj, gj);
    double mix = 0.0;
    for (int c = 0; c < nc; ++c)
      if (slot[c] == pp) mix += s.dd1[c];
    double* out = a.zeta_slots + 3 * (pp * a.n_slots + a.slot_offset + t * k);
    for (int i = 0; i < k; ++i)
      for (int c = 0; c < 3; ++c)
        out[3 * i + c] = (s.d2 * dq + mix) * g[i][c] + s.d1 * gj[i][c].d[0];
  }
}

}  // namespace tmk
