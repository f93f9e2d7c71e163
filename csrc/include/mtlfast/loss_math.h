// Loss math shared by every backend: written once as host+device inline functions so the CPU kernel
// (exercised by the float64 oracle tests on any machine) and the CUDA kernel compute the same formulas.
//
// Conventions (see DESIGN.md §2): each task's loss is the mean over its valid entries; every function here
// returns the *unnormalised* per-entry loss and d(loss)/d(logit); the kernels scale the gradient by
// 1 / denominator of the task (0 when the task has no valid entry, so it contributes 0 and gets zero grads).
//
// No torch headers here: this file is included from .cu files that must compile without them.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MTLFAST_HD __host__ __device__ __forceinline__
#else
#define MTLFAST_HD inline
#endif

namespace mtlfast {

// Stable integer codes: they travel through the op schema as int[] (see csrc/registration.cpp) and are
// mirrored by mtlfast/tasks.py::LossKind.
enum LossKind : int64_t {
  kNone = 0,          // task absent from this batch: loss 0, zero gradient
  kCrossEntropy = 1,  // multiclass; target = class index; ignore_index, label smoothing, class weights
  kBCE = 2,           // binary / multi-label BCE-with-logits; NaN target = missing; pos_weight
  kMSE = 3,           // regression, NaN target = missing
  kL1 = 4,
  kHuber = 5,         // param = delta
  kDistill = 6,       // knowledge distillation, target = teacher logits; param = temperature τ
  kDistillProbs = 7,  // knowledge distillation, target = teacher probabilities; param = temperature τ
  kNumLossKinds = 8,  // one past the last code
};

// The target form of a distillation task is encoded by its kind code alone (one code per form, here and in
// mtlfast/tasks.py::DISTILLATION_KINDS): every other kind-specific branch asks these two.
MTLFAST_HD bool is_distillation(int64_t kind) { return kind == kDistill || kind == kDistillProbs; }
MTLFAST_HD bool distillation_targets_are_logits(int64_t kind) { return kind == kDistill; }

template <typename acc_t>
struct LossAndGrad {
  acc_t loss;
  acc_t grad;
};

// std:: math throughout: on the host, the global ::exp(float) is C's double exp (a silent float -> double round
// trip, ~2x slower); std::exp has float overloads on the host and in CUDA device code alike.
template <typename acc_t>
MTLFAST_HD acc_t log1p_fast(acc_t x) {
#if defined(__CUDA_ARCH__)
  return std::log1p(x);
#else
  // glibc's float log1pf is ~2x slower than its double log1p (measured 16 ns vs 8 ns), and the double result
  // rounded to float is at least as accurate.
  return static_cast<acc_t>(std::log1p(static_cast<double>(x)));
#endif
}

template <typename acc_t>
MTLFAST_HD acc_t stable_softplus(acc_t x) {
  // log(1 + exp(x)) without overflow for large |x|.
  return (x > acc_t(0) ? x : acc_t(0)) + log1p_fast(std::exp(-std::fabs(x)));
}

template <typename acc_t>
MTLFAST_HD acc_t stable_sigmoid(acc_t x) {
  if (x >= acc_t(0)) {
    return acc_t(1) / (acc_t(1) + std::exp(-x));
  }
  const acc_t e = std::exp(x);
  return e / (acc_t(1) + e);
}

// BCE with logits, PyTorch's formula: pos_weight*y*softplus(-z) + (1-y)*softplus(z).
// softplus(z), softplus(-z) and sigmoid(z) are stable_softplus / stable_sigmoid expanded so they share
// e = exp(-|z|) and log1p(e): bit-identical results with one exp and one log1p instead of three and two.
template <typename acc_t>
MTLFAST_HD LossAndGrad<acc_t> bce_with_logits(acc_t z, acc_t y, acc_t pos_weight) {
  const acc_t e = std::exp(-std::fabs(z));
  const acc_t log1p_e = log1p_fast(e);
  const acc_t softplus_z = (z > acc_t(0) ? z : acc_t(0)) + log1p_e;
  const acc_t softplus_minus_z = (z < acc_t(0) ? -z : acc_t(0)) + log1p_e;
  const acc_t s = (z >= acc_t(0) ? acc_t(1) : e) / (acc_t(1) + e);  // sigmoid(z)
  LossAndGrad<acc_t> r;
  r.loss = pos_weight * y * softplus_minus_z + (acc_t(1) - y) * softplus_z;
  r.grad = (acc_t(1) - y) * s - pos_weight * y * (acc_t(1) - s);
  return r;
}

template <typename acc_t>
MTLFAST_HD LossAndGrad<acc_t> squared_error(acc_t z, acc_t y) {
  const acc_t d = z - y;
  return {d * d, acc_t(2) * d};
}

template <typename acc_t>
MTLFAST_HD LossAndGrad<acc_t> absolute_error(acc_t z, acc_t y) {
  const acc_t d = z - y;
  // PyTorch's l1_loss gradient is sign(d), 0 at d == 0.
  const acc_t sign = d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0));
  return {std::fabs(d), sign};
}

