// Emulation build only (mtlfast_cuda_emulation.h): kernels launch synchronously; the stream is a null handle.
#pragma once

#include <c10/core/Device.h>

#include "mtlfast_cuda_emulation.h"

namespace c10 {
namespace cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
