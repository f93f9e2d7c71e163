// multi_task_loss_recompute's backward, the part every device shares (csrc/include/mtlfast/recompute_backward.h).
//
// Memory: the loop holds one (N, block_columns) block of logits and the (N, D) input-gradient accumulator besides the
// outputs. The weight gradient of a block is one GEMM written straight into its rows (disjoint across blocks: no
// accumulator, one rounding, as in PyTorch's own linear backward); only dh, a sum over all blocks, is accumulated.
#include "mtlfast/recompute_backward.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/version.h>

#include <algorithm>

#include "mtlfast/loss_math.h"
#include "mtlfast/task_table.h"

namespace mtlfast {
namespace {

// The forward's saved state fits the inputs: row_stats (T, N, 4) and inverse_denominators (T,), in the accumulation
// dtype, on h's device.
void check_saved_state(const TaskTable& table, const at::Tensor& row_stats, const at::Tensor& inverse_denominators,
                       const at::Tensor& h, at::ScalarType acc_dtype) {
  const int64_t T = table.num_tasks();
  TORCH_CHECK_VALUE(row_stats.dim() == 3 && row_stats.size(0) == T && row_stats.size(1) == table.rows &&
                        row_stats.size(2) == kSavedRowStats,
                    "mtlfast: row_stats must be (T, N, 4) = (", T, ", ", table.rows, ", 4), got ", row_stats.sizes());
  TORCH_CHECK_VALUE(inverse_denominators.dim() == 1 && inverse_denominators.size(0) == T,
                    "mtlfast: inverse_denominators must be (T,) = (", T, ",), got ", inverse_denominators.sizes());
  for (const at::Tensor* saved : {&row_stats, &inverse_denominators}) {
    TORCH_CHECK_TYPE(saved->scalar_type() == acc_dtype, "mtlfast: the saved row statistics must be ", acc_dtype,
                     ", got ", saved->scalar_type());
    TORCH_CHECK_VALUE(saved->device() == h.device(), "mtlfast: the saved row statistics are on ", saved->device(),
                      " but h is on ", h.device());
  }
}

}  // namespace

RecomputeBackwardInputs prepare_recompute_backward(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const at::Tensor& h, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::TensorList targets, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, const at::Tensor& row_stats, const at::Tensor& inverse_denominators,
    c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims, c10::IntArrayRef ignore_index,
    c10::ArrayRef<double> params, const std::vector<std::string>& task_names, TargetConversion conversion) {
  PreparedInputs prepared = prepare_multi_task_inputs(h, weight, bias, targets, task_weights, col_weight, col_task,
                                                      kinds, col_offsets, class_dims, ignore_index, params,
                                                      task_names, conversion);
  const at::ScalarType acc_dtype = accumulation_dtype(prepared.h.scalar_type());
  check_saved_state(prepared.table, row_stats, inverse_denominators, prepared.h, acc_dtype);
  at::Tensor scales =
      (task_coefficients(grad_total, grad_losses, task_weights, acc_dtype) * inverse_denominators).contiguous();
  return {std::move(prepared), std::move(scales), row_stats.contiguous()};
}

void gemm_to_accumulator(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) {
      at::addmm_out(out, out, a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  if (out.is_cuda()) {
    if (accumulate) {
      at::addmm_out(out, out, a, b, out.scalar_type());
    } else {
      at::mm_out(out, a, b, out.scalar_type());
    }
    return;
  }
#endif
  // No out_dtype GEMM here (CPU tensors, which includes the CUDA emulation build, or an older torch): multiply in
  // the accumulation type, a block of output rows at a time, so the converted copies stay small.
  const at::Tensor b_acc = b.to(out.scalar_type());
  constexpr int64_t kRowsPerBlock = 1024;
  for (int64_t begin = 0; begin < out.size(0); begin += kRowsPerBlock) {
    const int64_t rows = std::min(kRowsPerBlock, out.size(0) - begin);
    at::Tensor out_rows = out.narrow(0, begin, rows);
    const at::Tensor a_rows = a.narrow(0, begin, rows).to(out.scalar_type());
    if (accumulate) {
      out_rows.addmm_(a_rows, b_acc);
    } else {
      at::mm_out(out_rows, a_rows, b_acc);
    }
  }
}

void head_logits_into(at::Tensor& z, const at::Tensor& h, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(z, *bias, h, weight.t());
  } else {
    at::mm_out(z, h, weight.t());
  }
}

void column_sums_into(at::Tensor& out, const at::Tensor& z, const at::Tensor& ones) {
  if (ones.defined()) {
    // On CUDA a matrix-vector product with ones: ATen's column reduction of an (N, columns) block stages partial
    // sums in a buffer as large as 32 MiB for S5's 4096 x 1024 blocks (H100, torch 2.11: the allocation alive at
    // the large head's memory peak, one per block), while cuBLAS works in its persistent workspace. Both accumulate
    // half inputs in fp32 and round once.
    at::mv_out(out, z.t(), ones);
  } else {
    at::sum_out(out, z, /*dim=*/0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recompute_backward(const at::Tensor& h, const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  int64_t block_columns,
                                                                  const BlockGradient& block_gradient) {
  TORCH_CHECK_VALUE(block_columns > 0, "mtlfast: block_columns must be positive, got ", block_columns);
  at::NoGradGuard no_grad;  // implementation steps of a backward op (out= GEMMs refuse inputs that require grad)
  const int64_t N = h.size(0);
  const int64_t D = h.size(1);
  const int64_t S = weight.size(0);
  const at::ScalarType acc_dtype = accumulation_dtype(h.scalar_type());
  const int64_t columns = std::min(block_columns, S);
  // Rows of the block padded to 16 bytes, so the three GEMMs that touch it keep cuBLAS's fast paths.
  const int64_t row_align = 16 / h.element_size();
  const int64_t ld = (columns + row_align - 1) / row_align * row_align;

  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor grad_bias = bias.has_value() ? at::empty({S}, h.options()) : at::empty({0}, h.options());
  at::Tensor grad_h_acc = at::empty({N, D}, h.options().dtype(acc_dtype));
  const at::Tensor ones = bias.has_value() && h.is_cuda() ? at::ones({N}, h.options()) : at::Tensor();
  {
    at::Tensor buffer = at::empty({N, ld}, h.options());
    for (int64_t begin = 0; begin < S; begin += columns) {
      const int64_t width = std::min(columns, S - begin);
      at::Tensor z = buffer.narrow(1, 0, width);
      const at::Tensor w = weight.narrow(0, begin, width);
      head_logits_into(z, h, w, bias.has_value() ? c10::optional<at::Tensor>(bias->narrow(0, begin, width))
                                                  : c10::nullopt);
      block_gradient(z, begin);  // z now holds dz
      at::Tensor grad_weight_rows = grad_weight.narrow(0, begin, width);
      at::mm_out(grad_weight_rows, z.t(), h);
      if (bias.has_value()) {
        at::Tensor grad_bias_rows = grad_bias.narrow(0, begin, width);
        column_sums_into(grad_bias_rows, z, ones);
      }
      gemm_to_accumulator(grad_h_acc, z, w, /*accumulate=*/begin > 0);
    }
  }  // the block buffer is released before grad_h is converted
  at::Tensor grad_h = acc_dtype == h.scalar_type() ? grad_h_acc : grad_h_acc.to(h.scalar_type());
  return {grad_h, grad_weight, grad_bias};
}

}  // namespace mtlfast
