// CUDA implementations of multi_task_loss and its backward, multi_task_loss_chunked and the recompute pair (semantics:
// csrc/registration.cpp and DESIGN.md §2). Tensor checks, allocation and the GEMMs (cuBLAS through ATen) live here;
// the loss kernels live in multi_task_loss_kernels.cu, which is kept free of torch headers (they would multiply its
// compile time).
//
// Everything runs on the current stream without a host sync: losses stay on the device, and a class index out of
// range (which the CPU backend reports as an IndexError) turns the task's loss into NaN instead, as does a
// negative or infinite distillation probability (a ValueError on the CPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "dispatch_key.h"
#include "multi_task_loss_kernels.h"
#include "mtlfast/loss_math.h"
#include "mtlfast/op_signatures.h"
#include "mtlfast/recompute_backward.h"
#include "mtlfast/task_table.h"

namespace mtlfast {
namespace {

// kernel_device_guard_note: every entry point guards h's device with the generic c10::DeviceGuard, not CUDAGuard.
// One CUDA tensor among the arguments sends the call here; when h itself is on the CPU, CUDAGuard would throw a
// RuntimeError about a CPU device before the input checks can raise their ValueError naming the misplaced tensor
// (seen on an H100: tests/test_errors.py's device-mix tests). A CPU guard is a no-op.

cuda::InputDType kernel_dtype(at::ScalarType type) {
  if (type == at::kFloat) {
    return cuda::InputDType::kFloat;
  }
  if (type == at::kDouble) {
    return cuda::InputDType::kDouble;
  }
  if (type == at::kHalf) {
    return cuda::InputDType::kHalf;
  }
  TORCH_CHECK_TYPE(type == at::kBFloat16,
                   "mtlfast: CUDA kernels support float32, float64, float16 and bfloat16 inputs, got ", type);
  return cuda::InputDType::kBFloat16;
}

// The targets of the present tasks where the kernels read them (plan_kernel_targets): contiguous ones in the kernel
// dtype, or dense ones in a half / bfloat16 model's own dtype, in place; the planned copies (integer labels, columns
// of a label matrix, float labels of a bf16 model) made by one launch per kernel dtype and 64 tasks, not an ATen
// conversion (a launch and an allocation) per task. plan.converted keeps what the pointers point into alive.
TargetPlan kernel_targets(const TaskTable& table, at::TensorList given, const at::Tensor& h, cudaStream_t stream) {
  const at::ScalarType acc = accumulation_dtype(h.scalar_type());
  // The kernels read dense targets in the input dtype too (for a float / double model that is the accumulation
  // dtype, in place already).
  TargetPlan plan = plan_kernel_targets(table, given, acc, h.scalar_type());
  const cuda::TargetKernelDType kernel_dtypes[2] = {
      cuda::TargetKernelDType::kLong,
      acc == at::kDouble ? cuda::TargetKernelDType::kDouble : cuda::TargetKernelDType::kFloat};
  for (int which = 0; which < 2; ++which) {
    const std::vector<TargetPlan::Copy>& copies = plan.copies[which];
    if (copies.empty()) {
      continue;
    }
    const at::Tensor buffer = at::empty({plan.buffer_sizes[which]}, h.options().dtype(plan.buffer_dtypes[which]));
    for (size_t begin = 0; begin < copies.size(); begin += cuda::kMaxTasksPerLaunch) {
      cuda::TargetCopyBatch batch{};
      const size_t end = std::min(copies.size(), begin + cuda::kMaxTasksPerLaunch);
      for (size_t i = begin; i < end; ++i) {
        const at::Tensor& y = given[copies[i].task];
        batch.copy[batch.count++] = {y.const_data_ptr(), copies[i].row_stride, copies[i].col_stride, copies[i].width,
                                     copies[i].offset, copies[i].source_dtype};
      }
      C10_CUDA_CHECK(
          cuda::launch_pack_targets(kernel_dtypes[which], batch, table.rows, buffer.mutable_data_ptr(), stream));
    }
    const auto* base = static_cast<const char*>(buffer.const_data_ptr());
    for (const TargetPlan::Copy& copy : copies) {
      plan.pointers[copy.task] = base + copy.offset * buffer.element_size();
    }
    plan.converted.push_back(buffer);
  }
  return plan;
}

// The validated inputs of one op call in the layout the kernels read: the task metadata in launch groups, the
// targets and column weights they point into, the stream.
struct KernelTasks {
  cuda::InputDType dtype;
  int64_t rows;
  TargetPlan targets;  // kernel_targets: targets.pointers[t] is what the kernels read
  c10::optional<at::Tensor> col_weight;
  std::vector<cuda::TaskBatch> batches;
  cudaStream_t stream;

