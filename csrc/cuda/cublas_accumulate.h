// out (fp32) = a @ b or out += a @ b for half / bf16 a, b, through cublasGemmEx on the handle torch set up for the
// current stream (its persistent workspace). Why not ATen's out_dtype GEMM: with torch 2.11 on an H100 that path
// allocated a fresh 32 MiB cuBLASLt workspace from the caching allocator on every call (seen in a memory snapshot
// of the large-head backward: 32 of its 118.8 MiB peak), which alone breaks the large head's memory budget.
#pragma once

#include <ATen/ATen.h>

namespace mtlfast::cuda {

// Same contract as mtlfast::gemm_to_accumulator (which it falls back to for anything but half / bf16 inputs with
// an fp32 out whose rows are contiguous).
void gemm_to_accumulator_cublas(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

}  // namespace mtlfast::cuda
