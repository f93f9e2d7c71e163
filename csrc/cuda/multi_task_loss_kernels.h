// Launchers of the CUDA kernels of the fused multi-task loss. Raw pointers, sizes and a stream only: this header
// is shared by multi_task_loss_kernels.cu (kept free of torch headers, which would multiply its compile time) and
// the ATen glue in multi_task_loss_cuda.cpp.
//
// One op call runs, on one stream and without host syncs:
//   0. launch_pack_targets      only for targets the kernels cannot read in place (strided, or a dtype other than
//                               int64 class indices / dense targets in the accumulation type or, for a half /
//                               bfloat16 model, in its own dtype): all of them converted to the kernel layout at once
//   1. launch_denominators      per task and row slot: Σ class weight of valid targets (CE) / count of non-NaN
//                               targets (element-wise kinds) / count of rows without NaN (distillation)
//                                                                -> denominator partials (T, kMaxDenominatorSlots)
//   2. launch_segment_losses    per (row, task): loss and logit gradient in one read of the logits, the gradient
//                               written over the logits (scaled by 1/denominator) -> loss partials (T, N)
//                               (called once per row chunk by the chunked op)
//   3. launch_finalize_losses   per task: Σ loss partials in a fixed order × 1/denominator -> losses (T,)
//      (or launch_finalize_losses_with_total for a single launch group of small heads: the total Σ λ_t L_t too)
// multi_task_loss (no row chunks) on a small batch of narrow tasks skips 1: the segment pass counts the
// denominators itself (SegmentArgs::counted_denominators, segment_counts_denominators).
// multi_task_loss_recompute's backward, per block of head columns of the recomputed logits:
//   4. launch_gradient_from_stats  dz from the row statistics step 2 saved, × c_t / denominator_t, in place
// multi_task_loss's backward (the GEMMs dh = dz W, dW = dzᵀ h and db = Σ_rows dz are ATen calls in the glue):
//   5. launch_scale_logit_gradient  dz = saved logit gradient × c_t (+ the gradient of the logits output)
// Every reduction runs in a fixed order (no float atomics): the same inputs give bitwise the same outputs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mtlfast/loss_math.h"
#include "mtlfast/target_dtypes.h"

