// CUDA kernels of the fused multi-task loss; the pipeline and buffer layouts are described in
// multi_task_loss_kernels.h. No torch headers here: they would multiply this file's compile time (shared/BUILD.md).
//
// Work decomposition of the segmented loss pass (one read of the logits, gradient written in place):
//   * segments of width C ≤ kMaxWarpSegmentWidth: a group of G = min(32, next_pow2(C)) lanes per row, so a
//     warp handles 32/G rows of one task (64 binary heads: 32 rows per warp; 5-class heads: 4 rows per warp);
//     the flattened grid assigns every task exactly the warps it needs (no idle blocks for narrow tasks);
//   * wider segments (a 32k-class head): a block per (row, task), 16-byte vector accesses, an online
//     max / Σexp pass followed by a pass writing the gradients.
// Each warp (small segments) or block (wide ones) writes the loss of its rows to its own slot of the loss
// partials, and every reduction (lane groups, warps, blocks, partial slots) runs in a fixed order.
// Distillation rows follow the cross-entropy structure: a pass gathering the row's softmax statistics (of the
// student, and of the teacher or its probability mass) reduced over the lane group / block, then a pass writing
// the gradients.
#include "multi_task_loss_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "mtlfast/loss_math.h"

namespace mtlfast {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kWarpKernelThreads = 256;
// An 85-register budget: with none, ptxas (sm_90) settles on 40 registers and spills in the fp32 kernel.
constexpr int kWarpKernelMinBlocks = 3;
constexpr int kRowKernelThreads = 256;
constexpr int kRowKernelWarps = kRowKernelThreads / kWarpSize;
constexpr int kDenominatorThreads = 256;
constexpr int kDenominatorWarps = kDenominatorThreads / kWarpSize;
// A finalize block sums up to N partials (one per row for wide tasks): enough threads for few loads each.
constexpr int kFinalizeThreads = 1024;
constexpr int kFinalizeWarps = kFinalizeThreads / kWarpSize;
constexpr int kGradientThreads = 256;
constexpr int kScaleThreads = 256;
constexpr int kPackThreads = 256;
constexpr int64_t kMaxPackBlocksPerTask = 256;
// Enough blocks to fill the device for the (small-head) sizes this kernel sees; larger ones loop.
constexpr int64_t kMaxScaleBlocks = 4096;
// The bias-gradient variant of the scale kernel: a block is a tile of 32 head columns (one per lane, so each thread
// keeps one coefficient and one running sum) times kBiasRowLanes row lanes, over one slab of rows.
constexpr int kBiasRowLanes = 32;  // 8 lanes left S1's backward (256 rows, 2 tiles) latency-bound: 8.5 us on an H100
constexpr int64_t kMinRowsPerBiasSlab = 256;
constexpr int64_t kMaxBiasSlabs = 128;
constexpr int64_t kMaxBiasPartials = int64_t(1) << 20;  // slabs · cols: the partials stay ≤ 4 MiB in fp32
constexpr int64_t kMinRowsPerDenominatorSlot = 128;
// Targets all warps of a task read together when they count its denominator themselves (segment_counts_denominators):
// 64 tasks of 256 binary rows read 2048 each (8 per lane), 512 rows 8192.
constexpr int64_t kMaxCountedDenominatorReads = 16384;

// ---------------------------------------------------------------------------------------------------------------
// Types

template <typename scalar_t>
struct ScalarTraits;

template <>
struct ScalarTraits<float> {
  using acc_t = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};

template <>
struct ScalarTraits<double> {
  using acc_t = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

template <>
struct ScalarTraits<__half> {
  using acc_t = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};

template <>
struct ScalarTraits<__nv_bfloat16> {
  using acc_t = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

// A target value as the accumulation type (a target stored in the input dtype, or already in the accumulation one).
template <typename stored_t>
__device__ __forceinline__ typename ScalarTraits<stored_t>::acc_t widen(stored_t v) {
  return ScalarTraits<stored_t>::to_acc(v);
}

// A task's dense targets from element `offset` on (row-major (N, width)), read as the accumulation type whichever
// dtype TaskMeta::dense_target_dtype says they are stored in: a branch per element, for scalar loops.
template <typename scalar_t>
struct DenseTargets {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  const void* base;     // element 0 of this view
  bool in_input_dtype;  // scalar_t, else acc_t

  __device__ __forceinline__ DenseTargets(const TaskMeta& task, int64_t offset)
      : base(task.dense_target_dtype == DenseTargetDType::kInput
                 ? static_cast<const void*>(static_cast<const scalar_t*>(task.target) + offset)
                 : static_cast<const void*>(static_cast<const acc_t*>(task.target) + offset)),
        in_input_dtype(task.dense_target_dtype == DenseTargetDType::kInput) {}

  __device__ __forceinline__ acc_t operator[](int64_t i) const {
    return in_input_dtype ? widen(static_cast<const scalar_t*>(base)[i]) : static_cast<const acc_t*>(base)[i];
  }
};

// visit(y) with y a typed pointer to the same targets (const scalar_t* or const acc_t*; read them with widen): one
// branch per call, for the 16-byte packed visits, where a branch per element made ptxas spill (sm_90, bf16).
template <typename scalar_t, typename Visit>
__device__ __forceinline__ void with_dense_targets(const TaskMeta& task, int64_t offset, Visit visit) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  if (task.dense_target_dtype == DenseTargetDType::kInput) {
    visit(static_cast<const scalar_t*>(task.target) + offset);
  } else {
    visit(static_cast<const acc_t*>(task.target) + offset);
  }
}

// Finite stand-in for -inf as the initial running max: exp(lowest - v) is 0, never exp(-inf + inf) = NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t lowest();
template <>
__device__ __forceinline__ float lowest<float>() { return -FLT_MAX; }
template <>
__device__ __forceinline__ double lowest<double>() { return -DBL_MAX; }

// Products that the compiler may not contract into an FMA: a·b + c·d then rounds the same way whichever operand
// order two lanes of a butterfly use, so all lanes end with bitwise identical statistics.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

__host__ __device__ __forceinline__ int group_width(int64_t width) {
  int lanes = 1;
  while (lanes < width && lanes < kWarpSize) {
    lanes <<= 1;
  }
  return lanes;
}

// Rows covered by one loss partial slot: a warp's rows for narrow segments, one row for wide ones.
__host__ __device__ __forceinline__ int rows_per_loss_part(int64_t width) {
  return width > kMaxWarpSegmentWidth ? 1 : kWarpSize / group_width(width);
}

// Loss partial slots of a task of `width` columns over `rows` rows (one per warp of the warp kernel for narrow ones).
__host__ __device__ __forceinline__ int64_t loss_part_count(int64_t rows, int64_t width) {
  return (rows + rows_per_loss_part(width) - 1) / rows_per_loss_part(width);
}

// Running softmax statistics of one cross-entropy row (or of the part of it one thread has seen).
template <typename acc_t>
struct SoftmaxStats {
  acc_t max;       // running max of the logits
  acc_t sum_exp;   // Σ exp(z_c - max)
  acc_t target;    // z_y, contributed by the thread that owns column y
  acc_t weighted;  // Σ w_c z_c (label smoothing only)
  acc_t weights;   // Σ w_c     (label smoothing with class weights only)

