// CUDA kernels of timemachine: float64 energy, gradient, ∂E/∂θ and ζ for every potential
// of the JAX reference, the Langevin update with counter-based noise, and the
// deterministic gathers. Loaded by timemachine/backends/cupy_backend.py (CuPy RawModule,
// NVRTC) and compiled by nvcc in the test suite for sm_80 and sm_90.
//
// Each kernel takes one pointer to its argument struct in device memory (built once per
// run by the backend), so launches carry no per-step arguments and a step can be
// captured in a CUDA graph.
#include "kernels.cuh"

#define TM_DEVICE_1D(name, Args, body)                                          \
  extern "C" __global__ void name(const tmk::Args* __restrict__ args) {          \
    const tmk::Args a = *args;                                                   \
    tmk::body((long long)blockIdx.x * blockDim.x + threadIdx.x, a);                \
  }
#define TM_DEVICE_2D(name, Args, body)                                          \
  extern "C" __global__ void name(const tmk::Args* __restrict__ args) {          \
    const tmk::Args a = *args;                                                   \
    tmk::body((long long)blockIdx.x * blockDim.x + threadIdx.x, (long long)blockIdx.y, a); \
  }

TM_KERNELS_1D(TM_DEVICE_1D)
TM_KERNELS_2D(TM_DEVICE_2D)
