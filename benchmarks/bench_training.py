"""Training on the GPU: add + LayerNorm forward + backward (gradients for x, sum_weight, weight
and bias) against torch eager and torch.compile of ``F.layer_norm(x + s, ...)``, in ms and % of
the bytes-moved floor; the backward alone with its two column-sum reductions (partial sums,
atomics); and a ModelNew training step (forward + ``.sum().backward()``, reference model at
batch 32) against Model eager and torch.compile(Model), float32 and bfloat16.

The floor of add + LayerNorm forward + backward is five tensors of x's size (x read by the
forward and by the backward, the output written, dy read, dx written) at the device-to-device
copy bandwidth measured in the same run. Each forward + backward step is timed twice: with
``do_bench`` as a training loop runs it, and replayed from a CUDA graph (``tuner.timing``), GPU
time only, which is what the kernels decide where the host's autograd is the slower part.
Configs come from the runtime's tables (shipped and
the user's, else heuristics); ``--trials N`` first tunes every kernel involved with `tuner`
(N trials a problem, into $OUT/training_table.json) and times with that table.

    cd benchmarks && python bench_training.py [--trials 24] [--grid]
                                                     (results in $OUT/bench_training.json)

``--grid`` also times a small grid of backward configs per shape (a few minutes more); tuning
takes longer than the timing itself (16 problems, each config compiled and timed in turn), so
run it as a call of its own.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os

import torch
import torch.nn.functional as F
import triton

from common import copy_bandwidth_gbps, out_dir, print_table, time_ms, versions, write_json
from tuner.timing import time_calls_ms
from kernels import LaunchConfig, Model, ModelNew, fused_add_layernorm, reload_tables
from kernels.add_layernorm_backward import (
    ADD_LAYERNORM_BACKWARD,
    AddLayerNormBackwardCall,
    add_layernorm_backward,
)
from kernels.backward_reduce import REDUCTIONS
from kernels.model import REFERENCE_ARGS, REFERENCE_INPUT_SHAPE

SHAPES = [(4194304, 64, torch.float32), (4194304, 64, torch.bfloat16),
          (65536, 1024, torch.bfloat16), (16384, 4096, torch.bfloat16)]
EPS = 1e-5
# Relative error of each of our gradients against float32 eager allowed before anything is
# timed; the baselines get 5x (eager rounds x + s to bfloat16 before normalising).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def tune(trials: int, table) -> None:
    """Tunes, with `tuner` on one GPU worker into ``table``, the forward and backward kernels
    that the timed problems run."""
    import optuna
    import ray

    from tuner import Driver, PoolOptions, Progress, Settings, WorkerPool, get_kernel

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    problems = [get_kernel(kernel).problem(f"{rows}x{width}", str(dtype).removeprefix("torch."))
                for rows, width, dtype in SHAPES
                for kernel in ("add_layernorm", "add_layernorm_backward")]
    conv_out = "x".join(map(str, (REFERENCE_INPUT_SHAPE[0], 64, 32, 64, 64)))
    problems += [get_kernel(kernel).problem(conv_out, dtype)
                 for kernel in ("add_layernorm_pool_gelu_channels_last",
                                "add_layernorm_pool_gelu_backward_channels_last",
                                "add_layernorm_pool_gelu", "add_layernorm_pool_gelu_backward")
                 for dtype in ("float32", "bfloat16")]
    pool = WorkerPool(PoolOptions(workers=1))
    pool.start()
    Driver(pool, optuna.storages.InMemoryStorage(), Settings(trials=trials), lambda device: table,
           progress=Progress(interval=30)).run(problems)
    pool.shutdown()
    ray.shutdown()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def layer_norm_fwd_bwd(rows: int, width: int, dtype: torch.dtype, copy_gbps: float,
                       grid: bool) -> tuple[dict, list[list]]:
    """Times forward + backward of ours, eager and compiled, and our backward alone."""
    generator = torch.Generator(device="cuda").manual_seed(rows + width)

    def randn(*shape, scale=1.0, shift=0.0):
        values = torch.randn(shape, device="cuda", generator=generator) * scale + shift
        return values.to(dtype).requires_grad_()

    x = randn(rows, width, scale=2.0, shift=0.5)
    sum_weight = randn(scale=0.5, shift=1.0)
    weight = randn(width, scale=0.5, shift=1.0)
    bias = randn(width, scale=0.5)
    dy = torch.randn(rows, width, device="cuda", generator=generator).to(dtype)
    leaves = (x, sum_weight, weight, bias)

    def eager_fn(x, s, w, b):
        return F.layer_norm(x + s, (width,), w, b, EPS)

    def ours_fn(x, s, w, b):
        return fused_add_layernorm(x, s, width, w, b, EPS)

    compiled_fn = torch.compile(eager_fn, dynamic=False)
    # torch.autograd.grad, not .backward(): accumulating into .grad would add a read and a
    # write of x's size to every step.
    steps = {name: (lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, dy))
             for name, fn in (("ours", ours_fn), ("torch eager", eager_fn),
                              ("torch.compile", compiled_fn))}

    # Float32 eager as the reference: a float64 copy of the largest problems would not fit.
    with torch.no_grad():
        leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    with torch.enable_grad():
        want = torch.autograd.grad(eager_fn(*leaves32), leaves32, dy.float())
    errors = {}
    for name, step in steps.items():
        for label, got, expected in zip(("dx", "dsum_weight", "dweight", "dbias"), step(), want):
            if label == "dsum_weight":
                continue  # zero in exact arithmetic: rounding noise on every side
            errors[f"{name} {label}"] = error = relative_error(got, expected)
            allowed = TOLERANCE[dtype] * (1 if name == "ours" else 5)
            assert error <= allowed, (name, label, error)

    floor_bytes = 5 * x.numel() * x.element_size()
    floor_ms = floor_bytes / copy_gbps / 1e6
    result = {"rows": rows, "width": width, "dtype": str(dtype).removeprefix("torch."),
              "floor_ms": floor_ms, "errors_vs_float32_eager": errors, "fwd_bwd_ms": {},
              "fwd_bwd_gpu_ms": {},
              "backward_only_ms": {}}
    for name, step in steps.items():
        result["fwd_bwd_ms"][name] = time_ms(step)
        # The same step replayed from a CUDA graph: GPU time only, where a step through
        # autograd is bound by the host's Python (small problems, wide rows).
        result["fwd_bwd_gpu_ms"][name] = time_calls_ms([step], x.device)

    # The backward alone, both reductions, given the forward's statistics.
    with torch.no_grad():
        shifted = x.float() + sum_weight.float()
        mean = shifted.mean(-1)
        rstd = torch.rsqrt(shifted.var(-1, unbiased=False) + EPS)
        x_plain, w_plain, s_plain = x.detach(), weight.detach(), sum_weight.detach()
        config, source = ADD_LAYERNORM_BACKWARD.select(AddLayerNormBackwardCall(rows, width, dtype))
        result["backward_config"] = {"config": config.key(), "source": source}
        for reduction in REDUCTIONS:
            result["backward_only_ms"][reduction] = time_ms(
                lambda: add_layernorm_backward(dy, x_plain, w_plain, mean, rstd, s_plain,
                                               config=config, reduction=reduction))
        if grid:
            result["backward_grid"] = backward_grid(dy, x_plain, w_plain, mean, rstd, s_plain,
                                                    want[0])

    compiled_ms = result["fwd_bwd_ms"]["torch.compile"]
    shape = f"{rows}x{width} {result['dtype']}"
    rows_out = [[shape, f"fwd+bwd {name}", f"{ms:.3f}", f"{100 * floor_ms / ms:.0f}%",
                 f"{compiled_ms / ms:.2f}x"] for name, ms in result["fwd_bwd_ms"].items()]
    compiled_gpu_ms = result["fwd_bwd_gpu_ms"]["torch.compile"]
    rows_out += [[shape, f"fwd+bwd {name}, GPU time (CUDA graph)", f"{ms:.3f}",
                  f"{100 * floor_ms / ms:.0f}%", f"{compiled_gpu_ms / ms:.2f}x"]
                 for name, ms in result["fwd_bwd_gpu_ms"].items()]
    rows_out += [[shape, f"bwd only, {reduction} ({config.key()}, {source})", f"{ms:.3f}",
                  f"{100 * (3 / 5) * floor_ms / ms:.0f}%", ""]
                 for reduction, ms in result["backward_only_ms"].items()]
    if grid and result["backward_grid"]:
        best_ms, best_key = result["backward_grid"][0]
        rows_out.append([shape, f"bwd only, best of grid ({best_key})", f"{best_ms:.3f}",
                         f"{100 * (3 / 5) * floor_ms / best_ms:.0f}%", ""])
    return result, rows_out


def backward_grid(dy, x, weight, mean, rstd, sum_weight, want_dx) -> list[tuple[float, str]]:
    """(ms, config) of a small grid of backward configs, fastest first (partial sums)."""
    rows, width = x.shape
    block_w = triton.next_power_of_2(width)
    timings = []
    for block_rows, warps, stages in itertools.product([1, 2, 4, 8, 16, 32, 64, 128],
                                                       [2, 4, 8, 16], [1, 2]):
        tile = block_rows * block_w
        if tile > 16384 or tile < 32 * warps or block_rows > rows:
            continue
        config = LaunchConfig(block_rows, block_w, warps, stages)
        try:
            run = lambda: add_layernorm_backward(dy, x, weight, mean, rstd, sum_weight,
                                                 config=config)
            assert relative_error(run().dx, want_dx) <= TOLERANCE[x.dtype]
            timings.append((time_ms(run), config.key()))
        except Exception as error:  # a config that cannot run is skipped, not fatal
            print(f"  {config.key()}: {type(error).__name__}: {str(error)[:120]}")
    return sorted(timings)


def model_training_step(dtype: torch.dtype) -> tuple[dict, list[list]]:
    """Forward + ``.sum().backward()`` of ModelNew (its default channels-last convolution, and
    NCDHW), Model and torch.compile(Model)."""
    torch.manual_seed(0)
    model = Model(**REFERENCE_ARGS).cuda().to(dtype).train()
    new = ModelNew(**REFERENCE_ARGS).cuda().to(dtype).train()
    new.load_state_dict(model.state_dict())
    new_ncdhw = copy.deepcopy(new)
    new_ncdhw.channels_last_conv = False
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, dynamic=False)
    x = torch.randn(REFERENCE_INPUT_SHAPE, device="cuda", dtype=dtype)
    candidates = {"ModelNew": new, "ModelNew, NCDHW conv": new_ncdhw, "Model eager": model,
                  "torch.compile(Model)": compiled}

    def step(module):
        module(x).sum().backward()

    # The gradients agree before anything is timed (conv weight: every gradient path passes
    # through it). Loose bounds: float32 convolutions run on TF32 tensor cores (cuDNN's
    # default) on every side, and bfloat16 rounds differently on each.
    conv_weights = {name: module.conv_transpose.weight for name, module in
                    (("ModelNew", new), ("ModelNew, NCDHW conv", new_ncdhw),
                     ("Model eager", model), ("torch.compile(Model)", compiled_model))}
    for name, module in candidates.items():
        module.zero_grad(set_to_none=True)
        step(module)
    errors = {name: relative_error(conv_weights[name].grad, conv_weights["Model eager"].grad)
              for name in conv_weights if name != "Model eager"}
    for name, error in errors.items():
        assert error <= (1e-2 if dtype == torch.float32 else 1e-1), (name, error)
    timings = {name: time_ms(lambda module=module: step(module))
               for name, module in candidates.items()}
    compiled_ms = timings["torch.compile(Model)"]
    label = str(dtype).removeprefix("torch.")
    rows = [[f"model batch {REFERENCE_INPUT_SHAPE[0]} {label}", f"train step {name}", f"{ms:.3f}",
             "", f"{compiled_ms / ms:.2f}x"] for name, ms in timings.items()]
    return {"dtype": label, "train_step_ms": timings,
            "conv_weight_grad_errors_vs_eager": errors}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grid", action="store_true",
                        help="also time a small grid of backward configs per shape")
    parser.add_argument("--trials", type=int, default=0,
                        help="tune every kernel involved first, this many trials a problem "
                             "(default 0: no tuning)")
    args = parser.parse_args()
    if args.trials:
        table = out_dir() / "training_table.json"
        tune(args.trials, table)
        os.environ["TUNER_TABLE"] = str(table)
        reload_tables()
    info = versions()
    copy_gbps = copy_bandwidth_gbps()
    print(f"{info}  copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    results = {"versions": info, "copy_gbps": copy_gbps, "layer_norm": [], "model": []}
    table = []
    for rows, width, dtype in SHAPES:
        result, rows_out = layer_norm_fwd_bwd(rows, width, dtype, copy_gbps, args.grid)
        results["layer_norm"].append(result)
        table += rows_out
        print("\n".join(" | ".join(row) for row in rows_out), flush=True)
        torch.cuda.empty_cache()
    for dtype in (torch.float32, torch.bfloat16):
        result, rows_out = model_training_step(dtype)
        results["model"].append(result)
        table += rows_out
        print("\n".join(" | ".join(row) for row in rows_out), flush=True)
        torch.cuda.empty_cache()
    write_json("bench_training.json", results)
    print(f"\n{info}; copy {copy_gbps:.0f} GB/s; floor = 5 tensors of x's size (fwd+bwd), "
          "3 (bwd only)")
    print_table(["problem", "what", "ms", "% of floor", "vs torch.compile"], table)


if __name__ == "__main__":
    main()