  __device__ __forceinline__ void add_logit(acc_t z) {
    if (z > max) {
      sum_exp = sum_exp * ::exp(max - z) + acc_t(1);
      max = z;
    } else {
      sum_exp += ::exp(z - max);
    }
  }
};

template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> empty_stats() {
  return {lowest<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// Reduction operators (functors, so the reductions below inline them).
struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct CombineStats {
  template <typename acc_t>
  __device__ __forceinline__ SoftmaxStats<acc_t> operator()(const SoftmaxStats<acc_t>& a,
                                                            const SoftmaxStats<acc_t>& b) const {
    const acc_t m = ::fmax(a.max, b.max);
    return {m, mul_rn(a.sum_exp, ::exp(a.max - m)) + mul_rn(b.sum_exp, ::exp(b.max - m)), a.target + b.target,
            a.weighted + b.weighted, a.weights + b.weights};
  }
};

template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> shfl_xor(const SoftmaxStats<acc_t>& s, int offset) {
  return {__shfl_xor_sync(kFullMask, s.max, offset), __shfl_xor_sync(kFullMask, s.sum_exp, offset),
          __shfl_xor_sync(kFullMask, s.target, offset), __shfl_xor_sync(kFullMask, s.weighted, offset),
          __shfl_xor_sync(kFullMask, s.weights, offset)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t shfl_xor(acc_t v, int offset) {
  return __shfl_xor_sync(kFullMask, v, offset);
}

// Butterfly over aligned groups of `lanes` lanes (a power of two): every lane of a group ends with the same value.
// All 32 lanes must call it.
template <typename T, typename Op>
__device__ __forceinline__ T group_all_reduce(T v, int lanes, Op op) {
  for (int offset = 1; offset < lanes; offset <<= 1) {
    v = op(v, shfl_xor(v, offset));
  }
  return v;
}

// All threads of the block get the same value; warp results are combined in warp order. `scratch` holds one
// value per warp. All threads must call it.
template <int kWarps, typename T, typename Op>
__device__ __forceinline__ T block_all_reduce(T v, Op op, T* scratch) {
  v = group_all_reduce(v, kWarpSize, op);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    scratch[warp] = v;
  }
  __syncthreads();
  T result = scratch[0];
  for (int w = 1; w < kWarps; ++w) {
    result = op(result, scratch[w]);
  }
  __syncthreads();  // scratch may be reused right after
  return result;
}

// 1 / (the task's denominator), or 0 when it has no valid entry. Reduces the denominator partials with one warp
// in a fixed order; every caller (loss pass, finalize) therefore sees bitwise the same denominator.
template <typename acc_t>
__device__ __forceinline__ acc_t inverse_denominator(const void* parts, int32_t slots, int32_t task_index) {
  const int lane = threadIdx.x % kWarpSize;
  const acc_t* task_parts = static_cast<const acc_t*>(parts) + int64_t(task_index) * kMaxDenominatorSlots;
  const acc_t v = lane < slots ? task_parts[lane] : acc_t(0);
  return safe_reciprocal(group_all_reduce(v, kWarpSize, Sum{}));
}

// The calling thread's share of a task's denominator over rows [begin, end): cross-entropy Σ class weight of the
// valid class indices (or their count), distillation the rows without a NaN target, element-wise kinds the non-NaN
// targets. Per-element loops are strided over `threads` threads (this one is `thread`); distillation rows go to the
// `warps` warps (this thread's is `warp`), lanes along the row. The caller sums the shares over the threads; all
// lanes of each warp must call it.
template <typename scalar_t, typename acc_t = typename ScalarTraits<scalar_t>::acc_t>
__device__ __forceinline__ acc_t denominator_share(const TaskMeta& task, int64_t begin, int64_t end,
                                                   const acc_t* col_weight, int thread, int threads, int warp,
                                                   int warps) {
  acc_t weight_sum = acc_t(0);
  int64_t count = 0;  // exact; converted once
  if (task.kind == kCrossEntropy) {
    const int64_t* y = static_cast<const int64_t*>(task.target);
    const acc_t* class_weight = col_weight != nullptr ? col_weight + task.col_offset : nullptr;
#pragma unroll 8  // independent loads in flight together: a warp counting a whole task is latency-bound
    for (int64_t r = begin + thread; r < end; r += threads) {
      const int64_t v = y[r];
      if (v != task.ignore_index && v >= 0 && v < task.width) {
        if (class_weight != nullptr) {
          weight_sum += class_weight[v];
        } else {
          ++count;
        }
      }
    }
  } else if (is_distillation(task.kind)) {
    // Valid rows: a NaN anywhere marks the row missing. A warp per row, reading along it (coalesced).
    const DenseTargets<scalar_t> y(task, 0);
    const int lane = threadIdx.x % kWarpSize;
    for (int64_t r = begin + warp; r < end; r += warps) {  // uniform over the warp
      bool missing = false;
      for (int64_t c = lane; c < task.width; c += kWarpSize) {
        missing = missing || isnan(y[r * task.width + c]);
      }
      const bool row_missing = __any_sync(kFullMask, missing);
      if (lane == 0 && !row_missing) {
        ++count;
      }
    }
  } else if (task.kind != kNone) {
    const DenseTargets<scalar_t> y(task, 0);
#pragma unroll 8
    for (int64_t i = begin * task.width + thread; i < end * task.width; i += threads) {
      count += isnan(y[i]) ? 0 : 1;
    }
  }
  return weight_sum + static_cast<acc_t>(count);
}

// ---------------------------------------------------------------------------------------------------------------
// Per-element pieces shared by the warp and the block kernels

// Dense kinds: loss of one element (0 for a NaN = missing target); stores its scaled gradient.
template <int64_t kKind, typename acc_t>
__device__ __forceinline__ acc_t dense_element(acc_t z, acc_t y, acc_t param, acc_t inv_denominator, acc_t* grad) {
  if (isnan(y)) {
    *grad = acc_t(0);
    return acc_t(0);
  }
  const LossAndGrad<acc_t> r = elementwise_loss<acc_t>(kKind, z, y, param);
  *grad = r.grad * inv_denominator;
  return r.loss;
}

// The per-column parameter of a dense kind: pos_weight (BCE, 1 without col_weight) or delta (Huber).
template <int64_t kKind, typename acc_t>
__device__ __forceinline__ acc_t dense_param(const acc_t* pos_weight, int64_t c, acc_t task_param) {
  if (kKind == kBCE) {
    return pos_weight != nullptr ? pos_weight[c] : acc_t(1);
  }
  return task_param;
}

// Cross-entropy row quantities derived from the reduced statistics (loss_math.h's formulas).
template <typename acc_t>
struct CrossEntropyTerms {
  CrossEntropyRow<acc_t> row;
  acc_t smoothing_scale;  // ε / C: b_c = smoothing_scale · w_c
  acc_t inv_sum_exp;
};

template <typename acc_t>
__device__ __forceinline__ CrossEntropyTerms<acc_t> cross_entropy_terms(const SoftmaxStats<acc_t>& s,
                                                                        const acc_t* class_weight, int64_t y,
                                                                        acc_t smoothing, int32_t width) {
  const acc_t weight_of_target = class_weight != nullptr ? class_weight[y] : acc_t(1);
  const acc_t sum_class_weights = class_weight != nullptr ? s.weights : acc_t(width);
  return {cross_entropy_row(smoothing, weight_of_target, sum_class_weights, width), smoothing / acc_t(width),
          acc_t(1) / s.sum_exp};
}

template <typename acc_t>
__device__ __forceinline__ acc_t cross_entropy_loss(const CrossEntropyTerms<acc_t>& t, const SoftmaxStats<acc_t>& s) {
  return cross_entropy_row_loss(t.row, s.max + ::log(s.sum_exp), s.target, t.smoothing_scale * s.weighted);
}

template <typename acc_t>
__device__ __forceinline__ acc_t cross_entropy_element_grad(const CrossEntropyTerms<acc_t>& t,
                                                            const SoftmaxStats<acc_t>& s, acc_t z, bool is_target,
                                                            acc_t class_weight_c, acc_t inv_denominator) {
  const acc_t prob = ::exp(z - s.max) * t.inv_sum_exp;
  return cross_entropy_grad(t.row, prob, is_target, t.smoothing_scale * class_weight_c) * inv_denominator;
}

// w_c as the label-smoothing term needs it (1 without class weights; unused, so not loaded, without smoothing).
template <typename acc_t>
__device__ __forceinline__ acc_t smoothing_class_weight(const acc_t* class_weight, int64_t c, acc_t smoothing) {
  return smoothing > acc_t(0) && class_weight != nullptr ? class_weight[c] : acc_t(1);
}

// One logit's share of a cross-entropy row's statistics, for the warp- and the block-per-row kernels alike.
template <typename acc_t>
__device__ __forceinline__ void add_class_logit(SoftmaxStats<acc_t>& stats, int64_t c, acc_t z, int64_t y,
                                                const acc_t* class_weight, acc_t smoothing) {
  stats.add_logit(z);
  if (c == y) {
    stats.target = z;
  }
  if (smoothing > acc_t(0)) {
    const acc_t w = smoothing_class_weight(class_weight, c, smoothing);
    stats.weighted += w * z;
    stats.weights += w;
  }
}

// The loss of a row whose class index is not a class: 0 when ignored, NaN when out of range (the CUDA op cannot
// raise without a host sync, so the task's loss becomes NaN instead of a silently wrong number).
template <typename acc_t>
__device__ __forceinline__ acc_t invalid_target_loss(bool ignored) {
  return ignored ? acc_t(0) : acc_t(NAN);
}

// Online max / Σexp(v - max) update, as SoftmaxStats::add_logit.
template <typename acc_t>
__device__ __forceinline__ void add_to_softmax(acc_t& max, acc_t& sum_exp, acc_t v) {
  if (v > max) {
    sum_exp = sum_exp * ::exp(max - v) + acc_t(1);
    max = v;
  } else {
    sum_exp += ::exp(v - max);
  }
}

// Running statistics of one distillation row (or of the part of it one thread has seen): loss_math.h's
// distillation_row inputs, plus whether a target entry was NaN (the row is then missing).
template <typename acc_t>
struct DistillationStats {
  acc_t student_max;      // max of z / τ
  acc_t student_sum_exp;  // Σ exp(z / τ - student_max)
  acc_t teacher_max;      // teacher logits: max of t / τ
  acc_t teacher_sum_exp;  // teacher logits: Σ exp(t / τ - teacher_max)
  acc_t target_mass;      // probabilities: Σ p
  int missing;            // nonzero when some target entry is NaN

  __device__ __forceinline__ void add(acc_t z, acc_t y, acc_t inv_temperature, bool from_logits) {
    missing |= isnan(y) ? 1 : 0;
    add_to_softmax(student_max, student_sum_exp, z * inv_temperature);
    if (from_logits) {
      add_to_softmax(teacher_max, teacher_sum_exp, y * inv_temperature);
    } else {
      target_mass += y;
    }
  }

  __device__ __forceinline__ DistillationRow<acc_t> row(acc_t temperature, bool from_logits) const {
    return from_logits
               ? distillation_row(temperature, student_max, student_sum_exp, teacher_max, teacher_sum_exp, acc_t(1))
               : distillation_row(temperature, student_max, student_sum_exp, acc_t(0), acc_t(1), target_mass);
  }
};

template <typename acc_t>
__device__ __forceinline__ DistillationStats<acc_t> empty_distillation_stats() {
  return {lowest<acc_t>(), acc_t(0), lowest<acc_t>(), acc_t(0), acc_t(0), 0};
}

struct CombineDistillationStats {
  template <typename acc_t>
  __device__ __forceinline__ DistillationStats<acc_t> operator()(const DistillationStats<acc_t>& a,
                                                                 const DistillationStats<acc_t>& b) const {
    const acc_t s = ::fmax(a.student_max, b.student_max);
    const acc_t t = ::fmax(a.teacher_max, b.teacher_max);
    return {s,
            mul_rn(a.student_sum_exp, ::exp(a.student_max - s)) + mul_rn(b.student_sum_exp, ::exp(b.student_max - s)),
            t,
            mul_rn(a.teacher_sum_exp, ::exp(a.teacher_max - t)) + mul_rn(b.teacher_sum_exp, ::exp(b.teacher_max - t)),
            a.target_mass + b.target_mass,
            a.missing | b.missing};
  }
};

template <typename acc_t>
__device__ __forceinline__ DistillationStats<acc_t> shfl_xor(const DistillationStats<acc_t>& s, int offset) {
  return {__shfl_xor_sync(kFullMask, s.student_max, offset), __shfl_xor_sync(kFullMask, s.student_sum_exp, offset),
          __shfl_xor_sync(kFullMask, s.teacher_max, offset), __shfl_xor_sync(kFullMask, s.teacher_sum_exp, offset),
          __shfl_xor_sync(kFullMask, s.target_mass, offset), __shfl_xor_sync(kFullMask, s.missing, offset)};
}

// The saved statistics of one row (multi_task_loss_recompute): written by one thread per row, when asked for.
template <typename acc_t>
__device__ __forceinline__ void store_row_stats(const SegmentArgs& args, const TaskMeta& task, int64_t row, acc_t s0,
                                                acc_t s1, acc_t s2, acc_t s3) {
  if (args.row_stats == nullptr) {
    return;
  }
  acc_t* out = static_cast<acc_t*>(args.row_stats) + (int64_t(task.index) * args.row_stats_rows + row) * kRowStatsWidth;
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

template <typename acc_t>
__device__ __forceinline__ void store_cross_entropy_stats(const SegmentArgs& args, const TaskMeta& task, int64_t row,
                                                          const CrossEntropyTerms<acc_t>& terms,
                                                          const SoftmaxStats<acc_t>& stats) {
  store_row_stats(args, task, row, stats.max + ::log(stats.sum_exp), terms.row.a, terms.row.B, terms.smoothing_scale);
}

template <typename acc_t>
__device__ __forceinline__ void store_distillation_stats(const SegmentArgs& args, const TaskMeta& task, int64_t row,
                                                         const DistillationRow<acc_t>& r, bool from_logits) {
  store_row_stats(args, task, row, r.student_lse, from_logits ? r.teacher_lse : acc_t(0), r.target_mass, acc_t(1));
}

// ---------------------------------------------------------------------------------------------------------------
// Narrow segments: `lanes` lanes per row, 32 / lanes rows per warp

template <typename scalar_t>
struct WarpRow {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  const scalar_t* logits;  // the task's segment of this lane's row
  scalar_t* grad;          // null: losses only (SegmentArgs::grad)
  int64_t row;             // global row index
  int lane_in_row;
  int lanes;
  bool active;             // false for the lanes past the last row (they still join the shuffles)
  acc_t inv_denominator;
};

// A row whose gradient is zero (an ignored class index, a missing distillation row, an absent task).
template <typename scalar_t>
__device__ __forceinline__ void zero_segment_warp(const WarpRow<scalar_t>& r, int width) {
  for (int c = r.lane_in_row; r.grad != nullptr && c < width; c += r.lanes) {
    r.grad[c] = ScalarTraits<scalar_t>::from_acc(typename ScalarTraits<scalar_t>::acc_t(0));
  }
}

template <int64_t kKind, typename scalar_t>
__device__ __forceinline__ typename ScalarTraits<scalar_t>::acc_t dense_segment_warp(const TaskMeta& task,
                                                                                     const SegmentArgs& args,
                                                                                     const WarpRow<scalar_t>& r) {
  using T = ScalarTraits<scalar_t>;
  using acc_t = typename T::acc_t;
  if (!r.active) {
    return acc_t(0);
  }
  const DenseTargets<scalar_t> y(task, r.row * task.width);
  const acc_t* pos_weight =
      args.col_weight != nullptr ? static_cast<const acc_t*>(args.col_weight) + task.col_offset : nullptr;
  const acc_t task_param = acc_t(task.param);
  acc_t loss = acc_t(0);
  for (int c = r.lane_in_row; c < task.width; c += r.lanes) {
    acc_t grad;
    loss += dense_element<kKind>(T::to_acc(r.logits[c]), y[c], dense_param<kKind>(pos_weight, c, task_param),
                                 r.inv_denominator, &grad);
    if (r.grad != nullptr) {
      r.grad[c] = T::from_acc(grad);
    }
  }
  return loss;
}

template <typename scalar_t>
__device__ __forceinline__ typename ScalarTraits<scalar_t>::acc_t cross_entropy_segment_warp(
    const TaskMeta& task, const SegmentArgs& args, const WarpRow<scalar_t>& r) {
  using T = ScalarTraits<scalar_t>;
  using acc_t = typename T::acc_t;
  const int64_t y = r.active ? static_cast<const int64_t*>(task.target)[r.row] : task.ignore_index;
  const bool ignored = y == task.ignore_index;
  const bool valid = !ignored && y >= 0 && y < task.width;
  const acc_t* class_weight =
      args.col_weight != nullptr ? static_cast<const acc_t*>(args.col_weight) + task.col_offset : nullptr;
  const acc_t smoothing = acc_t(task.param);

  // Pass 1: softmax statistics; the target logit comes from the lane owning column y (in place, no other lane
  // may read a column its owner is about to overwrite).
  SoftmaxStats<acc_t> stats = empty_stats<acc_t>();
  if (valid) {
    for (int c = r.lane_in_row; c < task.width; c += r.lanes) {
      add_class_logit(stats, c, T::to_acc(r.logits[c]), y, class_weight, smoothing);
    }
  }
  stats = group_all_reduce(stats, r.lanes, CombineStats{});
  if (!r.active) {
    return acc_t(0);
  }
  if (!valid) {
    zero_segment_warp(r, task.width);
    if (r.lane_in_row == 0) {
      store_row_stats(args, task, r.row, acc_t(0), acc_t(0), acc_t(0), acc_t(0));
    }
    return r.lane_in_row == 0 ? invalid_target_loss<acc_t>(ignored) : acc_t(0);
  }

  // Pass 2: gradients over the (cache-hot) logits.
  const CrossEntropyTerms<acc_t> terms = cross_entropy_terms(stats, class_weight, y, smoothing, task.width);
  if (r.lane_in_row == 0) {
    store_cross_entropy_stats(args, task, r.row, terms, stats);
  }
  for (int c = r.lane_in_row; r.grad != nullptr && c < task.width; c += r.lanes) {
    r.grad[c] = T::from_acc(cross_entropy_element_grad(terms, stats, T::to_acc(r.logits[c]), c == y,
                                                       smoothing_class_weight(class_weight, c, smoothing),
                                                       r.inv_denominator));
  }
  return r.lane_in_row == 0 ? cross_entropy_loss(terms, stats) : acc_t(0);
}

template <typename scalar_t>
__device__ __forceinline__ typename ScalarTraits<scalar_t>::acc_t distillation_segment_warp(
    const TaskMeta& task, const SegmentArgs& args, const WarpRow<scalar_t>& r) {
  using T = ScalarTraits<scalar_t>;
  using acc_t = typename T::acc_t;
  const bool from_logits = distillation_targets_are_logits(task.kind);
  const acc_t temperature = acc_t(task.param);
  const acc_t inv_temperature = acc_t(1) / temperature;
  const DenseTargets<scalar_t> y(task, r.row * task.width);

  // Pass 1: the row's statistics, reduced over its lane group (inactive lanes join with empty ones).
  DistillationStats<acc_t> stats = empty_distillation_stats<acc_t>();
  if (r.active) {
    for (int c = r.lane_in_row; c < task.width; c += r.lanes) {
      stats.add(T::to_acc(r.logits[c]), y[c], inv_temperature, from_logits);
    }
  }
  stats = group_all_reduce(stats, r.lanes, CombineDistillationStats{});
  if (!r.active) {
    return acc_t(0);
  }
  if (stats.missing) {
    zero_segment_warp(r, task.width);
    if (r.lane_in_row == 0) {
      store_row_stats(args, task, r.row, acc_t(0), acc_t(0), acc_t(0), acc_t(0));
    }
    return acc_t(0);
  }

  // Pass 2: loss and gradient per class (each lane over the columns it read).
  const DistillationRow<acc_t> row = stats.row(temperature, from_logits);
  if (r.lane_in_row == 0) {
    store_distillation_stats(args, task, r.row, row, from_logits);
  }
  acc_t loss = acc_t(0);
  for (int c = r.lane_in_row; c < task.width; c += r.lanes) {
    const LossAndGrad<acc_t> e = distillation_element(row, from_logits, T::to_acc(r.logits[c]), y[c]);
    loss += e.loss;
    if (r.grad != nullptr) {
      r.grad[c] = T::from_acc(e.grad * r.inv_denominator);
    }
  }
  return loss;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpKernelThreads, kWarpKernelMinBlocks)
    segment_loss_warp_kernel(const __grid_constant__ TaskBatch batch, const __grid_constant__ SegmentArgs args) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  const int warp = blockIdx.x * (kWarpKernelThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (warp >= batch.total_warps) {
    return;  // whole warps only: the shuffles below never miss a lane
  }
  // The task owning this warp: the last one whose first warp is ≤ warp (tasks are in first_warp order).
  int lo = 0;
  int hi = batch.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (batch.task[mid].first_warp <= warp) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const TaskMeta& task = batch.task[lo];
  const int lane = threadIdx.x % kWarpSize;
  const int lanes = group_width(task.width);
  const int rows_per_warp = kWarpSize / lanes;
  const int64_t first_row = int64_t(warp - task.first_warp) * rows_per_warp;  // within the chunk
  const int64_t local_row = first_row + lane / lanes;

  WarpRow<scalar_t> r;
  r.active = local_row < args.rows;
  const int64_t offset = local_row * args.ld + task.col_offset;
  r.logits = static_cast<const scalar_t*>(args.logits) + offset;
  r.grad = args.grad != nullptr ? static_cast<scalar_t*>(args.grad) + offset : nullptr;
  r.row = args.row_begin + local_row;
  r.lane_in_row = lane % lanes;
  r.lanes = lanes;
  if (args.counted_denominators != nullptr) {
    // Every warp of the task counts the same targets in the same order: bitwise the same denominator everywhere.
    const acc_t denominator = group_all_reduce(
        denominator_share<scalar_t>(task, 0, args.rows, static_cast<const acc_t*>(args.col_weight), lane, kWarpSize,
                                    0, 1),
        kWarpSize, Sum{});
    if (warp == task.first_warp && lane == 0) {  // for the finalize, as launch_denominators' only slot
      static_cast<acc_t*>(args.counted_denominators)[int64_t(task.index) * kMaxDenominatorSlots] = denominator;
    }
    r.inv_denominator = safe_reciprocal(denominator);
  } else {
    r.inv_denominator = inverse_denominator<acc_t>(args.denominator_parts, args.denominator_slots, task.index);
  }

  acc_t loss = acc_t(0);
  switch (task.kind) {
    case kCrossEntropy:
      loss = cross_entropy_segment_warp(task, args, r);
      break;
    case kBCE:
      loss = dense_segment_warp<kBCE>(task, args, r);
      break;
    case kMSE:
      loss = dense_segment_warp<kMSE>(task, args, r);
      break;
    case kL1:
      loss = dense_segment_warp<kL1>(task, args, r);
      break;
    case kHuber:
      loss = dense_segment_warp<kHuber>(task, args, r);
      break;
    case kDistill:
    case kDistillProbs:
      loss = distillation_segment_warp(task, args, r);
      break;
    default:  // kNone: absent from the batch, zero gradient
      if (r.active) {
        zero_segment_warp(r, task.width);
      }
      break;
  }
  loss = group_all_reduce(loss, kWarpSize, Sum{});
  if (lane == 0) {
    const int64_t slot = (args.row_begin + first_row) / rows_per_warp;
    static_cast<acc_t*>(args.loss_parts)[int64_t(task.index) * args.loss_parts_stride + slot] = loss;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Wide segments: a block per (row, task)

// Visits the n elements of a row segment, each by exactly one thread (the same thread in every call, so a pass
// writing in place only overwrites elements its own thread has read), with 16-byte accesses on the aligned body.
// visit(c, value) returns the value stored at c when kWrite. Without kRead the value passed is 0.
template <bool kRead, bool kWrite, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_in_segment(const scalar_t* in, scalar_t* out, int64_t n, Visit visit) {
  using T = ScalarTraits<scalar_t>;
  using acc_t = typename T::acc_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
  struct alignas(16) Pack {
    scalar_t v[kVec];
  };
  const scalar_t* base = kRead ? in : out;
  const int phase = static_cast<int>((reinterpret_cast<uintptr_t>(base) / sizeof(scalar_t)) % kVec);
  const int64_t head = phase == 0 ? 0 : (n < kVec - phase ? n : kVec - phase);
  const int64_t packs = (n - head) / kVec;
  const int64_t tail = head + packs * kVec;

  auto one = [&](int64_t c) {
    acc_t value = acc_t(0);
    if constexpr (kRead) {
      value = T::to_acc(in[c]);
    }
    const acc_t r = visit(c, value);
    if constexpr (kWrite) {
      out[c] = T::from_acc(r);
    }
  };
  for (int64_t c = threadIdx.x; c < head; c += blockDim.x) {
    one(c);
  }
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    Pack values;
    if constexpr (kRead) {
      values = reinterpret_cast<const Pack*>(in + head)[p];
    }
    Pack result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc_t value = acc_t(0);
      if constexpr (kRead) {
        value = T::to_acc(values.v[j]);
      }
      result.v[j] = T::from_acc(visit(head + p * kVec + j, value));
    }
    if constexpr (kWrite) {
      reinterpret_cast<Pack*>(out + head)[p] = result;
    }
  }
  for (int64_t c = tail + threadIdx.x; c < n; c += blockDim.x) {
    one(c);
  }
}

// grad null (SegmentArgs::grad): nothing to write.
template <typename scalar_t>
__device__ __forceinline__ void zero_segment(scalar_t* grad, int64_t n) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  if (grad == nullptr) {
    return;
  }
  for_each_in_segment<false, true>(static_cast<const scalar_t*>(nullptr), grad, n,
                                   [](int64_t, acc_t) { return acc_t(0); });
}

template <int64_t kKind, typename scalar_t>
__device__ __forceinline__ typename ScalarTraits<scalar_t>::acc_t dense_segment_block(
    const TaskMeta& task, const SegmentArgs& args, int64_t row, const scalar_t* logits, scalar_t* grad,
    typename ScalarTraits<scalar_t>::acc_t inv_denominator) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  __shared__ acc_t scratch[kRowKernelWarps];
  const acc_t* pos_weight =
      args.col_weight != nullptr ? static_cast<const acc_t*>(args.col_weight) + task.col_offset : nullptr;
  const acc_t task_param = acc_t(task.param);
  acc_t loss = acc_t(0);
  with_dense_targets<scalar_t>(task, row * task.width, [&](const auto* y) {
    const auto element = [&](int64_t c, acc_t z) {
      acc_t g;
      loss += dense_element<kKind>(z, widen(y[c]), dense_param<kKind>(pos_weight, c, task_param), inv_denominator,
                                   &g);
      return g;
    };
    if (grad != nullptr) {  // uniform over the block
      for_each_in_segment<true, true>(logits, grad, task.width, element);
    } else {
      for_each_in_segment<true, false>(logits, grad, task.width, element);
    }
  });
  return block_all_reduce<kRowKernelWarps>(loss, Sum{}, scratch);
}

template <typename scalar_t>
__device__ __forceinline__ typename ScalarTraits<scalar_t>::acc_t cross_entropy_segment_block(
    const TaskMeta& task, const SegmentArgs& args, int64_t row, const scalar_t* logits, scalar_t* grad,
    typename ScalarTraits<scalar_t>::acc_t inv_denominator) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  __shared__ SoftmaxStats<acc_t> scratch[kRowKernelWarps];
  const int64_t y = static_cast<const int64_t*>(task.target)[row];
  const bool ignored = y == task.ignore_index;
  if (ignored || y < 0 || y >= task.width) {  // uniform over the block
    zero_segment(grad, task.width);
    if (threadIdx.x == 0) {
      store_row_stats(args, task, row, acc_t(0), acc_t(0), acc_t(0), acc_t(0));
    }
    return invalid_target_loss<acc_t>(ignored);
  }
  const acc_t* class_weight =
      args.col_weight != nullptr ? static_cast<const acc_t*>(args.col_weight) + task.col_offset : nullptr;
  const acc_t smoothing = acc_t(task.param);

  SoftmaxStats<acc_t> stats = empty_stats<acc_t>();
  for_each_in_segment<true, false>(logits, grad, task.width, [&](int64_t c, acc_t z) {
    add_class_logit(stats, c, z, y, class_weight, smoothing);
    return acc_t(0);
  });
  stats = block_all_reduce<kRowKernelWarps>(stats, CombineStats{}, scratch);

  const CrossEntropyTerms<acc_t> terms = cross_entropy_terms(stats, class_weight, y, smoothing, task.width);
  if (threadIdx.x == 0) {
    store_cross_entropy_stats(args, task, row, terms, stats);
  }
  if (grad != nullptr) {  // uniform over the block
    for_each_in_segment<true, true>(logits, grad, task.width, [&](int64_t c, acc_t z) {
      return cross_entropy_element_grad(terms, stats, z, c == y, smoothing_class_weight(class_weight, c, smoothing),
                                        inv_denominator);
    });
  }
  return cross_entropy_loss(terms, stats);
}

// Plain strided loops rather than for_each_in_segment's 16-byte packs: the packs' unrolled online-softmax updates of
// two distributions made ptxas spill in this kernel (sm_90), and the loads stay coalesced (the targets' too).
template <typename scalar_t>
__device__ __forceinline__ typename ScalarTraits<scalar_t>::acc_t distillation_segment_block(
    const TaskMeta& task, const SegmentArgs& args, int64_t row, const scalar_t* logits, scalar_t* grad,
    typename ScalarTraits<scalar_t>::acc_t inv_denominator) {
  using T = ScalarTraits<scalar_t>;
  using acc_t = typename T::acc_t;
  __shared__ DistillationStats<acc_t> stats_scratch[kRowKernelWarps];
  __shared__ acc_t loss_scratch[kRowKernelWarps];
  const bool from_logits = distillation_targets_are_logits(task.kind);
  const acc_t temperature = acc_t(task.param);
  const acc_t inv_temperature = acc_t(1) / temperature;
  const DenseTargets<scalar_t> y(task, row * task.width);

  DistillationStats<acc_t> stats = empty_distillation_stats<acc_t>();
  for (int64_t c = threadIdx.x; c < task.width; c += blockDim.x) {
    stats.add(T::to_acc(logits[c]), y[c], inv_temperature, from_logits);
  }
  stats = block_all_reduce<kRowKernelWarps>(stats, CombineDistillationStats{}, stats_scratch);
  if (stats.missing) {  // uniform over the block
    zero_segment(grad, task.width);
    if (threadIdx.x == 0) {
      store_row_stats(args, task, row, acc_t(0), acc_t(0), acc_t(0), acc_t(0));
    }
    return acc_t(0);
  }

  const DistillationRow<acc_t> terms = stats.row(temperature, from_logits);
  if (threadIdx.x == 0) {
    store_distillation_stats(args, task, row, terms, from_logits);
  }
  acc_t loss = acc_t(0);
  for (int64_t c = threadIdx.x; c < task.width; c += blockDim.x) {
    const LossAndGrad<acc_t> e = distillation_element(terms, from_logits, T::to_acc(logits[c]), y[c]);
    loss += e.loss;
    if (grad != nullptr) {
      grad[c] = T::from_acc(e.grad * inv_denominator);
    }
  }
  return block_all_reduce<kRowKernelWarps>(loss, Sum{}, loss_scratch);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowKernelThreads)
    segment_loss_row_kernel(const __grid_constant__ TaskBatch batch, const __grid_constant__ SegmentArgs args) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  const TaskMeta& task = batch.task[blockIdx.y];
  const int64_t local_row = blockIdx.x;
  const int64_t row = args.row_begin + local_row;
  const int64_t offset = local_row * args.ld + task.col_offset;
  const scalar_t* logits = static_cast<const scalar_t*>(args.logits) + offset;
  scalar_t* grad = args.grad != nullptr ? static_cast<scalar_t*>(args.grad) + offset : nullptr;
  const acc_t inv_denominator =
      inverse_denominator<acc_t>(args.denominator_parts, args.denominator_slots, task.index);

  acc_t loss = acc_t(0);
  switch (task.kind) {
    case kCrossEntropy:
      loss = cross_entropy_segment_block(task, args, row, logits, grad, inv_denominator);
      break;
    case kBCE:
      loss = dense_segment_block<kBCE>(task, args, row, logits, grad, inv_denominator);
      break;
    case kMSE:
      loss = dense_segment_block<kMSE>(task, args, row, logits, grad, inv_denominator);
      break;
    case kL1:
      loss = dense_segment_block<kL1>(task, args, row, logits, grad, inv_denominator);
      break;
    case kHuber:
      loss = dense_segment_block<kHuber>(task, args, row, logits, grad, inv_denominator);
      break;
    case kDistill:
    case kDistillProbs:
      loss = distillation_segment_block(task, args, row, logits, grad, inv_denominator);
      break;
    default:  // kNone
      zero_segment(grad, task.width);
      break;
  }
  if (threadIdx.x == 0) {
    static_cast<acc_t*>(args.loss_parts)[int64_t(task.index) * args.loss_parts_stride + row] = loss;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Denominators and final losses

// Block (slot, task): the denominator contribution of rows [slot·per_slot, (slot+1)·per_slot).
template <typename scalar_t, typename acc_t = typename ScalarTraits<scalar_t>::acc_t>
__global__ void __launch_bounds__(kDenominatorThreads)
    denominator_kernel(const __grid_constant__ TaskBatch batch, int64_t rows, const acc_t* col_weight,
                       acc_t* parts) {
  __shared__ acc_t scratch[kDenominatorWarps];
  const TaskMeta& task = batch.task[blockIdx.y];
  const int64_t per_slot = (rows + gridDim.x - 1) / gridDim.x;
  const int64_t begin = blockIdx.x * per_slot;
  const int64_t end = begin + per_slot < rows ? begin + per_slot : rows;
  const acc_t share = denominator_share<scalar_t>(task, begin, end, col_weight, threadIdx.x, blockDim.x,
                                        threadIdx.x / kWarpSize, kDenominatorWarps);
  const acc_t total = block_all_reduce<kDenominatorWarps>(share, Sum{}, scratch);
  if (threadIdx.x == 0) {
    parts[int64_t(task.index) * kMaxDenominatorSlots + blockIdx.x] = total;
  }
}

// Block per task: the loss partials of all rows, summed in a fixed order, × 1/denominator.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const __grid_constant__ TaskBatch batch, int64_t rows, const acc_t* denominator_parts,
                    int32_t denominator_slots, const acc_t* loss_parts, int64_t loss_parts_stride, acc_t* losses,
                    acc_t* inverse_denominators) {
  __shared__ acc_t scratch[kFinalizeWarps];
  const TaskMeta& task = batch.task[blockIdx.x];
  const int64_t parts = loss_part_count(rows, task.width);
  const acc_t* task_parts = loss_parts + int64_t(task.index) * loss_parts_stride;
  acc_t sum = acc_t(0);
  for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) {
    sum += task_parts[i];
  }
  sum = block_all_reduce<kFinalizeWarps>(sum, Sum{}, scratch);
  const acc_t inv_denominator = inverse_denominator<acc_t>(denominator_parts, denominator_slots, task.index);
  if (threadIdx.x == 0) {
    losses[task.index] = sum * inv_denominator;
    if (inverse_denominators != nullptr) {
      inverse_denominators[task.index] = inv_denominator;
    }
  }
}

// The whole batch in one block when it is the op's only launch group and its tasks have few loss partials (small
// heads): a warp per task, then the total Σ λ_t L_t over the tasks in batch order, so the op needs no separate
// reduction for it.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_with_total_kernel(const __grid_constant__ TaskBatch batch, int64_t rows, const acc_t* denominator_parts,
                               int32_t denominator_slots, const acc_t* loss_parts, int64_t loss_parts_stride,
                               acc_t* losses, acc_t* inverse_denominators, const acc_t* task_weights, acc_t* total) {
  __shared__ acc_t weighted_losses[kMaxTasksPerLaunch];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int k = warp; k < batch.count; k += kFinalizeWarps) {  // uniform over the warp
    const TaskMeta& task = batch.task[k];
    const int64_t parts = loss_part_count(rows, task.width);
    const acc_t* task_parts = loss_parts + int64_t(task.index) * loss_parts_stride;
    acc_t sum = acc_t(0);
    for (int64_t i = lane; i < parts; i += kWarpSize) {
      sum += task_parts[i];
    }
    sum = group_all_reduce(sum, kWarpSize, Sum{});
    const acc_t inv_denominator = inverse_denominator<acc_t>(denominator_parts, denominator_slots, task.index);
    if (lane == 0) {
      const acc_t loss = sum * inv_denominator;
      losses[task.index] = loss;
      if (inverse_denominators != nullptr) {
        inverse_denominators[task.index] = inv_denominator;
      }
      weighted_losses[k] = loss * task_weights[task.index];
    }
  }
  __syncthreads();
  if (warp == 0) {
    acc_t sum = acc_t(0);
    for (int k = lane; k < batch.count; k += kWarpSize) {
      sum += weighted_losses[k];
    }
    sum = group_all_reduce(sum, kWarpSize, Sum{});
    if (lane == 0) {
      *total = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Logit gradients from saved row statistics (multi_task_loss_recompute's backward): a block per row; the tasks of
// the batch that meet the block's columns in turn, each over its columns there. Per element only, so the values do
// not depend on where the column blocks start.

// Each of these visits the n columns of its task in the block with for_each_in_segment (16-byte accesses on the
// aligned body), reading the logit and writing its gradient in place.
template <int64_t kKind, typename scalar_t>
__device__ __forceinline__ void dense_gradient(const TaskMeta& task, const GradientArgs& args, int64_t row,
                                               int64_t first_class, int64_t n, scalar_t* z,
                                               typename ScalarTraits<scalar_t>::acc_t scale) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  const acc_t* pos_weight = args.col_weight != nullptr
                                ? static_cast<const acc_t*>(args.col_weight) + task.col_offset + first_class
                                : nullptr;
  const acc_t task_param = acc_t(task.param);
  with_dense_targets<scalar_t>(task, row * task.width + first_class, [&](const auto* y) {
    for_each_in_segment<true, true>(z, z, n, [&](int64_t c, acc_t logit) {
      acc_t grad;
      dense_element<kKind>(logit, widen(y[c]), dense_param<kKind>(pos_weight, c, task_param), scale, &grad);
      return grad;
    });
  });
}

template <typename scalar_t>
__device__ __forceinline__ const typename ScalarTraits<scalar_t>::acc_t* saved_row(const TaskMeta& task,
                                                                                  const GradientArgs& args,
                                                                                  int64_t row) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  return static_cast<const acc_t*>(args.row_stats) + (int64_t(task.index) * args.rows + row) * kRowStatsWidth;
}

template <typename scalar_t>
__device__ __forceinline__ void cross_entropy_gradient(const TaskMeta& task, const GradientArgs& args, int64_t row,
                                                       int64_t first_class, int64_t n, scalar_t* z,
                                                       typename ScalarTraits<scalar_t>::acc_t scale) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  const SavedCrossEntropyRow<acc_t> saved = saved_cross_entropy_row(saved_row<scalar_t>(task, args, row));
  const int64_t y = static_cast<const int64_t*>(task.target)[row];
  const acc_t smoothing = acc_t(task.param);
  const acc_t* class_weight = args.col_weight != nullptr
                                  ? static_cast<const acc_t*>(args.col_weight) + task.col_offset
                                  : nullptr;
  for_each_in_segment<true, true>(z, z, n, [&](int64_t c, acc_t logit) {
    const int64_t k = first_class + c;
    return saved_cross_entropy_grad(saved, logit, k == y, smoothing_class_weight(class_weight, k, smoothing)) * scale;
  });
}

template <typename scalar_t>
__device__ __forceinline__ void distillation_gradient(const TaskMeta& task, const GradientArgs& args, int64_t row,
                                                      int64_t first_class, int64_t n, scalar_t* z,
                                                      typename ScalarTraits<scalar_t>::acc_t scale) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  const SavedDistillationRow<acc_t> saved =
      saved_distillation_row(acc_t(task.param), saved_row<scalar_t>(task, args, row));
  const bool from_logits = distillation_targets_are_logits(task.kind);
  const DenseTargets<scalar_t> y(task, row * task.width + first_class);
  for_each_in_segment<true, true>(z, z, n, [&](int64_t c, acc_t logit) {
    return saved_distillation_grad(saved, from_logits, logit, y[c]) * scale;
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kGradientThreads)
    gradient_from_stats_kernel(const __grid_constant__ TaskBatch batch, const __grid_constant__ GradientArgs args) {
  using acc_t = typename ScalarTraits<scalar_t>::acc_t;
  const int64_t row = blockIdx.x;
  scalar_t* block_row = static_cast<scalar_t*>(args.block) + row * args.ld;
  const acc_t* scales = static_cast<const acc_t*>(args.scales);
  const int64_t block_end = args.col_begin + args.cols;
  for (int k = 0; k < batch.count; ++k) {  // uniform over the block
    const TaskMeta& task = batch.task[k];
    const int64_t begin = task.col_offset > args.col_begin ? task.col_offset : args.col_begin;
    const int64_t task_end = task.col_offset + task.width;
    const int64_t end = task_end < block_end ? task_end : block_end;
    if (begin >= end) {
      continue;
    }
    scalar_t* z = block_row + (begin - args.col_begin);
    const int64_t first_class = begin - task.col_offset;
    const int64_t n = end - begin;
    const acc_t scale = scales[task.index];
    switch (task.kind) {
      case kCrossEntropy:
        cross_entropy_gradient(task, args, row, first_class, n, z, scale);
        break;
      case kBCE:
        dense_gradient<kBCE>(task, args, row, first_class, n, z, scale);
        break;
      case kMSE:
        dense_gradient<kMSE>(task, args, row, first_class, n, z, scale);
        break;
      case kL1:
        dense_gradient<kL1>(task, args, row, first_class, n, z, scale);
        break;
      case kHuber:
        dense_gradient<kHuber>(task, args, row, first_class, n, z, scale);
        break;
      case kDistill:
      case kDistillProbs:
        distillation_gradient(task, args, row, first_class, n, z, scale);
        break;
      default:  // kNone
        zero_segment(z, n);
        break;
    }
  }
}

// One target entry converted to the kernel dtype (the conversions of Tensor.to: bool -> 0 / 1, integers and
// floats by value).
template <typename out_t>
__device__ __forceinline__ out_t load_target(const void* source, int64_t index, TargetSourceDType dtype) {
  switch (dtype) {
    case TargetSourceDType::kBool:
      return static_cast<const uint8_t*>(source)[index] != 0 ? out_t(1) : out_t(0);
    case TargetSourceDType::kUInt8:
      return static_cast<out_t>(static_cast<const uint8_t*>(source)[index]);
    case TargetSourceDType::kInt8:
      return static_cast<out_t>(static_cast<const int8_t*>(source)[index]);
    case TargetSourceDType::kInt16:
      return static_cast<out_t>(static_cast<const int16_t*>(source)[index]);
    case TargetSourceDType::kInt32:
      return static_cast<out_t>(static_cast<const int32_t*>(source)[index]);
    case TargetSourceDType::kInt64:
      return static_cast<out_t>(static_cast<const int64_t*>(source)[index]);
    case TargetSourceDType::kHalf:
      return static_cast<out_t>(__half2float(static_cast<const __half*>(source)[index]));
    case TargetSourceDType::kBFloat16:
      return static_cast<out_t>(__bfloat162float(static_cast<const __nv_bfloat16*>(source)[index]));
    case TargetSourceDType::kFloat:
      return static_cast<out_t>(static_cast<const float*>(source)[index]);
    default:  // kDouble
      return static_cast<out_t>(static_cast<const double*>(source)[index]);
  }
}

// A grid row per task (blockIdx.y), its entries grid-strided over the row's blocks.
template <typename out_t>
__global__ void __launch_bounds__(kPackThreads)
    pack_targets_kernel(const __grid_constant__ TargetCopyBatch batch, int64_t rows, out_t* packed) {
  const TargetCopy& copy = batch.copy[blockIdx.y];
  const int64_t count = rows * copy.width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    const int64_t row = index / copy.width;
    const int64_t col = index - row * copy.width;
    packed[copy.offset + index] =
        load_target<out_t>(copy.source, row * copy.row_stride + col * copy.col_stride, copy.dtype);
  }
}

// dTotal of LogitGradientArgs (0 when absent), read once per thread.
template <typename acc_t>
__device__ acc_t grad_total_of(const LogitGradientArgs& args) {
  return args.grad_total != nullptr ? *static_cast<const acc_t*>(args.grad_total) : acc_t(0);
}

// The per-column coefficient of LogitGradientArgs (NaN for a column whose task index is out of range).
template <typename acc_t>
__device__ acc_t column_coefficient(const LogitGradientArgs& args, int64_t col, acc_t d_total) {
  const int64_t task = args.col_task[col];
  if (task < 0 || task >= args.tasks) {
    return acc_t(NAN);
  }
  acc_t c = acc_t(0);
  if (args.grad_total != nullptr) {
    c = static_cast<const acc_t*>(args.task_weights)[task] * d_total;
  }
  if (args.grad_losses != nullptr) {
    c += static_cast<const acc_t*>(args.grad_losses)[task * args.grad_losses_stride];
  }
  return c;
}

// multi_task_loss's backward: one element of dz per thread (grid-stride). Head columns are few next to rows, so the
// coefficient is recomputed per element from cached (T,) vectors rather than staged.
template <typename scalar_t>
__global__ void __launch_bounds__(kScaleThreads)
    scale_logit_gradient_kernel(const __grid_constant__ LogitGradientArgs args) {
  using Traits = ScalarTraits<scalar_t>;
  using acc_t = typename Traits::acc_t;
  const scalar_t* grad = static_cast<const scalar_t*>(args.grad_logits);
  const scalar_t* extra = static_cast<const scalar_t*>(args.extra_grad);
  scalar_t* dz = static_cast<scalar_t*>(args.dz);
  const acc_t d_total = grad_total_of<acc_t>(args);
  const int64_t count = args.rows * args.cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    const int64_t row = index / args.cols;
    const int64_t col = index - row * args.cols;
    const acc_t c = column_coefficient(args, col, d_total);
    acc_t value = Traits::to_acc(grad[row * args.ld + col]) * c;
    if (extra != nullptr) {
      value += Traits::to_acc(extra[row * args.extra_row_stride + col * args.extra_col_stride]);
    }
    dz[index] = Traits::from_acc(value);
  }
}

