#!/usr/bin/env bash
# GPU step efficiency (issue "MeanFlow within 2x of flow matching") on one CUDA machine, in one go:
# the compiled-step and device-draw tests on CUDA, the fashion UNet's step cost per (precision,
# compute.compile, memory format) for flow matching and MeanFlow, with the GPU busy fraction, and
# profiles of the bf16 MeanFlow step eager and compiled. At most about 12 minutes (the T_* limits);
# each part has its own time limit so one hang costs little; torch.compile's first compile of the
# UNet is the unknown (never measured on a GPU here). reports/gpu/ takes what it measured.
#
#   OUT=build/gpu_step bash benchmarks/gpu_step.sh
#   DEVICE=cpu SHAPE=1,8,8 STEPS=2 REPS=1 bash benchmarks/gpu_step.sh   (a dry run of the script on a CPU)
#
# A machine without internet installs the packages it lacks from wheels in .whl/ first (see
# reports/gpu/README.md for the list).
set -uo pipefail
OUT=${OUT:-build/gpu_step} LOG=gpu_step.log
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-1,32,32}
STEPS=${STEPS:-20}
REPS=${REPS:-3}
source "$(dirname "$0")/gpu_env.sh"

# bf16 is the precision the issue's targets are set in; on a CPU (a dry run) fp32
[ "$DEVICE" = cuda ] && P=bf16 || P=fp32
# in order of what the issue needs most: the ratio and busy fraction, the profiles that say why,
# the CUDA tests, the memory formats
log "step cost: compile none and jvp, $P (and the eager fp32 flow-matching baseline)"
timeout "${T_COST:-330}" $PY benchmarks/step_cost.py --preset fashion --shape "$SHAPE" --device "$DEVICE" --precision "$P" \
  --compile none,jvp --methods meanflow --steps "$STEPS" --reps "$REPS" --out "$OUT/step_cost_compile.json" \
  2>&1 | tail -8 | tee -a "$OUT/gpu_step.log"

mkdir -p "$OUT/profiles"
for spec in meanflow:jvp meanflow:none flow_matching:none; do
  log "profile ${spec%%:*} $P compile=${spec#*:}"
  timeout "${T_PROFILE:-90}" $PY benchmarks/profile_step.py --preset fashion --shape "$SHAPE" --device "$DEVICE" \
    --precision "$P" --method "${spec%%:*}" --compile "${spec#*:}" --steps 5 \
    --out "$OUT/profiles/${spec%%:*}_${P}_${spec#*:}.txt" 2>&1 | grep -v USDT | head -2 | tee -a "$OUT/gpu_step.log"
done

if [ "$DEVICE" = cuda ]; then
  log "tests"
  timeout "${T_TESTS:-200}" $PY -m pytest -q -p no:cacheprovider -rs tests/test_compile.py tests/test_cuda.py \
    2>&1 | tail -30 | tee "$OUT/pytest.txt"
fi

log "step cost: memory formats, $P eager"
timeout "${T_FORMAT:-90}" $PY benchmarks/step_cost.py --preset fashion --shape "$SHAPE" --device "$DEVICE" \
  --precision "$P" --memory-format contiguous,channels_last --methods meanflow \
  --steps "$STEPS" --reps "$REPS" --out "$OUT/step_cost_memory_format.json" 2>&1 | tail -6 | tee -a "$OUT/gpu_step.log"
log "done"
