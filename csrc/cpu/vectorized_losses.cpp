// AVX2 kernels of the CPU loss pass: vector twins of mtlfast/loss_math.h's formulas (declared and specified in
// vectorized_losses.h).
//
// On x86-64 this TU alone is compiled with -mavx2 -mfma and ATen's CPU_CAPABILITY=AVX2 (CMakeLists.txt), so
// at::vec::Vectorized is its AVX2 implementation, with SLEEF's exp / log / log1p. (Built with the default flags it
// would be the generic one, whose exp / log are scalar libm calls in a loop: no faster than the scalar path.)
// The loss pass calls these kernels only when the CPU runs AVX2, so the module loads and runs on any CPU. For
// that, nothing here may be an out-of-line copy of an inline function that other TUs use too (the linker would
// keep one copy for the whole module, maybe this AVX2 one; ATen's vec headers put their code in the namespace
// at::vec::AVX2 for this reason): this TU includes no mtlfast header but its own and calls no loss_math.h
// function. Hence also the masked partial vector at the end of each array instead of a scalar tail loop over
// the loss_math.h formulas.
//
// -ffp-contract=off (CMakeLists.txt) keeps a*b + c two roundings, as in the scalar path (built without FMA), so
// the results differ from it only by SLEEF's exp / log / log1p (≤ 1 ulp) against glibc's, the float log1p of BCE
// (≤ 3 ulp, below), and the order of the loss sums.
#include "vectorized_losses.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <limits>

namespace mtlfast::vectorized {
namespace {

using at::vec::Vectorized;

// Σ of per-lane losses in double, as the scalar path adds every loss to a double.
template <typename acc_t>
class LossSum;

template <>
class LossSum<double> {
 public:
  void add(const Vectorized<double>& loss) { sum_ += loss; }
  double total() const { return lane_total(sum_); }

  // Lanes in order: the result depends on the array only, not on the thread that runs it.
  static double lane_total(const Vectorized<double>& v) {
    std::array<double, Vectorized<double>::size()> lanes;
    v.store(lanes.data());
    double total = 0.0;
    for (const double lane : lanes) {
      total += lane;
    }
    return total;
  }

 private:
  Vectorized<double> sum_{0.0};
};

template <>
class LossSum<float> {
 public:
  void add(const Vectorized<float>& loss) {
    const auto wide = at::vec::convert<double, 2, float, 1>(at::vec::VectorizedN<float, 1>(loss));
    low_ += wide[0];
    high_ += wide[1];
  }
  double total() const { return LossSum<double>::lane_total(low_ + high_); }

 private:
  Vectorized<double> low_{0.0};
  Vectorized<double> high_{0.0};
};

// log1p(x) for x in [0, 1], BCE's log1p(exp(-|z|)). Double: SLEEF's (≤ 1 ulp). Float: 2·atanh(s) with
// s = x / (2 + x) in [0, 1/3], atanh(s) / s = Σ_k w^k / (2k + 1) with w = s² ≤ 1/9, summed to k = 6 (the first
// term left out is < 2^-26 relative): ≤ 3 ulp over [0, 1] (checked against log1p in double on every 7th float),
// and 6x faster than SLEEF's log1pf, which was half the cost of a BCE entry.
template <typename acc_t>
Vectorized<acc_t> log1p_unit_interval(const Vectorized<acc_t>& x) {
  return x.log1p();
}

template <>
Vectorized<float> log1p_unit_interval(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  const Vec s = x / (Vec(2.0f) + x);
  const Vec w = s * s;
  Vec series(1.0f / 13);
  for (const float coefficient : {1.0f / 11, 1.0f / 9, 1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f}) {
    series = at::vec::fmadd(series, w, Vec(coefficient));
  }
  return (s + s) * series;
}

// Runs step(i, count) over [0, n) in vectors: count = the vector size, then what is left (a masked tail).
template <typename acc_t, typename Step>
void for_each_vector(int64_t n, const Step& step) {
  constexpr int64_t kSize = Vectorized<acc_t>::size();
  int64_t i = 0;
  for (; i + kSize <= n; i += kSize) {
    step(i, kSize);
  }
  if (i < n) {
    step(i, n - i);
  }
}

}  // namespace

namespace {

// The loss and dloss/dz of bce_with_logits (loss_math.h) for one vector of entries, both 0 where the target is
// missing (NaN): e = exp(-|z|) and log1p(e) shared by softplus(±z) and sigmoid(z).
template <typename acc_t>
struct BceVector {
  Vectorized<acc_t> loss;
  Vectorized<acc_t> grad;
};

template <typename acc_t>
BceVector<acc_t> bce_vector(const Vectorized<acc_t>& z, const Vectorized<acc_t>& y, const Vectorized<acc_t>& pw) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0), one(1);
  const Vec e = z.abs().neg().exp();
  const Vec log1p_e = log1p_unit_interval(e);
  const Vec softplus_z = Vec::blendv(zero, z, z > zero) + log1p_e;
  const Vec softplus_minus_z = Vec::blendv(zero, z.neg(), z < zero) + log1p_e;
  const Vec s = Vec::blendv(e, one, z >= zero) / (one + e);  // sigmoid(z)
  const Vec loss = pw * y * softplus_minus_z + (one - y) * softplus_z;
  const Vec grad = (one - y) * s - pw * y * (one - s);
  const Vec present = y == y;  // false for NaN
  return {Vec::blendv(zero, loss, present), Vec::blendv(zero, grad, present)};
}

}  // namespace

