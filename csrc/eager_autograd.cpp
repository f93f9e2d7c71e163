// The eager-mode entry point of multi_task_loss: a C++ autograd Function around the dispatcher op, bound in
// mtlfast._C as `multi_task_loss_eager(spec, h, weight, bias, targets, task_weights, col_weight, col_task,
// return_logits)`.
//
// Why it exists: called from Python through torch.ops, every step converts the op's per-task lists (kinds,
// offsets, params, names: 7 lists of T entries) into IValues, its Python autograd.Function runs Python code in the
// forward and the backward, and the Python layers above look every task's target up by name. At 64 small tasks
// that was ~250 us per step against ~400 us of GEMMs. Here the static lists live in a TaskSpec built once per task
// layout, the targets are looked up in C++, the op and its backward are called through typed dispatcher handles,
// and the backward never enters Python. The autograd formula is the one registered for torch.compile and opcheck
// in mtlfast/ops.py (same saved tensors, same c = dTotal·λ + dL); the oracle tests run through this path in eager
// mode, the opcheck and compile tests through that one.
//
// Anything unusual about the targets (an unknown name, a value that is not a plain tensor or None, no target at
// all) makes it return None without running anything: the Python path then handles the call, and raises its
// errors, exactly as without this entry point.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/stl.h>

#include "mtlfast/loss_math.h"
#include "mtlfast/op_signatures.h"

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace mtlfast {
namespace {

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The per-layout arguments of the op that do not change from step to step.
struct TaskSpec {
  std::vector<int64_t> kinds;
  std::vector<int64_t> col_offsets;
  std::vector<int64_t> class_dims;
  std::vector<int64_t> ignore_index;
  std::vector<double> params;
  std::vector<std::string> names;
  std::vector<py::str> py_names;  // the names as Python strings, the keys of a targets dict
};

// One call's targets in task order, with the kinds of absent tasks set to kNone.
struct GatheredTargets {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> kinds;
  bool all_present = true;
};

// A target value: a plain tensor (or Parameter) is taken, None marks an absent task; anything else (a tensor
// subclass, which may override __torch_function__, or a wrong type) is left to the Python path.
bool take_target(PyObject* value, int64_t task, GatheredTargets& out) {
  if (value == nullptr || value == Py_None) {
    out.kinds[task] = kNone;
    out.all_present = false;
    return true;
  }
  if (!THPVariable_CheckExact(value)) {
    return false;
  }
  out.tensors[task] = THPVariable_Unpack(value);
  return true;
}

// targets: a dict by task name or a list / tuple in task order. False when the Python path must handle them.
bool gather_targets(const TaskSpec& spec, py::handle targets, GatheredTargets& out) {
  const size_t T = spec.kinds.size();
  out.tensors.assign(T, at::Tensor());
  out.kinds = spec.kinds;
  PyObject* object = targets.ptr();
  if (PyDict_Check(object)) {
    Py_ssize_t found = 0;
    for (size_t t = 0; t < T; ++t) {
      PyObject* value = PyDict_GetItemWithError(object, spec.py_names[t].ptr());  // borrowed
      if (value == nullptr && PyErr_Occurred()) {
        PyErr_Clear();
        return false;
      }
      found += value != nullptr ? 1 : 0;
      if (!take_target(value, static_cast<int64_t>(t), out)) {
        return false;
      }
    }
    if (found != PyDict_Size(object)) {  // a key that is not a task
      return false;
    }
  } else if (PyList_Check(object) || PyTuple_Check(object)) {
    if (static_cast<size_t>(PySequence_Fast_GET_SIZE(object)) != T) {
      return false;
    }
    for (size_t t = 0; t < T; ++t) {
      if (!take_target(PySequence_Fast_GET_ITEM(object, t), static_cast<int64_t>(t), out)) {
        return false;
      }
    }
  } else {
    return false;
  }
  // No target at all is an error, which the Python path raises.
  return std::any_of(out.kinds.begin(), out.kinds.end(), [](int64_t kind) { return kind != kNone; });
}

const c10::TypedOperatorHandle<MultiTaskLossKernel>& forward_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("mtlfast::multi_task_loss", "").typed<MultiTaskLossKernel>();
  return handle;
}

const c10::TypedOperatorHandle<MultiTaskLossBackwardKernel>& backward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("mtlfast::multi_task_loss_backward", "")
                                 .typed<MultiTaskLossBackwardKernel>();
  return handle;
}

// The non-tensor arguments, passed to the Function as one value so that autograd does not track the targets
// (they get no gradient, as in the registered formula).
struct CallArgs {
  const TaskSpec& spec;
  const GatheredTargets& targets;
  bool return_logits;
};

std::optional<at::Tensor> if_defined(const at::Tensor& tensor) {
  return tensor.defined() ? std::optional<at::Tensor>(tensor) : std::nullopt;
}

// Saved tensors, in save order.
enum Saved : size_t { kH, kWeight, kGradLogits, kColTask, kTaskWeights, kLosses };

