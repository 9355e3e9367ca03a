#!/usr/bin/env bash
# The GPU path on one CUDA machine, in one go: the CUDA tests (and the resume/NaN tests, whose
# stages pick CUDA there), the per-step cost of the fashion and CIFAR-10 UNets in fp32 and bf16,
# and every stage of the digits preset (one post-training seed), stage by stage as dvc.yaml runs
# them. reports/gpu/ holds what it measured.
#
#   OUT=build/gpu_check bash benchmarks/gpu_check.sh
#   PYTHON=.venv/bin/python PRESET=digits PIPELINE_SECONDS=600 ...   (defaults: python3, digits, 220 s)
#
# On an H100 the digits stages up to mid-training took 215 s (reports/gpu/README.md), so 220 s stops
# before post-training; give the pipeline about 600 s to run every stage.
#
# A machine without internet installs the packages it lacks from wheels in .whl/ first
# (benchmarks/gpu_wheels.sh downloads them here; gpu_env.sh installs them there); each part
# has its own time limit so one hang costs little.
set -uo pipefail
OUT=${OUT:-build/gpu_check} LOG=gpu_check.log
source "$(dirname "$0")/gpu_env.sh"

log "tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_train.py tests/test_meanflow.py tests/test_config.py \
  --deselect tests/test_config.py::test_cli_check_accepts_good_file \
  2>&1 | tail -40 | tee "$OUT/pytest.txt"

for spec in fashion:1,32,32 cifar10:3,32,32; do
  log "step cost ${spec%%:*}"
  timeout 75 $PY benchmarks/step_cost.py --preset "${spec%%:*}" --shape "${spec#*:}" --device cuda \
    --precision fp32,bf16 --steps 20 --reps 3 --out "$OUT/step_cost_gpu_${spec%%:*}.json" 2>&1 | tee -a "$OUT/gpu_check.log"
done

log "digits pipeline"
WORK=$(mktemp -d)
cp -r cmt_bench experiments "$WORK"/
(
  cd "$WORK" || exit 1
  export PYTHONPATH=$WORK
  $PY -m cmt_bench preset "${PRESET:-digits}" >/dev/null
  $PY - <<'EOF'
import yaml
p = yaml.safe_load(open("params.yaml"))
p["posttrain"]["seeds"] = [0]
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
  deadline=$((SECONDS + ${PIPELINE_SECONDS:-220}))
  stage() { local t0=$SECONDS
            [ $((deadline - SECONDS)) -gt 0 ] || { echo "out of time before: $*"; exit 1; }
            timeout $((deadline - SECONDS)) $PY -m cmt_bench "$@" >>"$WORK/stages.log" 2>&1 ||
              { echo "FAILED or out of time: $*"; tail -30 "$WORK/stages.log"; exit 1; }
            echo "$* : $((SECONDS - t0)) s wall"; }
  stage data; stage features; stage pretrain; stage trajectories
  for m in ect meanflow; do stage midtrain --method $m; done
  for m in ect meanflow; do for i in random diffusion cmt; do
    stage posttrain --init $i --method $m --seed 0; stage evaluate --init $i --method $m --seed 0; done; done
) 2>&1 | tee -a "$OUT/gpu_check.log"
# every stage's ledger and metrics, for reports/gpu/
$PY - "$WORK" "$OUT/digits_pipeline.json" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
found = {str(p.relative_to(work)): json.loads(p.read_text())
         for p in sorted((work / "artifacts").rglob("*.json")) if p.stat().st_size < 200_000}
Path(sys.argv[2]).write_text(json.dumps(found, indent=1))
print(len(found), "json files")
EOF
cp "$WORK/mlflow.db" "$OUT/digits_mlflow.db" 2>/dev/null
log "done"
