// CPU kernels of the fused multi-task loss (schemas and conventions: csrc/registration.cpp).
//
// Both ops share one loss pass over a (rows, S) block of logits: for every row and every task segment it adds
// the task's loss to per-task sums and overwrites the logits IN PLACE with dL_t/dz, already divided by the task's
// denominator. The denominators come from a pre-pass over the whole batch (so the chunked op scales every chunk
// correctly), and the per-element / per-row formulas come from mtlfast/loss_math.h (shared with CUDA). On CPUs
// that run AVX2, the libm-bound kinds (BCE, cross-entropy) use the vector twins of those formulas in
// vectorized_losses.cpp instead (SLEEF's vector exp / log / log1p instead of scalar libm calls: 3-5x faster),
// on tiles of the block gathered into contiguous buffers. Distillation rows run scalar code on every CPU (their
// exp / log calls are not vectorised; the structure of cross_entropy_rows would allow it if they ever matter).
//
//   multi_task_loss          the head GEMM and the loss pass per panel of rows, each thread on its own panels (the
//                            logits are read back while in cache); the (N, S) logits become the returned
//                            grad_logits.
//   multi_task_loss_chunked  the same per chunk of rows, followed by the chunk's share of the weight, bias and
//                            per-task input gradients, so the (N, S) logits never exist.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mtlfast/loss_math.h"
#include "mtlfast/op_signatures.h"
#include "mtlfast/task_table.h"
#include "vectorized_losses.h"

namespace mtlfast {
namespace {

// `#pragma omp simd` below: with -fopenmp these are vectorisation directives (reductions may be reordered);
// they start no threads. Threads come from at::parallel_for over row blocks.
//
// A row block of about this many logits stays in L1/L2 while the loss pass walks it task by task.
constexpr int64_t kBlockElements = 4096;
constexpr int64_t kMaxBlockRows = 256;
// Blocks of at least this many rows have a multiple of it, so that narrow tasks fill the vectors of
// vectorized_losses.cpp (8 floats) over the rows.
constexpr int64_t kBlockRowMultiple = 8;
// Fewer logits than this per thread do not repay waking another thread: each logit costs 10-30 ns of scalar
// exp / log1p, or 3-8 ns vectorised, so this is 10-100 us of work against a few us to fork and join.
constexpr int64_t kMinElementsPerThread = 4096;
// A thread's panel of logits (GEMM output, then loss pass) holds at most about this many: 256 KiB in fp32, so it is
// still in L2 when the loss pass reads it.
constexpr int64_t kPanelElements = 1 << 16;
// Cross-entropy tasks with at most this many classes go through the class-major kernel (one vector = one class
// of consecutive rows); wider ones row by row, vectorised along the classes (measured: both alike at 32 classes,
// the class-major kernel 2-5x faster below 10, the row path faster from 64).
constexpr int64_t kMaxClassMajorClasses = 32;

// Whether the loss pass uses vectorized_losses.cpp: built for AVX2 (x86-64 builds) and the CPU runs it, as
// ATen decides (AVX2 or AVX512 means AVX2 + FMA; ATEN_CPU_CAPABILITY=default forces the scalar path).
bool use_vectorized_losses() {
#if defined(MTLFAST_AVX2_LOSSES)
  static const bool cpu_runs_avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return cpu_runs_avx2;
#else
  return false;
#endif
}

// What the loss pass needs about one task, resolved once per call.
template <typename acc_t>
struct TaskPass {
  int64_t kind = kNone;
  int64_t begin = 0;  // first packed column
  int64_t width = 0;  // C_t
  int64_t ignore_index = 0;
  acc_t param = 0;              // label smoothing (cross-entropy) / delta (Huber) / temperature (distillation)
  acc_t sum_class_weights = 0;  // cross-entropy: Σ_c w_c over the task's columns
  acc_t grad_scale = 0;         // 1 / denominator, 0 when the task has no valid entry
  bool uniform_pos_weight = true;          // BCE: the same pos_weight in all its columns
  const int64_t* class_targets = nullptr;  // cross-entropy: (N,)
  const acc_t* dense_targets = nullptr;    // dense kinds: (N, width), row-major
  // multi_task_loss_recompute: the task's (N, 4) block of row_stats (cross-entropy and distillation tasks), or null.
  acc_t* row_stats = nullptr;
};

// The statistics multi_task_loss_recompute saves for row `row` of a task (layout: csrc/registration.cpp).
template <typename acc_t>
void store_row_stats(const TaskPass<acc_t>& task, int64_t row, acc_t s0, acc_t s1, acc_t s2, acc_t s3) {
  if (task.row_stats != nullptr) {
    acc_t* out = task.row_stats + row * kSavedRowStats;
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
  }
}

// Consecutive Binary tasks (one column each: adjacent columns of the logits) go through the loss pass as one
// (rows, run) block, row by row in place, instead of task by task on gathered columns: at 64 Binary heads that was
// a quarter of the pass. Runs shorter than this are not worth gathering their targets for.
constexpr int64_t kMinBceRun = 4;

template <typename acc_t>
struct BceColumnRun {
  int64_t first_task = 0;  // tasks [first_task, first_task + num_tasks), columns likewise
  int64_t num_tasks = 0;
  std::vector<const acc_t*> targets;  // per task, its (N,) targets
  std::vector<acc_t> pos_weight;      // per task
  std::vector<acc_t> grad_scale;      // per task
};

// Σ over non-ignored rows of the target's class weight: the number of valid rows when unweighted.
template <typename acc_t>
double cross_entropy_denominator(const TaskPass<acc_t>& task, int64_t rows, const acc_t* class_weights) {
  double denominator = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t y = task.class_targets[i];
    if (y != task.ignore_index) {
      denominator += static_cast<double>(class_weights[y]);
    }
  }
  return denominator;
}

// Number of non-NaN (present) target entries.
template <typename acc_t>
double dense_denominator(const TaskPass<acc_t>& task, int64_t rows) {
  const int64_t count = rows * task.width;
  const acc_t* y = task.dense_targets;
  int64_t present = 0;
#pragma omp simd reduction(+ : present)
  for (int64_t i = 0; i < count; ++i) {
    present += y[i] == y[i] ? 1 : 0;  // false for NaN only (std::isnan does not vectorise)
  }
  return static_cast<double>(present);
}

// Number of rows whose target holds no NaN (distillation: a NaN anywhere in the row marks it missing).
template <typename acc_t>
double complete_rows(const TaskPass<acc_t>& task, int64_t rows) {
  int64_t present = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* y = task.dense_targets + i * task.width;
    present += std::none_of(y, y + task.width, [](acc_t v) { return std::isnan(v); }) ? 1 : 0;
  }
  return static_cast<double>(present);
}

