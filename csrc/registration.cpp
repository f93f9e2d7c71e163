// Every op schema of mtlfast, defined once, plus the pybind11 module `mtlfast._C` (build information).
// Kernels register per dispatch key in csrc/cpu/ and csrc/cuda/; the device-generic ops (the chunked backward,
// per_task_input_grads) are compositions of ATen calls in csrc/composite_ops.cpp; fake kernels and autograd live in
// mtlfast/ops.py.
//
// Argument conventions shared by the forward ops (T tasks, S = Σ_t C_t packed head columns, N rows, D features):
//   h            (..., D) floating; fp32 / fp64 / bf16 / fp16. Its leading dims are the batch shape B, N = |B|
//   weight       (S, D)  same dtype as h: the heads packed row-wise in task order
//   bias         (S,)    optional, same dtype as h
//   targets      T tensors, one per task, as the user gave them: class indices of shape B for cross-entropy (any
//                integer dtype); for the dense kinds real values of shape B, or B + (C_t,) when class_dims[t] is 1
//                (converted to the accumulation dtype: float64 for fp64 inputs, else float32); ignored (pass an
//                empty tensor) for a task whose kind is kNone (absent from the batch)
//   task_weights (T,)    floating: λ in total = Σ_t λ_t L_t
//   col_weight   (S,) optional, accumulation dtype: class weights (cross-entropy) / pos_weight (BCE) per column;
//                1 where a task has none
//   col_task     (S,) int64: the task of each column (used by the backward and by the CUDA kernels)
//   kinds        T ints (mtlfast::LossKind)      col_offsets  T+1 ints, task t owns columns [off[t], off[t+1])
//   class_dims   T ints, 1 when task t's target has a trailing (C_t,) dim after the batch dims, else 0
//   ignore_index T ints (cross-entropy only)     params       T floats: label smoothing (CE) / pos_weight is per
//                                                column / delta (Huber) / temperature (distillation)
//   task_names   T strings, used in error messages only
// Outputs: total (scalar) and losses (T,) in the accumulation dtype, each task's loss the mean over its valid
// entries (0 when none).
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "mtlfast/build_info.h"

namespace mtlfast {
void bind_eager_autograd(pybind11::module_& module);  // csrc/eager_autograd.cpp
}  // namespace mtlfast

