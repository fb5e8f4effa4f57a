// The list of kernels: (name, argument struct, body). Each kernel is one thin wrapper
// around a body function that compiles for host and device; tm_kernels.cu makes them
// __global__ functions (thread index → body), host/tm_host.cpp makes them host loops
// over the same index space, in the same order of launches, for the CPU test suite.
#pragma once
#include "bonded.cuh"
#include "cutoff.cuh"
#include "gather.cuh"
#include "gbsa.cuh"
#include "langevin.cuh"
#include "nonbonded.cuh"
#include "philox.cuh"
#include "tm_common.cuh"

// kernels over one index (threads x)
#define TM_KERNELS_1D(X)                                 \
  X(tm_terms_primal, TermArgs, terms_primal_body)        \
  X(tm_terms_zeta, TermArgs, terms_zeta_body)            \
  X(tm_nonbonded_primal, NonbondedArgs, nonbonded_primal_body) \
  X(tm_cutoff_primal, CutoffArgs, cutoff_primal_body)    \
  X(tm_cutoff_list, ListArgs, cutoff_list_body)          \
  X(tm_gb_psi, GBArgs, gb_psi_body)                      \
  X(tm_gb_beta, GBArgs, gb_beta_body)                    \
  X(tm_gb_grad, GBArgs, gb_grad_body)                    \
  X(tm_gather_grad, GatherArgs, gather_grad_body)        \
  X(tm_gather_params, GatherArgs, gather_params_body)    \
  X(tm_langevin_primal, LangevinArgs, langevin_primal_body) \
  X(tm_sens_exact, LangevinArgs, sens_exact_body)        \
  X(tm_sens_window, LangevinArgs, sens_window_body)      \
  X(tm_step_advance, LangevinArgs, step_advance_body)

// kernels over (x, y): atom × tangent chunk, or atom × tangent
// (the _xonly pair passes: no pair parameter among the tangents, no mixed partials)
#define TM_KERNELS_2D(X)                                               \
  X(tm_nonbonded_zeta, NonbondedArgs, nonbonded_zeta_body)             \
  X(tm_nonbonded_zeta_xonly, NonbondedArgs, nonbonded_zeta_body_xonly) \
  X(tm_cutoff_zeta, CutoffArgs, cutoff_zeta_body)                     \
  X(tm_cutoff_zeta_xonly, CutoffArgs, cutoff_zeta_body_xonly)         \
  X(tm_gb_dpsi, GBArgs, gb_dpsi_body)                                  \
  X(tm_gb_dpsi_xonly, GBArgs, gb_dpsi_body_xonly)                      \
  X(tm_gb_dbeta, GBArgs, gb_dbeta_body)                                \
  X(tm_gb_dbeta_xonly, GBArgs, gb_dbeta_body_xonly)                    \
  X(tm_gb_zeta, GBArgs, gb_zeta_body)                                  \
  X(tm_gb_zeta_xonly, GBArgs, gb_zeta_body_xonly)                      \
  X(tm_gather_zeta, GatherArgs, gather_zeta_body)
