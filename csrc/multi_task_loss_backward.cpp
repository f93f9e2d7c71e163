// Backward ops of the fused multi-task loss. They are compositions of ATen calls (GEMMs through MKL / cuBLAS
// plus work the size of the head weights), so one CompositeExplicitAutograd implementation serves every device
// without a kernel of its own (the CPU has one: csrc/cpu/multi_task_loss_backward_cpu.cpp).
//
// The per-task coefficients c_t = dTotal·λ_t + dL_t come from task_coefficients (csrc/task_table.cpp); the forward
// already divided each task's logit gradient by its denominator, so dz = grad_logits · c[col_task]. Scaling the
// (S, D) weights instead of the (N, S) gradient keeps the backward at two GEMMs with no pass over the logits:
//   dh = grad_logits @ (c[col_task] ⊙ W),   dW = c[col_task] ⊙ (grad_logitsᵀ @ h),   db = c[col_task] ⊙ Σ_rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "mtlfast/op_signatures.h"
#include "mtlfast/task_table.h"

namespace mtlfast {
namespace {

at::Tensor column_sums(const at::Tensor& matrix) {
  // fp32 accumulation for half inputs; the result comes back in the input dtype.
  const auto acc = matrix.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return matrix.sum(0, /*keepdim=*/false, acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_task_loss_backward(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const c10::optional<at::Tensor>& grad_logits_output, const at::Tensor& grad_logits,
    const at::Tensor& h_in, const at::Tensor& weight, const at::Tensor& col_task, bool has_bias) {
  const at::Tensor h = h_in.reshape({-1, h_in.size(-1)});
  const at::Tensor c = task_coefficients(grad_total, grad_losses, task_weights, accumulation_dtype(h.scalar_type()));
  const at::Tensor coeff = c.index_select(0, col_task);
  at::Tensor grad_h, grad_weight, grad_bias;
  if (grad_logits_output.has_value() && grad_logits_output->defined()) {
    // The logits were used downstream too: materialise dz once and run the plain linear backward on it.
    const at::Tensor dz = (grad_logits.to(coeff.scalar_type()) * coeff.unsqueeze(0) +
                           grad_logits_output->to(coeff.scalar_type()))
                              .to(h.scalar_type());
    grad_h = dz.mm(weight);
    grad_weight = dz.t().mm(h);
    if (has_bias) {
      grad_bias = column_sums(dz).to(h.scalar_type());
    }
  } else {
    grad_h = grad_logits.mm((weight.to(coeff.scalar_type()) * coeff.unsqueeze(1)).to(h.scalar_type()));
    grad_weight = (grad_logits.t().mm(h).to(coeff.scalar_type()) * coeff.unsqueeze(1)).to(h.scalar_type());
    if (has_bias) {
      grad_bias = (column_sums(grad_logits) * coeff).to(h.scalar_type());
    }
  }
  if (!has_bias) {
    grad_bias = at::empty({0}, h.options());
  }
  return {grad_h.view(h_in.sizes()), grad_weight, grad_bias};
}

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

static_assert(std::is_same_v<decltype(multi_task_loss_backward), MultiTaskLossBackwardKernel>);

}  // namespace

TORCH_LIBRARY_IMPL(mtlfast, CompositeExplicitAutograd, m) {
  m.impl("multi_task_loss_backward", &multi_task_loss_backward);
  m.impl("multi_task_loss_chunked_backward", &multi_task_loss_chunked_backward);
  m.impl("per_task_input_grads", &per_task_input_grads);
}

}  // namespace mtlfast
