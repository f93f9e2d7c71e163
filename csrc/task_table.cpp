#include "mtlfast/task_table.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorUtils.h>
#include <c10/util/Exception.h>

#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <optional>
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

}  // namespace

std::string TaskTable::describe(int64_t task) const {
  std::ostringstream out;
  out << "mtlfast: task '" << names[task] << "' (" << kind_name(kinds[task]) << ")";
  return out.str();
}

at::ScalarType accumulation_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType kernel_target_dtype(const TaskTable& table, int64_t task, at::ScalarType acc_dtype) {
  return table.kinds[task] == kCrossEntropy ? at::kLong : acc_dtype;
}

namespace {

std::optional<TargetSourceDType> target_source_dtype(at::ScalarType type) {
  switch (type) {
    case at::kBool: return TargetSourceDType::kBool;
    case at::kByte: return TargetSourceDType::kUInt8;
    case at::kChar: return TargetSourceDType::kInt8;
    case at::kShort: return TargetSourceDType::kInt16;
    case at::kInt: return TargetSourceDType::kInt32;
    case at::kLong: return TargetSourceDType::kInt64;
    case at::kHalf: return TargetSourceDType::kHalf;
    case at::kBFloat16: return TargetSourceDType::kBFloat16;
    case at::kFloat: return TargetSourceDType::kFloat;
    case at::kDouble: return TargetSourceDType::kDouble;
    default: return std::nullopt;
  }
}

}  // namespace

TargetPlan plan_kernel_targets(const TaskTable& table, at::TensorList targets, at::ScalarType acc_dtype,
                               std::optional<at::ScalarType> dense_in_place_dtype) {
  TargetPlan plan;
  plan.buffer_dtypes[1] = acc_dtype;
  plan.pointers.assign(table.num_tasks(), nullptr);
  plan.dense_in_place.assign(table.num_tasks(), false);
  for (int64_t t = 0; t < table.num_tasks(); ++t) {
    const at::Tensor& y = targets[t];
    if (!y.defined()) {
      continue;
    }
    const at::ScalarType wanted = kernel_target_dtype(table, t, acc_dtype);
    if (y.scalar_type() == wanted && y.is_contiguous()) {
      plan.pointers[t] = y.const_data_ptr();
      continue;
    }
    if (wanted != at::kLong && y.scalar_type() == dense_in_place_dtype && y.is_contiguous()) {
      plan.pointers[t] = y.const_data_ptr();
      plan.dense_in_place[t] = true;
      continue;
    }
    const int64_t width = table.class_dims[t] != 0 ? table.width(t) : 1;
    const int64_t kernel_shape[2] = {table.rows, width};
    const std::optional<TargetSourceDType> source_dtype = target_source_dtype(y.scalar_type());
    const auto strides = source_dtype.has_value()
                             ? at::detail::computeStride(y.sizes(), y.strides(), c10::IntArrayRef(kernel_shape))
                             : std::nullopt;
    if (!strides.has_value()) {
      plan.converted.push_back(y.to(wanted).contiguous());
      plan.pointers[t] = plan.converted.back().const_data_ptr();
      continue;
    }
    const int which = wanted == at::kLong ? 0 : 1;
    plan.copies[which].push_back({t, width, (*strides)[0], (*strides)[1], plan.buffer_sizes[which], *source_dtype});
    plan.buffer_sizes[which] += table.rows * width;
  }
  return plan;
}

