#!/usr/bin/env bash
# On a lent GPU machine (device tool): build from source against the machine's torch, run the CUDA tests, the
# kernel self-check, the CUDA benchmarks, the profiles and the whole test suite. Everything lands in $OUT (or
# ./gpu-results): build log, info, pytest logs, CSVs, profiles.
#   scripts/gpu_validate.sh                        every stage (~18 min: more than one 10-minute device call)
#   GPU_STAGES="tests selfcheck bench profile" BENCH_DTYPES=bfloat16 scripts/gpu_validate.sh     first call (~8 min)
#   GPU_STAGES="suite bench train" BENCH_DTYPES=float32 scripts/gpu_validate.sh                  second call
# The build runs in every call (a call may land on a fresh machine). First scripts/fetch_gpu_wheels.sh here (that
# machine reaches no registry), then run(command="MTLFAST_GIT_SHA=<git rev-parse --short=12 HEAD here> ...",
# carry=[".gpu-wheels"]): the device's copy of .git may be older than the files it runs (benchmarks/bench_op.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MTLFAST_CUDA=ON
PY="${PYTHON:-python3}"
STAGES=" ${GPU_STAGES:-tests selfcheck bench profile train suite} "
stage() { [[ "$STAGES" == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  echo "BUILD FAILED"; tail -n 60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
"$PY" -m mtlfast info | tee "$OUT/info.txt"
# Optional competitors carried from the dev machine (scripts/fetch_gpu_wheels.sh): Liger-Kernel for S5.
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index .gpu-wheels/*.whl 2>&1 | tail -n 2
fi
"$PY" -c "import liger_kernel; print('liger_kernel', liger_kernel.__file__)" 2>&1 | tail -n 1 | tee -a "$OUT/gpu.txt"

# Time-boxed stages, rarest evidence first, so one slow stage cannot eat the lease.
if stage tests; then
  timeout "${CUDA_TEST_TIMEOUT:-120}" "$PY" -m pytest tests/test_cuda.py -q -rfE -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest_cuda.txt" | tail -n 15
  timeout "${CUDA_TEST_TIMEOUT:-120}" "$PY" -m pytest tests/test_recompute.py -m cuda -q -rfE -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest_recompute_cuda.txt" | tail -n 5
  # Bad input on the GPU (device mixes, the device guard) and the module's linkage (the static-libstdc++ crash).
  timeout "${CUDA_TEST_TIMEOUT:-120}" "$PY" -m pytest tests/test_errors.py tests/test_linkage.py -q -rfE \
    -p no:cacheprovider 2>&1 | tee "$OUT/pytest_errors.txt" | tail -n 5
fi
if stage selfcheck; then
  # Kernel-level checks (determinism, graph replay, > 64 tasks, NaN for a bad index) and GPU-only timings.
  timeout "${SELFCHECK_TIMEOUT:-120}" "$PY" benchmarks/cuda_selfcheck.py 2>&1 | tee "$OUT/cuda_selfcheck.txt" | tail -n 25
fi
if stage bench; then
  # The op benchmark alone per config (`mtlfast bench` would rerun the training-step benchmark after each one).
  for dtype in ${BENCH_DTYPES:-bfloat16 float32}; do
    for config in S1 S2 S3 S4 S5; do
      timeout "${BENCH_TIMEOUT:-90}" "$PY" -m benchmarks.bench_op --device cuda --dtype "$dtype" --configs "$config" \
        --csv "$OUT/op_cuda.csv" 2>&1 | tee -a "$OUT/bench_$dtype.txt" | grep -E "^\|" | tail -n 3
    done
  done
fi
if stage profile; then
  # Where S1's and S5's time and memory go: kernels per step, GPU vs wall time, host ops, allocations at the peak.
  timeout "${PROFILE_TIMEOUT:-90}" "$PY" -m benchmarks.profile_step --configs S1,S5 --providers mtlfast,gemm_only,gemm_autograd \
    --dtype bfloat16 2>&1 | tee "$OUT/profile.txt" | grep -E "^==|wall|peak"
fi
if stage train; then
  timeout "${BENCH_TIMEOUT:-90}" "$PY" -m benchmarks.bench_train --device cuda --csv "$OUT/train_cuda.csv" 2>&1 \
    | tee "$OUT/bench_train.txt" | grep -E "^\|" | tail -n 10
fi
if stage suite; then
  # pytest-xdist where the image has it (it is not installable there); the emulation tests need no GPU: skipped.
  parallel=()
  if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
  timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest tests -q -rfE -p no:cacheprovider --ignore=tests/test_cuda.py \
    --ignore=tests/test_cuda_emulation.py ${parallel[@]+"${parallel[@]}"} 2>&1 | tee "$OUT/pytest.txt" | tail -n 15
fi