template <typename acc_t>
MTLFAST_HD LossAndGrad<acc_t> huber(acc_t z, acc_t y, acc_t delta) {
  const acc_t d = z - y;
  const acc_t ad = std::fabs(d);
  if (ad < delta) {
    return {acc_t(0.5) * d * d, d};
  }
  const acc_t sign = d > acc_t(0) ? acc_t(1) : acc_t(-1);
  return {delta * (ad - acc_t(0.5) * delta), delta * sign};
}

// Dense (element-wise) kinds in one switch, so a kernel's inner loop stays branch-light per task.
template <typename acc_t>
MTLFAST_HD LossAndGrad<acc_t> elementwise_loss(int64_t kind, acc_t z, acc_t y, acc_t param) {
  switch (kind) {
    case kBCE:
      return bce_with_logits(z, y, param);
    case kMSE:
      return squared_error(z, y);
    case kL1:
      return absolute_error(z, y);
    case kHuber:
    default:
      return huber(z, y, param);
  }
}

// Cross-entropy with label smoothing ε and class weights w, matching torch.nn.functional.cross_entropy:
//   row loss  = (1-ε)·w_y·(lse - z_y) + (ε/C)·Σ_c w_c·(lse - z_c)
//             = (a + B)·lse - a·z_y - Σ_c b_c·z_c,   a = (1-ε)·w_y,  b_c = (ε/C)·w_c,  B = Σ_c b_c
//   d/dz_c    = (a + B)·p_c - a·[c == y] - b_c,     p = softmax(z)
//   the task's denominator accumulates w_y (the count of valid rows when unweighted).
// A kernel computes the row statistics (max, Σexp, z_y, Σ b_c z_c) its own way and calls these.
template <typename acc_t>
struct CrossEntropyRow {
  acc_t a;  // (1-ε)·w_y
  acc_t B;  // (ε/C)·Σ_c w_c
};

template <typename acc_t>
MTLFAST_HD CrossEntropyRow<acc_t> cross_entropy_row(acc_t label_smoothing, acc_t weight_of_target,
                                                    acc_t sum_class_weights, int64_t num_classes) {
  CrossEntropyRow<acc_t> r;
  r.a = (acc_t(1) - label_smoothing) * weight_of_target;
  r.B = label_smoothing / acc_t(num_classes) * sum_class_weights;
  return r;
}

template <typename acc_t>
MTLFAST_HD acc_t cross_entropy_row_loss(const CrossEntropyRow<acc_t>& row, acc_t log_sum_exp, acc_t target_logit,
                                        acc_t smoothing_dot_logits /* Σ_c b_c z_c */) {
  return (row.a + row.B) * log_sum_exp - row.a * target_logit - smoothing_dot_logits;
}

template <typename acc_t>
MTLFAST_HD acc_t cross_entropy_grad(const CrossEntropyRow<acc_t>& row, acc_t prob, bool is_target,
                                    acc_t smoothing_weight /* b_c */) {
  return (row.a + row.B) * prob - (is_target ? row.a : acc_t(0)) - smoothing_weight;
}

// Knowledge distillation (Hinton et al. 2015) of a row of C student logits z toward a teacher distribution p at
// temperature τ:
//   q         = softmax(z / τ),  log q_c = z_c / τ - lse_s,   lse_s = log Σ_c exp(z_c / τ)
//   p         = softmax(t / τ) for teacher logits t (log p_c = t_c / τ - lse_t), or the given probabilities
//   row loss  = τ² · Σ_c p_c (log p_c - log q_c)     with 0 · log 0 = 0
//   d/dz_c    = τ · (m·q_c - p_c),                   m = Σ_c p_c (1 for teacher logits; as given for probabilities)
//   the task's denominator counts the valid rows (a row whose target holds a NaN is missing).
// A kernel computes the row statistics (the max and Σexp of z / τ, and of t / τ or Σ_c p_c) its own way and calls
// these per element. A negative probability makes log p_c, hence the loss, NaN (the CPU backend rejects it first).
template <typename acc_t>
struct DistillationRow {
  acc_t temperature;      // τ
  acc_t inv_temperature;  // 1 / τ
  acc_t student_lse;      // lse_s
  acc_t teacher_lse;      // lse_t (teacher logits only)
  acc_t target_mass;      // m = Σ_c p_c
};

