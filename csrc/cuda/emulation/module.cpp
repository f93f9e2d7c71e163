// mtlfast._cuda_emulation: importing it puts the CUDA backend (csrc/cuda/*.cpp glue and the *.cu kernels, run by
// the emulator of mtlfast_cuda_emulation.h) in place of the CPU kernels of the mtlfast ops, for the rest of the
// process. Test-only (tests/test_cuda_emulation.py): on a machine without a GPU, the CPU test suite then runs the
// CUDA kernels' code on CPU tensors.
#include <Python.h>

#include <cstring>
#include <string>
#include <utility>

#include "mtlfast_cuda_emulation.h"
#include "selftest_kernels.h"

namespace mtlfast {
namespace {

// Looks `name` up in a table of {name, value} pairs; sets a ValueError listing the names when it is not there.
template <typename Value, std::size_t N>
bool lookup(const std::pair<const char*, Value> (&table)[N], const char* name, const char* what, Value* out) {
  std::string names;
  for (const auto& [key, value] : table) {
    if (std::strcmp(key, name) == 0) {
      *out = value;
      return true;
    }
    names += names.empty() ? key : std::string(", ") + key;
  }
  PyErr_Format(PyExc_ValueError, "unknown %s '%s' (one of: %s)", what, name, names.c_str());
  return false;
}

const std::pair<const char*, emulation::ThreadOrder> kThreadOrders[] = {
    {"forward", emulation::ThreadOrder::kForward},
    {"reverse", emulation::ThreadOrder::kReverse},
    {"shuffled", emulation::ThreadOrder::kShuffled},
    {"warps_forward", emulation::ThreadOrder::kWarpsForward},
    {"warps_reverse", emulation::ThreadOrder::kWarpsReverse},
};

const std::pair<const char*, emulation::Selftest> kSelftests[] = {
    {"block_sum", emulation::Selftest::kBlockSum},
    {"block_sum_without_barrier", emulation::Selftest::kBlockSumWithoutBarrier},
    {"two_sums", emulation::Selftest::kTwoSums},
    {"two_sums_without_trailing_barrier", emulation::Selftest::kTwoSumsWithoutTrailingBarrier},
    {"divergent_barrier", emulation::Selftest::kDivergentBarrier},
    {"shuffle_after_exit", emulation::Selftest::kShuffleAfterExit},
    {"deadlock", emulation::Selftest::kDeadlock},
};

PyObject* set_thread_order(PyObject*, PyObject* args) {
  const char* name = nullptr;
  unsigned long long seed = 0;
  emulation::ThreadOrder order;
  if (!PyArg_ParseTuple(args, "s|K", &name, &seed) || !lookup(kThreadOrders, name, "thread order", &order)) {
    return nullptr;
  }
  emulation::set_thread_order(order, seed);
  Py_RETURN_NONE;
}

PyObject* launches(PyObject*, PyObject*) { return PyLong_FromLongLong(emulation::launches()); }

// selftest(name, values) -> list[float]: runs a self-test kernel on the 256 values; RuntimeError when the launch
// failed (the emulator's message).
PyObject* selftest(PyObject*, PyObject* args) {
  const char* name = nullptr;
  PyObject* values = nullptr;
  emulation::Selftest kernel;
  if (!PyArg_ParseTuple(args, "sO", &name, &values) || !lookup(kSelftests, name, "self-test", &kernel)) {
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
