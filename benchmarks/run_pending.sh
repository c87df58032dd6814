#!/usr/bin/env bash
# GPU runs behind BENCHMARKS.md, one device call each (each recorded at least once since; the
# 2- and 4-GPU sweeps in the sixth session, the H100 tables earlier, the H200 table in the eighth):
#   one GPU:   bash benchmarks/run_pending.sh model
#   one GPU:   bash benchmarks/run_pending.sh training  (bench_training.py, about 4 minutes)
#   one GPU:   bash benchmarks/run_pending.sh tables      (the reference sweeps -> $OUT/tables/)
#   two GPUs:  bash benchmarks/run_pending.sh sweep2      (nvidia-h200-x2 / nvidia-h100-x2)
#   four GPUs: bash benchmarks/run_pending.sh sweep4      (nvidia-h200-x4 / nvidia-h100-x4)
# Results land in $OUT; copy them to benchmarks/results/ and BENCHMARKS.md.
set -euo pipefail
cd benchmarks
case "${1:-model}" in
  model)  python bench_model.py --trials 24 2>&1 | tee "$OUT/model.log" ;;
  training) python bench_training.py 2>&1 | tee "$OUT/training.log" ;;
  tables) for spec in reference_model reference_model_tail reference_model_conv; do
            python -m tuner sweep --spec "../search_spaces/sweeps/$spec.yaml" --out "$OUT/tables" \
              --storage "sqlite:///$OUT/sweep.db" 2>&1 | tee -a "$OUT/tables.log"
          done ;;
  sweep2) python bench_sweep.py --gpus 1,2 --spec ../search_spaces/sweeps/reference_model.yaml 2>&1 | tee "$OUT/sweep.log" ;;
  sweep4) python bench_sweep.py --gpus 1,2,4 --spec ../search_spaces/sweeps/reference_model.yaml 2>&1 | tee "$OUT/sweep.log" ;;
  *) echo "usage: $0 model|training|tables|sweep2|sweep4" >&2; exit 2 ;;
esac
