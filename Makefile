# Two entry points: `make toy` (set up, then `dvc repro` of the toy preset) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.PHONY: toy test setup

setup: $(VENV)/installed

# torch first and pinned: it installs the local CPU build instead of a multi-GB CUDA download.
$(VENV)/installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

toy: setup
	cmt-bench check
	dvc repro
	@cmt-bench summary

test: setup
	python -m pytest -q