// The whole batch's task description: per-task passes with their gradient scales, the column weights, and the
// kernel-layout targets they point into (PreparedInputs::kernel_targets, alive for the op call).
template <typename acc_t>
class LossProblem {
 public:
  LossProblem(const TaskTable& table, const std::vector<const void*>& kernel_targets,
              const c10::optional<at::Tensor>& col_weight)
      : columns_(table.columns),
        col_weight_storage_(col_weight.has_value() ? col_weight->contiguous() : at::Tensor()),
        unit_weights_(col_weight.has_value() ? 0 : table.columns, acc_t(1)),
        col_weight_(col_weight.has_value() ? col_weight_storage_.const_data_ptr<acc_t>() : unit_weights_.data()) {
    const int64_t T = table.num_tasks();
    tasks_.resize(T);
    denominators_.assign(T, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      TaskPass<acc_t>& task = tasks_[t];
      task.kind = table.kinds[t];
      task.begin = table.col_offsets[t];
      task.width = table.width(t);
      task.ignore_index = table.ignore_index[t];
      task.param = static_cast<acc_t>(table.params[t]);
      if (task.kind == kNone) {
        continue;
      }
      const acc_t* class_weights = col_weight_ + task.begin;
      if (task.kind == kCrossEntropy) {
        task.class_targets = static_cast<const int64_t*>(kernel_targets[t]);
        max_class_width_ = std::max(max_class_width_, task.width);
        for (int64_t c = 0; c < task.width; ++c) {
          task.sum_class_weights += class_weights[c];
        }
        denominators_[t] = cross_entropy_denominator(task, table.rows, class_weights);
      } else {
        task.dense_targets = static_cast<const acc_t*>(kernel_targets[t]);
        if (task.kind == kBCE) {
          task.uniform_pos_weight = std::all_of(class_weights, class_weights + task.width,
                                                [&](acc_t w) { return w == class_weights[0]; });
          max_bce_width_ = std::max(max_bce_width_, task.width);
        }
        denominators_[t] = is_distillation(task.kind) ? complete_rows(task, table.rows)
                                                      : dense_denominator(task, table.rows);
      }
      task.grad_scale = static_cast<acc_t>(safe_reciprocal(denominators_[t]));
    }
    find_bce_column_runs();
  }

  const std::vector<TaskPass<acc_t>>& tasks() const { return tasks_; }

  // The loss pass then also writes each cross-entropy / distillation row's statistics into row_stats, (T, N, 4)
  // contiguous (the rows of other tasks are left as they are).
  void save_row_stats(at::Tensor& row_stats) {
    acc_t* base = row_stats.data_ptr<acc_t>();
    const int64_t rows = row_stats.size(1);
    for (int64_t t = 0; t < num_tasks(); ++t) {
      if (tasks_[t].kind == kCrossEntropy || is_distillation(tasks_[t].kind)) {
        tasks_[t].row_stats = base + t * rows * kSavedRowStats;
      }
    }
  }

  // Per task, 1 / denominator (0 without a valid entry).
  at::Tensor inverse_denominators(const at::TensorOptions& options) const {
    at::Tensor out = at::empty({num_tasks()}, options);
    acc_t* data = out.data_ptr<acc_t>();
    for (int64_t t = 0; t < num_tasks(); ++t) {
      data[t] = static_cast<acc_t>(safe_reciprocal(denominators_[t]));
    }
    return out;
  }
  const std::vector<BceColumnRun<acc_t>>& bce_column_runs() const { return bce_column_runs_; }
  int64_t max_bce_run() const { return max_bce_run_; }
  int64_t num_tasks() const { return static_cast<int64_t>(tasks_.size()); }
  int64_t columns() const { return columns_; }
  const acc_t* col_weight() const { return col_weight_; }
  int64_t max_class_width() const { return max_class_width_; }
  int64_t max_bce_width() const { return max_bce_width_; }

  // losses[t] = Σ loss / denominator, 0 for a task without valid entries.
  at::Tensor mean_losses(const std::vector<double>& loss_sums, const at::TensorOptions& options) const {
    at::Tensor losses = at::empty({num_tasks()}, options);
    acc_t* out = losses.data_ptr<acc_t>();
    for (int64_t t = 0; t < num_tasks(); ++t) {
      out[t] = static_cast<acc_t>(loss_sums[t] * safe_reciprocal(denominators_[t]));
    }
    return losses;
  }

 private:
  int64_t columns_;
  at::Tensor col_weight_storage_;
  std::vector<acc_t> unit_weights_;  // all ones without col_weight, so the inner loops need no branch on it
  const acc_t* col_weight_;          // (S,), never null
  std::vector<TaskPass<acc_t>> tasks_;
  std::vector<double> denominators_;
  int64_t max_class_width_ = 0;
  int64_t max_bce_width_ = 0;
  std::vector<BceColumnRun<acc_t>> bce_column_runs_;
  int64_t max_bce_run_ = 0;

