// AVX2 twins of the libm-bound loss formulas of mtlfast/loss_math.h, for the CPU loss pass
// (csrc/cpu/multi_task_loss_cpu.cpp, which calls them only on CPUs that run AVX2; see there).
//
// Host-only. The kernels work in place on contiguous acc_t (float / double) arrays: the caller gathers a task's
// block of logits into such a tile (converting bf16 / fp16) and scatters the gradient back. The loss kernels
// return the Σ of their entries' unnormalised losses and leave grad_scale · dloss/dz in z, like the scalar pass.
#pragma once

#include <cstdint>

namespace mtlfast::vectorized {

// bce_with_logits over n entries. y: the n targets, NaN = missing (zero loss and gradient). pos_weight: n
// entries, or one shared by all when pos_weight_stride is 0.
template <typename acc_t>
double bce_with_logits(acc_t* z, const acc_t* y, const acc_t* pos_weight, int64_t pos_weight_stride,
                       acc_t grad_scale, int64_t n);

// bce_with_logits over a (rows, columns) block of single-output BCE tasks, one task per column, in place in the
// logits: entry (i, c) at z[i * z_stride + c]; targets y[i * columns + c] (row-major, NaN = missing). Per column:
// pos_weight[c] and grad_scale[c]; column_sums[c] += the column's loss sum, added row by row in row order.
template <typename acc_t>
void bce_with_logits_columns(acc_t* z, int64_t z_stride, const acc_t* y, int64_t rows, int64_t columns,
                             const acc_t* pos_weight, const acc_t* grad_scale, double* column_sums);

// Cross-entropy of `rows` rows of num_classes logits stored class-major (z[c * rows + i]: class c of row i), so
// that one vector holds the same class of consecutive rows, whatever the number of classes. Per row: target[i]
// the target class as acc_t, or -1 for an ignored row (zero loss and gradient); a[i] the row's
// cross_entropy_row(...).a. Per task: B = cross_entropy_row(...).B, b[c] = (ε/C)·w_c.
template <typename acc_t>
double cross_entropy_class_major(acc_t* z, int64_t rows, int64_t num_classes, const acc_t* target, const acc_t* a,
                                 acc_t B, const acc_t* b, acc_t grad_scale);

// x[i] = exp(x[i] - shift) for n entries; returns Σ x[i].
template <typename acc_t>
acc_t exp_shifted_sum(acc_t* x, acc_t shift, int64_t n);

}  // namespace mtlfast::vectorized
