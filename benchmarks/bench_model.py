"""The reference model at batch 32 (float32, bfloat16): Model eager, torch.compile(Model), ModelNew
with the add+LN kernel, with cuDNN's channels-last convolution and the fused tail, and as one
Triton kernel (its default; all kernels tuned first by `tuner`); the tail alone and the whole
model; bytes moved by the tail and % of copy bandwidth; convolution variants.

    python benchmarks/bench_model.py [--trials 32]     (results in $OUT/bench_model.json)
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from common import copy_bandwidth_gbps, out_dir, print_table, time_ms, versions, write_json
from kernels import Model, ModelNew, reload_tables
from kernels.model import REFERENCE_ARGS, REFERENCE_INPUT_SHAPE


class ModelNewAddLayerNorm(ModelNew):
    """ModelNew forced onto the add+LayerNorm kernel with PyTorch pooling and GELU."""

    uses_fused_tail = False


class ModelNewFusedTail(ModelNew):
    """ModelNew forced onto cuDNN's channels-last convolution and the fused tail kernel."""

    conv_in_triton = False


def tune(trials: int, table) -> None:
    """Tunes both kernels at the model's shapes with `tuner` (one GPU worker) into ``table``."""
    import optuna
    import ray

    from tuner import Driver, PoolOptions, Progress, Settings, WorkerPool, get_kernel

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    conv_out = "x".join(map(str, (REFERENCE_INPUT_SHAPE[0], 64, 32, 64, 64)))
    conv_problem = "x".join(map(str, REFERENCE_INPUT_SHAPE + (64,)))  # conv input, C_out
    problems = [get_kernel(kernel).problem(conv_out, dtype)
                for kernel in ("add_layernorm", "add_layernorm_pool_gelu",
                               "add_layernorm_pool_gelu_channels_last")
                for dtype in ("float32", "bfloat16")]
    problems += [get_kernel("conv_transpose_tail").problem(conv_problem, dtype)
                 for dtype in ("float32", "bfloat16")]
    pool = WorkerPool(PoolOptions(workers=1))
    pool.start()
    Driver(pool, optuna.storages.InMemoryStorage(), Settings(trials=trials), lambda device: table,
           progress=Progress(interval=30)).run(problems)
    pool.shutdown()
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=32)
    args = parser.parse_args()
    table = out_dir() / "model_table.json"
    tune(args.trials, table)
    os.environ["TUNER_TABLE"] = str(table)
    reload_tables()

    copy_gbps = copy_bandwidth_gbps()
    results = {"versions": versions(), "copy_gbps": copy_gbps, "dtypes": {}}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Model(**REFERENCE_ARGS).cuda().to(dtype).eval()
        new, add_ln, fused_tail = (cls(**REFERENCE_ARGS).cuda().to(dtype).eval()
                                   for cls in (ModelNew, ModelNewAddLayerNorm, ModelNewFusedTail))
        for candidate in (new, add_ln, fused_tail):
            candidate.load_state_dict(model.state_dict())
        x = torch.randn(REFERENCE_INPUT_SHAPE, device="cuda", dtype=dtype)
        with torch.no_grad():
            conv_out = model.conv_transpose(x)
            conv_out_cl = conv_out.contiguous(memory_format=torch.channels_last_3d)
            conv_cl = copy.deepcopy(model.conv_transpose).to(memory_format=torch.channels_last_3d)
            x_cl = x.contiguous(memory_format=torch.channels_last_3d)
            compiled = torch.compile(copy.deepcopy(model))
            compiled_tail = torch.compile(copy.deepcopy(model).tail)
            compiled_conv = torch.compile(copy.deepcopy(model.conv_transpose))
            expected = model(x).float()
            for name, candidate in (("ModelNew", new), ("ModelNew add+LN", add_ln),
                                    ("ModelNew fused tail", fused_tail), ("compile", compiled)):
                error = ((candidate(x).float() - expected).norm() / expected.norm()).item()
                # float32: the convolutions run on TF32 tensor cores (cuDNN's default, and ours).
                assert error < (5e-3 if dtype == torch.float32 else 2e-2), (name, error)
            tail_bytes = conv_out.numel() * conv_out.element_size() * 9 // 8  # read x, write x/8
            timings = {
                "tail eager": time_ms(lambda: model.tail(conv_out)),
                "tail torch.compile": time_ms(lambda: compiled_tail(conv_out)),
                "tail add+LN kernel + torch pool/GELU": time_ms(lambda: add_ln.tail(conv_out)),
                "tail fused kernel": time_ms(lambda: new.tail(conv_out)),
                "tail fused kernel, channels-last input": time_ms(lambda: new.tail(conv_out_cl)),
                "conv eager": time_ms(lambda: model.conv_transpose(x)),
                "conv torch.compile": time_ms(lambda: compiled_conv(x)),
                "conv channels_last_3d": time_ms(lambda: conv_cl(x_cl)),
                "Model eager": time_ms(lambda: model(x)),
                "torch.compile(Model)": time_ms(lambda: compiled(x)),
                "ModelNew add+LN": time_ms(lambda: add_ln(x)),
                "ModelNew cuDNN conv + fused tail": time_ms(lambda: fused_tail(x)),
                "ModelNew (conv + tail in one Triton kernel)": time_ms(lambda: new(x)),
            }
        name = str(dtype).removeprefix("torch.")
        results["dtypes"][name] = {"timings_ms": timings, "tail_bytes": tail_bytes,
                                   "fused_tail_gbps": tail_bytes / timings["tail fused kernel"] / 1e6}
        for key, ms in timings.items():
            note = ""
            if key.startswith("tail"):
                gbps = tail_bytes / ms / 1e6
                note = f"{gbps:.0f} GB/s ({100 * gbps / copy_gbps:.0f}% of copy)"
            elif key.startswith("ModelNew"):
                note = (f"{timings['torch.compile(Model)'] / ms:.2f}x compile, "
                        f"{timings['Model eager'] / ms:.2f}x eager")
            rows.append([name, key, f"{ms:.3f}", note])
    write_json("bench_model.json", results)
    print(f"\n{results['versions']}; copy {copy_gbps:.0f} GB/s; tail bytes = input + output")
    print_table(["dtype", "what", "ms", "notes"], rows)


if __name__ == "__main__":
    main()