// scale_logit_gradient_kernel plus the bias gradient: block (32, kBiasRowLanes) over a tile of 32 columns
// (blockIdx.x) and a slab of rows (blockIdx.y). Each thread sums its column over its rows in a fixed order, the
// block's lanes are added in lane order, and the slabs (when more than one) by sum_bias_partials_kernel in slab
// order: the same bits every run.
template <typename scalar_t>
__global__ void __launch_bounds__(32 * kBiasRowLanes)
    scale_logit_gradient_with_bias_kernel(const __grid_constant__ LogitGradientArgs args, int64_t rows_per_slab) {
  using Traits = ScalarTraits<scalar_t>;
  using acc_t = typename Traits::acc_t;
  __shared__ acc_t lane_sums[kBiasRowLanes][32];
  const scalar_t* grad = static_cast<const scalar_t*>(args.grad_logits);
  const scalar_t* extra = static_cast<const scalar_t*>(args.extra_grad);
  scalar_t* dz = static_cast<scalar_t*>(args.dz);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_slab;
  const int64_t end = begin + rows_per_slab < args.rows ? begin + rows_per_slab : args.rows;
  acc_t sum = acc_t(0);
  if (col < args.cols) {
    const acc_t c = column_coefficient(args, col, grad_total_of<acc_t>(args));
#pragma unroll 4
    for (int64_t row = begin + threadIdx.y; row < end; row += kBiasRowLanes) {
      acc_t value = Traits::to_acc(grad[row * args.ld + col]) * c;
      if (extra != nullptr) {
        value += Traits::to_acc(extra[row * args.extra_row_stride + col * args.extra_col_stride]);
      }
      const scalar_t rounded = Traits::from_acc(value);
      dz[row * args.cols + col] = rounded;
      sum += Traits::to_acc(rounded);
    }
  }
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < args.cols) {
    acc_t total = acc_t(0);
    for (int lane = 0; lane < kBiasRowLanes; ++lane) {
      total += lane_sums[lane][threadIdx.x];
    }
    if (gridDim.y == 1) {
      static_cast<scalar_t*>(args.grad_bias)[col] = Traits::from_acc(total);
    } else {
      static_cast<acc_t*>(args.bias_partials)[blockIdx.y * args.cols + col] = total;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kScaleThreads)
    sum_bias_partials_kernel(const __grid_constant__ LogitGradientArgs args, int64_t slabs) {
  using Traits = ScalarTraits<scalar_t>;
  using acc_t = typename Traits::acc_t;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= args.cols) {
    return;
  }
  const acc_t* partials = static_cast<const acc_t*>(args.bias_partials);
  acc_t total = acc_t(0);
  for (int64_t slab = 0; slab < slabs; ++slab) {
    total += partials[slab * args.cols + col];
  }
  static_cast<scalar_t*>(args.grad_bias)[col] = Traits::from_acc(total);
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers

template <typename Launch>
void dispatch_input_dtype(InputDType dtype, Launch&& launch) {
  switch (dtype) {
    case InputDType::kFloat:
      launch(float{});
      break;
    case InputDType::kDouble:
      launch(double{});
      break;
    case InputDType::kHalf:
      launch(__half{});
      break;
    case InputDType::kBFloat16:
      launch(__nv_bfloat16{});
      break;
  }
}

bool valid_batch(const TaskBatch& batch) { return batch.count > 0 && batch.count <= kMaxTasksPerLaunch; }

}  // namespace

