// Input checks shared by the CPU and CUDA glue of the Gram solvers (torch headers allowed: not for .cu files).
#pragma once

#include <ATen/ATen.h>

namespace mtlfast {

inline void check_gram_problem(const at::Tensor& gram, const at::Tensor* orders, const char* op) {
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1) && gram.size(0) > 0, "mtlfast: ", op,
                    ": the Gram matrix must be (T, T) with T >= 1, got ", gram.sizes());
  TORCH_CHECK_TYPE(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble, "mtlfast: ", op,
                   ": the Gram matrix must be float32 or float64, got ", gram.scalar_type());
  if (orders != nullptr) {
    TORCH_CHECK_VALUE(orders->sizes() == gram.sizes(), "mtlfast: ", op, ": orders must be (T, T) like the Gram "
                      "matrix ", gram.sizes(), ", got ", orders->sizes());
    TORCH_CHECK_TYPE(orders->scalar_type() == at::kLong, "mtlfast: ", op, ": orders must be int64, got ",
                     orders->scalar_type());
    TORCH_CHECK_VALUE(orders->device() == gram.device(), "mtlfast: ", op, ": orders are on ", orders->device(),
                      " but the Gram matrix is on ", gram.device());
  }
}

}  // namespace mtlfast
