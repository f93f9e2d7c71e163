// The per-task description every forward op receives, validated once with messages that name the task.
// Used by the CPU and CUDA glue alike, before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>
#include <vector>

#include "mtlfast/target_dtypes.h"

namespace mtlfast {

struct TaskTable {
  int64_t rows = 0;      // N
  int64_t features = 0;  // D
  int64_t columns = 0;   // S = Σ C_t
  std::vector<int64_t> kinds;
  std::vector<int64_t> col_offsets;  // T + 1
  std::vector<int64_t> class_dims;   // 1: the target has a trailing (C_t,) dim
  std::vector<int64_t> ignore_index;
  std::vector<double> params;
  c10::ArrayRef<std::string> names;  // the op's task_names argument (outlives the table: both live for one call)

  int64_t num_tasks() const { return static_cast<int64_t>(kinds.size()); }
  int64_t width(int64_t task) const { return col_offsets[task + 1] - col_offsets[task]; }
  // "task 'topic' (cross-entropy)": the prefix of every error message about one task.
  std::string describe(int64_t task) const;
};

// Who brings targets that are not yet in the kernel layout (another dtype, strided: a column of a label matrix)
// there: prepare_multi_task_inputs, with host loops (the CPU backends), or the backend itself (CUDA: one launch). Both
// follow plan_kernel_targets, so either way it is one pass for all tasks, not an ATen call per task.
enum class TargetConversion { kOnHost, kByBackend };

// A forward op's inputs, validated, in the layout the kernels read.
struct PreparedInputs {
  TaskTable table;
  at::Tensor h;                     // (N, D): h with its batch dims flattened
  // Per task, the target as given (validated: batch shape (+ C_t)), undefined when the task is absent.
  std::vector<at::Tensor> targets;
  // TargetConversion::kOnHost only: per task the (N,) / (N, C_t) row-major array of kernel_target_dtype the kernels
  // read (null when absent): targets[t]'s own data, or a slice of one of target_buffers. Empty with kByBackend.
  std::vector<const void*> kernel_targets;
  std::vector<at::Tensor> target_buffers;
  at::Tensor task_weights;          // (T,) accumulation dtype
};

// Checks shapes, dtypes, devices and list lengths of a forward op's inputs (argument conventions:
// csrc/registration.cpp) and brings h and (unless the backend does it) the targets to the kernel layout (flattened
// batch dims; integer class indices to int64, dense targets to the accumulation dtype). Throws c10 errors that
// surface in Python as ValueError / TypeError naming the task.
PreparedInputs prepare_multi_task_inputs(const at::Tensor& h, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias, at::TensorList targets,
                                         const at::Tensor& task_weights, const c10::optional<at::Tensor>& col_weight,
                                         const at::Tensor& col_task, c10::IntArrayRef kinds,
                                         c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
                                         c10::IntArrayRef ignore_index, c10::ArrayRef<double> params,
                                         const std::vector<std::string>& task_names,
                                         TargetConversion conversion = TargetConversion::kOnHost);

// The dtype the kernels read task t's targets in: int64 class indices, else the accumulation dtype.
at::ScalarType kernel_target_dtype(const TaskTable& table, int64_t task, at::ScalarType acc_dtype);

// How a backend brings the targets to the kernel layout (kernel_target_dtype, row-major (N,) / (N, C_t)) without an
// ATen call per task: a target already in it is read in place; one of a common dtype whose (N, width) view needs
// one stride per dim (a column of a label matrix, class-major storage) is copied, with every other such target,
// into one buffer per kernel dtype (the backend's one pass); anything else is converted with Tensor.to here.
struct TargetPlan {
  struct Copy {
    int64_t task;
    int64_t width;       // 1 for (N,) targets
    int64_t row_stride;  // entry (r, c) of the target at r * row_stride + c * col_stride (elements)
    int64_t col_stride;
    int64_t offset;      // of its first entry in the buffer
    TargetSourceDType source_dtype;
  };
  std::vector<const void*> pointers;  // per task; null for absent tasks and, until the backend makes them, copies
  std::vector<bool> dense_in_place;   // per task: pointers[t] is the dense target as given, in dense_in_place_dtype
  std::vector<at::Tensor> converted;  // the Tensor.to results the pointers point into
  std::vector<Copy> copies[2];        // into the int64 buffer (class indices) / the accumulation-dtype one
  int64_t buffer_sizes[2] = {0, 0};
  at::ScalarType buffer_dtypes[2] = {at::kLong, at::kFloat};
};

// targets: per task, validated (batch shape (+ C_t), h's device) or undefined when absent. Copies are only planned
// for targets in a TargetSourceDType. A backend whose kernels also read dense targets in another dtype names it as
// dense_in_place_dtype (CUDA: the half / bfloat16 input dtype); contiguous dense targets in it are left in place.
TargetPlan plan_kernel_targets(const TaskTable& table, at::TensorList targets, at::ScalarType acc_dtype,
                               std::optional<at::ScalarType> dense_in_place_dtype = std::nullopt);

// Σ_t λ_t L_t as a 0-dim tensor (losses and task_weights in the accumulation dtype, on one device).
at::Tensor weighted_total(const at::Tensor& losses, const at::Tensor& task_weights);

// The backward's per-task coefficients c = grad_total·λ + grad_losses, in the accumulation dtype; either gradient
// may be absent (its output was not used), and c = 0 when both are.
at::Tensor task_coefficients(const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
                             const at::Tensor& task_weights, at::ScalarType acc_dtype);

// The dtype losses and dense targets use: float64 for float64 inputs, float32 otherwise.
at::ScalarType accumulation_dtype(at::ScalarType input_dtype);

// CPU only (reading values on a GPU would need a host sync): every class index is in [0, C) or ignore_index.
// Raises IndexError naming the task, the offending value and its row.
void check_class_targets_in_range_cpu(const TaskTable& table, const std::vector<const void*>& kernel_targets);

// CPU only, like the class index check: every entry of a distillation task's probability targets is NaN (the row
// is missing) or a finite non-negative number. Raises ValueError naming the task, the value, its row and class.
void check_distillation_targets_cpu(const TaskTable& table, const std::vector<const void*>& kernel_targets,
                                   at::ScalarType acc_dtype);

}  // namespace mtlfast
