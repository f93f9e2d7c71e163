// CPU kernels of the gradient-weighting solvers (csrc/include/mtlfast/gram_solvers.h): serial, T is small.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "mtlfast/gram_solvers.h"
#include "mtlfast/gram_solvers_checks.h"

namespace mtlfast {

at::Tensor pcgrad_weights_cpu(const at::Tensor& gram_in, const at::Tensor& orders_in) {
  check_gram_problem(gram_in, &orders_in, "pcgrad_weights");
  const at::Tensor gram = gram_in.contiguous();
  const at::Tensor orders = orders_in.contiguous();
  const int64_t tasks = gram.size(0);
  at::Tensor weights = at::zeros({tasks}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "pcgrad_weights_cpu", [&] {
    const scalar_t* k = gram.data_ptr<scalar_t>();
    const int64_t* order = orders.data_ptr<int64_t>();
    scalar_t* w = weights.data_ptr<scalar_t>();
    std::vector<scalar_t> row(tasks);
    for (int64_t i = 0; i < tasks; ++i) {
      gram::pcgrad_row(k, order + i * tasks, tasks, i, row.data());
      for (int64_t t = 0; t < tasks; ++t) w[t] += row[t];
    }
  });
  return weights;
}

at::Tensor min_norm_weights_cpu(const at::Tensor& gram_in, int64_t iterations) {
  check_gram_problem(gram_in, nullptr, "min_norm_weights");
  TORCH_CHECK_VALUE(iterations >= 0, "mtlfast: min_norm_weights: iterations must be >= 0, got ", iterations);
  const at::Tensor gram = gram_in.contiguous();
  const int64_t tasks = gram.size(0);
  at::Tensor alpha = at::empty({tasks}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "min_norm_weights_cpu", [&] {
    const scalar_t* k = gram.data_ptr<scalar_t>();
    scalar_t* a = alpha.data_ptr<scalar_t>();
    std::vector<scalar_t> k_alpha(tasks);
    gram::min_norm_init(k, tasks, a);
    for (int64_t it = 0; it < iterations; ++it) {
      for (int64_t r = 0; r < tasks; ++r) {
        scalar_t sum = scalar_t(0);
        for (int64_t c = 0; c < tasks; ++c) sum += k[r * tasks + c] * a[c];
        k_alpha[r] = sum;
      }
      gram::min_norm_pairwise_step(k, k_alpha.data(), tasks, a);
    }
  });
  return alpha;
}

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("pcgrad_weights", &pcgrad_weights_cpu);
  m.impl("min_norm_weights", &min_norm_weights_cpu);
}

}  // namespace mtlfast
