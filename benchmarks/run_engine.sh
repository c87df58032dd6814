#!/usr/bin/env bash
# The tuning-engine runs behind BENCHMARKS.md (issue 10), on a 4-GPU host, two device calls:
#   bash benchmarks/run_engine.sh quality     # held-out quality (3 seeds), start-up, warm pool
#   bash benchmarks/run_engine.sh scaling     # sweep and one-study scaling on 1, 2, 4 GPUs; tables
# Results land in $OUT; copy them to benchmarks/results/ and BENCHMARKS.md.
set -euo pipefail
cd benchmarks
case "${1:-quality}" in
  quality) python bench_quality.py --trials 32 --seeds 0,1,2 2>&1 | tee "$OUT/quality.log"
           python bench_startup.py --gpus 1,4 --repeats 2 --serve 2>&1 | tee "$OUT/startup.log" ;;
  scaling) python bench_scaling.py --gpus 1,2,4 2>&1 | tee "$OUT/scaling.log" ;;
  startup-scaling)  # both, in one call of at most 8 minutes
           timeout 170 python bench_startup.py --gpus 1,4 --serve 2>&1 | grep -v WARNING | tee "$OUT/startup.log" | tail -8 || true
           timeout 280 python bench_scaling.py --gpus 1,2,4 2>&1 | tee "$OUT/scaling.log" | tail -12 ;;
  tables)  for spec in reference_model reference_model_tail reference_model_conv transformer_hidden; do
             python -m tuner sweep --spec "../search_spaces/sweeps/$spec.yaml" --out "$OUT/tables" \
               --storage "sqlite:///$OUT/sweep.db" --quiet 2>&1 | tee -a "$OUT/tables.log"
           done ;;
  *) echo "usage: $0 quality|scaling|startup-scaling|tables" >&2; exit 2 ;;
esac
