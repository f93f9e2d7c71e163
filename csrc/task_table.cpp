#include "mtlfast/task_table.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

#include "mtlfast/loss_math.h"

namespace mtlfast {
namespace {

const char* kind_name(int64_t kind) {
  switch (kind) {
    case kNone: return "absent";
    case kCrossEntropy: return "cross-entropy";
    case kBCE: return "BCE";
    case kMSE: return "MSE";
    case kL1: return "L1";
    case kHuber: return "Huber";
    case kDistill: return "distillation from teacher logits";
    case kDistillProbs: return "distillation from teacher probabilities";
    default: return "unknown kind";
  }
}

bool is_dense_kind(int64_t kind) {
  return kind == kBCE || kind == kMSE || kind == kL1 || kind == kHuber || is_distillation(kind);
}

}  // namespace

std::string TaskTable::describe(int64_t task) const {
  std::ostringstream out;
  out << "mtlfast: task '" << names[task] << "' (" << kind_name(kinds[task]) << ")";
  return out.str();
}

at::ScalarType accumulation_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

TaskTable check_multi_task_inputs(const at::Tensor& h, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::TensorList targets,
                                  const c10::optional<at::Tensor>& col_weight, const at::Tensor& col_task,
                                  c10::IntArrayRef kinds, c10::IntArrayRef col_offsets,
                                  c10::IntArrayRef ignore_index, c10::ArrayRef<double> params,
                                  const std::vector<std::string>& task_names) {
  const int64_t T = static_cast<int64_t>(kinds.size());
  TORCH_CHECK_VALUE(T > 0, "mtlfast: at least one task is required");
  TORCH_CHECK_VALUE(static_cast<int64_t>(col_offsets.size()) == T + 1 &&
                        static_cast<int64_t>(ignore_index.size()) == T &&
                        static_cast<int64_t>(params.size()) == T &&
                        static_cast<int64_t>(task_names.size()) == T &&
                        static_cast<int64_t>(targets.size()) == T,
                    "mtlfast: per-task lists disagree on the number of tasks (kinds ", T, ", col_offsets ",
                    col_offsets.size(), " (expects T+1), ignore_index ", ignore_index.size(), ", params ",
                    params.size(), ", task_names ", task_names.size(), ", targets ", targets.size(), ")");

  TORCH_CHECK_VALUE(h.dim() == 2, "mtlfast: the shared input h must be 2-D (N, D), got shape ", h.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(h.scalar_type()), "mtlfast: h must be floating point, got ",
                   h.scalar_type());
  TORCH_CHECK_VALUE(h.size(0) > 0, "mtlfast: empty batch (h has 0 rows)");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == h.size(1),
                    "mtlfast: packed head weight must be (S, D) with D = ", h.size(1), ", got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == h.scalar_type(), "mtlfast: head weight dtype ", weight.scalar_type(),
                   " differs from h dtype ", h.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == h.device(), "mtlfast: head weight is on ", weight.device(),
                    " but h is on ", h.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "mtlfast: bias must be (S,) = (",
                      weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == h.scalar_type(), "mtlfast: bias dtype ", bias->scalar_type(),
                     " differs from h dtype ", h.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == h.device(), "mtlfast: bias is on ", bias->device(), " but h is on ",
                      h.device());
  }

  TaskTable table;
  table.rows = h.size(0);
  table.features = h.size(1);
  table.columns = weight.size(0);
  table.kinds.assign(kinds.begin(), kinds.end());
  table.col_offsets.assign(col_offsets.begin(), col_offsets.end());
  table.ignore_index.assign(ignore_index.begin(), ignore_index.end());
  table.params.assign(params.begin(), params.end());
  table.names = task_names;

  TORCH_CHECK_VALUE(table.col_offsets.front() == 0 && table.col_offsets.back() == table.columns,
                    "mtlfast: col_offsets must start at 0 and end at S = ", table.columns);
  const at::ScalarType acc = accumulation_dtype(h.scalar_type());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t kind = table.kinds[t];
    TORCH_CHECK_VALUE(kind >= kNone && kind < kNumLossKinds, "mtlfast: task '", table.names[t],
                      "': unknown loss kind ", kind);
    TORCH_CHECK_VALUE(table.width(t) > 0, table.describe(t), ": owns no head column");
    if (kind == kNone) {
      continue;
    }
    const at::Tensor& y = targets[t];
    TORCH_CHECK_VALUE(y.device() == h.device(), table.describe(t), ": target is on ", y.device(),
                      " but h is on ", h.device());
    if (kind == kCrossEntropy) {
      TORCH_CHECK_TYPE(y.scalar_type() == at::kLong, table.describe(t),
                       ": target must hold int64 class indices, got ", y.scalar_type());
      TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == table.rows, table.describe(t),
                        ": target must have shape (N,) = (", table.rows, ",), got ", y.sizes());
      TORCH_CHECK_VALUE(table.params[t] >= 0.0 && table.params[t] <= 1.0, table.describe(t),
                        ": label_smoothing must be in [0, 1], got ", table.params[t]);
    } else if (is_dense_kind(kind)) {
      TORCH_CHECK_TYPE(y.scalar_type() == acc, table.describe(t), ": target must be ", acc, " for ",
                       h.scalar_type(), " inputs, got ", y.scalar_type());
      TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == table.rows && y.size(1) == table.width(t),
                        table.describe(t), ": target must have shape (N, C) = (", table.rows, ", ",
                        table.width(t), "), got ", y.sizes());
      if (kind == kHuber) {
        TORCH_CHECK_VALUE(table.params[t] > 0.0, table.describe(t), ": delta must be positive, got ",
                          table.params[t]);
      }
      if (is_distillation(kind)) {
        TORCH_CHECK_VALUE(table.params[t] > 0.0 && std::isfinite(table.params[t]), table.describe(t),
                          ": temperature must be positive and finite, got ", table.params[t]);
      }
    }
  }
  if (col_weight.has_value()) {
    TORCH_CHECK_VALUE(col_weight->dim() == 1 && col_weight->size(0) == table.columns,
                      "mtlfast: col_weight must be (S,) = (", table.columns, ",), got ", col_weight->sizes());
    TORCH_CHECK_TYPE(col_weight->scalar_type() == acc, "mtlfast: col_weight must be ", acc, ", got ",
                     col_weight->scalar_type());
    TORCH_CHECK_VALUE(col_weight->device() == h.device(), "mtlfast: col_weight is on ", col_weight->device(),
                      " but h is on ", h.device());
  }
  TORCH_CHECK_VALUE(col_task.dim() == 1 && col_task.size(0) == table.columns && col_task.scalar_type() == at::kLong &&
                        col_task.device() == h.device(),
                    "mtlfast: col_task must be an int64 (S,) tensor on ", h.device());
  return table;
}

