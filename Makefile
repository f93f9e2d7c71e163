# The two commands of the README. Both set up everything they need on a fresh machine (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export MTLFAST_VENV := $(VENV)
# Build mtlfast._cuda_emulation too, so that `make test` runs the CUDA kernels' code on the CPU emulator
# (tests/test_cuda_emulation.py); with ON that test fails, rather than skips, when the module is missing.
export MTLFAST_CUDA_EMULATION ?= ON

.PHONY: setup demo test bench info

setup:
	./scripts/setup.sh

# The main job: fused vs plain-PyTorch multi-task models on the embedded synthetic data (ARGS="--dataset adult …").
demo: setup
	$(PY) -m mtlfast demo $(ARGS)

test: setup
	$(PY) -m pytest tests -q

bench: setup
	$(PY) -m mtlfast bench --device $(if $(DEVICE),$(DEVICE),cpu) $(ARGS)

info: setup
	$(PY) -m mtlfast info