int bias_gradient_slabs(int64_t rows, int64_t cols) {
  int64_t slabs = (rows + kMinRowsPerBiasSlab - 1) / kMinRowsPerBiasSlab;
  slabs = slabs < kMaxBiasSlabs ? slabs : kMaxBiasSlabs;
  const int64_t by_size = cols > 0 ? kMaxBiasPartials / cols : kMaxBiasSlabs;
  slabs = slabs < by_size ? slabs : by_size;
  return static_cast<int>(slabs > 1 ? slabs : 1);
}

int denominator_slots(int64_t rows) {
  const int64_t slots = (rows + kMinRowsPerDenominatorSlot - 1) / kMinRowsPerDenominatorSlot;
  return static_cast<int>(slots < 1 ? 1 : (slots > kMaxDenominatorSlots ? kMaxDenominatorSlots : slots));
}

cudaError_t launch_denominators(InputDType dtype, const TaskBatch& batch, int64_t rows, const void* col_weight,
                                void* denominator_parts, int32_t slots, cudaStream_t stream) {
  if (!valid_batch(batch) || rows <= 0 || slots < 1 || slots > kMaxDenominatorSlots) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(slots, batch.count);
  dispatch_input_dtype(dtype, [&](auto tag) {  // the input dtype: dense targets may be stored in it
    using scalar_t = decltype(tag);
    using acc_t = typename ScalarTraits<scalar_t>::acc_t;
    denominator_kernel<scalar_t><<<grid, kDenominatorThreads, 0, stream>>>(
        batch, rows, static_cast<const acc_t*>(col_weight), static_cast<acc_t*>(denominator_parts));
  });
  return cudaGetLastError();
}