  KernelTasks(const TaskTable& table, const at::Tensor& h, at::TensorList targets_in,
              const c10::optional<at::Tensor>& col_weight_in)
      : dtype(kernel_dtype(h.scalar_type())),
        rows(table.rows),
        stream(c10::cuda::getCurrentCUDAStream(h.device().index()).stream()) {
    const int64_t T = table.num_tasks();
    TORCH_CHECK_VALUE(table.rows <= std::numeric_limits<int32_t>::max(),
                      "mtlfast: the CUDA kernels support at most 2^31-1 rows, got ", table.rows);
    if (col_weight_in.has_value()) {
      col_weight = col_weight_in->contiguous();
    }
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK_VALUE(table.width(t) <= std::numeric_limits<int32_t>::max(), table.describe(t),
                        ": at most 2^31-1 head columns per task on CUDA, got ", table.width(t));
    }
    targets = kernel_targets(table, targets_in, h, stream);
    for (int64_t begin = 0; begin < T; begin += cuda::kMaxTasksPerLaunch) {
      cuda::TaskBatch batch{};
      const int64_t end = std::min<int64_t>(T, begin + cuda::kMaxTasksPerLaunch);
      for (int64_t t = begin; t < end; ++t) {
        cuda::TaskMeta& meta = batch.task[batch.count++];
        meta.target = targets.pointers[t];
        meta.col_offset = table.col_offsets[t];
        meta.ignore_index = table.ignore_index[t];
        meta.param = table.params[t];
        meta.kind = static_cast<int16_t>(table.kinds[t]);
        meta.dense_target_dtype =
            targets.dense_in_place[t] ? cuda::DenseTargetDType::kInput : cuda::DenseTargetDType::kAccumulation;
        meta.width = static_cast<int32_t>(table.width(t));
        meta.index = static_cast<int32_t>(t);
      }
      batches.push_back(batch);
    }
  }

  const void* col_weight_ptr() const { return col_weight.has_value() ? col_weight->const_data_ptr() : nullptr; }
};

// KernelTasks plus the device buffers the loss pipeline (denominators -> segment losses, per row chunk -> finalize)
// shares.
struct LossPipeline : KernelTasks {
  at::Tensor denominator_parts;  // (T, kMaxDenominatorSlots)
  int32_t denominator_slots;      // 1 once whole_batch_losses has counted them in the segment pass
  at::Tensor loss_parts;  // (T, N)
  at::Tensor losses;      // (T,)
  at::Tensor row_stats;   // (T, N, kRowStatsWidth) when save_row_stats() was called, else undefined
  at::Tensor inverse_denominators;  // (T,) likewise

  LossPipeline(const TaskTable& table, const at::Tensor& h, at::TensorList targets_in,
               const c10::optional<at::Tensor>& col_weight_in)
      : KernelTasks(table, h, targets_in, col_weight_in), denominator_slots(cuda::denominator_slots(table.rows)) {
    const int64_t T = table.num_tasks();
    const auto acc_options = h.options().dtype(accumulation_dtype(h.scalar_type()));
    denominator_parts = at::empty({T, cuda::kMaxDenominatorSlots}, acc_options);
    loss_parts = at::empty({T, table.rows}, acc_options);
    losses = at::empty({T}, acc_options);
  }

  // multi_task_loss_recompute: the segment pass also saves each softmax row's statistics (zeros for the rows of
  // other kinds), and finalize the inverse denominators.
  void save_row_stats() {
    row_stats = at::zeros({losses.size(0), rows, cuda::kRowStatsWidth}, losses.options());
    inverse_denominators = at::empty_like(losses);
  }

  // Over the whole batch, before any chunk: each chunk's gradients are scaled by the batch-wide denominators.
  void compute_denominators() {
    for (const cuda::TaskBatch& batch : batches) {
      C10_CUDA_CHECK(cuda::launch_denominators(dtype, batch, rows, col_weight_ptr(),
                                               denominator_parts.mutable_data_ptr(), denominator_slots, stream));
    }
  }

