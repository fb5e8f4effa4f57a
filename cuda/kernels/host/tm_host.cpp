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
  const char* names[] = {"TermArgs", "NonbondedArgs", "GBArgs", "LangevinArgs", "GatherArgs"};
  const long long sizes[] = {sizeof(tmk::TermArgs), sizeof(tmk::NonbondedArgs), sizeof(tmk::GBArgs),
                           sizeof(tmk::LangevinArgs), sizeof(tmk::GatherArgs)};
  for (int k = 0; k < 5; ++k) {
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