cudaError_t launch_segment_losses(InputDType dtype, const TaskBatch& batch, const SegmentArgs& args,
                                  cudaStream_t stream) {
  const auto phase = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  if (!valid_batch(batch) || args.rows <= 0 || args.rows > INT_MAX || args.row_begin % kRowAlignment != 0 ||
      (args.grad != nullptr && phase(args.logits) != phase(args.grad)) ||
      (args.counted_denominators != nullptr &&
       (args.row_begin != 0 || args.rows != args.row_stats_rows || !segment_counts_denominators(batch, args.rows)))) {
    return cudaErrorInvalidValue;
  }
  // Split the batch: narrow segments get consecutive warp ranges in the warp kernel, wide ones a grid row each.
  TaskBatch narrow{};
  TaskBatch wide{};
  int64_t warps = 0;
  for (int i = 0; i < batch.count; ++i) {
    TaskMeta task = batch.task[i];
    if (task.width > kMaxWarpSegmentWidth) {
      wide.task[wide.count++] = task;
    } else {
      task.first_warp = static_cast<int32_t>(warps);
      warps += loss_part_count(args.rows, task.width);
      if (warps > INT_MAX - kWarpKernelThreads) {
        return cudaErrorInvalidValue;
      }
      narrow.task[narrow.count++] = task;
    }
  }
  narrow.total_warps = static_cast<int32_t>(warps);

  dispatch_input_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (narrow.count > 0) {
      constexpr int kWarpsPerBlock = kWarpKernelThreads / kWarpSize;
      const unsigned blocks = static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
      segment_loss_warp_kernel<scalar_t><<<blocks, kWarpKernelThreads, 0, stream>>>(narrow, args);
    }
    if (wide.count > 0) {
      const dim3 grid(static_cast<unsigned>(args.rows), wide.count);
      segment_loss_row_kernel<scalar_t><<<grid, kRowKernelThreads, 0, stream>>>(wide, args);
    }
  });
  return cudaGetLastError();
}

