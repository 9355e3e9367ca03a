#!/usr/bin/env bash
# GPU step efficiency (issue "MeanFlow within 2x of flow matching") on one CUDA machine, in one go,
# most needed first, each part under its own time limit (so one hang or a slow compile costs only
# its part, and what finished is kept): the fashion UNet's bf16 step cost for flow matching and
# MeanFlow, eager and under compute.compile jvp, with the GPU busy fraction (noise and times drawn
# on the GPU, as training draws them); the same under CUDA graphs; the CUDA parametrisations of the
# compile and CUDA tests; channels-last against contiguous; profiles of the eager steps. About 10
# minutes at most (the T_* limits), 8 files (what the device tool brings back). reports/gpu/ takes
# what it measured.
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

cost compile "${T_COST:-270}" --precision "$P" --compile none,jvp --methods meanflow
if [ "$DEVICE" = cuda ]; then
  cost graphs "${T_GRAPHS:-90}" --precision "$P" --compile graphs --methods meanflow
  log "tests (CUDA parametrisations)"
  timeout "${T_TESTS:-80}" $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_compile.py -k cuda \
    2>&1 | tail -25 | tee "$OUT/pytest.txt"
fi
cost memory_format "${T_FORMAT:-40}" --precision "$P" --memory-format contiguous,channels_last --methods meanflow
prof flow_matching none "${T_PROFILE:-30}"
prof meanflow none "${T_PROFILE:-30}"
log "done"