  // Maximal runs of at least kMinBceRun consecutive single-column BCE tasks.
  void find_bce_column_runs() {
    const int64_t T = num_tasks();
    for (int64_t t = 0; t < T;) {
      int64_t end = t;
      while (end < T && tasks_[end].kind == kBCE && tasks_[end].width == 1) {
        ++end;
      }
      if (end - t >= kMinBceRun) {
        BceColumnRun<acc_t> run;
        run.first_task = t;
        run.num_tasks = end - t;
        for (int64_t k = t; k < end; ++k) {
          run.targets.push_back(tasks_[k].dense_targets);
          run.pos_weight.push_back(col_weight_[tasks_[k].begin]);
          run.grad_scale.push_back(tasks_[k].grad_scale);
        }
        max_bce_run_ = std::max(max_bce_run_, run.num_tasks);
        bce_column_runs_.push_back(std::move(run));
      }
      t = std::max(end, t + 1);
    }
  }
};

// Per-thread buffers of the loss pass for blocks of up to block_rows rows; those of the vector kernels only
// with vector_kernels.
template <typename acc_t>
struct LossScratch {
  LossScratch(const LossProblem<acc_t>& problem, int64_t block_rows, bool vector_kernels)
      : exp(problem.max_class_width()) {
    if (vector_kernels) {
      run_targets.resize(block_rows * problem.max_bce_run());
      const int64_t class_major_width = std::min(problem.max_class_width(), kMaxClassMajorClasses);
      tile.resize(block_rows * std::max(problem.max_bce_width(), class_major_width));
      pos_weight.resize(block_rows * problem.max_bce_width());
      row_target.resize(block_rows);
      row_a.resize(block_rows);
      smoothing_weights.resize(class_major_width);
    }
  }

  std::vector<acc_t> exp;                // cross-entropy row by row: exp(z - max) of one row
  std::vector<acc_t> tile;               // one task's logits of the block, then their gradient
  std::vector<acc_t> pos_weight;         // BCE without a uniform pos_weight: each entry's
  std::vector<acc_t> row_target;         // class-major cross-entropy: per row, the target class or -1 (ignored)
  std::vector<acc_t> row_a;              // ... and cross_entropy_row(...).a;
  std::vector<acc_t> smoothing_weights;  // ... per class, b_c = (ε/C)·w_c
  std::vector<acc_t> run_targets;        // a BCE column run's targets of the block, (rows, run) row-major
};

// Cross-entropy rows of one task: row statistics (max, Σexp, z_y, Σ b_c z_c) here, formulas from loss_math.h.
// exp_scratch (≥ width) keeps exp(z - max) between the normalising sum and the gradient; with vector_kernels
// vectorized_losses.cpp computes it (the compiler vectorises the other loops).
template <typename scalar_t, typename acc_t>
double cross_entropy_rows(scalar_t* logits, int64_t row_stride, int64_t rows, int64_t first_row,
                          const TaskPass<acc_t>& task, const acc_t* col_weight, bool vector_kernels,
                          acc_t* exp_scratch) {
  const int64_t num_classes = task.width;
  const acc_t* class_weights = col_weight + task.begin;
  const acc_t smoothing = task.param;
  const acc_t smoothing_per_class = smoothing / static_cast<acc_t>(num_classes);  // b_c = this · w_c
  double loss_sum = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* z = logits + i * row_stride + task.begin;
    const int64_t target = task.class_targets[first_row + i];
    if (target == task.ignore_index) {
      std::fill(z, z + num_classes, scalar_t(0));
      store_row_stats(task, first_row + i, acc_t(0), acc_t(0), acc_t(0), acc_t(0));
      continue;
    }
    acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : max_logit)
    for (int64_t c = 0; c < num_classes; ++c) {
      max_logit = std::max(max_logit, static_cast<acc_t>(z[c]));
    }
    acc_t smoothing_dot_logits = 0;
    if (smoothing > acc_t(0)) {
#pragma omp simd reduction(+ : smoothing_dot_logits)
      for (int64_t c = 0; c < num_classes; ++c) {
        smoothing_dot_logits += smoothing_per_class * class_weights[c] * static_cast<acc_t>(z[c]);
      }
    }
    acc_t sum_exp = 0;
    if (vector_kernels) {
      std::copy_n(z, num_classes, exp_scratch);
      sum_exp = vectorized::exp_shifted_sum(exp_scratch, max_logit, num_classes);
    } else {
      // The exp calls stay scalar; summing in a separate loop keeps the sum's dependency chain out of them.
      for (int64_t c = 0; c < num_classes; ++c) {
        exp_scratch[c] = std::exp(static_cast<acc_t>(z[c]) - max_logit);
      }
#pragma omp simd reduction(+ : sum_exp)
      for (int64_t c = 0; c < num_classes; ++c) {
        sum_exp += exp_scratch[c];
      }
    }
    const acc_t log_sum_exp = max_logit + std::log(sum_exp);
    const CrossEntropyRow<acc_t> row =
        cross_entropy_row(smoothing, class_weights[target], task.sum_class_weights, num_classes);
    loss_sum += cross_entropy_row_loss(row, log_sum_exp, static_cast<acc_t>(z[target]), smoothing_dot_logits);
    store_row_stats(task, first_row + i, log_sum_exp, row.a, row.B, smoothing_per_class);

    // Every class as a non-target first (a branch-free, vectorisable loop), then the target's entry.
    const acc_t inv_sum_exp = acc_t(1) / sum_exp;
    const acc_t grad_scale = task.grad_scale;
    auto class_grad = [&](int64_t c, bool is_target) {
      const acc_t smoothing_weight = smoothing_per_class * class_weights[c];
      return grad_scale * cross_entropy_grad(row, exp_scratch[c] * inv_sum_exp, is_target, smoothing_weight);
    };
