#!/usr/bin/env bash
# Before a GPU session (device tool): the GPU machine reaches no package registry, so download here the optional
# packages its benchmarks compare against — Liger-Kernel (pure Python + Triton; the S5 `liger` provider) — into
# .gpu-wheels/ (git-ignored), and carry that folder: run(command="scripts/gpu_validate.sh", carry=[".gpu-wheels"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
mkdir -p .gpu-wheels
$PIP download --no-deps -d .gpu-wheels "liger-kernel${LIGER_VERSION:+==$LIGER_VERSION}"
ls -l .gpu-wheels