  // Loss and logit gradient of rows [row_begin, row_begin + logits.size(0)); the gradient goes to grad, which may
  // be logits itself, or nowhere when grad is undefined (losses and saved row statistics only).
  void segment_losses(const at::Tensor& logits, const at::Tensor& grad, int64_t row_begin) {
    const cuda::SegmentArgs args = segment_args(logits, grad, row_begin);
    for (const cuda::TaskBatch& batch : batches) {
      C10_CUDA_CHECK(cuda::launch_segment_losses(dtype, batch, args, stream));
    }
  }

  // multi_task_loss's loss pass over the whole batch (logits: all N rows): on a small batch of narrow tasks the
  // segment pass counts the denominators itself (cuda::segment_counts_denominators: one launch less, ~2 us of GPU
  // time on an H100), else launch_denominators runs first.
  void whole_batch_losses(const at::Tensor& logits, const at::Tensor& grad) {
    if (batches.size() != 1 || !cuda::segment_counts_denominators(batches[0], rows)) {
      compute_denominators();
      segment_losses(logits, grad, 0);
      return;
    }
    cuda::SegmentArgs args = segment_args(logits, grad, 0);
    args.counted_denominators = denominator_parts.mutable_data_ptr();
    C10_CUDA_CHECK(cuda::launch_segment_losses(dtype, batches[0], args, stream));
    denominator_slots = 1;  // the whole count is in slot 0
  }

  cuda::SegmentArgs segment_args(const at::Tensor& logits, const at::Tensor& grad, int64_t row_begin) const {
    cuda::SegmentArgs args;
    args.logits = logits.const_data_ptr();
    args.grad = grad.defined() ? grad.mutable_data_ptr() : nullptr;
    args.rows = logits.size(0);
    args.row_begin = row_begin;
    args.ld = logits.stride(0);
    args.col_weight = col_weight_ptr();
    args.denominator_parts = denominator_parts.const_data_ptr();
    args.denominator_slots = denominator_slots;
    args.loss_parts = loss_parts.mutable_data_ptr();
    args.loss_parts_stride = loss_parts.stride(0);
    args.row_stats = row_stats.defined() ? row_stats.mutable_data_ptr() : nullptr;
    args.row_stats_rows = rows;
    args.counted_denominators = nullptr;
    return args;
  }