class MultiTaskLossFunction : public torch::autograd::Function<MultiTaskLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& task_weights,
                               const std::optional<at::Tensor>& col_weight, const at::Tensor& col_task,
                               const CallArgs& args) {
    // Below autograd: this Function is the op's autograd here (the one registered in Python would run otherwise).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const TaskSpec& spec = args.spec;
    auto [total, losses, grad_logits, logits] =
        forward_op().call(h, weight, bias, args.targets.tensors, task_weights, col_weight, col_task,
                          args.targets.kinds, spec.col_offsets, spec.class_dims, spec.ignore_index, spec.params,
                          spec.names, args.return_logits);
    ctx->save_for_backward({h, weight, grad_logits, col_task, task_weights, losses});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    if (logits.numel() == 0) {
      ctx->mark_non_differentiable({grad_logits, logits});
    } else {
      ctx->mark_non_differentiable({grad_logits});
    }
    ctx->set_materialize_grads(false);  // an unused output must not cost a tensor of zeros
    return {total, losses, grad_logits, logits};
  }

  // grads: total, losses, grad_logits (not differentiable), logits; any may be undefined (unused).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor& grad_total = grads[0];
    // Without create_graph the backward op is not recorded: skip its autograd key (a not-implemented fallback
    // that inspects every input) as the forward does.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) {
      below_autograd.emplace();
    }
    auto [grad_h, grad_weight, grad_bias] =
        backward_op().call(if_defined(grad_total), if_defined(grads[1]), saved[kTaskWeights], if_defined(grads[3]),
                           saved[kGradLogits], saved[kH], saved[kWeight], saved[kColTask], has_bias);
    // dTotal/dλ = L. needs_input_grad counts tensor inputs only: h, weight, [bias], task_weights.
    const size_t task_weights_edge = has_bias ? 3 : 2;
    at::Tensor grad_task_weights;
    if (grad_total.defined() && ctx->needs_input_grad(task_weights_edge)) {
      grad_task_weights = grad_total.mul(saved[kLosses]).to(saved[kTaskWeights].scalar_type());
    }
    // One entry per forward argument: h, weight, bias, task_weights, col_weight, col_task, args.
    return {grad_h, grad_weight, has_bias ? grad_bias : at::Tensor(), grad_task_weights,
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// (total, losses, grad_logits, logits, present) with present None when every task has a target, else a tuple
// of bools; None when the targets need the Python path.
py::object multi_task_loss_eager(const TaskSpec& spec, const at::Tensor& h, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, py::handle targets,
                                 const at::Tensor& task_weights, const std::optional<at::Tensor>& col_weight,
                                 const at::Tensor& col_task, bool return_logits) {
  HANDLE_TH_ERRORS
  GatheredTargets gathered;
  if (!gather_targets(spec, targets, gathered)) {
    return py::none();
  }
  variable_list outputs;
  {
    py::gil_scoped_release no_gil;
    outputs = MultiTaskLossFunction::apply(h, weight, bias, task_weights, col_weight, col_task,
                                           CallArgs{spec, gathered, return_logits});
  }
  py::object present = py::none();
  if (!gathered.all_present) {
    py::tuple flags(gathered.kinds.size());
    for (size_t t = 0; t < gathered.kinds.size(); ++t) {
      flags[t] = py::bool_(gathered.kinds[t] != kNone);
    }
    present = std::move(flags);
  }
  return py::make_tuple(outputs[0], outputs[1], outputs[2], outputs[3], present);
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

void bind_eager_autograd(py::module_& module) {
  py::class_<TaskSpec>(module, "TaskSpec",
                       "The per-layout list arguments of torch.ops.mtlfast.multi_task_loss, converted once.")
      .def(py::init([](std::vector<int64_t> kinds, std::vector<int64_t> col_offsets, std::vector<int64_t> class_dims,
                       std::vector<int64_t> ignore_index, std::vector<double> params,
                       std::vector<std::string> names) {
             std::vector<py::str> py_names(names.begin(), names.end());
             return TaskSpec{std::move(kinds),  std::move(col_offsets), std::move(class_dims),
                             std::move(ignore_index), std::move(params), std::move(names), std::move(py_names)};
           }),
           py::arg("kinds"), py::arg("col_offsets"), py::arg("class_dims"), py::arg("ignore_index"),
           py::arg("params"), py::arg("task_names"));
  module.def("multi_task_loss_eager", &multi_task_loss_eager, py::arg("spec"), py::arg("h"), py::arg("weight"),
             py::arg("bias"), py::arg("targets"), py::arg("task_weights"), py::arg("col_weight"),
             py::arg("col_task"), py::arg("return_logits"),
             "torch.ops.mtlfast.multi_task_loss(h, weight, bias, targets, task_weights, col_weight, col_task, "
             "*spec, return_logits) with its autograd in C++ (eager mode only); targets: a dict by task name or a "
             "list in task order (None: absent). Returns (total, losses, grad_logits, logits, present), present "
             "None when every task has a target; None when the targets need the Python path.");
}

}  // namespace mtlfast