#pragma omp simd
    for (int64_t c = 0; c < num_classes; ++c) {
      z[c] = static_cast<scalar_t>(class_grad(c, /*is_target=*/false));
    }
    z[target] = static_cast<scalar_t>(class_grad(target, /*is_target=*/true));
  }
  return loss_sum;
}

// Distillation rows of one task: per row the maxima and Σexp of z / τ (and of t / τ for teacher logits, or the
// target mass Σ p for probabilities), then loss_math.h's per-class loss and gradient. Scalar: each class costs
// four exp calls (two and a log for probabilities) but needs no scratch buffer.
template <typename scalar_t, typename acc_t>
double distillation_rows(scalar_t* logits, int64_t row_stride, int64_t rows, int64_t first_row,
                         const TaskPass<acc_t>& task) {
  const int64_t num_classes = task.width;
  const bool from_logits = distillation_targets_are_logits(task.kind);
  const acc_t temperature = task.param;
  const acc_t inv_temperature = acc_t(1) / temperature;
  const acc_t grad_scale = task.grad_scale;
  double loss_sum = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* z = logits + i * row_stride + task.begin;
    const acc_t* y = task.dense_targets + (first_row + i) * num_classes;
    if (std::any_of(y, y + num_classes, [](acc_t v) { return std::isnan(v); })) {  // missing row
      std::fill(z, z + num_classes, scalar_t(0));
      store_row_stats(task, first_row + i, acc_t(0), acc_t(0), acc_t(0), acc_t(0));
      continue;
    }
    acc_t student_max = -std::numeric_limits<acc_t>::infinity();
    acc_t teacher_max = -std::numeric_limits<acc_t>::infinity();
    acc_t target_mass = 0;
    for (int64_t c = 0; c < num_classes; ++c) {
      student_max = std::max(student_max, static_cast<acc_t>(z[c]) * inv_temperature);
      teacher_max = std::max(teacher_max, y[c] * inv_temperature);
      target_mass += y[c];
    }
    acc_t student_sum_exp = 0;
    acc_t teacher_sum_exp = 0;
    for (int64_t c = 0; c < num_classes; ++c) {
      student_sum_exp += std::exp(static_cast<acc_t>(z[c]) * inv_temperature - student_max);
      if (from_logits) {
        teacher_sum_exp += std::exp(y[c] * inv_temperature - teacher_max);
      }
    }
    const DistillationRow<acc_t> row =
        from_logits ? distillation_row(temperature, student_max, student_sum_exp, teacher_max, teacher_sum_exp, acc_t(1))
                    : distillation_row(temperature, student_max, student_sum_exp, acc_t(0), acc_t(1), target_mass);
    store_row_stats(task, first_row + i, row.student_lse, from_logits ? row.teacher_lse : acc_t(0), row.target_mass,
                    acc_t(1));
    acc_t row_loss = 0;
    for (int64_t c = 0; c < num_classes; ++c) {
      const LossAndGrad<acc_t> r = distillation_element(row, from_logits, static_cast<acc_t>(z[c]), y[c]);
      row_loss += r.loss;
      z[c] = static_cast<scalar_t>(grad_scale * r.grad);
    }
    loss_sum += static_cast<double>(row_loss);
  }
  return loss_sum;
}

// Element-wise kinds; kKind is a template argument so elementwise_loss's switch folds away in the inner loop.
template <int64_t kKind, typename scalar_t, typename acc_t>
double dense_rows(scalar_t* logits, int64_t row_stride, int64_t rows, int64_t first_row, const TaskPass<acc_t>& task,
                  const acc_t* col_weight) {
  const int64_t width = task.width;
  const acc_t* pos_weights = col_weight + task.begin;
  const acc_t grad_scale = task.grad_scale;
  double loss_sum = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* z = logits + i * row_stride + task.begin;
    const acc_t* y = task.dense_targets + (first_row + i) * width;
    for (int64_t c = 0; c < width; ++c) {
      const acc_t target = y[c];
      if (std::isnan(target)) {  // missing label
        z[c] = scalar_t(0);
        continue;
      }
      // BCE's parameter is the column's pos_weight; Huber's is the task's delta; MSE / L1 ignore it.
      const acc_t param = kKind == kBCE ? pos_weights[c] : task.param;
      const LossAndGrad<acc_t> r = elementwise_loss<acc_t>(kKind, static_cast<acc_t>(z[c]), target, param);
      loss_sum += static_cast<double>(r.loss);
      z[c] = static_cast<scalar_t>(grad_scale * r.grad);
    }
  }
  return loss_sum;
}

// f(i, c) for every entry of a (rows, width) block, the longer side innermost: a block is often many rows of one
// column (a Binary task), and looping over rows outermost would cost a loop set-up per entry.
template <typename F>
void for_each_entry(int64_t rows, int64_t width, const F& f) {
  if (width >= rows) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t c = 0; c < width; ++c) {
        f(i, c);
      }
    }
  } else {
    for (int64_t c = 0; c < width; ++c) {
      for (int64_t i = 0; i < rows; ++i) {
        f(i, c);
      }
    }
  }
}

