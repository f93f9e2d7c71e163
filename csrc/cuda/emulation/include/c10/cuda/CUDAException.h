// Emulation build only (mtlfast_cuda_emulation.h): a failed emulated launch raises with the emulator's message.
#pragma once

#include <c10/util/Exception.h>

#include "mtlfast_cuda_emulation.h"

#define C10_CUDA_CHECK(EXPR)                                                                                   \
  do {                                                                                                         \
    const cudaError_t mtlfast_emulated_error = (EXPR);                                                         \
    TORCH_CHECK(mtlfast_emulated_error == cudaSuccess, "CUDA error (emulated): ",                              \
                cudaGetErrorString(mtlfast_emulated_error), ": ", ::mtlfast::emulation::last_error_message()); \
  } while (0)
