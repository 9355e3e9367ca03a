#!/usr/bin/env bash
# The wheels a bare GPU machine (the lent H200/H100 image: Python 3.12, torch, numpy, scipy, pandas,
# pytest, ... but not these) needs to run the GPU scripts here (gpu_step.sh, gpu_check.sh) and the
# CUDA tests, at the versions this repository's .venv holds, into .whl/ (ignored by git; carry it).
# gpu_env.sh installs them there, offline, into /tmp/site. mlflow-skinny alone cannot open the
# sqlite tracking stores the tests use (seen 2026-11-30), hence the full mlflow and SQLAlchemy.
#
#   bash benchmarks/gpu_wheels.sh      (then: carry [".whl"] and run benchmarks/gpu_step.sh there)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
NAMES="alembic annotated-types braceexpand cachetools cffi cryptography databricks-sdk fastapi gitdb gitpython
 google-auth importlib-metadata mako mlflow mlflow-skinny mlflow-tracing opentelemetry-api opentelemetry-proto
 opentelemetry-sdk opentelemetry-semantic-conventions orjson pycparser pydantic pydantic-core pydot smmap sqlalchemy
 sqlparse starlette torch-fidelity typing-extensions typing-inspection webdataset"
mkdir -p .whl
for name in $NAMES; do
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version" 2>&1 | grep -v WARNING || true
done
ls .whl | wc -l; du -sh .whl