// max_* are the row maxima of z / τ and t / τ, sum_exp_* the Σ exp(· / τ - max_*): lse = max + log(sum_exp).
template <typename acc_t>
MTLFAST_HD DistillationRow<acc_t> distillation_row(acc_t temperature, acc_t student_max, acc_t student_sum_exp,
                                                   acc_t teacher_max, acc_t teacher_sum_exp, acc_t target_mass) {
  DistillationRow<acc_t> r;
  r.temperature = temperature;
  r.inv_temperature = acc_t(1) / temperature;
  r.student_lse = student_max + std::log(student_sum_exp);
  r.teacher_lse = teacher_max + std::log(teacher_sum_exp);
  r.target_mass = target_mass;
  return r;
}

// One class of a row: z the student logit, y the target entry (teacher logit or probability). The loss returned
// already carries the factor τ², the gradient the factor τ (not yet divided by the denominator).
template <typename acc_t>
MTLFAST_HD LossAndGrad<acc_t> distillation_element(const DistillationRow<acc_t>& row, bool targets_are_logits,
                                                   acc_t z, acc_t y) {
  const acc_t log_q = z * row.inv_temperature - row.student_lse;
  const acc_t log_p = targets_are_logits ? y * row.inv_temperature - row.teacher_lse : std::log(y);
  const acc_t p = targets_are_logits ? std::exp(log_p) : y;
  LossAndGrad<acc_t> r;
  // p == 0 (a probability of 0, a teacher logit of -inf, or exp underflow): 0 · log 0 = 0, whatever log q is.
  r.loss = p == acc_t(0) ? acc_t(0) : row.temperature * row.temperature * p * (log_p - log_q);
  r.grad = row.temperature * (row.target_mass * std::exp(log_q) - p);
  return r;
}

// multi_task_loss_recompute saves 4 statistics per softmax row (layout: csrc/registration.cpp) and its backward,
// on every backend, rebuilds the row's gradient from them with these, one logit at a time:
//   cross-entropy [lse, a, B, ε/C]: all 0 for an ignored row, whose every gradient term then vanishes (as for a valid
//                 row whose target class weighs 0 without smoothing, so the two need no telling apart);
//   distillation  [lse_s, lse_t, m, valid]: all 0 for a missing row.
constexpr int kSavedRowStats = 4;

template <typename acc_t>
struct SavedCrossEntropyRow {
  CrossEntropyRow<acc_t> row;
  acc_t log_sum_exp;
  acc_t smoothing_scale;  // ε / C: b_c = smoothing_scale · w_c
  bool contributes;       // false when every term is 0 (exp(z - 0) could overflow into 0 · inf)
};

template <typename acc_t>
MTLFAST_HD SavedCrossEntropyRow<acc_t> saved_cross_entropy_row(const acc_t* stats) {
  SavedCrossEntropyRow<acc_t> r;
  r.row.a = stats[1];
  r.row.B = stats[2];
  r.log_sum_exp = stats[0];
  r.smoothing_scale = stats[3];
  r.contributes = !(r.row.a == acc_t(0) && r.row.B == acc_t(0) && r.smoothing_scale == acc_t(0));
  return r;
}

// d(row loss)/dz_c, unnormalised; class_weight_c = w_c (1 without class weights).
template <typename acc_t>
MTLFAST_HD acc_t saved_cross_entropy_grad(const SavedCrossEntropyRow<acc_t>& r, acc_t z, bool is_target,
                                          acc_t class_weight_c) {
  if (!r.contributes) {
    return acc_t(0);
  }
  return cross_entropy_grad(r.row, std::exp(z - r.log_sum_exp), is_target, r.smoothing_scale * class_weight_c);
}

template <typename acc_t>
struct SavedDistillationRow {
  DistillationRow<acc_t> row;
  bool valid;
};

template <typename acc_t>
MTLFAST_HD SavedDistillationRow<acc_t> saved_distillation_row(acc_t temperature, const acc_t* stats) {
  SavedDistillationRow<acc_t> r;
  r.row.temperature = temperature;
  r.row.inv_temperature = acc_t(1) / temperature;
  r.row.student_lse = stats[0];
  r.row.teacher_lse = stats[1];
  r.row.target_mass = stats[2];
  r.valid = stats[3] != acc_t(0);
  return r;
}

// d(row loss)/dz_c, unnormalised (carries τ, as distillation_element's); y the target entry of class c.
template <typename acc_t>
MTLFAST_HD acc_t saved_distillation_grad(const SavedDistillationRow<acc_t>& r, bool targets_are_logits, acc_t z,
                                         acc_t y) {
  return r.valid ? distillation_element(r.row, targets_are_logits, z, y).grad : acc_t(0);
}

// 1 / denominator, or 0 for a task with no valid entry (it then contributes 0 and gets zero gradient).
template <typename acc_t>
MTLFAST_HD acc_t safe_reciprocal(acc_t denominator) {
  return denominator > acc_t(0) ? acc_t(1) / denominator : acc_t(0);
}

}  // namespace mtlfast