namespace {

// "(4, 3)" / "(4,)": shapes as Python prints them, as the user wrote them.
std::string shape_string(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out << (i > 0 ? ", " : "") << sizes[i];
  }
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// One task's target: shape, dtype and device checked against what the task expects (no conversion here).
void check_target(const TaskTable& table, int64_t t, const at::Tensor& y, const at::Tensor& h,
                  c10::IntArrayRef batch_shape) {
  const int64_t kind = table.kinds[t];
  TORCH_CHECK_TYPE(y.defined(), table.describe(t), ": target is missing (an undefined tensor)");
  TORCH_CHECK_VALUE(y.device() == h.device(), table.describe(t), ": target is on ", y.device(), " but h is on ",
                    h.device());
  const bool class_dim = table.class_dims[t] != 0;
  const c10::IntArrayRef sizes = y.sizes();
  const bool shape_ok = class_dim ? sizes.size() == batch_shape.size() + 1 && sizes.slice(0, batch_shape.size()) == batch_shape &&
                                        sizes.back() == table.width(t)
                                  : sizes == batch_shape;
  if (!shape_ok) {
    std::vector<int64_t> expected(batch_shape.begin(), batch_shape.end());
    if (class_dim) {
      expected.push_back(table.width(t));
    }
    TORCH_CHECK_VALUE(false, table.describe(t), ": target must have shape ", shape_string(expected),
                      " (the batch shape of h", class_dim ? ", plus the output dimension" : "", "), got ",
                      shape_string(sizes));
  }
  if (kind == kCrossEntropy) {
    TORCH_CHECK_TYPE(!at::isFloatingType(y.scalar_type()) && !at::isComplexType(y.scalar_type()) &&
                         y.scalar_type() != at::kBool,
                     table.describe(t), ": targets must be integer class indices, got ", y.scalar_type());
    TORCH_CHECK_VALUE(table.params[t] >= 0.0 && table.params[t] <= 1.0, table.describe(t),
                      ": label_smoothing must be in [0, 1], got ", table.params[t]);
  } else if (is_distillation(kind)) {
    // Teacher logits / probabilities are real-valued: integers here are most likely class indices.
    TORCH_CHECK_TYPE(at::isFloatingType(y.scalar_type()), table.describe(t), ": targets must be floating point ",
                     distillation_targets_are_logits(kind) ? "teacher logits" : "teacher probabilities",
                     " of shape (..., ", table.width(t), "), got ", y.scalar_type());
    TORCH_CHECK_VALUE(table.params[t] > 0.0 && std::isfinite(table.params[t]), table.describe(t),
                      ": temperature must be positive and finite, got ", table.params[t]);
  } else {
    // bool / integer labels (0 / 1) are accepted for BCE and regression alike, and converted.
    TORCH_CHECK_TYPE(!at::isComplexType(y.scalar_type()), table.describe(t), ": targets must be real, got ",
                     y.scalar_type());
    if (kind == kHuber) {
      TORCH_CHECK_VALUE(table.params[t] > 0.0, table.describe(t), ": delta must be positive, got ",
                        table.params[t]);
    }
  }
}

// Entry (r, c) of a target viewed as (rows, width), converted as Tensor.to converts (bool -> 0 / 1).
template <typename Out>
void copy_target(const at::Tensor& y, int64_t rows, int64_t width, int64_t row_stride, int64_t col_stride, Out* out) {
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, y.scalar_type(), "mtlfast::copy_target", [&] {
    const scalar_t* source = y.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 15) / width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < width; ++c) {
          out[r * width + c] = static_cast<Out>(source[r * row_stride + c * col_stride]);
        }
      }
    });
  });
}

// TargetConversion::kOnHost, on the host: the plan's copies made by plain loops (a Tensor.to per task cost ~7 us
// each on a 64-task step, 25-30 % of the step with int64 label columns; CPU, S1 shapes).
void bring_targets_to_kernel_layout(PreparedInputs& prepared, at::ScalarType acc) {
  const TaskTable& table = prepared.table;
  TargetPlan plan = plan_kernel_targets(table, prepared.targets, acc);
  for (int which = 0; which < 2; ++which) {
    if (plan.copies[which].empty()) {
      continue;
    }
    const at::TensorOptions options = prepared.targets[plan.copies[which].front().task].options();
    const at::Tensor buffer = at::empty({plan.buffer_sizes[which]}, options.dtype(plan.buffer_dtypes[which]));
    for (const TargetPlan::Copy& copy : plan.copies[which]) {
      const at::Tensor& y = prepared.targets[copy.task];
      TORCH_INTERNAL_ASSERT(y.is_cpu(), "mtlfast: host conversion of a ", y.device(), " target");
      const auto make = [&](auto* out) {
        out += copy.offset;
        copy_target(y, table.rows, copy.width, copy.row_stride, copy.col_stride, out);
        plan.pointers[copy.task] = out;
      };
      if (which == 0) {
        make(buffer.mutable_data_ptr<int64_t>());
      } else if (acc == at::kDouble) {
        make(buffer.mutable_data_ptr<double>());
      } else {
        make(buffer.mutable_data_ptr<float>());
      }
    }
    plan.converted.push_back(buffer);
  }
  prepared.kernel_targets = std::move(plan.pointers);
  prepared.target_buffers = std::move(plan.converted);
}

}  // namespace

