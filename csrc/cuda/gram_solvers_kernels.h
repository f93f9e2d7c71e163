// Launchers of the gradient-weighting solvers on CUDA (raw pointers; no torch headers, see gram_solvers.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mtlfast {
namespace cuda {

// weights (T,) = column sums of the PCGrad coefficient rows; scratch holds T*T values.
template <typename scalar_t>
cudaError_t launch_pcgrad_weights(const scalar_t* gram, const int64_t* orders, int64_t tasks, scalar_t* scratch,
                                  scalar_t* weights, cudaStream_t stream);

// alpha (T,) = MGDA min-norm point after `iterations` pairwise Frank-Wolfe steps; scratch holds T values.
template <typename scalar_t>
cudaError_t launch_min_norm_weights(const scalar_t* gram, int64_t tasks, int64_t iterations, scalar_t* alpha,
                                    scalar_t* scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace mtlfast