template <typename acc_t>
double bce_with_logits(acc_t* z, const acc_t* y, const acc_t* pos_weight, int64_t pos_weight_stride,
                       acc_t grad_scale, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec scale(grad_scale);
  const Vec missing(std::numeric_limits<acc_t>::quiet_NaN());
  LossSum<acc_t> loss_sum;
  for_each_vector<acc_t>(n, [&](int64_t i, int64_t count) {
    // Lanes past the end read as missing targets, so they add nothing.
    const Vec yi = Vec::set(missing, Vec::loadu(y + i, count), count);
    const Vec pw = pos_weight_stride == 0 ? Vec(pos_weight[0]) : Vec::loadu(pos_weight + i, count);
    const BceVector<acc_t> r = bce_vector(Vec::loadu(z + i, count), yi, pw);
    loss_sum.add(r.loss);
    (scale * r.grad).store(z + i, count);
  });
  return loss_sum.total();
}

namespace {

// sums[k] += lanes[k] for the Vec::size() lanes, in double.
void add_lanes(double* sums, const Vectorized<double>& lanes) {
  (Vectorized<double>::loadu(sums) + lanes).store(sums);
}

void add_lanes(double* sums, const Vectorized<float>& lanes) {
  const auto wide = at::vec::convert<double, 2, float, 1>(at::vec::VectorizedN<float, 1>(lanes));
  add_lanes(sums, wide[0]);
  add_lanes(sums + Vectorized<double>::size(), wide[1]);
}

}  // namespace

template <typename acc_t>
void bce_with_logits_columns(acc_t* z, int64_t z_stride, const acc_t* y, int64_t rows, int64_t columns,
                             const acc_t* pos_weight, const acc_t* grad_scale, double* column_sums) {
  using Vec = Vectorized<acc_t>;
  const Vec missing(std::numeric_limits<acc_t>::quiet_NaN());
  std::array<acc_t, Vec::size()> lane_loss;
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* z_row = z + i * z_stride;
    const acc_t* y_row = y + i * columns;
    for_each_vector<acc_t>(columns, [&](int64_t c, int64_t count) {
      const Vec yc = Vec::set(missing, Vec::loadu(y_row + c, count), count);
      const BceVector<acc_t> r = bce_vector(Vec::loadu(z_row + c, count), yc, Vec::loadu(pos_weight + c, count));
      (Vec::loadu(grad_scale + c, count) * r.grad).store(z_row + c, count);
      if (count == Vec::size()) {
        add_lanes(column_sums + c, r.loss);
      } else {
        r.loss.store(lane_loss.data());
        for (int64_t k = 0; k < count; ++k) {
          column_sums[c + k] += static_cast<double>(lane_loss[k]);
        }
      }
    });
  }
}

