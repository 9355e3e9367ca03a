# Sourced by the GPU scripts here (gpu_check.sh, gpu_step.sh) with OUT and LOG set: the output folder,
# $PY, log(), the packages a bare GPU machine lacks (from wheels in .whl/, offline) and env.txt.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true CI=true
PY=$(command -v "${PYTHON:-python3}")
log() { echo "== $(date +%T) $*" | tee -a "$OUT/$LOG"; }

# into a folder of its own (the image's site-packages stay as they are), found through PYTHONPATH
if [ -d .whl ] && ! $PY -c "import mlflow, pydantic, webdataset" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  $PY -c "import mlflow, pydantic, webdataset; print('mlflow', mlflow.__version__, 'pydantic', pydantic.VERSION)" 2>&1 | tail -1
  nproc; } 2>&1 | tee "$OUT/env.txt"
