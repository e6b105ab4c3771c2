#!/usr/bin/env bash
# One GPU check (README, "Before renting"): on a machine with one GPU and famjax installed with
# `make venv EXTRAS=test,cuda`, runs each part under its own timeout (see GPU_CHECK_PARTS below) and
# prints one JSON line per part: {"part", "rc", "seconds", "result"} where result is the part's
# own JSON line (null when it failed or timed out; rc 124 = timed out).
#   mfu:          benchmarks/mfu.py, `small` preset, bfloat16, remat none, dots and block
#   step_memory:  benchmarks/step_memory.py (XLA's temp bytes per remat policy, compile time)
#   decode:       benchmarks/decode.py (cached, relay, confidence and speculative decoding)
#   paper_train:  benchmarks/paper_smallest.py, 200 steps of the paper preset's smallest shape
#   plan_on_gpu:  benchmarks/plan_on_gpu.py, the memory plan's choice for that shape (one GPU's
#                 share of its batch) and one step at it: the compiler's and the device's peak
#   study_throughput: benchmarks/study_throughput.py, 24 runs of the laws preset's width-32 gamma
#                 grid (125 steps each) one at a time and as cohorts (vmapped runs of one shape)
# Usage: bash benchmarks/gpu_check.sh   (GPU_CHECK_SMOKE=1: tiny sizes, to check it on a CPU;
# GPU_CHECK_PARTS="mfu study_throughput": those parts only; all of them take up to 12 minutes)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  MFU_ARGS="--preset tiny --batch 8 --seq 128 --steps 2"
  MEMORY_ARGS="--remat none --depths 4,8"
  DECODE_ARGS="--steps 20 --context 64"
  TRAIN_ARGS="--steps 3 --batch 2 --seq 128 --microbatches 1"
  PLAN_ARGS="--smoke"
  STUDY_ARGS="--widths 32 --seeds 0,1 --tokens 52224 --modes cohorts --step_sizes 2"
else
  MFU_ARGS="--preset small --remat none,dots,block"
  MEMORY_ARGS=""
  DECODE_ARGS="--steps 300"
  TRAIN_ARGS="--steps 200 --batch 32 --seq 2048"
  PLAN_ARGS=""
  STUDY_ARGS="--widths 32 --seeds 0,1,2,3 --tokens 128000 --modes sequential,cohorts"
fi
PARTS=" ${GPU_CHECK_PARTS:-mfu step_memory decode paper_train plan_on_gpu study_throughput} "

part() {  # name, timeout in seconds, command...
  local name=$1 limit=$2
  shift 2
  [[ "$PARTS" == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
  local rc=$?
  local result
  result=$(grep '^{' "$WORK/$name.out" | tail -n 1)
  printf '{"part": "%s", "rc": %d, "seconds": %d, "result": %s}\n' \
    "$name" "$rc" "$((SECONDS - start))" "${result:-null}"
  if [[ $rc -ne 0 ]]; then tail -n 5 "$WORK/$name.err" >&2; fi
}

part mfu 150 $PY benchmarks/mfu.py $MFU_ARGS
part step_memory 90 $PY benchmarks/step_memory.py $MEMORY_ARGS
part decode 110 $PY benchmarks/decode.py --workdir "$WORK/decode" $DECODE_ARGS
part paper_train 120 $PY benchmarks/paper_smallest.py $TRAIN_ARGS
part plan_on_gpu 120 $PY benchmarks/plan_on_gpu.py $PLAN_ARGS
part study_throughput 150 $PY benchmarks/study_throughput.py $STUDY_ARGS
