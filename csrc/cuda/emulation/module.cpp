// mtlfast._cuda_emulation: importing it puts the CUDA backend (csrc/cuda/*.cpp glue and the *.cu kernels, run by
// the emulator of mtlfast_cuda_emulation.h) in place of the CPU kernels of the mtlfast ops, for the rest of the
// process. Test-only (tests/test_cuda_emulation.py): on a machine without a GPU, the CPU test suite then runs the
// CUDA kernels' code on CPU tensors.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "mtlfast/op_signatures.h"
#include "mtlfast_cuda_emulation.h"
#include "selftest_kernels.h"

namespace mtlfast {
namespace {

// On CUDA the backward is the CompositeExplicitAutograd implementation (csrc/multi_task_loss_backward.cpp); the
// CPU has a kernel of its own, which would hide it. Send CPU calls to the composite one, as CUDA calls go.
std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_backward(
    const std::optional<at::Tensor>& grad_total, const std::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const std::optional<at::Tensor>& grad_logits_output, const at::Tensor& grad_logits,
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& col_task, bool has_bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mtlfast::multi_task_loss_backward", "")
                             .typed<MultiTaskLossBackwardKernel>();
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CompositeExplicitAutograd), grad_total, grad_losses,
                       task_weights, grad_logits_output, grad_logits, h, weight, col_task, has_bias);
}

static_assert(std::is_same_v<decltype(composite_backward), MultiTaskLossBackwardKernel>);

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) { m.impl("multi_task_loss_backward", &composite_backward); }

PyObject* set_thread_order(PyObject*, PyObject* args) {
  const char* name = nullptr;
  unsigned long long seed = 0;
  if (!PyArg_ParseTuple(args, "s|K", &name, &seed)) {
    return nullptr;
  }
  const std::string order(name);
  if (order == "forward") {
    emulation::set_thread_order(emulation::ThreadOrder::kForward, seed);
  } else if (order == "reverse") {
    emulation::set_thread_order(emulation::ThreadOrder::kReverse, seed);
  } else if (order == "shuffled") {
    emulation::set_thread_order(emulation::ThreadOrder::kShuffled, seed);
  } else if (order == "warps_forward") {
    emulation::set_thread_order(emulation::ThreadOrder::kWarpsForward, seed);
  } else if (order == "warps_reverse") {
    emulation::set_thread_order(emulation::ThreadOrder::kWarpsReverse, seed);
  } else {
    PyErr_Format(PyExc_ValueError,
                 "thread order must be 'forward', 'reverse', 'shuffled', 'warps_forward' or 'warps_reverse', got %R",
                 PyTuple_GET_ITEM(args, 0));
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* launches(PyObject*, PyObject*) { return PyLong_FromLongLong(emulation::launches()); }

// selftest(name, values) -> list[float]: runs a self-test kernel on the 256 values; RuntimeError when the launch
// failed (the emulator's message).
PyObject* selftest(PyObject*, PyObject* args) {
  const char* name = nullptr;
  PyObject* values = nullptr;
  if (!PyArg_ParseTuple(args, "sO", &name, &values)) {
    return nullptr;
  }
  const std::string which(name);
  emulation::Selftest kernel;
  if (which == "block_sum") {
    kernel = emulation::Selftest::kBlockSum;
  } else if (which == "block_sum_without_barrier") {
    kernel = emulation::Selftest::kBlockSumWithoutBarrier;
  } else if (which == "divergent_barrier") {
    kernel = emulation::Selftest::kDivergentBarrier;
  } else if (which == "shuffle_after_exit") {
    kernel = emulation::Selftest::kShuffleAfterExit;
  } else if (which == "deadlock") {
    kernel = emulation::Selftest::kDeadlock;
  } else if (which == "two_sums") {
    kernel = emulation::Selftest::kTwoSums;
  } else if (which == "two_sums_without_trailing_barrier") {
    kernel = emulation::Selftest::kTwoSumsWithoutTrailingBarrier;
  } else {
    PyErr_Format(PyExc_ValueError, "unknown self-test %s", name);
    return nullptr;
  }
  float in[256] = {};
  float out[256] = {};
  PyObject* sequence = PySequence_Fast(values, "values must be a sequence of 256 floats");
  if (sequence == nullptr) {
    return nullptr;
  }
  if (PySequence_Fast_GET_SIZE(sequence) != 256) {
    Py_DECREF(sequence);
    PyErr_SetString(PyExc_ValueError, "values must be a sequence of 256 floats");
    return nullptr;
  }
  for (int i = 0; i < 256; ++i) {
    in[i] = static_cast<float>(PyFloat_AsDouble(PySequence_Fast_GET_ITEM(sequence, i)));
  }
  Py_DECREF(sequence);
  if (PyErr_Occurred()) {
    return nullptr;
  }
  if (emulation::launch_selftest(kernel, in, out) != cudaSuccess) {
    PyErr_SetString(PyExc_RuntimeError, emulation::last_error_message());
    return nullptr;
  }
  PyObject* result = PyList_New(256);
  for (int i = 0; i < 256; ++i) {
    PyList_SET_ITEM(result, i, PyFloat_FromDouble(out[i]));
  }
  return result;
}

PyMethodDef methods[] = {
    {"selftest", selftest, METH_VARARGS,
     "selftest(name, values) -> list[float]: runs one of the emulator's self-test kernels (block_sum, "
     "block_sum_without_barrier, two_sums, two_sums_without_trailing_barrier, divergent_barrier, shuffle_after_exit, deadlock) "
     "on 256 floats."},
    {"set_thread_order", set_thread_order, METH_VARARGS,
     "set_thread_order(order: 'forward' | 'reverse' | 'shuffled' | 'warps_forward' | 'warps_reverse', seed: int = 0): "
     "the order in which the emulator resumes the threads of a block (results must not depend on it)."},
    {"launches", launches, METH_NOARGS, "launches() -> int: emulated kernel launches so far (this thread)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_emulation",
                          "The CUDA backend of mtlfast emulated on the CPU (tests only).", -1, methods};

}  // namespace
}  // namespace mtlfast

PyMODINIT_FUNC PyInit__cuda_emulation() { return PyModule_Create(&mtlfast::module_def); }