bool segment_counts_denominators(const TaskBatch& batch, int64_t rows) {
  if (!valid_batch(batch) || rows <= 0) {
    return false;
  }
  for (int i = 0; i < batch.count; ++i) {
    const TaskMeta& task = batch.task[i];
    if (task.width > kMaxWarpSegmentWidth) {
      return false;
    }
    const int64_t read_per_warp = task.kind == kCrossEntropy ? rows : rows * task.width;
    if (loss_part_count(rows, task.width) * read_per_warp > kMaxCountedDenominatorReads) {
      return false;
    }
  }
  return true;
}

cudaError_t launch_finalize_losses(InputDType dtype, const TaskBatch& batch, int64_t rows,
                                   const void* denominator_parts, int32_t slots, const void* loss_parts,
                                   int64_t loss_parts_stride, void* losses, void* inverse_denominators,
                                   cudaStream_t stream) {
  if (!valid_batch(batch) || rows <= 0) {
    return cudaErrorInvalidValue;
  }
  if (dtype == InputDType::kDouble) {
    finalize_kernel<double><<<batch.count, kFinalizeThreads, 0, stream>>>(
        batch, rows, static_cast<const double*>(denominator_parts), slots, static_cast<const double*>(loss_parts),
        loss_parts_stride, static_cast<double*>(losses), static_cast<double*>(inverse_denominators));
  } else {
    finalize_kernel<float><<<batch.count, kFinalizeThreads, 0, stream>>>(
        batch, rows, static_cast<const float*>(denominator_parts), slots, static_cast<const float*>(loss_parts),
        loss_parts_stride, static_cast<float*>(losses), static_cast<float*>(inverse_denominators));
  }
  return cudaGetLastError();
}