// A task's (rows, width) block of the logits, columns [begin, begin + width) of each row, to a contiguous acc_t
// tile holding entry (i, c) at tile[i * row_step + c * class_step] (row-major or class-major), and back.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* logits, int64_t row_stride, int64_t rows, int64_t begin, int64_t width, acc_t* tile,
               int64_t row_step, int64_t class_step) {
  for_each_entry(rows, width, [&](int64_t i, int64_t c) {
    tile[i * row_step + c * class_step] = static_cast<acc_t>(logits[i * row_stride + begin + c]);
  });
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* tile, int64_t row_step, int64_t class_step, scalar_t* logits, int64_t row_stride,
                int64_t rows, int64_t begin, int64_t width) {
  for_each_entry(rows, width, [&](int64_t i, int64_t c) {
    logits[i * row_stride + begin + c] = static_cast<scalar_t>(tile[i * row_step + c * class_step]);
  });
}

// dense_rows<kBCE> with vectorized::bce_with_logits. The targets are a row-major (N, width) array, so the block's
// logits are gathered row-major too and one call covers every entry of the block, whatever the task's width.
template <typename scalar_t, typename acc_t>
double bce_rows_vectorized(scalar_t* logits, int64_t row_stride, int64_t rows, int64_t first_row,
                           const TaskPass<acc_t>& task, const acc_t* col_weight, LossScratch<acc_t>& scratch) {
  const int64_t width = task.width;
  acc_t* z = scratch.tile.data();
  load_tile(logits, row_stride, rows, task.begin, width, z, /*row_step=*/width, /*class_step=*/1);
  const acc_t* pos_weights = col_weight + task.begin;
  int64_t pos_weight_stride = 0;
  if (!task.uniform_pos_weight) {  // the kernel takes one per entry then
    for (int64_t i = 0; i < rows; ++i) {
      std::copy_n(pos_weights, width, scratch.pos_weight.data() + i * width);
    }
    pos_weights = scratch.pos_weight.data();
    pos_weight_stride = 1;
  }
  const double loss_sum = vectorized::bce_with_logits(z, task.dense_targets + first_row * width, pos_weights,
                                                      pos_weight_stride, task.grad_scale, rows * width);
  store_tile(z, /*row_step=*/width, /*class_step=*/1, logits, row_stride, rows, task.begin, width);
  return loss_sum;
}

// cross_entropy_rows with vectorized::cross_entropy_class_major, for tasks of at most kMaxClassMajorClasses
// classes (few classes leave most lanes idle when vectorised along a row). The per-row and per-class constants
// come from loss_math.h's cross_entropy_row here.
template <typename scalar_t, typename acc_t>
double cross_entropy_rows_class_major(scalar_t* logits, int64_t row_stride, int64_t rows, int64_t first_row,
                                      const TaskPass<acc_t>& task, const acc_t* col_weight,
                                      LossScratch<acc_t>& scratch) {
  const int64_t num_classes = task.width;
  const acc_t* class_weights = col_weight + task.begin;
  const acc_t smoothing = task.param;
  const acc_t smoothing_per_class = smoothing / static_cast<acc_t>(num_classes);
  for (int64_t c = 0; c < num_classes; ++c) {
    scratch.smoothing_weights[c] = smoothing_per_class * class_weights[c];
  }
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t target = task.class_targets[first_row + i];
    const bool ignored = target == task.ignore_index;
    scratch.row_target[i] = ignored ? acc_t(-1) : static_cast<acc_t>(target);
    scratch.row_a[i] =
        ignored ? acc_t(0)
                : cross_entropy_row(smoothing, class_weights[target], task.sum_class_weights, num_classes).a;
  }
  const acc_t B = cross_entropy_row(smoothing, acc_t(0), task.sum_class_weights, num_classes).B;
  acc_t* z = scratch.tile.data();
  load_tile(logits, row_stride, rows, task.begin, num_classes, z, /*row_step=*/1, /*class_step=*/rows);
  const double loss_sum =
      vectorized::cross_entropy_class_major(z, rows, num_classes, scratch.row_target.data(), scratch.row_a.data(), B,
                                            scratch.smoothing_weights.data(), task.grad_scale);
  store_tile(z, /*row_step=*/1, /*class_step=*/rows, logits, row_stride, rows, task.begin, num_classes);
  return loss_sum;
}

template <typename scalar_t>
void zero_rows(scalar_t* logits, int64_t row_stride, int64_t rows, int64_t begin, int64_t width) {
  for (int64_t i = 0; i < rows; ++i) {
    std::fill_n(logits + i * row_stride + begin, width, scalar_t(0));
  }
}

// A BCE column run over a block of rows (logits of acc_t, as the vector kernels take them): adds each task's loss
// sum of the block to loss_sums[k] (k: the task's place in the run) and leaves the gradient in the logits.
template <typename acc_t>
void bce_column_run_rows(acc_t* logits, int64_t row_stride, int64_t rows, int64_t first_row,
                         const BceColumnRun<acc_t>& run, int64_t first_column, LossScratch<acc_t>& scratch,
                         double* loss_sums) {
  const int64_t width = run.num_tasks;
  acc_t* y = scratch.run_targets.data();
  for (int64_t k = 0; k < width; ++k) {
    const acc_t* task_targets = run.targets[k] + first_row;
    for (int64_t i = 0; i < rows; ++i) {
      y[i * width + k] = task_targets[i];
    }
  }
  vectorized::bce_with_logits_columns(logits + first_column, row_stride, y, rows, width, run.pos_weight.data(),
                                      run.grad_scale.data(), loss_sums);
}

