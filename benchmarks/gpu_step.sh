#!/usr/bin/env bash
# GPU step efficiency (issue "MeanFlow within 2x of flow matching") on one CUDA machine, in one go,
# most needed first, each part under its own time limit (so one hang or a slow compile costs only
# its part, and what finished is kept): the fashion UNet's bf16 eager step cost for flow matching,
# MeanFlow and MeanFlow with one JVP shape every step, with the GPU busy fraction (noise and times
# drawn on the GPU, as training draws them); a profile of the fixed-shape step; that step under CUDA
# graphs; the CUDA parametrisations of the compile and CUDA tests; a profile of MeanFlow's eager step;
# compute.compile jvp last. About 10 minutes at most (the T_* limits), 8 files at most (what the
# device tool brings back). reports/gpu/ takes what it measured.
#
#   OUT=build/gpu_step bash benchmarks/gpu_step.sh
#   DEVICE=cpu SHAPE=1,8,8 STEPS=2 REPS=1 bash benchmarks/gpu_step.sh   (a dry run of the script on a CPU)
#
# A machine without internet installs the packages it lacks from wheels in .whl/ first
# (benchmarks/gpu_wheels.sh downloads them here; gpu_env.sh installs them there).
set -uo pipefail
OUT=${OUT:-build/gpu_step} LOG=gpu_step.log
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-1,32,32}
STEPS=${STEPS:-20}
REPS=${REPS:-3}
source "$(dirname "$0")/gpu_env.sh"

# bf16 is the precision the issue's targets are set in; on a CPU (a dry run) fp32
[ "$DEVICE" = cuda ] && P=bf16 || P=fp32
cost() {  # cost NAME TIMEOUT ARGS...: one step_cost run into $OUT/step_cost_NAME.json
  local name=$1 limit=$2; shift 2
  log "step cost $name: $*"
  timeout "$limit" $PY benchmarks/step_cost.py --preset fashion --shape "$SHAPE" --device "$DEVICE" \
    --steps "$STEPS" --reps "$REPS" --out "$OUT/step_cost_$name.json" "$@" 2>&1 \
    | grep -v -i -E "warn|^ *$" | tail -20 | tee -a "$OUT/$LOG"
}
prof() {  # prof METHOD COMPILE TIMEOUT: one profile into $OUT/profiles/
  log "profile $1 $P compile=$2"
  timeout "$3" $PY benchmarks/profile_step.py --preset fashion --shape "$SHAPE" --device "$DEVICE" \
    --precision "$P" --method "$1" --compile "$2" --steps 5 --out "$OUT/profiles/$1_${P}_$2.txt" 2>&1 \
    | grep -v USDT | head -2 | tee -a "$OUT/$LOG"
}
mkdir -p "$OUT/profiles"

# Session 19 measured eager MeanFlow at 3.90x flow matching with 365 us of CPU per convolution (50 in
# FM) and compute.compile jvp never finishing; first: does one JVP shape every step close the gap?
cost fixed_rows "${T_COST:-150}" --precision "$P" --compile none --methods meanflow,meanflow_fixed_rows
prof meanflow_fixed_rows none "${T_PROFILE:-30}"
if [ "$DEVICE" = cuda ]; then
  cost graphs "${T_GRAPHS:-120}" --precision "$P" --compile graphs --methods meanflow_fixed_rows
  log "tests (CUDA parametrisations)"
  timeout "${T_TESTS:-80}" $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_compile.py -k cuda \
    2>&1 | tail -25 | tee "$OUT/pytest.txt"
fi
prof meanflow none "${T_PROFILE:-30}"
cost compile "${T_COMPILE:-150}" --precision "$P" --compile jvp --methods meanflow
log "done"