void check_class_targets_in_range_cpu(const TaskTable& table, at::TensorList targets) {
  for (int64_t t = 0; t < table.num_tasks(); ++t) {
    if (table.kinds[t] != kCrossEntropy) {
      continue;
    }
    const at::Tensor y = targets[t].contiguous();
    const int64_t* data = y.const_data_ptr<int64_t>();
    const int64_t classes = table.width(t);
    const int64_t ignore = table.ignore_index[t];
    for (int64_t i = 0; i < y.numel(); ++i) {
      const int64_t v = data[i];
      TORCH_CHECK_INDEX(v == ignore || (v >= 0 && v < classes), table.describe(t), ": class index ", v,
                        " at row ", i, " is out of range [0, ", classes, ") (ignore_index is ", ignore, ")");
    }
  }
}

void check_distillation_targets_cpu(const TaskTable& table, at::TensorList targets) {
  for (int64_t t = 0; t < table.num_tasks(); ++t) {
    if (table.kinds[t] != kDistillProbs) {
      continue;
    }
    const at::Tensor y = targets[t].contiguous();
    const int64_t width = table.width(t);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mtlfast::check_distillation_targets_cpu", [&] {
      const scalar_t* data = y.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < y.numel(); ++i) {
        const scalar_t v = data[i];
        // NaN marks a missing row; anything else must be a probability (the row sum is not checked).
        TORCH_CHECK_VALUE(std::isnan(v) || (v >= scalar_t(0) && std::isfinite(v)), table.describe(t),
                          ": target probabilities must be non-negative and finite (NaN marks a missing row), got ",
                          v, " at row ", i / width, ", class ", i % width);
      }
    });
  }
}

}  // namespace mtlfast