// One task over a block of rows: returns the block's loss sum and leaves the scaled gradient in the logits.
// vector_kernels: use_vectorized_losses().
template <typename scalar_t, typename acc_t>
double task_rows(scalar_t* logits, int64_t row_stride, int64_t rows, int64_t first_row, const TaskPass<acc_t>& task,
                 const acc_t* col_weight, bool vector_kernels, LossScratch<acc_t>& scratch) {
  switch (task.kind) {
    case kCrossEntropy:
      // The class-major kernel keeps no row statistics: the row path saves them when asked for.
      if (vector_kernels && task.width <= kMaxClassMajorClasses && task.row_stats == nullptr) {
        return cross_entropy_rows_class_major(logits, row_stride, rows, first_row, task, col_weight, scratch);
      }
      return cross_entropy_rows(logits, row_stride, rows, first_row, task, col_weight, vector_kernels,
                                scratch.exp.data());
    case kBCE:
      if (vector_kernels) {
        return bce_rows_vectorized(logits, row_stride, rows, first_row, task, col_weight, scratch);
      }
      return dense_rows<kBCE>(logits, row_stride, rows, first_row, task, col_weight);
    case kMSE:
      return dense_rows<kMSE>(logits, row_stride, rows, first_row, task, col_weight);
    case kL1:
      return dense_rows<kL1>(logits, row_stride, rows, first_row, task, col_weight);
    case kHuber:
      return dense_rows<kHuber>(logits, row_stride, rows, first_row, task, col_weight);
    case kDistill:
    case kDistillProbs:
      return distillation_rows(logits, row_stride, rows, first_row, task);
    default:  // kNone: absent task, zero gradient
      zero_rows(logits, row_stride, rows, task.begin, task.width);
      return 0.0;
  }
}

// The shared loss pass. logits: (rows, S) row-major holding rows [first_row, first_row + rows) of the batch;
// overwritten with the scaled logit gradient. Adds each task's loss sum to loss_sums (T entries).
//
// Rows are cut into blocks (the unit of the loss pass and of its partial sums) and consecutive blocks into panels
// (the unit of work of one thread). Before its loss pass, a panel's logits are produced by
// produce_rows(first, count) (rows relative to `logits`), so that a thread runs the head GEMM of its own rows and
// the loss pass on them while they are still in cache; pass a no-op when the logits already exist. Per-block
// partial sums reduced in block order make the losses independent of the thread count.
template <typename scalar_t, typename acc_t, typename ProduceRows>
void accumulate_loss_and_grad(scalar_t* logits, int64_t rows, int64_t first_row, const LossProblem<acc_t>& problem,
                              std::vector<double>& loss_sums, const ProduceRows& produce_rows) {
  const int64_t S = problem.columns();
  const int64_t T = problem.num_tasks();
  int64_t block_rows = std::clamp<int64_t>(kBlockElements / S, 1, kMaxBlockRows);
  if (block_rows > kBlockRowMultiple) {
    block_rows -= block_rows % kBlockRowMultiple;
  }
  const int64_t num_blocks = (rows + block_rows - 1) / block_rows;
  const int64_t block_elements = block_rows * S;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Panels small enough to stay in cache and large enough to repay waking a thread, and a multiple of the thread
  // count where possible: at::parallel_for gives each thread an equal run of panels, and the GEMMs dominate.
  const int64_t max_panel_blocks = std::max<int64_t>(1, kPanelElements / block_elements);
  const int64_t min_panel_blocks = std::max<int64_t>(1, kMinElementsPerThread / block_elements);
  int64_t num_panels = (num_blocks + max_panel_blocks - 1) / max_panel_blocks;
  num_panels = std::min(num_blocks, (num_panels + threads - 1) / threads * threads);
  int64_t panel_blocks = std::max(min_panel_blocks, (num_blocks + num_panels - 1) / num_panels);
  num_panels = (num_blocks + panel_blocks - 1) / panel_blocks;
  std::vector<double> block_sums(num_blocks * T, 0.0);
  const bool vector_kernels = use_vectorized_losses();
  // The column runs work in place on acc_t logits (fp32 / fp64 inputs, and every chunk of the chunked op).
  static const std::vector<BceColumnRun<acc_t>> kNoRuns;
  const std::vector<BceColumnRun<acc_t>>& column_runs =
      vector_kernels && std::is_same_v<scalar_t, acc_t> ? problem.bce_column_runs() : kNoRuns;

  at::parallel_for(0, num_panels, 1, [&](int64_t panel_begin, int64_t panel_end) {
    LossScratch<acc_t> scratch(problem, block_rows, vector_kernels);
    for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
      const int64_t block_begin = panel * panel_blocks;
      const int64_t block_end = std::min(num_blocks, block_begin + panel_blocks);
      const int64_t panel_row = block_begin * block_rows;
      produce_rows(panel_row, std::min(block_end * block_rows, rows) - panel_row);
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t row = block * block_rows;
        const int64_t count = std::min(block_rows, rows - row);
        double* sums = block_sums.data() + block * T;
        int64_t t = 0;
        for (const BceColumnRun<acc_t>& run : column_runs) {
          for (; t < run.first_task; ++t) {
            sums[t] = task_rows(logits + row * S, S, count, first_row + row, problem.tasks()[t],
                                problem.col_weight(), vector_kernels, scratch);
          }
          if constexpr (std::is_same_v<scalar_t, acc_t>) {  // else there are no runs
            bce_column_run_rows(logits + row * S, S, count, first_row + row, run, problem.tasks()[t].begin, scratch,
                                sums + t);
          }
          t += run.num_tasks;
        }
        for (; t < T; ++t) {
          sums[t] = task_rows(logits + row * S, S, count, first_row + row, problem.tasks()[t], problem.col_weight(),
                              vector_kernels, scratch);
        }
      }
    }
  });
  for (int64_t block = 0; block < num_blocks; ++block) {
    for (int64_t t = 0; t < T; ++t) {
      loss_sums[t] += block_sums[block * T + t];
    }
  }
}

