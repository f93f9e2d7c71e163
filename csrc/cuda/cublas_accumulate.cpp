#include "cublas_accumulate.h"

#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>

#include <algorithm>
#include <limits>

#include "mtlfast/recompute_backward.h"

namespace mtlfast::cuda {
namespace {

// The rows of m are contiguous (unit column stride) and its row stride is a valid cuBLAS leading dimension.
bool row_major(const at::Tensor& m) {
  return m.dim() == 2 && (m.stride(1) == 1 || m.size(1) <= 1) && m.stride(0) >= std::max<int64_t>(1, m.size(1));
}

cudaDataType_t cublas_type(at::ScalarType type) {
  return type == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
}

}  // namespace

void gemm_to_accumulator_cublas(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const at::ScalarType in_type = a.scalar_type();
  const bool half_inputs = (in_type == at::kHalf || in_type == at::kBFloat16) && b.scalar_type() == in_type;
  const int64_t limit = std::numeric_limits<int>::max();
  if (!half_inputs || out.scalar_type() != at::kFloat || !row_major(out) || !row_major(a) || !row_major(b) ||
      std::max({out.size(0), out.size(1), a.size(1), out.stride(0), a.stride(0), b.stride(0)}) > limit) {
    gemm_to_accumulator(out, a, b, accumulate);
    return;
  }
  TORCH_CHECK(a.size(0) == out.size(0) && b.size(1) == out.size(1) && a.size(1) == b.size(0),
              "mtlfast: gemm_to_accumulator_cublas shapes ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes());
  if (out.numel() == 0) {
    return;
  }
  if (a.size(1) == 0) {
    if (!accumulate) {
      out.zero_();
    }
    return;
  }
  // Row-major out (N, M) = a (N, K) @ b (K, M) is column-major outᵀ (M, N) = bᵀ (M, K) · aᵀ (K, N): the row-major
  // buffers read as column-major matrices are exactly bᵀ and aᵀ, so no transposition flags.
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const cublasStatus_t status = cublasGemmEx(
      handle, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(out.size(1)), static_cast<int>(out.size(0)),
      static_cast<int>(a.size(1)), &alpha, b.const_data_ptr(), cublas_type(in_type), static_cast<int>(b.stride(0)),
      a.const_data_ptr(), cublas_type(in_type), static_cast<int>(a.stride(0)), &beta, out.mutable_data_ptr(),
      CUDA_R_32F, static_cast<int>(out.stride(0)), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "mtlfast: cublasGemmEx failed: ", cublasGetStatusString(status));
}

}  // namespace mtlfast::cuda
