cd benchmarks
python bench_conv.py 2>&1 | tee $OUT/conv.log | tail -n 14
python bench_sweep.py --gpus 1 --spec ../search_spaces/sweeps/reference_model.yaml 2>&1 | tee $OUT/sweep.log | grep -v "^\[I\|WARNING"
python bench_kernel.py 2>&1 | tee $OUT/kernel.log | tail -n 9
