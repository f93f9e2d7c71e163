// The device-generic ops of the fused multi-task loss, compositions of ATen calls registered once as
// CompositeExplicitAutograd: the chunked op's backward (work the size of the head weights plus one (1, T) × (T, N·D)
// GEMM) and per_task_input_grads (T GEMMs). multi_task_loss_backward, which makes a pass over the (N, S) logit
// gradient, has a kernel per device (csrc/cpu/multi_task_loss_backward_cpu.cpp, csrc/cuda/multi_task_loss_cuda.cpp).
//
// The per-task coefficients c_t = dTotal·λ_t + dL_t come from task_coefficients (csrc/task_table.cpp); the forward
// already divided each task's gradients by its denominator.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "mtlfast/op_signatures.h"
#include "mtlfast/task_table.h"

namespace mtlfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_task_loss_chunked_backward(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const at::Tensor& grad_h_per_task, const at::Tensor& grad_weight,
    const at::Tensor& grad_bias, const at::Tensor& col_task, at::ScalarType h_dtype) {
  const int64_t T = grad_h_per_task.size(0);
  const int64_t N = grad_h_per_task.size(1);
  const int64_t D = grad_h_per_task.size(2);
  const at::Tensor c = task_coefficients(grad_total, grad_losses, task_weights, grad_h_per_task.scalar_type());
  const at::Tensor grad_h = c.view({1, T}).mm(grad_h_per_task.reshape({T, N * D})).view({N, D}).to(h_dtype);
  const at::Tensor coeff = c.index_select(0, col_task);
  const at::Tensor dW = (grad_weight * coeff.unsqueeze(1)).to(h_dtype);
  const at::Tensor db = grad_bias.numel() > 0 ? (grad_bias * coeff).to(h_dtype) : at::empty({0}, grad_bias.options().dtype(h_dtype));
  return {grad_h, dW, db};
}

at::Tensor per_task_input_grads(const at::Tensor& grad_logits, const at::Tensor& weight,
                                c10::IntArrayRef col_offsets) {
  // A diagnostic output, never differentiated: mm_out refuses inputs that require grad.
  at::NoGradGuard no_grad;
  const int64_t T = static_cast<int64_t>(col_offsets.size()) - 1;
  at::Tensor out = at::empty({T, grad_logits.size(0), weight.size(1)}, grad_logits.options());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t begin = col_offsets[t];
    const int64_t width = col_offsets[t + 1] - begin;
    at::Tensor slot = out.select(0, t);
    at::mm_out(slot, grad_logits.narrow(1, begin, width), weight.narrow(0, begin, width));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlfast, CompositeExplicitAutograd, m) {
  m.impl("multi_task_loss_chunked_backward", &multi_task_loss_chunked_backward);
  m.impl("per_task_input_grads", &per_task_input_grads);
}

}  // namespace mtlfast