// Validation shared by both ops, before any kernel runs; the value checks read the targets on the host.
PreparedInputs prepare_cpu_inputs(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  at::TensorList targets, const at::Tensor& task_weights,
                                  const c10::optional<at::Tensor>& col_weight, const at::Tensor& col_task,
                                  c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
                                  c10::IntArrayRef ignore_index, c10::ArrayRef<double> params,
                                  const std::vector<std::string>& task_names) {
  PreparedInputs prepared = prepare_multi_task_inputs(h, weight, bias, targets, task_weights, col_weight, col_task,
                                                      kinds, col_offsets, class_dims, ignore_index, params,
                                                      task_names);
  check_class_targets_in_range_cpu(prepared.table, prepared.kernel_targets);
  check_distillation_targets_cpu(prepared.table, prepared.kernel_targets,
                                 accumulation_dtype(prepared.h.scalar_type()));
  return prepared;
}

// h @ weight^T (+ bias) into a preallocated (rows, S) buffer. Through the CPU kernels directly (no dispatcher, no
// autograd): it also runs on the loss pass's worker threads, where the caller's grad mode does not apply.
void linear_into(at::Tensor& out, const at::Tensor& h, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::cpu::addmm_out(out, *bias, h, weight.t());
  } else {
    at::cpu::mm_out(out, h, weight.t());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_task_loss_cpu(
    const at::Tensor& h_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList targets_in, const at::Tensor& task_weights, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
    c10::IntArrayRef ignore_index, c10::ArrayRef<double> params, const std::vector<std::string>& task_names,
    bool return_logits) {
  // The ATen calls below are implementation steps: never recorded by autograd (the op's own formula is
  // registered in mtlfast/ops.py).
  at::NoGradGuard no_grad;
  const PreparedInputs prepared = prepare_cpu_inputs(h_in, weight, bias, targets_in, task_weights, col_weight,
                                                     col_task, kinds, col_offsets, class_dims, ignore_index, params,
                                                     task_names);
  const TaskTable& table = prepared.table;
  const at::Tensor& h = prepared.h;
  const at::ScalarType acc_dtype = accumulation_dtype(h.scalar_type());
  const int64_t S = table.columns;
  // The logits, which the loss pass then overwrites with their gradient; each thread computes its own panel of
  // rows with one GEMM just before its loss pass. A copy is kept only when asked for.
  at::Tensor grad_logits = at::empty({table.rows, S}, h.options());
  const at::Tensor logits = return_logits ? at::empty({table.rows, S}, h.options()) : at::empty({0}, h.options());

  at::Tensor losses;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "mtlfast::multi_task_loss (CPU)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossProblem<acc_t> problem(table, prepared.kernel_targets, col_weight);
    std::vector<double> loss_sums(table.num_tasks(), 0.0);
    scalar_t* grad_data = grad_logits.data_ptr<scalar_t>();
    scalar_t* logits_data = return_logits ? logits.data_ptr<scalar_t>() : nullptr;
    const auto produce_rows = [&](int64_t first, int64_t count) {
      // Grad mode is per thread and on by default in the pool's threads: without this guard, narrowing h (which
      // may require grad) there makes autograd views, and the result came out flagged as requiring grad.
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const at::NoGradGuard no_grad_in_worker;
      at::Tensor rows = grad_logits.narrow(0, first, count);
      linear_into(rows, h.narrow(0, first, count), weight, bias);
      if (logits_data != nullptr) {
        std::copy_n(grad_data + first * S, count * S, logits_data + first * S);
      }
    };
    accumulate_loss_and_grad(grad_data, table.rows, /*first_row=*/0, problem, loss_sums, produce_rows);
    losses = problem.mean_losses(loss_sums, h.options().dtype(acc_dtype));
  });
  return {weighted_total(losses, prepared.task_weights), losses, grad_logits, logits};
}

// The unscaled gradients the chunked op returns, in the accumulation dtype.
struct ChunkedGradients {
  at::Tensor input_per_task;  // (T, N, D)
  at::Tensor weight;          // (S, D)
  at::Tensor bias;            // (S,), or empty without bias
};

// Adds one chunk's share to the gradients: grad_chunk (rows, S) holds the scaled logit gradient of batch rows
// [first_row, first_row + rows); h_chunk and weight are in the accumulation dtype.
template <typename acc_t>
void accumulate_chunk_gradients(ChunkedGradients& grads, const at::Tensor& grad_chunk, const at::Tensor& h_chunk,
                                const at::Tensor& weight, const LossProblem<acc_t>& problem, int64_t first_row) {
  grads.weight.addmm_(grad_chunk.t(), h_chunk);
  if (grads.bias.numel() > 0) {
    grads.bias.add_(grad_chunk.sum(0));
  }
  for (int64_t t = 0; t < problem.num_tasks(); ++t) {
    const TaskPass<acc_t>& task = problem.tasks()[t];
    at::Tensor input_rows = grads.input_per_task.select(0, t).narrow(0, first_row, grad_chunk.size(0));
    if (task.grad_scale == acc_t(0)) {  // absent task or no valid entry: its gradient is 0
      input_rows.zero_();
    } else {
      at::mm_out(input_rows, grad_chunk.narrow(1, task.begin, task.width), weight.narrow(0, task.begin, task.width));
    }
  }
}

