// Host build of the kernel bodies (the test suite compiles this with a C++17 compiler and
// calls it through ctypes). Every kernel becomes a loop over its index space that calls
// the same body as the device kernel, so the CPU runs the GPU program serially.
#include <cstddef>
#include <cstdint>

#include "../kernels.cuh"

// The order in which a launch's threads run: 0 index order, 1 reversed, 2 a stride
// permutation (index k runs k-th · s mod n, s a prime that does not divide n). On a GPU
// the threads of a launch run in no fixed order, so a kernel whose results depend on the
// order (one thread reading or writing what another thread of the launch writes) races
// there; the test suite runs the same steps in every order and asks for the same bits.
static int launch_order = 0;
extern "C" void tm_set_launch_order(int mode) { launch_order = mode; }

struct LaunchOrder {
  long long n, stride;
  explicit LaunchOrder(long long n_) : n(n_), stride(1) {
    if (launch_order == 2) stride = (n % 7919 != 0) ? 7919 : 104729;
  }
  long long operator()(long long k) const {
    if (launch_order == 1) return n - 1 - k;
    if (launch_order == 2) return (k * stride) % n;
    return k;
  }
};

#define TM_HOST_1D(name, Args, body)                                        \
  extern "C" void name(long long nx, long long ny, const tmk::Args* a) {         \
    (void)ny;                                                               \
    const LaunchOrder ox(nx);                                               \
    for (long long x = 0; x < nx; ++x) tmk::body(ox(x), *a);                   \
  }
#define TM_HOST_2D(name, Args, body)                                        \
  extern "C" void name(long long nx, long long ny, const tmk::Args* a) {         \
    const LaunchOrder ox(nx), oy(ny);                                       \
    for (long long y = 0; y < ny; ++y)                                        \
      for (long long x = 0; x < nx; ++x) tmk::body(ox(x), oy(y), *a);          \
  }

TM_KERNELS_1D(TM_HOST_1D)
TM_KERNELS_2D(TM_HOST_2D)

// layout checks for the Python-side struct descriptions, and the constants they share
extern "C" long long tm_pchunk() { return tmk::PCHUNK; }
extern "C" long long tm_sizeof(const char* name) {
  const char* names[] = {"TermArgs", "NonbondedArgs", "GBArgs", "LangevinArgs", "GatherArgs",
                         "CutoffArgs", "ListArgs"};
  const long long sizes[] = {sizeof(tmk::TermArgs), sizeof(tmk::NonbondedArgs), sizeof(tmk::GBArgs),
                           sizeof(tmk::LangevinArgs), sizeof(tmk::GatherArgs),
                           sizeof(tmk::CutoffArgs), sizeof(tmk::ListArgs)};
  for (int k = 0; k < 7; ++k) {
    const char* p = names[k];
    const char* q = name;
    while (*p && *p == *q) ++p, ++q;
    if (*p == 0 && *q == 0) return sizes[k];
  }
  return -1;
}

// noise: Philox known-answer tests and the per-atom normals
extern "C" void tm_philox4x32_10(const unsigned int* ctr, const unsigned int* key, unsigned int* out) {
  tmk::U32x4 c;
  for (int k = 0; k < 4; ++k) c.v[k] = ctr[k];
  const tmk::U32x4 r = tmk::philox4x32_10(c, key[0], key[1]);
  for (int k = 0; k < 4; ++k) out[k] = r.v[k];
}
extern "C" void tm_normals(unsigned long long seed, long long step, unsigned long long replica, long long n_atoms,
                           double* out) {
  for (long long i = 0; i < n_atoms; ++i) tmk::atom_normals(seed, step, replica, i, out + 3 * i);
}

// the cutoff term's per-pair maths (cutoff.cuh) on arrays of pairs, for the tests against
// cutoffs._pair_scalars and jax derivatives. form: (cutoff, switch_distance, k_rf, c_rf,
// alpha, use_switch, pme). pairs (n, 7): r, q_i, q_j, σ_i, σ_j, ε_i, ε_j. out (n, 23):
// the radial functions (lj, c, lj_s, b_lj, db_lj, b_c, db_c, db_lj_s), then u, B, A,
// ∂u/∂(q_i, q_j, σ_i, σ_j, ε_i, ε_j) and ∂B/∂(the same).
extern "C" void tm_cutoff_pairs(long long n, const double* form, const double* pairs, double* out) {
  tmk::CutoffForm f;
  f.cutoff = form[0];
  f.switch_distance = form[1];
  f.k_rf = form[2];
  f.c_rf = form[3];
  f.alpha = form[4];
  f.use_switch = form[5] != 0.0;
  f.pme = form[6] != 0.0;
  for (long long k = 0; k < n; ++k) {
    const double* p = pairs + 7 * k;
    double* o = out + 23 * k;
    const tmk::CutoffRadial s = tmk::cutoff_radial(p[0], 0.5 * (p[3] + p[4]), f);
    const double v[8] = {s.lj, s.c, s.lj_s, s.b_lj, s.db_lj, s.b_c, s.db_c, s.db_lj_s};
    for (int c = 0; c < 8; ++c) o[c] = v[c];
    const double rei = tmk::tm_safe_sqrt(p[5]), rej = tmk::tm_safe_sqrt(p[6]);
    const tmk::CutoffPair q = tmk::cutoff_pair(p[0], p[1], p[2], p[3], p[4], rei, rej,
                                               tmk::safe_sqrt_derivative(p[5], rei),
                                               tmk::safe_sqrt_derivative(p[6], rej), f);
    o[8] = q.u;
    o[9] = q.b;
    o[10] = q.a;
    for (int c = 0; c < 6; ++c) {
      o[11 + c] = q.du[c];
      o[17 + c] = q.db[c];
    }
  }
}

// the minimum image of displacements d (n, 3) in box (3,), for the test against jnp.round
extern "C" void tm_minimum_image(long long n, const double* box, const double* d, double* out) {
  for (long long k = 0; k < 3 * n; ++k) out[k] = tmk::minimum_image(d[k], box[k % 3]);
}
