#!/usr/bin/env bash
# One study (128x64 float32, 48 trials, cold Triton cache, fresh storage) on 1 and 4 GPUs with
# several compile processes per worker, and how many CUDA contexts the host holds 8 s in: the
# measurement behind tuner.tuning_worker.default_compile_processes. Run on a 4-GPU host:
#   bash benchmarks/bench_compile_processes.sh [GPUS:PROCESSES ...]   # default 4:12 4:6 4:3 1:12
# Results in $OUT (default: a temp folder).
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(4:12 4:6 4:3 1:12)
for spec in "${specs[@]}"; do
  spec="${spec/:/ }"
  set -- $spec
  export TRITON_CACHE_DIR="$(mktemp -d)"
  (sleep 8; nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l > "$OUT/contexts_$1_$2.txt") &
  start=$(date +%s)
  python -m tuner search --shape 128x64 --trials 48 --workers "$1" --compile-processes "$2" \
    --verbose --quiet --storage "sqlite:///$OUT/s_$1_$2.db" --table "$OUT/t.json" > /dev/null 2> "$OUT/err_$1_$2.txt"
  end=$(date +%s)
  wait
  echo "gpus $1, compile processes $2 each: wall $((end - start)) s, CUDA contexts at 8 s: $(cat "$OUT/contexts_$1_$2.txt")"
  grep -h "trials in\|per trial\|seconds since" "$OUT/err_$1_$2.txt"
done | tee "$OUT/compile_processes.log"
