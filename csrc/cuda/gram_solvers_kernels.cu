// One block per problem: T is a handful to a few hundred tasks, so a single launch of one block replaces the
// hundreds of tiny launches the same solver costs as PyTorch ops.
#include "gram_solvers_kernels.h"
#include "mtlfast/gram_solvers.h"

namespace mtlfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void pcgrad_weights_kernel(const scalar_t* gram, const int64_t* orders, int64_t tasks, scalar_t* rows,
                                      scalar_t* weights) {
  for (int64_t i = threadIdx.x; i < tasks; i += blockDim.x) {
    gram::pcgrad_row(gram, orders + i * tasks, tasks, i, rows + i * tasks);
  }
  __syncthreads();
  // Column sums in a fixed order: deterministic.
  for (int64_t t = threadIdx.x; t < tasks; t += blockDim.x) {
    scalar_t sum = scalar_t(0);
    for (int64_t i = 0; i < tasks; ++i) sum += rows[i * tasks + t];
    weights[t] = sum;
  }
}

template <typename scalar_t>
__global__ void min_norm_weights_kernel(const scalar_t* gram, int64_t tasks, int64_t iterations, scalar_t* alpha,
                                        scalar_t* k_alpha) {
  if (threadIdx.x == 0) gram::min_norm_init(gram, tasks, alpha);
  __syncthreads();
  for (int64_t it = 0; it < iterations; ++it) {
    for (int64_t r = threadIdx.x; r < tasks; r += blockDim.x) {
      scalar_t sum = scalar_t(0);
      for (int64_t c = 0; c < tasks; ++c) sum += gram[r * tasks + c] * alpha[c];
      k_alpha[r] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) gram::min_norm_pairwise_step(gram, k_alpha, tasks, alpha);
    __syncthreads();
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_pcgrad_weights(const scalar_t* gram, const int64_t* orders, int64_t tasks, scalar_t* scratch,
                                  scalar_t* weights, cudaStream_t stream) {
  pcgrad_weights_kernel<scalar_t><<<1, kThreads, 0, stream>>>(gram, orders, tasks, scratch, weights);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_min_norm_weights(const scalar_t* gram, int64_t tasks, int64_t iterations, scalar_t* alpha,
                                    scalar_t* scratch, cudaStream_t stream) {
  min_norm_weights_kernel<scalar_t><<<1, kThreads, 0, stream>>>(gram, tasks, iterations, alpha, scratch);
  return cudaGetLastError();
}

template cudaError_t launch_pcgrad_weights<float>(const float*, const int64_t*, int64_t, float*, float*, cudaStream_t);
template cudaError_t launch_pcgrad_weights<double>(const double*, const int64_t*, int64_t, double*, double*,
                                                   cudaStream_t);
template cudaError_t launch_min_norm_weights<float>(const float*, int64_t, int64_t, float*, float*, cudaStream_t);
template cudaError_t launch_min_norm_weights<double>(const double*, int64_t, int64_t, double*, double*,
                                                     cudaStream_t);

}  // namespace cuda
}  // namespace mtlfast
