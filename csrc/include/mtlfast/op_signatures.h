// The C++ signatures of the kernels of multi_task_loss and multi_task_loss_backward (csrc/cpu, csrc/cuda), which are
// also the signatures of the typed dispatcher handles that call them from csrc/eager_autograd.cpp. Each kernel
// static_asserts its type against these: a kernel whose parameters drift fails to compile (the CUDA glue included,
// which CI compiles but cannot run) instead of at its first eager call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace mtlfast {

using MultiTaskLossKernel = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::TensorList targets,
    const at::Tensor& task_weights, const std::optional<at::Tensor>& col_weight, const at::Tensor& col_task,
    c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims, c10::IntArrayRef ignore_index,
    c10::ArrayRef<double> params, const std::vector<std::string>& task_names, bool return_logits);

using MultiTaskLossBackwardKernel = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>& grad_total, const std::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const std::optional<at::Tensor>& grad_logits_output, const at::Tensor& grad_logits,
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& col_task, bool has_bias);

}  // namespace mtlfast