bool finalize_computes_total(const TaskBatch& batch, int64_t rows) {
  if (!valid_batch(batch) || rows <= 0) {
    return false;
  }
  for (int i = 0; i < batch.count; ++i) {
    if (loss_part_count(rows, batch.task[i].width) > kMaxLossPartsForFinalizeWithTotal) {
      return false;
    }
  }
  return true;
}

cudaError_t launch_finalize_losses_with_total(InputDType dtype, const TaskBatch& batch, int64_t rows,
                                              const void* denominator_parts, int32_t slots, const void* loss_parts,
                                              int64_t loss_parts_stride, void* losses, void* inverse_denominators,
                                              const void* task_weights, void* total, cudaStream_t stream) {
  if (!finalize_computes_total(batch, rows) || task_weights == nullptr || total == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (dtype == InputDType::kDouble) {
    finalize_with_total_kernel<double><<<1, kFinalizeThreads, 0, stream>>>(
        batch, rows, static_cast<const double*>(denominator_parts), slots, static_cast<const double*>(loss_parts),
        loss_parts_stride, static_cast<double*>(losses), static_cast<double*>(inverse_denominators),
        static_cast<const double*>(task_weights), static_cast<double*>(total));
  } else {
    finalize_with_total_kernel<float><<<1, kFinalizeThreads, 0, stream>>>(
        batch, rows, static_cast<const float*>(denominator_parts), slots, static_cast<const float*>(loss_parts),
        loss_parts_stride, static_cast<float*>(losses), static_cast<float*>(inverse_denominators),
        static_cast<const float*>(task_weights), static_cast<float*>(total));
  }
  return cudaGetLastError();
}

cudaError_t launch_gradient_from_stats(InputDType dtype, const TaskBatch& batch, const GradientArgs& args,
                                       cudaStream_t stream) {
  if (!valid_batch(batch) || args.rows <= 0 || args.rows > INT_MAX || args.cols <= 0 || args.ld < args.cols ||
      args.row_stats == nullptr || args.scales == nullptr) {
    return cudaErrorInvalidValue;
  }
  dispatch_input_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    gradient_from_stats_kernel<scalar_t><<<static_cast<unsigned>(args.rows), kGradientThreads, 0, stream>>>(batch,
                                                                                                          args);
  });
  return cudaGetLastError();
}

