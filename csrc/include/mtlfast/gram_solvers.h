// The small solvers of gradient-weighting methods (mtlfast/weighting), on the (T, T) Gram matrix K of the task
// gradients. Written once as host+device inline functions: the CPU kernel runs them serially, the CUDA kernel runs
// one task (or one Gram row) per thread of a single block. A T x T problem costs microseconds here, where the same
// algorithm as PyTorch ops is hundreds of tiny launches (MGDA's Frank-Wolfe: ~20 ops x 100 iterations).
//
// No torch headers: included from .cu files.
#pragma once

#include <cstdint>

#include "mtlfast/loss_math.h"  // MTLFAST_HD

namespace mtlfast {
namespace gram {

// PCGrad (Yu et al. 2020) for task i in coefficient space: row = e_i (0 for an inactive task), then for each j in
// order[0..T): if j != i, j active and <g_i^PC, g_j> = (row . K[j]) < 0: row[j] -= <g_i^PC, g_j> / K[j][j].
// Afterwards g_i^PC = sum_k row[k] g_k. Same arithmetic as mtlfast.weighting.pcgrad.pcgrad_weights.
template <typename scalar_t>
MTLFAST_HD void pcgrad_row(const scalar_t* gram, const int64_t* order, int64_t tasks, int64_t i, scalar_t* row) {
  for (int64_t k = 0; k < tasks; ++k) row[k] = scalar_t(0);
  if (!(gram[i * tasks + i] > scalar_t(0))) return;
  row[i] = scalar_t(1);
  for (int64_t step = 0; step < tasks; ++step) {
    const int64_t j = order[step];
    const scalar_t norm2 = gram[j * tasks + j];
    if (j == i || !(norm2 > scalar_t(0))) continue;
    scalar_t inner = scalar_t(0);
    for (int64_t k = 0; k < tasks; ++k) inner += row[k] * gram[j * tasks + k];
    if (inner < scalar_t(0)) row[j] -= inner / norm2;
  }
}

// MGDA min-norm point (Sener & Koltun 2018): alpha on the simplex over the active tasks (K[t][t] > 0), started at
// the uniform point. One pairwise Frank-Wolfe step (Lacoste-Julien & Jaggi 2015) with exact line search, given
// k_alpha = K alpha: s = argmin_{active} k_alpha, v = argmax_{alpha > 0} k_alpha (first index on ties),
// gamma = clip((k_alpha[v] - k_alpha[s]) / ||g_s - g_v||^2, 0, alpha[v]); alpha += gamma (e_s - e_v).
// Same arithmetic as mtlfast.weighting.mgda.min_norm_weights.
template <typename scalar_t>
MTLFAST_HD void min_norm_init(const scalar_t* gram, int64_t tasks, scalar_t* alpha) {
  int64_t active = 0;
  for (int64_t t = 0; t < tasks; ++t) active += gram[t * tasks + t] > scalar_t(0);
  const scalar_t share = active > 0 ? scalar_t(1) / scalar_t(active) : scalar_t(0);
  for (int64_t t = 0; t < tasks; ++t) alpha[t] = gram[t * tasks + t] > scalar_t(0) ? share : scalar_t(0);
}

template <typename scalar_t>
MTLFAST_HD void min_norm_pairwise_step(const scalar_t* gram, const scalar_t* k_alpha, int64_t tasks,
                                       scalar_t* alpha) {
  int64_t toward = -1, away = -1;
  for (int64_t t = 0; t < tasks; ++t) {
    if (gram[t * tasks + t] > scalar_t(0) && (toward < 0 || k_alpha[t] < k_alpha[toward])) toward = t;
    if (alpha[t] > scalar_t(0) && (away < 0 || k_alpha[t] > k_alpha[away])) away = t;
  }
  if (toward < 0 || away < 0 || toward == away) return;
  const scalar_t curvature =
      gram[toward * tasks + toward] + gram[away * tasks + away] - scalar_t(2) * gram[toward * tasks + away];
  const scalar_t limit = alpha[away];
  scalar_t step = curvature > scalar_t(0) ? (k_alpha[away] - k_alpha[toward]) / curvature : limit;
  step = step < scalar_t(0) ? scalar_t(0) : (step > limit ? limit : step);
  alpha[toward] += step;
  alpha[away] -= step;
}

}  // namespace gram
}  // namespace mtlfast
