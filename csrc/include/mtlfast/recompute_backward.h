// The device-independent part of multi_task_loss_recompute's backward (csrc/registration.cpp): the loop over blocks
// of head columns and its GEMMs (ATen: MKL / oneDNN on the CPU, cuBLAS on CUDA). Each backend supplies the one
// step that is its own, the logit gradient of a block from the row statistics the forward saved.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "mtlfast/task_table.h"

namespace mtlfast {

// The backward op's inputs, validated (the forward's checks, then the saved state's shapes, dtypes and device), in
// the layout the block-gradient steps read.
struct RecomputeBackwardInputs {
  PreparedInputs prepared;  // h flattened to (N, D), targets as `conversion` leaves them
  at::Tensor scales;        // (T,) accumulation dtype: c_t / denominator_t, c = grad_total·λ + grad_losses
  at::Tensor row_stats;     // (T, N, 4) accumulation dtype, contiguous
};

RecomputeBackwardInputs prepare_recompute_backward(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const at::Tensor& h, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::TensorList targets, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, const at::Tensor& row_stats, const at::Tensor& inverse_denominators,
    c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims, c10::IntArrayRef ignore_index,
    c10::ArrayRef<double> params, const std::vector<std::string>& task_names, TargetConversion conversion);

// Overwrites `block` (N, cols), the recomputed logits of head columns [col_begin, col_begin + cols), with their
// gradient dz, each column's scaled by its task's entry of the (T,) scales (c_t / denominator_t).
using BlockGradient = std::function<void(at::Tensor& block, int64_t col_begin)>;

// grad_h (N, D), grad_weight (S, D), grad_bias (S,) or empty, all in h's dtype, from blocks of block_columns head
// columns: per block z = h W_bᵀ + b_b, block_gradient(z), dW_b = zᵀ h, db_b = Σ_rows z, dh += z W_b (dh in the
// accumulation dtype). h is (N, D), contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> recompute_backward(const at::Tensor& h, const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  int64_t block_columns,
                                                                  const BlockGradient& block_gradient);

// out (accumulation dtype) = a @ b, or out += a @ b when accumulate, for a and b in the input dtype (which may be
// out's own). Half inputs accumulate in fp32 inside cuBLAS on CUDA (torch ≥ 2.10's out_dtype GEMMs); elsewhere
// they are converted a block of output rows at a time.
void gemm_to_accumulator(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// z = h Wᵀ + b into z's memory (b may be absent), through the dispatcher. (The CPU kernels call at::cpu:: directly.)
void head_logits_into(at::Tensor& z, const at::Tensor& h, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias);

// out (columns,) = Σ_rows z for z (N, columns) in the input dtype: z's transpose times ones (N,) when ones is
// defined (CUDA), else a sum over dim 0.
void column_sums_into(at::Tensor& out, const at::Tensor& z, const at::Tensor& ones);

}  // namespace mtlfast