cudaError_t launch_pack_targets(TargetKernelDType kernel_dtype, const TargetCopyBatch& batch, int64_t rows,
                                void* packed, cudaStream_t stream) {
  if (batch.count <= 0 || batch.count > kMaxTasksPerLaunch || rows <= 0 || packed == nullptr) {
    return cudaErrorInvalidValue;
  }
  int64_t widest = 0;
  for (int i = 0; i < batch.count; ++i) {
    if (batch.copy[i].width <= 0 || batch.copy[i].source == nullptr) {
      return cudaErrorInvalidValue;
    }
    widest = batch.copy[i].width > widest ? batch.copy[i].width : widest;
  }
  const int64_t needed = (rows * widest + kPackThreads - 1) / kPackThreads;
  const dim3 grid(static_cast<unsigned>(needed < kMaxPackBlocksPerTask ? needed : kMaxPackBlocksPerTask), batch.count);
  switch (kernel_dtype) {
    case TargetKernelDType::kLong:
      pack_targets_kernel<int64_t><<<grid, kPackThreads, 0, stream>>>(batch, rows, static_cast<int64_t*>(packed));
      break;
    case TargetKernelDType::kFloat:
      pack_targets_kernel<float><<<grid, kPackThreads, 0, stream>>>(batch, rows, static_cast<float*>(packed));
      break;
    case TargetKernelDType::kDouble:
      pack_targets_kernel<double><<<grid, kPackThreads, 0, stream>>>(batch, rows, static_cast<double*>(packed));
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_scale_logit_gradient(InputDType dtype, const LogitGradientArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.cols < 0 || args.ld < args.cols || args.tasks < 0 || args.col_task == nullptr ||
      args.task_weights == nullptr || args.grad_logits == nullptr || args.dz == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t count = args.rows * args.cols;
  if (count == 0) {
    return cudaSuccess;
  }
  if (args.grad_bias != nullptr) {
    const int64_t slabs = bias_gradient_slabs(args.rows, args.cols);
    if (slabs > 1 && args.bias_partials == nullptr) {
      return cudaErrorInvalidValue;
    }
    const int64_t rows_per_slab = (args.rows + slabs - 1) / slabs;
    const dim3 grid(static_cast<unsigned>((args.cols + 31) / 32), static_cast<unsigned>(slabs));
    const dim3 block(32, kBiasRowLanes);
    const unsigned sum_blocks = static_cast<unsigned>((args.cols + kScaleThreads - 1) / kScaleThreads);
    dispatch_input_dtype(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      scale_logit_gradient_with_bias_kernel<scalar_t><<<grid, block, 0, stream>>>(args, rows_per_slab);
      if (slabs > 1) {
        sum_bias_partials_kernel<scalar_t><<<sum_blocks, kScaleThreads, 0, stream>>>(args, slabs);
      }
    });
    return cudaGetLastError();
  }
  const int64_t needed = (count + kScaleThreads - 1) / kScaleThreads;
  const unsigned blocks = static_cast<unsigned>(needed < kMaxScaleBlocks ? needed : kMaxScaleBlocks);
  dispatch_input_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    scale_logit_gradient_kernel<scalar_t><<<blocks, kScaleThreads, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mtlfast
