#!/usr/bin/env bash
# The emulated CUDA backend's tests under AddressSanitizer: an out-of-bounds read or write by a kernel of
# csrc/cuda/*.cu into a tensor's memory aborts the run with ASan's report (in $BUILD/asan.log.*), and a misaligned
# access (a 16-byte pack at an address a GPU would fault on) with UBSan's, on stderr. Not part of
# `make test`: it needs a second build of mtlfast._cuda_emulation (~1.5 min here) and runs ~2x slower.
#
#   scripts/check_cuda_emulation_asan.sh [pytest args]   (default: the files tests/test_cuda_emulation.py runs)
#   MTLFAST_VENV   the venv `make test` set up (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MTLFAST_VENV:-.venv}"
PY="$VENV/bin/python"
BUILD=build/asan-emulation
mkdir -p "$BUILD"
MTLFAST_CUDA=OFF MTLFAST_CUDA_EMULATION=ON "$VENV/bin/cmake" -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS="-fsanitize=address,alignment -fno-sanitize-recover=alignment -fno-omit-frame-pointer" >"$BUILD/configure.log"
PATH="$VENV/bin:$PATH" ninja -C "$BUILD" _cuda_emulation
if [[ $# -eq 0 ]]; then
  set -- $("$PY" -c 'import sys; sys.path.insert(0, "tests"); import test_cuda_emulation as t; print(" ".join("tests/" + f for f in t.EMULATED_FILES))')
fi
rm -f "$BUILD"/asan.log.*
status=0
# The fibers' stacks are the emulator's own (mmap): no use-after-return tracking on them; leaks are torch's business.
# libstdc++ preloaded too: ASan's __cxa_throw interceptor must find the real one before the first C++ exception.
MTLFAST_TEST_CUDA_EMULATION=1 MTLFAST_CUDA_EMULATION_MODULE="$(ls "$BUILD"/_cuda_emulation*.so)" \
  ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0:halt_on_error=1:log_path=$PWD/$BUILD/asan.log" \
  LD_PRELOAD="$(${CXX:-g++} -print-file-name=libasan.so) $(${CXX:-g++} -print-file-name=libstdc++.so.6)" \
  "$PY" -m pytest -q -p no:cacheprovider --capture=sys "$@" || status=$?  # fd 2 uncaptured: UBSan's report
if compgen -G "$BUILD/asan.log.*" >/dev/null; then
  echo "== AddressSanitizer reports:"
  cat "$BUILD"/asan.log.*
  exit 1
fi
exit $status
