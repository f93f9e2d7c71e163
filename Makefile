# The two commands of the README. Both set up everything they need on a fresh machine (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export MTLFAST_VENV := $(VENV)

.PHONY: setup test bench info

setup:
	./scripts/setup.sh

test: setup
	$(PY) -m pytest tests -q

bench: setup
	$(PY) -m mtlfast bench --device $(if $(DEVICE),$(DEVICE),cpu)

info: setup
	$(PY) -m mtlfast info
