// Build facts baked in by CMakeLists.txt, exposed by the pybind11 module (`python -m mtlfast info`).
#pragma once

#ifndef MTLFAST_VERSION
#define MTLFAST_VERSION "0.0.0+unknown"
#endif
#ifndef MTLFAST_CUDA_ARCHS
#define MTLFAST_CUDA_ARCHS ""
#endif

namespace mtlfast {
#ifdef MTLFAST_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif
#ifdef _OPENMP
constexpr bool kBuiltWithOpenMP = true;
#else
constexpr bool kBuiltWithOpenMP = false;
#endif
}  // namespace mtlfast