PreparedInputs prepare_multi_task_inputs(const at::Tensor& h, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias, at::TensorList targets,
                                         const at::Tensor& task_weights, const c10::optional<at::Tensor>& col_weight,
                                         const at::Tensor& col_task, c10::IntArrayRef kinds,
                                         c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
                                         c10::IntArrayRef ignore_index, c10::ArrayRef<double> params,
                                         const std::vector<std::string>& task_names, TargetConversion conversion) {
  const int64_t T = static_cast<int64_t>(kinds.size());
  TORCH_CHECK_VALUE(T > 0, "mtlfast: at least one task is required");
  TORCH_CHECK_VALUE(static_cast<int64_t>(col_offsets.size()) == T + 1 &&
                        static_cast<int64_t>(class_dims.size()) == T &&
                        static_cast<int64_t>(ignore_index.size()) == T &&
                        static_cast<int64_t>(params.size()) == T &&
                        static_cast<int64_t>(task_names.size()) == T &&
                        static_cast<int64_t>(targets.size()) == T,
                    "mtlfast: per-task lists disagree on the number of tasks (kinds ", T, ", col_offsets ",
                    col_offsets.size(), " (expects T+1), class_dims ", class_dims.size(), ", ignore_index ",
                    ignore_index.size(), ", params ", params.size(), ", task_names ", task_names.size(),
                    ", targets ", targets.size(), ")");

  TORCH_CHECK_VALUE(h.dim() >= 1, "mtlfast: the shared input h must be (..., D), got a 0-dim tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(h.scalar_type()), "mtlfast: h must be floating point, got ",
                   h.scalar_type());
  const c10::IntArrayRef batch_shape = h.sizes().slice(0, h.dim() - 1);
  const int64_t D = h.size(-1);
  const int64_t N = c10::multiply_integers(batch_shape);
  TORCH_CHECK_VALUE(N > 0, "mtlfast: empty batch (h has no rows)");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == D,
                    "mtlfast: packed head weight must be (S, D) with D = ", D, ", got ", weight.sizes());
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

  PreparedInputs prepared;
  TaskTable& table = prepared.table;
  table.rows = N;
  table.features = D;
  table.columns = weight.size(0);
  table.kinds.assign(kinds.begin(), kinds.end());
  table.col_offsets.assign(col_offsets.begin(), col_offsets.end());
  table.class_dims.assign(class_dims.begin(), class_dims.end());
  table.ignore_index.assign(ignore_index.begin(), ignore_index.end());
  table.params.assign(params.begin(), params.end());
  table.names = task_names;  // a view, not a copy of T strings

  TORCH_CHECK_VALUE(table.col_offsets.front() == 0 && table.col_offsets.back() == table.columns,
                    "mtlfast: col_offsets must start at 0 and end at S = ", table.columns);
  const at::ScalarType acc = accumulation_dtype(h.scalar_type());
  prepared.targets.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t kind = table.kinds[t];
    TORCH_CHECK_VALUE(kind >= kNone && kind < kNumLossKinds, "mtlfast: task '", table.names[t],
                      "': unknown loss kind ", kind);
    TORCH_CHECK_VALUE(table.width(t) > 0, table.describe(t), ": owns no head column");
    TORCH_CHECK_VALUE(table.class_dims[t] == 0 || (table.class_dims[t] == 1 && kind != kCrossEntropy),
                      table.describe(t), ": class_dims must be 0 or 1 (0 for class indices), got ",
                      table.class_dims[t]);
    if (kind != kNone) {
      check_target(table, t, targets[t], h, batch_shape);
      prepared.targets[t] = targets[t];
    }
  }
  if (conversion == TargetConversion::kOnHost) {
    bring_targets_to_kernel_layout(prepared, acc);
  }
  TORCH_CHECK_VALUE(task_weights.dim() == 1 && task_weights.size(0) == T, "mtlfast: task_weights must be (T,) = (",
                    T, ",), got ", task_weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(task_weights.scalar_type()), "mtlfast: task_weights must be floating point, got ",
                   task_weights.scalar_type());
  TORCH_CHECK_VALUE(task_weights.device() == h.device(), "mtlfast: task_weights are on ", task_weights.device(),
                    " but h is on ", h.device());
  prepared.task_weights = task_weights.to(acc);
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
  prepared.h = h.reshape({N, D});
  return prepared;
}