// Per chunk of rows: the logits in h's dtype (as in the unchunked op), then the loss pass and the gradient GEMMs
// in the accumulation dtype (fp32 for bf16 / fp16: exact accumulation across chunks, and faster than half GEMMs
// on CPUs without half-precision matrix units).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_task_loss_chunked_cpu(
    const at::Tensor& h_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList targets_in, const at::Tensor& task_weights, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
    c10::IntArrayRef ignore_index, c10::ArrayRef<double> params, const std::vector<std::string>& task_names,
    int64_t chunk_rows) {
  at::NoGradGuard no_grad;  // as in multi_task_loss_cpu
  const PreparedInputs prepared = prepare_cpu_inputs(h_in, weight, bias, targets_in, task_weights, col_weight,
                                                     col_task, kinds, col_offsets, class_dims, ignore_index, params,
                                                     task_names);
  const TaskTable& table = prepared.table;
  const at::Tensor& h = prepared.h;
  TORCH_CHECK_VALUE(chunk_rows > 0, "mtlfast: chunk_rows must be positive, got ", chunk_rows);
  const int64_t N = table.rows;
  const int64_t S = table.columns;
  const int64_t chunk = std::min(chunk_rows, N);
  const at::ScalarType acc_dtype = accumulation_dtype(h.scalar_type());
  const at::TensorOptions acc_options = h.options().dtype(acc_dtype);
  const bool half_input = acc_dtype != h.scalar_type();

  ChunkedGradients grads{at::empty({table.num_tasks(), N, table.features}, acc_options),
                         at::zeros({S, table.features}, acc_options),
                         bias.has_value() ? at::zeros({S}, acc_options) : at::empty({0}, acc_options)};
  const at::Tensor weight_acc = weight.to(acc_dtype);
  // Reused by every chunk. For fp32 / fp64 the loss pass overwrites the logits buffer itself.
  at::Tensor logits_buffer = at::empty({chunk, S}, h.options());
  at::Tensor grad_buffer = half_input ? at::empty({chunk, S}, acc_options) : logits_buffer;
  at::Tensor losses;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "mtlfast::multi_task_loss_chunked (CPU)",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossProblem<acc_t> problem(table, prepared.kernel_targets, col_weight);
    std::vector<double> loss_sums(table.num_tasks(), 0.0);
    for (int64_t first_row = 0; first_row < N; first_row += chunk) {
      const int64_t rows = std::min(chunk, N - first_row);
      const at::Tensor h_chunk = h.narrow(0, first_row, rows);
      at::Tensor chunk_logits = logits_buffer.narrow(0, 0, rows);
      linear_into(chunk_logits, h_chunk, weight, bias);
      at::Tensor grad_chunk = grad_buffer.narrow(0, 0, rows);
      if (half_input) {
        grad_chunk.copy_(chunk_logits);
      }
      accumulate_loss_and_grad(grad_chunk.data_ptr<acc_t>(), rows, first_row, problem, loss_sums,
                               [](int64_t, int64_t) {});
      accumulate_chunk_gradients(grads, grad_chunk, h_chunk.to(acc_dtype), weight_acc, problem, first_row);
    }
    losses = problem.mean_losses(loss_sums, acc_options);
  });
  return {weighted_total(losses, prepared.task_weights), losses, grads.input_per_task, grads.weight, grads.bias};
}

// The forward of the recompute path: per chunk of rows the logits and the loss pass (whose in-place gradient is
// scratch here), saving the row statistics; no gradient GEMM.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_task_loss_recompute_cpu(
    const at::Tensor& h_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList targets_in, const at::Tensor& task_weights, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
    c10::IntArrayRef ignore_index, c10::ArrayRef<double> params, const std::vector<std::string>& task_names,
    int64_t chunk_rows) {
  at::NoGradGuard no_grad;  // as in multi_task_loss_cpu
  const PreparedInputs prepared = prepare_cpu_inputs(h_in, weight, bias, targets_in, task_weights, col_weight,
                                                     col_task, kinds, col_offsets, class_dims, ignore_index, params,
                                                     task_names);
  const TaskTable& table = prepared.table;
  const at::Tensor& h = prepared.h;
  TORCH_CHECK_VALUE(chunk_rows > 0, "mtlfast: chunk_rows must be positive, got ", chunk_rows);
  const int64_t N = table.rows;
  const int64_t chunk = std::min(chunk_rows, N);
  const at::TensorOptions acc_options = h.options().dtype(accumulation_dtype(h.scalar_type()));
  at::Tensor row_stats = at::zeros({table.num_tasks(), N, kSavedRowStats}, acc_options);
  at::Tensor logits_buffer = at::empty({chunk, table.columns}, h.options());
  at::Tensor losses;
  at::Tensor inverse_denominators;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(),
                                  "mtlfast::multi_task_loss_recompute (CPU)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LossProblem<acc_t> problem(table, prepared.kernel_targets, col_weight);
    problem.save_row_stats(row_stats);
    std::vector<double> loss_sums(table.num_tasks(), 0.0);
    for (int64_t first_row = 0; first_row < N; first_row += chunk) {
      const int64_t rows = std::min(chunk, N - first_row);
      at::Tensor chunk_logits = logits_buffer.narrow(0, 0, rows);
      linear_into(chunk_logits, h.narrow(0, first_row, rows), weight, bias);
      accumulate_loss_and_grad(chunk_logits.data_ptr<scalar_t>(), rows, first_row, problem, loss_sums,
                               [](int64_t, int64_t) {});
    }
    losses = problem.mean_losses(loss_sums, acc_options);
    inverse_denominators = problem.inverse_denominators(acc_options);
  });
  return {weighted_total(losses, prepared.task_weights), losses, row_stats, inverse_denominators};
}

static_assert(std::is_same_v<decltype(multi_task_loss_cpu), MultiTaskLossKernel>);

}  // namespace

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("multi_task_loss", &multi_task_loss_cpu);
  m.impl("multi_task_loss_chunked", &multi_task_loss_chunked_cpu);
  m.impl("multi_task_loss_recompute", &multi_task_loss_recompute_cpu);
}

}  // namespace mtlfast