namespace mtlfast {
namespace cuda {

// Tasks per launch: the metadata travels by value as a kernel parameter (no host-to-device copy per call, so a
// launch is CUDA-graph safe); the glue loops over groups of tasks beyond this.
constexpr int kMaxTasksPerLaunch = 64;
// Segments up to this width are processed by a warp (or a fraction of one) per row; wider ones by a block.
constexpr int64_t kMaxWarpSegmentWidth = 1024;
// Row slots of the denominator partials per task (the consumers reduce them with one warp).
constexpr int kMaxDenominatorSlots = 32;
// Row chunks of launch_segment_losses must start at a multiple of this (loss partial slots are per row group).
constexpr int64_t kRowAlignment = 32;

// The dtype of h / weight / logits. Losses, denominators, dense targets and col_weight use the accumulation
// type: double for kDouble, float otherwise.
enum class InputDType { kFloat, kDouble, kHalf, kBFloat16 };

// The dtype a dense target (every kind but cross-entropy) is read in. kInput: the targets of a half / bfloat16 model
// given in its own dtype, read where they are (no conversion launch, no fp32 copy of a wide teacher's logits).
enum class DenseTargetDType : int16_t { kAccumulation, kInput };

struct TaskMeta {
  const void* target;    // int64 (N,) class indices (CE); (N, width) dense_target_dtype (dense); null for kNone
  int64_t col_offset;    // first head column of the task
  int64_t ignore_index;  // CE only
  double param;          // label smoothing (CE) / delta (Huber) / temperature (distillation)
  int16_t kind;          // mtlfast::LossKind
  DenseTargetDType dense_target_dtype;  // (kind and this share 4 bytes: 64 tasks' metadata stay a 3 KiB parameter)
  int32_t width;         // C_t
  int32_t index;         // the task's row in the per-task buffers (partials, losses)
  int32_t first_warp;    // set by launch_segment_losses: first warp of the task in the warp-per-row kernel
};

static_assert(sizeof(TaskMeta) == 48, "TaskBatch travels as a kernel parameter: keep TaskMeta small");

struct TaskBatch {
  int32_t count;        // tasks in use, ≤ kMaxTasksPerLaunch
  int32_t total_warps;  // set by launch_segment_losses
  TaskMeta task[kMaxTasksPerLaunch];
};

// The rows one launch_segment_losses call covers (a chunk of the batch, or all of it).
struct SegmentArgs {
  const void* logits;             // (rows, ld) input dtype, row-major
  void* grad;                     // (rows, ld) input dtype; may be logits itself (in place); same 16-byte phase.
                                  // Null: losses and row statistics only (multi_task_loss_recompute's forward)
  int64_t rows;                   // rows in this chunk
  int64_t row_begin;              // global index of its first row, a multiple of kRowAlignment
  int64_t ld;                     // row stride of logits / grad (S)
  const void* col_weight;         // (S,) accumulation type or null: CE class weights / BCE pos_weight
  const void* denominator_parts;  // (T, kMaxDenominatorSlots) from launch_denominators
  int32_t denominator_slots;      // slots in use per task
  void* loss_parts;               // (T, loss_parts_stride) accumulation type, written at slots of global rows
  int64_t loss_parts_stride;      // ≥ N
  void* row_stats;                // null, or (T, row_stats_rows, kRowStatsWidth) accumulation type: the softmax
                                  // statistics of every cross-entropy / distillation row (layout: the
                                  // multi_task_loss_recompute schema, csrc/registration.cpp); others left untouched
  int64_t row_stats_rows;         // N
  void* counted_denominators;     // null: launch_denominators has filled denominator_parts. Else (T,
                                  // kMaxDenominatorSlots) accumulation type, for a pass over the whole batch (row_begin
                                  // 0, rows N) where segment_counts_denominators holds: every warp counts its task's
                                  // denominator itself, the first one leaving it in slot 0 of the task's row (finalize
                                  // it with 1 slot); denominator_parts is not read
};

// Per (task, row) values of SegmentArgs::row_stats (loss_math.h's kSavedRowStats).
constexpr int kRowStatsWidth = kSavedRowStats;

// One block of head columns for launch_gradient_from_stats: the logits of columns [col_begin, col_begin + cols) of
// every row, overwritten with the logit gradient dz = (per-element gradient from the saved row statistics) × scale
// of the column's task. Columns of tasks outside the launch's batch are left untouched.
struct GradientArgs {
  void* block;            // (rows, ld) input dtype, row-major; column 0 is head column col_begin
  int64_t rows;           // N
  int64_t ld;             // ≥ cols
  int64_t col_begin;
  int64_t cols;
  const void* col_weight; // (S,) accumulation type or null
  const void* row_stats;  // (T, rows, kRowStatsWidth) accumulation type, from launch_segment_losses
  const void* scales;     // (T,) accumulation type: c_t / denominator_t
};

// The dtypes launch_pack_targets writes: int64 class indices, dense targets in the accumulation type.
enum class TargetKernelDType { kLong, kFloat, kDouble };

// One task's target for launch_pack_targets: a (rows, width) view of it, its entries copied row-major to
// packed[offset, offset + rows · width).
struct TargetCopy {
  const void* source;  // entry (r, c) at source[r * row_stride + c * col_stride] (strides in elements, may be 0)
  int64_t row_stride;
  int64_t col_stride;
  int64_t width;       // 1 for (N,) targets
  int64_t offset;
  TargetSourceDType dtype;
};

struct TargetCopyBatch {
  int32_t count;  // ≤ kMaxTasksPerLaunch
  TargetCopy copy[kMaxTasksPerLaunch];
};

// multi_task_loss's backward: dz[i, j] = grad_logits[i, j] · c_{col_task[j]} (+ extra_grad[i, j]), with
// c_t = dTotal·λ_t + dL_t, computed in the accumulation type and rounded once. A col_task entry outside [0, tasks)
// gives NaN (it is never used as an index).
struct LogitGradientArgs {
  const void* grad_logits;       // (rows, ld) input dtype: the forward's logit gradient, already / denominator
  int64_t rows;
  int64_t cols;                  // S
  int64_t ld;                    // ≥ cols
  const void* extra_grad;        // null, or input dtype at [i * extra_row_stride + j * extra_col_stride]: the
  int64_t extra_row_stride;      // gradient of the op's logits output (strides may be 0: an expanded gradient)
  int64_t extra_col_stride;
  const int64_t* col_task;       // (cols,) the task of every head column
  int64_t tasks;                 // T
  const void* task_weights;      // (T,) accumulation type, contiguous
  const void* grad_total;        // null, or one accumulation-type value
  const void* grad_losses;       // null, or (T,) accumulation type at [t * grad_losses_stride]
  int64_t grad_losses_stride;
  void* dz;                      // (rows, cols) input dtype, contiguous
  void* grad_bias;               // null, or (cols,) input dtype: Σ_rows dz, summed in the accumulation type from
                                 // the rounded dz (what dz.sum(0) gives), one rounding
  void* bias_partials;           // (bias_gradient_slabs(rows, cols), cols) accumulation type when that is > 1
};

// How many row slabs the bias gradient of an (rows, cols) dz is summed in (the partial sums' rows; depends on the
// shape only, so results are reproducible). One slab needs no partials.
int bias_gradient_slabs(int64_t rows, int64_t cols);

// The denominator row slots for a batch of `rows` rows (depends on the shape only, so results are reproducible).
int denominator_slots(int64_t rows);

cudaError_t launch_denominators(InputDType dtype, const TaskBatch& batch, int64_t rows, const void* col_weight,
                                void* denominator_parts, int32_t denominator_slots, cudaStream_t stream);

cudaError_t launch_segment_losses(InputDType dtype, const TaskBatch& batch, const SegmentArgs& args,
                                  cudaStream_t stream);

// losses[index] = Σ loss partials of the task over all N rows × 1/denominator (NaN when a class index was out of
// range, 0 for a task with no valid entry); inverse_denominators[index] = that 1/denominator, when not null.
cudaError_t launch_finalize_losses(InputDType dtype, const TaskBatch& batch, int64_t rows,
                                   const void* denominator_parts, int32_t denominator_slots, const void* loss_parts,
                                   int64_t loss_parts_stride, void* losses, void* inverse_denominators,
                                   cudaStream_t stream);

// Loss partials per task up to which one block finalizes a whole launch group (a warp per task; a wide task has a
// partial per row, a narrow one per warp's rows).
constexpr int64_t kMaxLossPartsForFinalizeWithTotal = 8192;

// Whether launch_finalize_losses_with_total serves this batch (of `rows` rows; the op's only launch group is the
// caller's condition).
bool finalize_computes_total(const TaskBatch& batch, int64_t rows);

// launch_finalize_losses plus *total = Σ_k losses[index_k] · task_weights[index_k] in batch order, in one block.
cudaError_t launch_finalize_losses_with_total(InputDType dtype, const TaskBatch& batch, int64_t rows,
                                              const void* denominator_parts, int32_t denominator_slots,
                                              const void* loss_parts, int64_t loss_parts_stride, void* losses,
                                              void* inverse_denominators, const void* task_weights, void* total,
                                              cudaStream_t stream);

// Whether launch_segment_losses may count the denominators itself (SegmentArgs::counted_denominators) for this
// batch of `rows` rows: every task narrow (the warp kernel alone covers it) and the redundant reading small (every
// warp reads all of its task's targets: a few hundred rows of narrow heads).
bool segment_counts_denominators(const TaskBatch& batch, int64_t rows);

// The backward of multi_task_loss_recompute for one block of head columns (a block per row, the tasks of the batch
// that meet the block's columns in turn): no reduction, so any block boundaries give the same values.
cudaError_t launch_gradient_from_stats(InputDType dtype, const TaskBatch& batch, const GradientArgs& args,
                                       cudaStream_t stream);

// Converts the batch's targets (each `rows` rows) to `packed`, an array of the kernel dtype, in one launch.
cudaError_t launch_pack_targets(TargetKernelDType kernel_dtype, const TargetCopyBatch& batch, int64_t rows,
                                void* packed, cudaStream_t stream);

// dz of LogitGradientArgs, and with grad_bias its column sums in the same pass (then dz is read back by nobody: a
// launch and ATen's reduction less per backward); nothing to do (success) when rows · cols is 0.
cudaError_t launch_scale_logit_gradient(InputDType dtype, const LogitGradientArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mtlfast