at::Tensor weighted_total(const at::Tensor& losses, const at::Tensor& task_weights) {
  if (!losses.device().is_cpu()) {
    return at::dot(losses, task_weights);
  }
  // T products on the host (accumulated in double): an ATen dot costs more than that for small T.
  at::Tensor total = at::empty({}, losses.options());
  AT_DISPATCH_FLOATING_TYPES(losses.scalar_type(), "mtlfast::weighted_total", [&] {
    const auto loss = losses.accessor<scalar_t, 1>();
    const auto weight = task_weights.accessor<scalar_t, 1>();
    double sum = 0.0;
    for (int64_t t = 0; t < loss.size(0); ++t) {
      sum += static_cast<double>(loss[t]) * static_cast<double>(weight[t]);
    }
    *total.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(sum);
  });
  return total;
}

at::Tensor task_coefficients(const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
                             const at::Tensor& task_weights, at::ScalarType acc_dtype) {
  const bool with_total = grad_total.has_value() && grad_total->defined();
  const bool with_losses = grad_losses.has_value() && grad_losses->defined();
  const int64_t T = task_weights.size(0);
  if (task_weights.device().is_cpu()) {
    // T values on the host: at small T the ATen calls below cost more than the arithmetic.
    at::Tensor c = at::empty({T}, task_weights.options().dtype(acc_dtype));
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "mtlfast::task_coefficients", [&] {
      scalar_t* out = c.mutable_data_ptr<scalar_t>();
      std::fill(out, out + T, scalar_t(0));
      if (with_total) {
        const scalar_t g = *grad_total->to(acc_dtype).const_data_ptr<scalar_t>();  // a 0-dim CPU tensor
        const at::Tensor lam = task_weights.to(acc_dtype);
        const auto lam_values = lam.accessor<scalar_t, 1>();
        for (int64_t t = 0; t < T; ++t) {
          out[t] = g * lam_values[t];
        }
      }
      if (with_losses) {
        const at::Tensor dl = grad_losses->to(acc_dtype);
        TORCH_CHECK_VALUE(dl.dim() == 1 && dl.size(0) == T, "mtlfast: grad_losses must be (T,) = (", T,
                          ",), got ", dl.sizes());
        const auto dl_values = dl.accessor<scalar_t, 1>();  // strided: an expanded gradient is read in place
        for (int64_t t = 0; t < T; ++t) {
          out[t] += dl_values[t];
        }
      }
    });
    return c;
  }
  at::Tensor c;
  if (with_total) {
    c = task_weights.to(acc_dtype) * grad_total->to(acc_dtype);
  }
  if (with_losses) {
    const at::Tensor g = grad_losses->to(acc_dtype);
    c = c.defined() ? c + g : g;
  }
  return c.defined() ? c : at::zeros({T}, task_weights.options().dtype(acc_dtype));
}

void check_class_targets_in_range_cpu(const TaskTable& table, const std::vector<const void*>& kernel_targets) {
  for (int64_t t = 0; t < table.num_tasks(); ++t) {
    if (table.kinds[t] != kCrossEntropy) {
      continue;
    }
    const int64_t* data = static_cast<const int64_t*>(kernel_targets[t]);
    const int64_t classes = table.width(t);
    const int64_t ignore = table.ignore_index[t];
    for (int64_t i = 0; i < table.rows; ++i) {
      const int64_t v = data[i];
      TORCH_CHECK_INDEX(v == ignore || (v >= 0 && v < classes), table.describe(t), ": class index ", v,
                        " at row ", i, " is out of range [0, ", classes, ") (ignore_index is ", ignore, ")");
    }
  }
}

void check_distillation_targets_cpu(const TaskTable& table, const std::vector<const void*>& kernel_targets,
                                   at::ScalarType acc_dtype) {
  for (int64_t t = 0; t < table.num_tasks(); ++t) {
    if (table.kinds[t] != kDistillProbs) {
      continue;
    }
    const int64_t width = table.width(t);
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "mtlfast::check_distillation_targets_cpu", [&] {
      const scalar_t* data = static_cast<const scalar_t*>(kernel_targets[t]);
      for (int64_t i = 0; i < table.rows * width; ++i) {
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