  // The losses and the total Σ λ_t L_t (task_weights: (T,), accumulation dtype). With one launch group of small
  // heads the finalize kernel computes the total too; otherwise it takes one reduction more.
  std::pair<at::Tensor, at::Tensor> finalize(const at::Tensor& task_weights) {
    void* inverse = inverse_denominators.defined() ? inverse_denominators.mutable_data_ptr() : nullptr;
    if (batches.size() == 1 && cuda::finalize_computes_total(batches[0], rows)) {
      const at::Tensor weights = task_weights.contiguous();
      at::Tensor total = at::empty({}, losses.options());
      C10_CUDA_CHECK(cuda::launch_finalize_losses_with_total(
          dtype, batches[0], rows, denominator_parts.const_data_ptr(), denominator_slots, loss_parts.const_data_ptr(),
          loss_parts.stride(0), losses.mutable_data_ptr(), inverse, weights.const_data_ptr(), total.mutable_data_ptr(),
          stream));
      return {losses, total};
    }
    for (const cuda::TaskBatch& batch : batches) {
      C10_CUDA_CHECK(cuda::launch_finalize_losses(dtype, batch, rows, denominator_parts.const_data_ptr(),
                                                  denominator_slots, loss_parts.const_data_ptr(),
                                                  loss_parts.stride(0), losses.mutable_data_ptr(), inverse, stream));
    }
    return {losses, weighted_total(losses, task_weights)};
  }
};

at::Tensor head_logits(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  at::Tensor z = at::empty({h.size(0), weight.size(0)}, h.options());
  head_logits_into(z, h, weight, bias);
  return z;
}

// The large-head ops' forward loop: the denominators over the whole batch, then per chunk of rows the chunk's
// logits z = h Wᵀ + b in a reused buffer, the segment pass (z then holds the chunk's logit gradient, unless
// !with_gradient: losses and row statistics only), and after_chunk(z, h_chunk, first_row). Chunks start at multiples
// of cuda::kRowAlignment (the loss partial slots cover aligned row groups); the buffer's rows are padded to 16 bytes
// and the logits GEMM is split at the last 16-byte column boundary: with an odd S (e.g. 32000 + 5 + 1 classes)
// cuBLAS would otherwise fall back to slower kernels for the GEMMs that touch the chunk's logits.
template <typename AfterChunk>
void for_each_logits_chunk(LossPipeline& pipeline, const at::Tensor& h, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t chunk_rows, bool with_gradient,
                           const AfterChunk& after_chunk) {
  TORCH_CHECK_VALUE(chunk_rows > 0, "mtlfast: chunk_rows must be positive, got ", chunk_rows);
  const int64_t N = h.size(0);
  const int64_t S = weight.size(0);
  const int64_t chunk = std::min(N, (chunk_rows + cuda::kRowAlignment - 1) / cuda::kRowAlignment * cuda::kRowAlignment);
  const int64_t row_align = 16 / h.element_size();
  const int64_t ld = (S + row_align - 1) / row_align * row_align;
  // cuBLAS's fast kernels want every GEMM dimension a multiple of 16 bytes: with S = 32006 the four row chunks'
  // GEMMs took 1.34 ms on an H100 in bf16 (Ampere CUTLASS kernels), split at column 32000 0.55 ms.
  const int64_t aligned = S / row_align * row_align;
  at::Tensor logits_buffer = at::empty({chunk, ld}, h.options());
  pipeline.compute_denominators();
  for (int64_t begin = 0; begin < N; begin += chunk) {
    const int64_t rows = std::min(chunk, N - begin);
    const at::Tensor h_chunk = h.narrow(0, begin, rows);
    at::Tensor z = logits_buffer.narrow(0, 0, rows).narrow(1, 0, S);
    const auto logits_columns = [&](int64_t first, int64_t width) {
      at::Tensor out = z.narrow(1, first, width);
      head_logits_into(out, h_chunk, weight.narrow(0, first, width),
                       bias.has_value() ? c10::optional<at::Tensor>(bias->narrow(0, first, width)) : c10::nullopt);
    };
    if (aligned == S || aligned == 0) {
      logits_columns(0, S);
    } else {
      logits_columns(0, aligned);
      logits_columns(aligned, S - aligned);
    }
    pipeline.segment_losses(z, with_gradient ? z : at::Tensor(), begin);
    after_chunk(z, h_chunk, begin);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_task_loss_cuda(
    const at::Tensor& h_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList targets_in, const at::Tensor& task_weights, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
    c10::IntArrayRef ignore_index, c10::ArrayRef<double> params, const std::vector<std::string>& task_names,
    bool return_logits) {
  const c10::DeviceGuard guard(h_in.device());  // see kernel_device_guard_note
  const PreparedInputs prepared = prepare_multi_task_inputs(h_in, weight, bias, targets_in, task_weights, col_weight,
                                                            col_task, kinds, col_offsets, class_dims, ignore_index,
                                                            params, task_names, TargetConversion::kByBackend);
  const TaskTable& table = prepared.table;
  const at::Tensor& h = prepared.h;
  LossPipeline pipeline(table, h, prepared.targets, col_weight);

  const at::Tensor logits = head_logits(h, weight, bias).contiguous();
  // Without return_logits the gradient overwrites the logits (one buffer, one pass).
  const at::Tensor grad_logits = return_logits ? at::empty_like(logits) : logits;
  pipeline.whole_batch_losses(logits, grad_logits);
  const auto [losses, total] = pipeline.finalize(prepared.task_weights);
  return {total, losses, grad_logits,
          return_logits ? logits : at::empty({0}, h.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_task_loss_chunked_cuda(
    const at::Tensor& h_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList targets_in, const at::Tensor& task_weights, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
    c10::IntArrayRef ignore_index, c10::ArrayRef<double> params, const std::vector<std::string>& task_names,
    int64_t chunk_rows) {
  const c10::DeviceGuard guard(h_in.device());  // see kernel_device_guard_note
  const PreparedInputs prepared = prepare_multi_task_inputs(h_in, weight, bias, targets_in, task_weights, col_weight,
                                                            col_task, kinds, col_offsets, class_dims, ignore_index,
                                                            params, task_names, TargetConversion::kByBackend);
  const TaskTable& table = prepared.table;
  const at::Tensor& h = prepared.h;
  LossPipeline pipeline(table, h, prepared.targets, col_weight);

  const int64_t N = table.rows;
  const int64_t D = table.features;
  const int64_t S = table.columns;
  const int64_t T = table.num_tasks();
  const auto acc_options = h.options().dtype(accumulation_dtype(h.scalar_type()));

  at::Tensor grad_h_per_task = at::empty({T, N, D}, acc_options);
  at::Tensor grad_weight = at::empty({S, D}, acc_options);  // the first chunk's GEMM overwrites it
  at::Tensor grad_bias = bias.has_value() ? at::zeros({S}, acc_options) : at::empty({0}, acc_options);
  for (int64_t t = 0; t < T; ++t) {
    if (table.kinds[t] == kNone) {
      grad_h_per_task.select(0, t).zero_();
    }
  }

  for_each_logits_chunk(pipeline, h, weight, bias, chunk_rows, /*with_gradient=*/true,
                        [&](const at::Tensor& z, const at::Tensor& h_chunk, int64_t begin) {
    const int64_t rows = z.size(0);
    gemm_to_accumulator(grad_weight, z.t(), h_chunk, /*accumulate=*/begin > 0);
    if (bias.has_value()) {
      grad_bias.add_(z.sum(0, /*keepdim=*/false, grad_bias.scalar_type()));
    }
    for (int64_t t = 0; t < T; ++t) {
      if (table.kinds[t] == kNone) {
        continue;
      }
      const int64_t offset = table.col_offsets[t];
      const int64_t width = table.width(t);
      at::Tensor out = grad_h_per_task.select(0, t).narrow(0, begin, rows);
      gemm_to_accumulator(out, z.narrow(1, offset, width), weight.narrow(0, offset, width), /*accumulate=*/false);
    }
  });
  const auto [losses, total] = pipeline.finalize(prepared.task_weights);
  return {total, losses, grad_h_per_task, grad_weight, grad_bias};
}

// The backward of multi_task_loss: one kernel turns the saved logit gradient into dz (the per-task coefficients
// c_t = dTotal·λ_t + dL_t applied per column, plus the logits output's gradient when it was used), then the linear
// layer's backward on it: dh = dz W, dW = dzᵀ h, and db = Σ_rows dz from the scale kernel itself (fp32 sums of the
// rounded dz for half types, as dz.sum(0) gives). Three launches whatever T (four when the batch is tall enough for
// the bias sums to take several row slabs); the coefficients never leave the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_task_loss_backward_cuda(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const c10::optional<at::Tensor>& grad_logits_output, const at::Tensor& grad_logits,
    const at::Tensor& h_in, const at::Tensor& weight, const at::Tensor& col_task, bool has_bias) {
  const c10::DeviceGuard guard(h_in.device());  // see kernel_device_guard_note
  at::NoGradGuard no_grad;  // implementation steps, as in the forward
  const at::Tensor h = h_in.reshape({-1, h_in.size(-1)});
  const at::ScalarType acc = accumulation_dtype(h.scalar_type());
  const int64_t N = h.size(0);
  const int64_t S = weight.size(0);
  const int64_t T = task_weights.numel();
  TORCH_CHECK_VALUE(grad_logits.dim() == 2 && grad_logits.size(0) == N && grad_logits.size(1) == S,
                    "mtlfast: grad_logits must be (N, S) = (", N, ", ", S, "), got ", grad_logits.sizes());
  TORCH_CHECK_VALUE(col_task.numel() == S, "mtlfast: col_task must have S = ", S, " entries, got ", col_task.numel());
  TORCH_CHECK_TYPE(col_task.scalar_type() == at::kLong, "mtlfast: col_task must be int64, got ",
                   col_task.scalar_type());
  TORCH_CHECK_TYPE(grad_logits.scalar_type() == h.scalar_type(), "mtlfast: grad_logits must have h's dtype ",
                   h.scalar_type(), ", got ", grad_logits.scalar_type());
  const bool with_total = grad_total.has_value() && grad_total->defined();
  const bool with_losses = grad_losses.has_value() && grad_losses->defined();
  const bool with_output_grad = grad_logits_output.has_value() && grad_logits_output->defined();
  // The kernel reads these through raw pointers: a tensor on another device would be an illegal address.
  const auto check_device = [&](const at::Tensor& tensor, const char* name) {
    TORCH_CHECK_VALUE(tensor.device() == h.device(), "mtlfast: ", name, " is on ", tensor.device(), " but h is on ",
                      h.device());
  };
  check_device(grad_logits, "grad_logits");
  check_device(weight, "the head weight");
  check_device(task_weights, "task_weights");
  check_device(col_task, "col_task");
  if (with_total) {
    check_device(*grad_total, "grad_total");
  }
  if (with_losses) {
    check_device(*grad_losses, "grad_losses");
  }
  if (with_output_grad) {
    check_device(*grad_logits_output, "the logits' gradient");
  }
  // Conversions are no-ops for the tensors autograd passes (the accumulation dtype, contiguous).
  const at::Tensor g = grad_logits.stride(1) == 1 ? grad_logits : grad_logits.contiguous();
  const at::Tensor weights = task_weights.to(acc).contiguous();
  const at::Tensor columns = col_task.contiguous();
  at::Tensor d_total, d_losses, extra;
  if (with_total) {
    TORCH_CHECK_VALUE(grad_total->numel() == 1, "mtlfast: grad_total must hold one value, got shape ",
                      grad_total->sizes());
    d_total = grad_total->to(acc).contiguous();
  }
  if (with_losses) {
    TORCH_CHECK_VALUE(grad_losses->dim() == 1 && grad_losses->size(0) == T, "mtlfast: grad_losses must be (T,) = (",
                      T, ",), got ", grad_losses->sizes());
    d_losses = grad_losses->to(acc);  // strided: an expanded gradient is read in place
  }
  if (with_output_grad) {
    TORCH_CHECK_VALUE(grad_logits_output->sizes() == grad_logits.sizes(),
                      "mtlfast: the logits' gradient must be (N, S) = (", N, ", ", S, "), got ",
                      grad_logits_output->sizes());
    extra = grad_logits_output->to(h.scalar_type());  // strided, likewise
  }

  at::Tensor dz = at::empty({N, S}, h.options());
  cuda::LogitGradientArgs args{};
  args.grad_logits = g.const_data_ptr();
  args.rows = N;
  args.cols = S;
  args.ld = g.stride(0);
  args.extra_grad = extra.defined() ? extra.const_data_ptr() : nullptr;
  args.extra_row_stride = extra.defined() ? extra.stride(0) : 0;
  args.extra_col_stride = extra.defined() ? extra.stride(1) : 0;
  args.col_task = columns.const_data_ptr<int64_t>();
  args.tasks = T;
  args.task_weights = weights.const_data_ptr();
  args.grad_total = d_total.defined() ? d_total.const_data_ptr() : nullptr;
  args.grad_losses = d_losses.defined() ? d_losses.const_data_ptr() : nullptr;
  args.grad_losses_stride = d_losses.defined() ? d_losses.stride(0) : 0;
  args.dz = dz.mutable_data_ptr();
  // The bias gradient comes out of the same kernel (column sums of the rounded dz, as dz.sum(0) would give).
  const int64_t bias_size = has_bias ? S : 0;
  at::Tensor grad_bias = N == 0 ? at::zeros({bias_size}, h.options()) : at::empty({bias_size}, h.options());
  at::Tensor bias_partials;
  if (has_bias && N > 0) {
    args.grad_bias = grad_bias.mutable_data_ptr();
    const int slabs = cuda::bias_gradient_slabs(N, S);
    if (slabs > 1) {
      bias_partials = at::empty({slabs, S}, h.options().dtype(acc));
      args.bias_partials = bias_partials.mutable_data_ptr();
    }
  }
  C10_CUDA_CHECK(cuda::launch_scale_logit_gradient(kernel_dtype(h.scalar_type()), args,
                                                   c10::cuda::getCurrentCUDAStream(h.device().index()).stream()));
  at::Tensor grad_h = dz.mm(weight);
  at::Tensor grad_weight = dz.t().mm(h);
  return {grad_h.view(h_in.sizes()), grad_weight, grad_bias};
}

// The forward of the recompute path: the chunked op's row chunks without any gradient: the segment pass reads each
// chunk's logits for the losses and the row statistics and writes nothing back (the backward recomputes them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_task_loss_recompute_cuda(
    const at::Tensor& h_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList targets_in, const at::Tensor& task_weights, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims,
    c10::IntArrayRef ignore_index, c10::ArrayRef<double> params, const std::vector<std::string>& task_names,
    int64_t chunk_rows) {
  const c10::DeviceGuard guard(h_in.device());  // see kernel_device_guard_note
  const PreparedInputs prepared = prepare_multi_task_inputs(h_in, weight, bias, targets_in, task_weights, col_weight,
                                                            col_task, kinds, col_offsets, class_dims, ignore_index,
                                                            params, task_names, TargetConversion::kByBackend);
  LossPipeline pipeline(prepared.table, prepared.h, prepared.targets, col_weight);
  pipeline.save_row_stats();
  for_each_logits_chunk(pipeline, prepared.h, weight, bias, chunk_rows, /*with_gradient=*/false,
                        [](const at::Tensor&, const at::Tensor&, int64_t) {});
  const auto [losses, total] = pipeline.finalize(prepared.task_weights);
  return {total, losses, pipeline.row_stats, pipeline.inverse_denominators};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_task_loss_recompute_backward_cuda(
    const c10::optional<at::Tensor>& grad_total, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_weights, const at::Tensor& h_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::TensorList targets_in, const c10::optional<at::Tensor>& col_weight,
    const at::Tensor& col_task, const at::Tensor& row_stats, const at::Tensor& inverse_denominators,
    c10::IntArrayRef kinds, c10::IntArrayRef col_offsets, c10::IntArrayRef class_dims, c10::IntArrayRef ignore_index,
    c10::ArrayRef<double> params, const std::vector<std::string>& task_names, int64_t block_columns) {
  const c10::DeviceGuard guard(h_in.device());  // see kernel_device_guard_note
  const RecomputeBackwardInputs in = prepare_recompute_backward(
      grad_total, grad_losses, task_weights, h_in, weight, bias, targets_in, col_weight, col_task, row_stats,
      inverse_denominators, kinds, col_offsets, class_dims, ignore_index, params, task_names,
      TargetConversion::kByBackend);
  const KernelTasks tasks(in.prepared.table, in.prepared.h, in.prepared.targets, col_weight);

  const auto block_gradient = [&](at::Tensor& block, int64_t col_begin) {
    cuda::GradientArgs args;
    args.block = block.mutable_data_ptr();
    args.rows = block.size(0);
    args.ld = block.stride(0);
    args.col_begin = col_begin;
    args.cols = block.size(1);
    args.col_weight = tasks.col_weight_ptr();
    args.row_stats = in.row_stats.const_data_ptr();
    args.scales = in.scales.const_data_ptr();
    for (const cuda::TaskBatch& batch : tasks.batches) {
      const cuda::TaskMeta& last = batch.task[batch.count - 1];
      if (batch.task[0].col_offset < col_begin + args.cols && last.col_offset + last.width > col_begin) {
        C10_CUDA_CHECK(cuda::launch_gradient_from_stats(tasks.dtype, batch, args, tasks.stream));
      }
    }
  };
  auto [grad_h, grad_weight, grad_bias] = recompute_backward(in.prepared.h, weight, bias, block_columns,
                                                             block_gradient);
  return {grad_h.view(h_in.sizes()), grad_weight, grad_bias};
}

static_assert(std::is_same_v<decltype(multi_task_loss_cuda), MultiTaskLossKernel>);
static_assert(std::is_same_v<decltype(multi_task_loss_backward_cuda), MultiTaskLossBackwardKernel>);

}  // namespace

TORCH_LIBRARY_IMPL(mtlfast, MTLFAST_CUDA_DISPATCH_KEY, m) {
  m.impl("multi_task_loss", &multi_task_loss_cuda);
  m.impl("multi_task_loss_backward", &multi_task_loss_backward_cuda);
  m.impl("multi_task_loss_chunked", &multi_task_loss_chunked_cuda);
  m.impl("multi_task_loss_recompute", &multi_task_loss_recompute_cuda);
  m.impl("multi_task_loss_recompute_backward", &multi_task_loss_recompute_backward_cuda);
}

}  // namespace mtlfast
