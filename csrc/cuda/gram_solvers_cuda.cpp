// CUDA glue of the gradient-weighting solvers: checks, device guard, current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dispatch_key.h"
#include "gram_solvers_kernels.h"
#include "mtlfast/gram_solvers_checks.h"

namespace mtlfast {

at::Tensor pcgrad_weights_cuda(const at::Tensor& gram_in, const at::Tensor& orders_in) {
  check_gram_problem(gram_in, &orders_in, "pcgrad_weights");
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.contiguous();
  const at::Tensor orders = orders_in.contiguous();
  const int64_t tasks = gram.size(0);
  at::Tensor weights = at::empty({tasks}, gram.options());
  at::Tensor scratch = at::empty({tasks, tasks}, gram.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gram.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "pcgrad_weights_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_pcgrad_weights<scalar_t>(gram.data_ptr<scalar_t>(), orders.data_ptr<int64_t>(),
                                                         tasks, scratch.data_ptr<scalar_t>(),
                                                         weights.data_ptr<scalar_t>(), stream));
  });
  return weights;
}

at::Tensor min_norm_weights_cuda(const at::Tensor& gram_in, int64_t iterations) {
  check_gram_problem(gram_in, nullptr, "min_norm_weights");
  TORCH_CHECK_VALUE(iterations >= 0, "mtlfast: min_norm_weights: iterations must be >= 0, got ", iterations);
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.contiguous();
  const int64_t tasks = gram.size(0);
  at::Tensor alpha = at::empty({tasks}, gram.options());
  at::Tensor scratch = at::empty({tasks}, gram.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gram.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "min_norm_weights_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_min_norm_weights<scalar_t>(gram.data_ptr<scalar_t>(), tasks, iterations,
                                                           alpha.data_ptr<scalar_t>(), scratch.data_ptr<scalar_t>(),
                                                           stream));
  });
  return alpha;
}

TORCH_LIBRARY_IMPL(mtlfast, MTLFAST_CUDA_DISPATCH_KEY, m) {
  m.impl("pcgrad_weights", &pcgrad_weights_cuda);
  m.impl("min_norm_weights", &min_norm_weights_cuda);
}

}  // namespace mtlfast
