// CPU kernel of multi_task_loss_recompute_backward (schema: csrc/registration.cpp). The block loop and its GEMMs are
// shared with CUDA (csrc/recompute_backward.cpp); this file supplies the CPU step that turns a block of recomputed
// logits into their gradient, from the row statistics the forward saved and loss_math.h's per-element formulas.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "mtlfast/loss_math.h"
#include "mtlfast/recompute_backward.h"
#include "mtlfast/task_table.h"

namespace mtlfast {
namespace {

// One task's columns [first_class, first_class + n) of one row, z pointing at the first of them; scale = c_t /
// denominator_t; stats = the row's saved statistics.
template <typename scalar_t, typename acc_t>
void cross_entropy_gradient(scalar_t* z, int64_t n, int64_t first_class, int64_t target, const acc_t* stats,
                            const acc_t* class_weights, acc_t scale) {
  const SavedCrossEntropyRow<acc_t> saved = saved_cross_entropy_row(stats);
  for (int64_t c = 0; c < n; ++c) {
    const int64_t k = first_class + c;
    const acc_t w = class_weights != nullptr ? class_weights[k] : acc_t(1);
    z[c] = static_cast<scalar_t>(scale * saved_cross_entropy_grad(saved, static_cast<acc_t>(z[c]), k == target, w));
  }
}

template <typename scalar_t, typename acc_t>
void distillation_gradient(scalar_t* z, int64_t n, const acc_t* y, const acc_t* stats, acc_t temperature,
                           bool from_logits, acc_t scale) {
  const SavedDistillationRow<acc_t> saved = saved_distillation_row(temperature, stats);
  for (int64_t c = 0; c < n; ++c) {
    z[c] = static_cast<scalar_t>(scale * saved_distillation_grad(saved, from_logits, static_cast<acc_t>(z[c]), y[c]));
  }
}

template <typename scalar_t, typename acc_t>
void dense_gradient(scalar_t* z, int64_t n, int64_t kind, const acc_t* y, const acc_t* pos_weight, acc_t param,
                    acc_t scale) {
  for (int64_t c = 0; c < n; ++c) {
    const acc_t p = kind == kBCE ? (pos_weight != nullptr ? pos_weight[c] : acc_t(1)) : param;
    z[c] = std::isnan(y[c])
               ? scalar_t(0)
               : static_cast<scalar_t>(scale * elementwise_loss<acc_t>(kind, static_cast<acc_t>(z[c]), y[c], p).grad);
  }
}

// The gradient of block (N, cols) = logits of head columns [col_begin, col_begin + cols), rows in parallel.
template <typename scalar_t>
void gradient_from_stats(at::Tensor& block, int64_t col_begin, const TaskTable& table,
                         const std::vector<const void*>& targets, const c10::optional<at::Tensor>& col_weight,
                         const at::Tensor& row_stats, const at::Tensor& scales) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = block.size(0);
  const int64_t ld = block.stride(0);
  const int64_t col_end = col_begin + block.size(1);
  scalar_t* data = block.data_ptr<scalar_t>();
  const acc_t* stats = row_stats.const_data_ptr<acc_t>();
  const acc_t* scale = scales.const_data_ptr<acc_t>();
  const acc_t* weights = col_weight.has_value() ? col_weight->const_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t t = 0; t < table.num_tasks(); ++t) {
      const int64_t begin = std::max(table.col_offsets[t], col_begin);
      const int64_t end = std::min(table.col_offsets[t + 1], col_end);
      if (begin >= end) {
        continue;
      }
      const int64_t kind = table.kinds[t];
      const int64_t width = table.width(t);
      const int64_t first_class = begin - table.col_offsets[t];
      const int64_t n = end - begin;
      const acc_t param = static_cast<acc_t>(table.params[t]);
      const acc_t* task_weights = weights != nullptr ? weights + table.col_offsets[t] : nullptr;
      for (int64_t i = row_begin; i < row_end; ++i) {
        scalar_t* z = data + i * ld + (begin - col_begin);
        const acc_t* row_stats_i = stats + (t * N + i) * kSavedRowStats;
        if (kind == kNone) {
          std::fill(z, z + n, scalar_t(0));
        } else if (kind == kCrossEntropy) {
          cross_entropy_gradient(z, n, first_class, static_cast<const int64_t*>(targets[t])[i], row_stats_i,
                                 task_weights, scale[t]);
        } else if (is_distillation(kind)) {
          const acc_t* y = static_cast<const acc_t*>(targets[t]) + i * width + first_class;
          distillation_gradient(z, n, y, row_stats_i, param, distillation_targets_are_logits(kind), scale[t]);
        } else {
          const acc_t* y = static_cast<const acc_t*>(targets[t]) + i * width + first_class;
          dense_gradient(z, n, kind, y, task_weights != nullptr ? task_weights + first_class : nullptr, param,
                         scale[t]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_task_loss_recompute_backward_cpu(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const at::Tensor& h_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::TensorList targets_in, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, const at::Tensor& row_stats, const at::Tensor& inverse_denominators,
    c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims, c10::IntArrayRef ignore_index,
    c10::ArrayRef<double> params, const std::vector<std::string>& task_names, int64_t block_columns) {
  at::NoGradGuard no_grad;
  const RecomputeBackwardInputs in = prepare_recompute_backward(
      grad_total, grad_losses, task_weights, h_in, weight, bias, targets_in, col_weight, col_task, row_stats,
      inverse_denominators, kinds, col_offsets, class_dims, ignore_index, params, task_names,
      TargetConversion::kOnHost);
  const c10::optional<at::Tensor> weights =
      col_weight.has_value() ? c10::optional<at::Tensor>(col_weight->contiguous()) : c10::nullopt;
  const auto block_gradient = [&](at::Tensor& block, int64_t col_begin) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, block.scalar_type(),
                                    "mtlfast::multi_task_loss_recompute_backward (CPU)", [&] {
      gradient_from_stats<scalar_t>(block, col_begin, in.prepared.table, in.prepared.kernel_targets, weights,
                                    in.row_stats, in.scales);
    });
  };
  auto [grad_h, grad_weight, grad_bias] = recompute_backward(in.prepared.h, weight, bias, block_columns,
                                                             block_gradient);
  return {grad_h.view(h_in.sizes()), grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("multi_task_loss_recompute_backward", &multi_task_loss_recompute_backward_cpu);
}

}  // namespace mtlfast
