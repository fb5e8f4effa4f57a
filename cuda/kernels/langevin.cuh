// The Langevin step (paper eqs. 3-4) and forward propagation of dx/dθ, as
// timemachine/integrator/langevin.py and timemachine/sensitivity/propagation.py:
//
//   v_t = a v_{t-1} - b ∘ ∇E(x_{t-1}) + c ∘ n_{t-1},   x_t = x_{t-1} + δt v_t
//   exact:  dv_{t+1} = a dv_t - b ∘ ζ_t,                 dx_{t+1} = dx_t + δt dv_{t+1}
//   window: dv_{t+1} = a dv_t - b ∘ (ζ_t + c_t - c_{t-1}), c_t = fold ζ_{t-k}
//           (ring slot t mod k ← ζ_t; to_fold ← ring[(t+1) mod k]; folded_last ← to_fold)
//
// The step counter t lives in device memory (`step`), read by every kernel of a step and
// advanced by step_advance_body at its end, so a step is the same launches every time.
#pragma once
#include "philox.cuh"
#include "tm_common.cuh"

namespace tmk {

struct LangevinArgs {
  const double* x;       // (N, 3) x_{t}
  const double* v;       // (N, 3) v_{t}
  const double* grad;    // (N, 3) ∇E(x_t)
  const double* b;       // (N,)
  const double* c;       // (N,)
  double* x_out;         // (N, 3) x_{t+1} (may alias x)
  double* v_out;         // (N, 3) v_{t+1} (may alias v)
  const double* zeta;    // (P, N, 3) ζ_t
  double* dx;            // (P, N, 3) updated in place
  double* dv;            // (P, N, 3) updated in place
  double* ring;          // (k, P, N, 3) window ring, or null
  double* to_fold;       // (P, N, 3)
  double* folded_last;   // (P, N, 3)
  i64* step;         // device step counter t
  double a;              // exp(-γ δt)
  double dt;             // ps
  double fold;           // a^{k+1} / (1 - a)
  u64 seed;
  u64 replica;
  i64 n_atoms;
  i64 n_params;
  i64 window;        // k
};

// thread i: one atom's velocity and position update with its own noise
TM_HD void langevin_primal_body(i64 i, const LangevinArgs& a) {
  if (i >= a.n_atoms) return;
  double n[3];
  atom_normals(a.seed, *a.step, a.replica, i, n);
  for (int k = 0; k < 3; ++k) {
    const i64 e = 3 * i + k;
    const double v = a.a * a.v[e] - a.b[i] * a.grad[e] + a.c[i] * n[k];
    a.v_out[e] = v;
    a.x_out[e] = a.x[e] + a.dt * v;
  }
}

// thread e over P·N·3 entries: exact-mode sensitivity update
TM_HD void sens_exact_body(i64 e, const LangevinArgs& a) {
  if (e >= a.n_params * a.n_atoms * 3) return;
  const i64 atom = (e / 3) % a.n_atoms;
  const double dv = a.a * a.dv[e] - a.b[atom] * a.zeta[e];
  a.dv[e] = dv;
  a.dx[e] = a.dx[e] + a.dt * dv;
}

// thread e over P·N·3 entries: window-mode update with the ring buffer of ζ's
TM_HD void sens_window_body(i64 e, const LangevinArgs& a) {
  const i64 size = a.n_params * a.n_atoms * 3;
  if (e >= size) return;
  const i64 atom = (e / 3) % a.n_atoms;
  const i64 t = *a.step;
  const double z = a.zeta[e];
  a.ring[(t % a.window) * size + e] = z;
  const double to_fold = a.to_fold[e];
  const double source = z + a.fold * (to_fold - a.folded_last[e]);
  const double dv = a.a * a.dv[e] - a.b[atom] * source;
  a.dv[e] = dv;
  a.dx[e] = a.dx[e] + a.dt * dv;
  a.folded_last[e] = to_fold;
  a.to_fold[e] = a.ring[((t + 1) % a.window) * size + e];
}

// one thread: t ← t + 1 (the last launch of a step)
TM_HD void step_advance_body(i64 i, const LangevinArgs& a) {
  if (i == 0) *a.step += 1;
}

}  // namespace tmk
