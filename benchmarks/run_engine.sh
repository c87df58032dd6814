#!/usr/bin/env bash
# The tuning-engine runs behind BENCHMARKS.md (issue 10), one device call each:
#   bash benchmarks/run_engine.sh quality [SEED]  # exhaustive ground truth, then 3 seeds of search
#   bash benchmarks/run_engine.sh default [SEED]  # the default config against that ground truth
#   bash benchmarks/run_engine.sh timing          # trial timing under host load; host overhead
#   bash benchmarks/run_engine.sh scaling         # start-up and sweep scaling on 1, 2 (and 4) GPUs
#   bash benchmarks/run_engine.sh tables          # the reference and transformer sweeps' tables
# SEED picks the held-out set (benchmarks/heldout.py; default: its first seed). Results land in
# $OUT; copy them to benchmarks/results/ and BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")"
export HELDOUT_SEED="${2:-${HELDOUT_SEED:-20261126}}"
cache="$(mktemp -d)/triton-cache"
case "${1:-quality}" in
  quality) python bench_exhaustive.py --cache "$cache" 2>&1 | tee "$OUT/exhaustive.log"
           python bench_quality.py --truth "$OUT/bench_exhaustive.json" --cache "$cache" \
             --trials 32 --seeds 0,1,2 2>&1 | tee "$OUT/quality.log" ;;
  default) python bench_exhaustive.py --cache "$cache" 2>&1 | tee "$OUT/exhaustive.log"
           python bench_default.py --exhaustive "$OUT/bench_exhaustive.json" 2>&1 | tee "$OUT/default.log" ;;
  timing)  python bench_timing.py 2>&1 | tee "$OUT/timing.log"
           python bench_overhead.py --profile 2>&1 | tee "$OUT/overhead.log" ;;
  scaling) gpus=$(python -c "import torch; print(','.join(str(n) for n in (1, 2, 4) if n <= torch.cuda.device_count()))")
           python bench_startup.py --gpus "$gpus" 2>&1 | tee "$OUT/startup.log"
           python bench_scaling.py --gpus "$gpus" 2>&1 | tee "$OUT/scaling.log" ;;
  tables)  for spec in reference_model reference_model_tail reference_model_conv transformer_hidden; do
             python -m tuner sweep --spec "../search_spaces/sweeps/$spec.yaml" --out "$OUT/tables" \
               --storage "sqlite:///$OUT/sweep.db" --quiet 2>&1 | tee -a "$OUT/tables.log"
           done ;;
  *) echo "usage: $0 quality|default|timing|scaling|tables [SEED]" >&2; exit 2 ;;
esac
