# Two entry points: `make toy` (the Python environment and the offline page of `dvc plots`, then
# `dvc repro` of the toy preset through `cmt-bench repro`: one line per stage, stages run warm) and
# `make test` (all of `make setup`: also Debian's Fashion-MNIST and Chromium, which only the image
# presets and the browser tests use).
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.PHONY: toy test setup fashion-data chromium plots-template

setup: $(VENV)/installed fashion-data chromium plots-template

# Fashion-MNIST comes from Debian (no download at run time). Only the fashion preset needs it, so
# where apt is unavailable this warns instead of failing.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
fashion-data:
	@[ -f $(FASHION) ] || $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	  || ($(SUDO) apt-get update -qq >/dev/null 2>&1 && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "warning: could not install dataset-fashion-mnist; the fashion preset will not run" >&2

# Debian's Chromium renders the HTML report and the dvc plots page in the browser tests; without it
# they skip (outside CI), so this warns instead of failing.
chromium:
	@[ -x /usr/bin/chromium ] || $(SUDO) apt-get install -y -qq chromium >/dev/null 2>&1 \
	  || ($(SUDO) apt-get update -qq >/dev/null 2>&1 && $(SUDO) apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser tests will not run" >&2

# An offline page for `dvc plots show --html-template build/dvc_plots_template.html`: vega, vega-lite
# and vega-embed from npm (pinned in cmt_bench/plots_template.py, installed into build/npm) inlined.
PLOTS_TEMPLATE := build/dvc_plots_template.html
plots-template: $(PLOTS_TEMPLATE)
$(PLOTS_TEMPLATE): cmt_bench/plots_template.py | $(VENV)/installed
	@python -m cmt_bench.plots_template -o $@ \
	  || echo "warning: could not build $@ (needs npm); dvc plots show will need a network" >&2

# torch first and pinned: it installs the local CPU build instead of a multi-GB CUDA download.
# Without its dependencies and its bytecode: uv installs everything else (torch's dependencies too,
# all pinned in constraints.txt) in parallel and compiles their bytecode on all cores, where pip took
# 2 min for the same versions (README); torch's bytecode with compileall likewise (pip compiles its
# 2,000 files one at a time; one of them is Python 3.12 syntax, which pip skips silently).
# torch-fidelity without its dependencies: it declares torchvision, which would pull a CUDA torch and
# has no build that loads beside torch 2.13.0+cpu (cmt_bench/fidelity.py stands in for it). lpips the
# same way: its linear heads file is what distance.lpips_weights reads, and tests/test_lpips.py checks
# cmt_bench's LPIPS against its code.
UV := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -c constraints.txt
$(VENV)/installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-compile --no-deps -c constraints.txt torch==2.13.0 uv
	$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics $(VENV)/lib/python3*/site-packages/torch
	$(UV) -e '.[test]'
	$(UV) --no-deps torch-fidelity lpips
	touch $@

# `cmt-bench repro` checks params.yaml before DVC starts and ends with `cmt-bench summary`'s lines
toy: $(VENV)/installed plots-template
	cmt-bench repro

# Test files over the cores this process may use (nproc; at most 4, since a test may run a pipeline with
# cells side by side); a file's tests stay in one process, which runs its module fixtures once.
TEST_PROCESSES ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
test: setup
	python -m pytest -q --numprocesses $(TEST_PROCESSES) --dist loadfile
