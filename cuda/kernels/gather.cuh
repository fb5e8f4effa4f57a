// Deterministic accumulation: every per-term contribution has its own slot, and each
// output (an atom's gradient or ζ, a parameter's ∂E/∂θ) sums its slots in a fixed order
// (CSR lists built on the host). No floating-point atomics, so repeated runs are bitwise
// identical, and the sums are exact float64 (no fixed-point rounding).
#pragma once
#include "tm_common.cuh"

namespace tmk {

struct GatherArgs {
  const i32* atom_ptr;    // (N + 1,) CSR row pointers into atom_slots
  const i32* atom_slots;  // (S,) slot ids of each atom, in a fixed order
  const double* grad_slots;   // (S, 3)
  const double* zeta_slots;   // (P, S, 3)
  double* grad;               // (N, 3) accumulated (+=)
  double* zeta;               // (P, N, 3) accumulated (+=)
  const i32* param_ptr;   // (P_all + 1,) CSR into param_entries
  const i32* param_entries;  // entries of `values` that are ∂E/∂θ_m contributions
  const double* values;       // per-term / per-atom ∂E/∂(term parameter)
  double* dedtheta;           // (P_all,)
  i64 n_atoms;
  i64 n_slots;
  i64 n_params;     // P (tangents)
  i64 n_theta;      // P_all
};

TM_HD void gather_grad_body(i64 i, const GatherArgs& a) {
  if (i >= a.n_atoms) return;
  double g[3] = {0.0, 0.0, 0.0};
  for (i32 s = a.atom_ptr[i]; s < a.atom_ptr[i + 1]; ++s) {
    const i64 slot = a.atom_slots[s];
    for (int c = 0; c < 3; ++c) g[c] += a.grad_slots[3 * slot + c];
  }
  for (int c = 0; c < 3; ++c) a.grad[3 * i + c] += g[c];
}

// thread (i, p)
TM_HD void gather_zeta_body(i64 i, i64 p, const GatherArgs& a) {
  if (i >= a.n_atoms || p >= a.n_params) return;
  double z[3] = {0.0, 0.0, 0.0};
  const double* base = a.zeta_slots + 3 * p * a.n_slots;
  for (i32 s = a.atom_ptr[i]; s < a.atom_ptr[i + 1]; ++s) {
    const i64 slot = a.atom_slots[s];
    for (int c = 0; c < 3; ++c) z[c] += base[3 * slot + c];
  }
  for (int c = 0; c < 3; ++c) a.zeta[3 * (p * a.n_atoms + i) + c] += z[c];
}

TM_HD void gather_params_body(i64 m, const GatherArgs& a) {
  if (m >= a.n_theta) return;
  double s = 0.0;
  for (i32 e = a.param_ptr[m]; e < a.param_ptr[m + 1]; ++e) s += a.values[a.param_entries[e]];
  a.dedtheta[m] = s;
}

}  // namespace tmk
