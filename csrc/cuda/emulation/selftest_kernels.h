// The emulator's self-test kernels (selftest_kernels.cu). `in` and `out` hold 256 floats.
#pragma once

#include <cuda_runtime_api.h>

namespace mtlfast {
namespace emulation {

enum class Selftest {
  kBlockSum,
  kBlockSumWithoutBarrier,
  kTwoSums,
  kTwoSumsWithoutTrailingBarrier,
  kDivergentBarrier,
  kShuffleAfterExit,
  kDeadlock,
};

cudaError_t launch_selftest(Selftest which, const float* in, float* out);

}  // namespace emulation
}  // namespace mtlfast
