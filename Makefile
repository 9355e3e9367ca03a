# Two entry points: `make toy` (set up, then `dvc repro` of the toy preset) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.PHONY: toy test setup fashion-data

setup: $(VENV)/installed fashion-data

# Fashion-MNIST comes from Debian (no download at run time). Only the fashion preset needs it, so
# where apt is unavailable this warns instead of failing.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
fashion-data:
	@[ -f $(FASHION) ] || $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	  || ($(SUDO) apt-get update -qq >/dev/null 2>&1 && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "warning: could not install dataset-fashion-mnist; the fashion preset will not run" >&2

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
