// The per-task description every forward op receives, validated once with messages that name the task.
// Used by the CPU and CUDA glue alike, before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace mtlfast {

struct TaskTable {
  int64_t rows = 0;      // N
  int64_t features = 0;  // D
  int64_t columns = 0;   // S = Σ C_t
  std::vector<int64_t> kinds;
  std::vector<int64_t> col_offsets;  // T + 1
  std::vector<int64_t> ignore_index;
  std::vector<double> params;
  std::vector<std::string> names;

  int64_t num_tasks() const { return static_cast<int64_t>(kinds.size()); }
  int64_t width(int64_t task) const { return col_offsets[task + 1] - col_offsets[task]; }
  // "task 'topic' (cross-entropy)": the prefix of every error message about one task.
  std::string describe(int64_t task) const;
};

// Checks shapes, dtypes, devices and list lengths of a forward op's inputs and returns the table.
// Throws c10 errors that surface in Python as ValueError / TypeError naming the task.
TaskTable check_multi_task_inputs(const at::Tensor& h, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::TensorList targets,
                                  const c10::optional<at::Tensor>& col_weight, const at::Tensor& col_task,
                                  c10::IntArrayRef kinds, c10::IntArrayRef col_offsets,
                                  c10::IntArrayRef ignore_index, c10::ArrayRef<double> params,
                                  const std::vector<std::string>& task_names);

// The dtype losses and dense targets use: float64 for float64 inputs, float32 otherwise.
at::ScalarType accumulation_dtype(at::ScalarType input_dtype);

// CPU only (reading values on a GPU would need a host sync): every class index is in [0, C) or ignore_index.
// Raises IndexError naming the task, the offending value and its row.
void check_class_targets_in_range_cpu(const TaskTable& table, at::TensorList targets);

// CPU only, like the class index check: every entry of a distillation task's probability targets is NaN (the row
// is missing) or a finite non-negative number. Raises ValueError naming the task, the value, its row and class.
void check_distillation_targets_cpu(const TaskTable& table, at::TensorList targets);

}  // namespace mtlfast
