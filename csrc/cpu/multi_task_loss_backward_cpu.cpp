// CPU kernel of multi_task_loss_backward (the CUDA one, in csrc/cuda/multi_task_loss_cuda.cpp, has the same
// formulas). One pass over the (N, S) logit gradient, in blocks of rows, applies the per-task coefficients,
//   dz = grad_logits · c[col_task] (+ the gradient of the logits output),
// and sums its columns (the bias gradient) on the way; then dh = dz W and dW = dzᵀ h are two plain GEMMs. With
// small heads this replaces half a dozen ATen calls on (S, D) and (N, S) tensors (~100 us per S1 step) by one
// pass that costs about what the loss pass does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mtlfast/op_signatures.h"
#include "mtlfast/task_table.h"

namespace mtlfast {
namespace {

// Rows per unit of parallel work. Each block of rows sums its columns separately and the block sums are added in
// block order, so the bias gradient does not depend on the thread count.
constexpr int64_t kRowBlock = 64;

// One block: dz = g · coeff[column] (+ e), and the block's column sums. Whole rows, so the inner loop runs over
// contiguous columns (vectorised).
template <typename scalar_t>
void scale_rows(const scalar_t* __restrict__ g, const scalar_t* __restrict__ e, const scalar_t* __restrict__ coeff,
                scalar_t* __restrict__ dz, scalar_t* __restrict__ sums, int64_t rows, int64_t S) {
  std::fill(sums, sums + S, scalar_t(0));
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* g_row = g + i * S;
    scalar_t* dz_row = dz + i * S;
    if (e == nullptr) {
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        dz_row[s] = g_row[s] * coeff[s];
        sums[s] += dz_row[s];
      }
    } else {
      const scalar_t* e_row = e + i * S;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        dz_row[s] = g_row[s] * coeff[s] + e_row[s];
        sums[s] += dz_row[s];
      }
    }
  }
}

// dz = grad_logits · coeff[column] (+ extra), column sums into column_sums. All (rows, S) row-major.
template <typename scalar_t>
void scale_columns(const scalar_t* grad_logits, const scalar_t* extra, const scalar_t* coeff, scalar_t* dz,
                   scalar_t* column_sums, int64_t rows, int64_t S) {
  const int64_t num_blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<scalar_t> block_sums(num_blocks * S);
  at::parallel_for(0, num_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const int64_t row = block * kRowBlock;
      scale_rows(grad_logits + row * S, extra == nullptr ? nullptr : extra + row * S, coeff, dz + row * S,
                 block_sums.data() + block * S, std::min(kRowBlock, rows - row), S);
    }
  });
  std::fill(column_sums, column_sums + S, scalar_t(0));
  for (int64_t block = 0; block < num_blocks; ++block) {
    const scalar_t* sums = block_sums.data() + block * S;
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      column_sums[s] += sums[s];
    }
  }
}

// Per column s, its task's coefficient c[col_task[s]] (c from task_coefficients, (T,) on the host).
template <typename acc_t>
std::vector<acc_t> column_coefficients(const at::Tensor& c, const at::Tensor& col_task) {
  const int64_t T = c.size(0);
  const acc_t* per_task = c.const_data_ptr<acc_t>();
  const at::Tensor tasks = col_task.contiguous();
  const int64_t* task_of = tasks.const_data_ptr<int64_t>();
  std::vector<acc_t> coeff(tasks.numel());
  for (int64_t s = 0; s < tasks.numel(); ++s) {
    TORCH_CHECK_INDEX(task_of[s] >= 0 && task_of[s] < T, "mtlfast: col_task[", s, "] = ", task_of[s],
                      " is not a task index in [0, ", T, ")");
    coeff[s] = per_task[task_of[s]];
  }
  return coeff;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_task_loss_backward_cpu(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const c10::optional<at::Tensor>& grad_logits_output, const at::Tensor& grad_logits,
    const at::Tensor& h_in, const at::Tensor& weight, const at::Tensor& col_task, bool has_bias) {
  at::NoGradGuard no_grad;  // implementation steps, as in the forward
  const at::Tensor h = h_in.reshape({-1, h_in.size(-1)});
  const at::ScalarType dtype = h.scalar_type();
  const at::ScalarType acc = accumulation_dtype(dtype);
  const int64_t N = grad_logits.size(0);
  const int64_t S = grad_logits.size(1);
  TORCH_CHECK_VALUE(col_task.numel() == S, "mtlfast: col_task must have S = ", S, " entries, got ", col_task.numel());
  const bool with_output_grad = grad_logits_output.has_value() && grad_logits_output->defined();
  const at::Tensor c = task_coefficients(grad_total, grad_losses, task_weights, acc);  // (T,)
  at::Tensor dz, bias_sums;
  if (dtype == acc) {  // fp32 / fp64: one raw pass
    dz = at::empty({N, S}, grad_logits.options());
    bias_sums = at::empty({S}, grad_logits.options());
    const at::Tensor g = grad_logits.contiguous();
    const at::Tensor extra = with_output_grad ? grad_logits_output->to(dtype).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(dtype, "mtlfast::multi_task_loss_backward (CPU)", [&] {
      const std::vector<scalar_t> coeff = column_coefficients<scalar_t>(c, col_task);
      scale_columns<scalar_t>(g.const_data_ptr<scalar_t>(), extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr,
                              coeff.data(), dz.mutable_data_ptr<scalar_t>(), bias_sums.mutable_data_ptr<scalar_t>(),
                              N, S);
    });
  } else {  // bf16 / fp16: scaled in fp32, rounded once
    const at::Tensor coeff = c.index_select(0, col_task);  // (S,)
    at::Tensor dz_acc = grad_logits.to(acc) * coeff.unsqueeze(0);
    if (with_output_grad) {
      dz_acc.add_(grad_logits_output->to(acc));
    }
    dz = dz_acc.to(dtype);
    bias_sums = dz_acc.sum(0);
  }
  at::Tensor grad_h = at::empty(h.sizes(), h.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::cpu::mm_out(grad_h, dz, weight);
  at::cpu::mm_out(grad_weight, dz.t(), h);
  const at::Tensor grad_bias = has_bias ? bias_sums.to(dtype) : at::empty({0}, h.options());
  return {grad_h.view(h_in.sizes()), grad_weight, grad_bias};
}

static_assert(std::is_same_v<decltype(multi_task_loss_backward_cpu), MultiTaskLossBackwardKernel>);

}  // namespace

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("multi_task_loss_backward", &multi_task_loss_backward_cpu);
}

}  // namespace mtlfast
