// Kernels with planted synchronisation bugs, and a correct twin, for the emulator's own tests
// (tests/test_emulator.py): each bug must surface as a wrong result under some thread order or as a launch error.
// Built only into mtlfast._cuda_emulation, through the same launch translation as the real kernels.
#include "selftest_kernels.h"

#include <cuda_runtime.h>

namespace mtlfast {
namespace emulation {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum of in[0..255] through warp shuffles and shared memory; without the barrier thread 0 may read the per-warp
// partial sums before the other warps have written them.
template <bool kWithBarrier>
__global__ void block_sum_kernel(const float* in, float* out) {
  __shared__ float partial[kWarps];
  const float v = warp_sum(in[threadIdx.x]);
  if (threadIdx.x % 32 == 0) {
    partial[threadIdx.x / 32] = v;
  }
  if (kWithBarrier) {
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      total += partial[w];
    }
    *out = total;
  }
}

// Two block sums through the same shared array, every thread getting both results; without the barrier after the
// reads of the first, a warp that runs ahead overwrites its slot before slower warps have read it. out[t] = the
// first sum seen by thread t.
template <bool kWithTrailingBarrier>
__device__ float block_all_sum(float v, float* partial) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) {
    partial[threadIdx.x / 32] = v;
  }
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) {
    total += partial[w];
  }
  if (kWithTrailingBarrier) {
    __syncthreads();
  }
  return total;
}

template <bool kWithTrailingBarrier>
__global__ void two_sums_kernel(const float* in, float* out) {
  __shared__ float partial[kWarps];
  const float x = in[threadIdx.x];
  const float sum = block_all_sum<kWithTrailingBarrier>(x, partial);
  const float sum_of_squares = block_all_sum<kWithTrailingBarrier>(x * x, partial);
  out[threadIdx.x] = sum_of_squares >= 0.0f ? sum : -1.0f;  // the first sum, after the second reduction ran
}

// Two halves of the block wait at two different barriers (undefined on a GPU).
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Half of a warp returns before the other half shuffles with a full mask (undefined on a GPU).
__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) {
    return;
  }
  out[threadIdx.x] = warp_sum(1.0f);
}

// Thread 0 waits at a barrier while its warp waits for it at a shuffle: nobody can move.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  }
  out[threadIdx.x] = warp_sum(1.0f);
}

}  // namespace

cudaError_t launch_selftest(Selftest which, const float* in, float* out) {
  switch (which) {
    case Selftest::kBlockSum:
      block_sum_kernel<true><<<1, kThreads, 0, nullptr>>>(in, out);
      break;
    case Selftest::kBlockSumWithoutBarrier:
      block_sum_kernel<false><<<1, kThreads, 0, nullptr>>>(in, out);
      break;
    case Selftest::kTwoSums:
      two_sums_kernel<true><<<1, kThreads, 0, nullptr>>>(in, out);
      break;
    case Selftest::kTwoSumsWithoutTrailingBarrier:
      two_sums_kernel<false><<<1, kThreads, 0, nullptr>>>(in, out);
      break;
    case Selftest::kDivergentBarrier:
      divergent_barrier_kernel<<<1, kThreads, 0, nullptr>>>(out);
      break;
    case Selftest::kShuffleAfterExit:
      shuffle_after_exit_kernel<<<1, kThreads, 0, nullptr>>>(out);
      break;
    case Selftest::kDeadlock:
      deadlock_kernel<<<1, kThreads, 0, nullptr>>>(out);
      break;
  }
  return cudaGetLastError();
}

}  // namespace emulation
}  // namespace mtlfast
