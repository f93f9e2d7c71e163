// A CPU emulation of the part of the CUDA programming model mtlfast's kernels use, so that the very source of
// csrc/cuda/*.cu (compiled by the host compiler) runs in the test suite on machines without a GPU.
//
// Every CUDA thread of a block is a fiber (its own stack) on one OS thread; a block's fibers run cooperatively and
// switch only at the collective operations (__syncthreads, warp shuffles / votes), which then really wait for the
// threads they synchronise. Kernels launch synchronously, block after block. What this checks that a sequential
// loop over threads could not: reductions through shared memory and warp shuffles, barrier placement (a missing
// __syncthreads shows up as a wrong result under one of the thread orders, see set_thread_order), barriers not
// reached by every thread and shuffles with exited lanes (reported as launch errors instead of hanging), and
// all the index arithmetic of the grid decomposition. What it cannot check: real concurrency (the memory model,
// races between blocks), timing, and the device's own math library (the host's libm runs instead).
//
// Included in place of <cuda_runtime.h>, <cuda_runtime_api.h>, <cuda_fp16.h> and <cuda_bf16.h> by the shim headers
// beside this one; only the emulation build (CMake option MTLFAST_CUDA_EMULATION) puts them on the include path.
#pragma once

#include <math.h>  // the global float overloads (::exp(float), ...) that CUDA's headers provide in device code

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
// One copy per block: blocks of a launch run one after the other on one OS thread, so a function-local static
// (per OS thread) is shared by exactly the fibers of the running block.
#define __shared__ static thread_local

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

using cudaStream_t = struct CUstream_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace mtlfast {
namespace emulation {

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The emulated thread running now (valid inside a kernel only).
const ThreadState& current_thread();

// Blocks until every live lane of the calling thread's warp has deposited its `size` (≤ 8) bytes; returns the 32
// deposits, 8 bytes apart, by lane. `mask` must name every lane of the warp (the kernels only use full masks).
const unsigned char* warp_exchange(unsigned mask, const void* value, std::size_t size);

// __syncthreads: waits for every live thread of the block. `site` tells the barriers apart: threads waiting at
// different __syncthreads (divergent barriers, undefined on a GPU) make the launch fail.
void sync_threads(const char* site);

// Runs `body(context)` as every thread of every block of the grid (blocks one after the other, in an order that
// follows set_thread_order); returns cudaSuccess or the first error.
cudaError_t run_grid(dim3 grid, dim3 block, void (*body)(void*), void* context);

// Order in which the fibers of a block are resumed: kernels must give the same results whichever it is. kForward /
// kReverse / kShuffled resume every runnable thread once per round; kWarpsForward / kWarpsReverse run one warp as
// far as it gets before the next (warps taken in ascending / descending order).
enum class ThreadOrder { kForward, kReverse, kShuffled, kWarpsForward, kWarpsReverse };
void set_thread_order(ThreadOrder order, std::uint64_t seed);

// Launches of the kernels run and whether one failed since the last reset (for the tests).
std::int64_t launches();
const char* last_error_message();

template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), dim3 grid, dim3 block) : kernel_(kernel), grid_(grid), block_(block) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    struct Context {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;
    };
    Context context{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_grid(grid_, block_, &Launch::invoke<Context>, &context);
  }

 private:
  template <typename Context>
  static void invoke(void* raw) {
    Context& context = *static_cast<Context*>(raw);
    std::apply(context.kernel, context.params);  // each thread gets its own copies of the parameters
  }

  void (*kernel_)(Params...);
  dim3 grid_;
  dim3 block_;
};

// What `kernel<<<grid, block, shared_bytes, stream>>>(args...)` becomes in the translated sources
// (translate_launches.cmake). Dynamic shared memory is not emulated.
template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes = 0,
                         cudaStream_t stream = nullptr) {
  (void)stream;
  if (shared_bytes != 0) {
    grid = dim3(0, 0, 0);  // run_grid reports an invalid configuration
  }
  return Launch<Params...>(kernel, grid, block);
}

inline int lane_id() {
  const ThreadState& t = current_thread();
  const unsigned linear = t.thread_idx.x + t.block_dim.x * (t.thread_idx.y + t.block_dim.y * t.thread_idx.z);
  return static_cast<int>(linear % 32);
}

}  // namespace emulation
}  // namespace mtlfast

#define threadIdx (::mtlfast::emulation::current_thread().thread_idx)
#define blockIdx (::mtlfast::emulation::current_thread().block_idx)
#define blockDim (::mtlfast::emulation::current_thread().block_dim)
#define gridDim (::mtlfast::emulation::current_thread().grid_dim)
#define warpSize 32

#define MTLFAST_EMULATION_STRINGIFY2(x) #x
#define MTLFAST_EMULATION_STRINGIFY(x) MTLFAST_EMULATION_STRINGIFY2(x)
#define __syncthreads() ::mtlfast::emulation::sync_threads(__FILE__ ":" MTLFAST_EMULATION_STRINGIFY(__LINE__))

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  const unsigned char* lanes = ::mtlfast::emulation::warp_exchange(mask, &value, sizeof(T));
  const int lane = ::mtlfast::emulation::lane_id();
  int source = lane ^ lane_mask;
  if (source / width > lane / width) {  // CUDA: a later group of `width` lanes returns the caller's own value
    source = lane;
  }
  T result;
  std::memcpy(&result, lanes + 8 * source, sizeof(T));
  return result;
}

inline int __any_sync(unsigned mask, int predicate) {
  const unsigned char* lanes = ::mtlfast::emulation::warp_exchange(mask, &predicate, sizeof(int));
  int any = 0;
  for (int lane = 0; lane < 32; ++lane) {
    int value;
    std::memcpy(&value, lanes + 8 * lane, sizeof(int));
    any |= (mask >> lane) & 1u ? (value != 0) : 0;
  }
  return any;
}

inline int __all_sync(unsigned mask, int predicate) { return !__any_sync(mask, !predicate); }

// Round-to-nearest products that CUDA guarantees never to contract into an FMA (the emulation build compiles
// with -ffp-contract=off, so a plain product is one).
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// fp16 through the compiler's IEEE binary16 (_Float16: round to nearest even, subnormals, inf / NaN).
struct __half {
  _Float16 value;
};
inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }

// bfloat16: the upper half of a float, rounded to nearest even (NaN stays a quiet NaN).
struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = std::uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (std::isnan(f)) {
    return __nv_bfloat16{static_cast<std::uint16_t>((u >> 16) | 0x0040u)};
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<std::uint16_t>(u >> 16)};
}