TORCH_LIBRARY(mtlfast, m) {
  // Small heads: the logit gradient dL_t/dz (already divided by each task's denominator) is produced while the
  // logits are hot and returned for the backward. logits is returned only when return_logits (else empty).
  m.def(
      "multi_task_loss(Tensor h, Tensor weight, Tensor? bias, Tensor[] targets, Tensor task_weights, "
      "Tensor? col_weight, Tensor col_task, int[] kinds, int[] col_offsets, int[] class_dims, int[] ignore_index, "
      "float[] params, str[] task_names, bool return_logits) -> (Tensor total, Tensor losses, Tensor grad_logits, "
      "Tensor logits)");
  // Large heads when the per-task input gradients are wanted (else multi_task_loss_recompute, below, needs less
  // memory): rows are processed in chunks of chunk_rows so the N×S logits never exist. Returns the per-task
  // input gradients dL_t/dh (T, N, D) and the unscaled weight / bias gradients (S, D) / (S,) (the bias one is
  // empty without bias), all in the accumulation dtype. Gradients of different tasks never mix in the weight
  // gradient (disjoint rows), so the backward only rescales them by each task's coefficient.
  m.def(
      "multi_task_loss_chunked(Tensor h, Tensor weight, Tensor? bias, Tensor[] targets, Tensor task_weights, "
      "Tensor? col_weight, Tensor col_task, int[] kinds, int[] col_offsets, int[] class_dims, int[] ignore_index, "
      "float[] params, str[] task_names, int chunk_rows) -> (Tensor total, Tensor losses, Tensor grad_h_per_task, "
      "Tensor grad_weight, Tensor grad_bias)");
  // Large heads, logits recomputed in the backward (the default large-head path): the forward keeps only each row's
  // softmax statistics, so the memory of a step is the parameters' gradients plus one block of logits. Returns
  //   row_stats (T, N, 4), accumulation dtype, per task and row (0 for the element-wise kinds and for absent tasks):
  //     cross-entropy  [lse, a, B, ε/C]  of loss_math.h's cross_entropy_row (lse = log Σ_c exp z_c); all four 0 for
  //                    an ignored row (and, on CUDA, a row whose class index is out of range: its loss is NaN)
  //     distillation   [lse_s, lse_t, m, valid]  of loss_math.h's distillation_row (lse_t 0 for probabilities,
  //                    m = Σ_c p_c, 1 for teacher logits); all four 0 for a missing row (valid 0)
  //   inverse_denominators (T,) accumulation dtype: 1 / each task's denominator (0 when it has no valid entry).
  // The logits of rows [k·chunk_rows, (k+1)·chunk_rows) exist one chunk at a time; no gradient is computed here.
  m.def(
      "multi_task_loss_recompute(Tensor h, Tensor weight, Tensor? bias, Tensor[] targets, Tensor task_weights, "
      "Tensor? col_weight, Tensor col_task, int[] kinds, int[] col_offsets, int[] class_dims, int[] ignore_index, "
      "float[] params, str[] task_names, int chunk_rows) -> (Tensor total, Tensor losses, Tensor row_stats, "
      "Tensor inverse_denominators)");
  // Backward of multi_task_loss_recompute, with the coefficients c = grad_total·λ + grad_losses. The logits are
  // recomputed in blocks of block_columns head columns (N × block_columns logits at a time); per block z = h W_bᵀ + b_b, dz from the
  // saved statistics scaled by c_t / denominator_t, dW_b = dzᵀ h (written once, in h's dtype), db_b = Σ_rows dz, and
  // dh += dz W_b (accumulated in the accumulation dtype). Returns grad_h shaped like h, grad_weight, grad_bias (empty
  // without bias), in h's dtype.
  m.def(
      "multi_task_loss_recompute_backward(Tensor? grad_total, Tensor? grad_losses, Tensor task_weights, Tensor h, "
      "Tensor weight, Tensor? bias, Tensor[] targets, Tensor? col_weight, Tensor col_task, Tensor row_stats, "
      "Tensor inverse_denominators, int[] kinds, int[] col_offsets, int[] class_dims, int[] ignore_index, "
      "float[] params, str[] task_names, int block_columns) -> (Tensor grad_h, Tensor grad_weight, Tensor grad_bias)");
  // Backward of multi_task_loss. The gradients of the total and of the losses (either may be absent) give one
  // coefficient per task, c = grad_total·λ + grad_losses; then dz = grad_logits · c[col_task] (+ the gradient of the
  // logits output), dh = dz W (shaped like h), dW = dzᵀ h, db = Σ_rows dz.
  m.def(
      "multi_task_loss_backward(Tensor? grad_total, Tensor? grad_losses, Tensor task_weights, "
      "Tensor? grad_logits_output, Tensor grad_logits, Tensor h, Tensor weight, Tensor col_task, bool has_bias) "
      "-> (Tensor grad_h, Tensor grad_weight, Tensor grad_bias)");
  // Backward of multi_task_loss_chunked, with the same coefficients; grad_h is (N, D).
  m.def(
      "multi_task_loss_chunked_backward(Tensor? grad_total, Tensor? grad_losses, Tensor task_weights, "
      "Tensor grad_h_per_task, Tensor grad_weight, Tensor grad_bias, Tensor col_task, ScalarType h_dtype) -> "
      "(Tensor grad_h, Tensor grad_weight, Tensor grad_bias)");
  // dL_t/dh for every task from the fused pass: out[t] = grad_logits[:, seg_t] @ weight[seg_t]  -> (T, N, D).
  m.def("per_task_input_grads(Tensor grad_logits, Tensor weight, int[] col_offsets) -> Tensor");
  // Solvers of gradient-weighting methods on the (T, T) task-gradient Gram matrix (mtlfast/weighting).
  m.def("pcgrad_weights(Tensor gram, Tensor orders) -> Tensor");
  m.def("min_norm_weights(Tensor gram, int iterations) -> Tensor");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "mtlfast C++/CUDA extension: build information and the eager entry point (the ops live in torch.ops.mtlfast)";
  module.attr("__version__") = MTLFAST_VERSION;
  module.attr("torch_version") = TORCH_VERSION;
  module.attr("with_cuda") = mtlfast::kBuiltWithCuda;
  module.attr("cuda_archs") = MTLFAST_CUDA_ARCHS;
  module.attr("with_openmp") = mtlfast::kBuiltWithOpenMP;
  mtlfast::bind_eager_autograd(module);
}
