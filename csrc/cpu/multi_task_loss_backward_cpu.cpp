// CPU kernel of multi_task_loss_backward (the composite one, csrc/multi_task_loss_backward.cpp, serves the other
// devices; same formulas). Its two GEMMs are independent, and at the sizes of small heads one GEMM spread over
// all threads scales poorly (measured on 2 cores, S1: ~25 % faster with 2 threads than with 1). So both are cut
// into pieces, dh by rows and dW by feature columns, and every thread runs whole pieces single-threaded:
// the two GEMMs then run side by side.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "mtlfast/task_table.h"

namespace mtlfast {
namespace {

// Below this many multiply-adds per GEMM, one call on the calling thread is cheaper than waking others.
constexpr int64_t kMinParallelGemmWork = int64_t{1} << 20;

// grad_h = dz @ right (N, D) and grad_weight = dzᵀ @ h (S, D), pieces spread over the threads.
void backward_gemms(const at::Tensor& dz, const at::Tensor& right, const at::Tensor& h, at::Tensor& grad_h,
                    at::Tensor& grad_weight) {
  const int64_t N = dz.size(0);
  const int64_t S = dz.size(1);
  const int64_t D = h.size(1);
  const int64_t work = N * S * D;
  const int64_t pieces = std::min({static_cast<int64_t>(at::get_num_threads()), N, D,
                                   std::max<int64_t>(1, work / kMinParallelGemmWork)});
  if (pieces <= 1) {
    at::cpu::mm_out(grad_h, dz, right);
    at::cpu::mm_out(grad_weight, dz.t(), h);
    return;
  }
  // Items [0, pieces): row ranges of grad_h; [pieces, 2·pieces): column ranges of grad_weight.
  at::parallel_for(0, 2 * pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const bool rows = item < pieces;
      const int64_t piece = rows ? item : item - pieces;
      const int64_t extent = rows ? N : D;
      const int64_t first = extent * piece / pieces;
      const int64_t count = extent * (piece + 1) / pieces - first;
      if (rows) {
        at::Tensor out = grad_h.narrow(0, first, count);
        at::cpu::mm_out(out, dz.narrow(0, first, count), right);
      } else {
        at::Tensor out = grad_weight.narrow(1, first, count);
        at::cpu::mm_out(out, dz.t(), h.narrow(1, first, count));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_task_loss_backward_cpu(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const c10::optional<at::Tensor>& grad_logits_output, const at::Tensor& grad_logits,
    const at::Tensor& h_in, const at::Tensor& weight, const at::Tensor& col_task, bool has_bias) {
  at::NoGradGuard no_grad;  // implementation steps, as in the forward
  const at::Tensor h = h_in.reshape({-1, h_in.size(-1)});
  const at::ScalarType dtype = h.scalar_type();
  const at::ScalarType acc = accumulation_dtype(dtype);
  const at::Tensor coeff =
      task_coefficients(grad_total, grad_losses, task_weights, acc).index_select(0, col_task);  // (S,)
  at::Tensor grad_h = at::empty(h.sizes(), h.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias;
  if (grad_logits_output.has_value() && grad_logits_output->defined()) {
    // The logits were used downstream too: materialise dz once and run the plain linear backward on it.
    const at::Tensor dz = (grad_logits.to(acc) * coeff.unsqueeze(0) + grad_logits_output->to(acc)).to(dtype);
    backward_gemms(dz, weight, h, grad_h, grad_weight);
    grad_bias = has_bias ? dz.sum(0, /*keepdim=*/false, acc).to(dtype) : at::empty({0}, h.options());
  } else {
    const at::Tensor scaled_weight = (weight.to(acc) * coeff.unsqueeze(1)).to(dtype);
    backward_gemms(grad_logits, scaled_weight, h, grad_h, grad_weight);
    grad_weight.mul_(coeff.unsqueeze(1));
    grad_bias = has_bias ? (grad_logits.sum(0, /*keepdim=*/false, acc) * coeff).to(dtype) : at::empty({0}, h.options());
  }
  return {grad_h.view(h_in.sizes()), grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("multi_task_loss_backward", &multi_task_loss_backward_cpu);
}

}  // namespace mtlfast
