// The dtypes a target may come in that the backends convert to the kernel layout themselves, in one pass for all
// tasks (host loops on the CPU, one launch on CUDA: plan_kernel_targets); a target in any other dtype goes through
// Tensor.to. Free of torch headers: the CUDA kernels read it.
#pragma once

#include <cstdint>

namespace mtlfast {

enum class TargetSourceDType : int32_t {
  kBool, kUInt8, kInt8, kInt16, kInt32, kInt64, kHalf, kBFloat16, kFloat, kDouble
};

}  // namespace mtlfast