// Mirrors cross_entropy_rows (multi_task_loss_cpu.cpp) for `Vec::size()` rows at a time: row statistics, then
// cross_entropy_row_loss and cross_entropy_grad (loss_math.h).
template <typename acc_t>
double cross_entropy_class_major(acc_t* z, int64_t rows, int64_t num_classes, const acc_t* target, const acc_t* a,
                                 acc_t B, const acc_t* b, acc_t grad_scale) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0), one(1), scale(grad_scale), B_vec(B);
  LossSum<acc_t> loss_sum;
  for_each_vector<acc_t>(rows, [&](int64_t i, int64_t count) {
    // Lanes past the end read as ignored rows, so they add nothing.
    const Vec y = Vec::set(Vec(-1), Vec::loadu(target + i, count), count);
    const Vec a_vec = Vec::loadu(a + i, count);
    Vec max_logit(-std::numeric_limits<acc_t>::infinity());
    Vec target_logit = zero;
    Vec smoothing_dot_logits = zero;  // Σ_c b_c z_c
    for (int64_t c = 0; c < num_classes; ++c) {
      const Vec zc = Vec::loadu(z + c * rows + i, count);
      max_logit = at::vec::maximum(max_logit, zc);
      target_logit = Vec::blendv(target_logit, zc, y == Vec(static_cast<acc_t>(c)));
      smoothing_dot_logits += Vec(b[c]) * zc;
    }
    // exp(z - max) replaces the logits until the gradient pass.
    Vec sum_exp = zero;
    for (int64_t c = 0; c < num_classes; ++c) {
      acc_t* zc = z + c * rows + i;
      const Vec e = (Vec::loadu(zc, count) - max_logit).exp();
      e.store(zc, count);
      sum_exp += e;
    }
    const Vec log_sum_exp = max_logit + sum_exp.log();
    const Vec a_plus_B = a_vec + B_vec;
    const Vec valid = y >= zero;
    const Vec loss = a_plus_B * log_sum_exp - a_vec * target_logit - smoothing_dot_logits;
    loss_sum.add(Vec::blendv(zero, loss, valid));
    const Vec inv_sum_exp = one / sum_exp;
    for (int64_t c = 0; c < num_classes; ++c) {
      acc_t* zc = z + c * rows + i;
      const Vec prob = Vec::loadu(zc, count) * inv_sum_exp;
      const Vec grad = a_plus_B * prob - Vec::blendv(zero, a_vec, y == Vec(static_cast<acc_t>(c))) - Vec(b[c]);
      Vec::blendv(zero, scale * grad, valid).store(zc, count);
    }
  });
  return loss_sum.total();
}

// Mirrors the exp and Σexp loops of cross_entropy_rows (multi_task_loss_cpu.cpp).
template <typename acc_t>
acc_t exp_shifted_sum(acc_t* x, acc_t shift, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec shift_vec(shift);
  Vec sum(0);
  for_each_vector<acc_t>(n, [&](int64_t i, int64_t count) {
    const Vec e = (Vec::loadu(x + i, count) - shift_vec).exp();
    e.store(x + i, count);
    sum += Vec::set(Vec(0), e, count);  // lanes past the end hold exp(0 - shift)
  });
  std::array<acc_t, Vec::size()> lanes;
  sum.store(lanes.data());
  acc_t total = 0;
  for (const acc_t lane : lanes) {
    total += lane;
  }
  return total;
}

#define MTLFAST_INSTANTIATE(acc_t)                                                                              \
  template double bce_with_logits<acc_t>(acc_t*, const acc_t*, const acc_t*, int64_t, acc_t, int64_t);         \
  template void bce_with_logits_columns<acc_t>(acc_t*, int64_t, const acc_t*, int64_t, int64_t, const acc_t*,   \
                                               const acc_t*, double*);                                          \
  template double cross_entropy_class_major<acc_t>(acc_t*, int64_t, int64_t, const acc_t*, const acc_t*, acc_t, \
                                                   const acc_t*, acc_t);                                        \
  template acc_t exp_shifted_sum<acc_t>(acc_t*, acc_t, int64_t);
MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(double)
#undef MTLFAST_INSTANTIATE

}  // namespace mtlfast::vectorized
