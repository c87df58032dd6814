"""The whole-model kernel (kernels/conv_transpose_tail.py) at the reference shape, batch 32: a
grid of launch configs, each checked against the float64 reference and timed; then ModelNew as
one kernel next to the path it replaces (cuDNN's convolution in channels_last_3d plus the fused
tail kernel), with TF32 on and off in float32.

    python benchmarks/bench_conv_tail.py [--block-rows 32,64] [--block-w 32,64,128]
        [--warps 4,8] [--evict ,evict_last]          (results in $OUT/bench_conv_tail.json)
"""

from __future__ import annotations

import argparse
import itertools

import torch

from common import print_table, time_ms, versions, write_json
from kernels import LaunchConfig, Model, ModelNew
from kernels.model import REFERENCE_ARGS, REFERENCE_INPUT_SHAPE

PROBLEM = "x".join(map(str, REFERENCE_INPUT_SHAPE + (REFERENCE_ARGS["out_channels"],)))


def ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def models(dtype: str, rows: list) -> dict:
    """ModelNew as one kernel (tables, else heuristic) against the path it replaces, cuDNN's
    channels-last convolution and the fused tail; float32 with TF32 allowed (PyTorch's
    default for convolutions) and not. The error is relative to Model in float64."""
    torch.manual_seed(0)
    model = Model(**REFERENCE_ARGS).cuda().eval()
    x = torch.randn(REFERENCE_INPUT_SHAPE, device="cuda")
    with torch.no_grad():
        expected = model.double()(x.double())
        model, x = model.to(getattr(torch, dtype)), x.to(getattr(torch, dtype))
    timings = {}
    for tf32 in ((True, False) if dtype == "float32" else (True,)):
        torch.backends.cudnn.allow_tf32 = tf32
        for conv_in_triton in (True, False):
            new = ModelNew(**REFERENCE_ARGS).cuda().to(getattr(torch, dtype)).eval()
            new.load_state_dict(model.state_dict())
            new.conv_in_triton = conv_in_triton
            name = ("ModelNew, one Triton kernel" if conv_in_triton
                    else "ModelNew, cuDNN conv (channels_last_3d) + fused tail")
            name += "" if tf32 else ", TF32 off"
            with torch.no_grad():
                error = ((new(x).double() - expected).norm() / expected.norm()).item()
                timings[name] = {"ms": time_ms(lambda: new(x)), "error": error}
            rows.append([dtype, name, f"{timings[name]['ms']:.3f}", f"rel. error {error:.1e}"])
    torch.backends.cudnn.allow_tf32 = True
    return timings


def main() -> None:
    from tuner import ProblemBench, copy_bandwidth_gbps, get_kernel

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--block-rows", type=ints, default=[32, 64])
    parser.add_argument("--block-w", type=ints, default=[32, 64, 128])
    parser.add_argument("--warps", type=ints, default=[4, 8])
    parser.add_argument("--evict", type=lambda text: text.split(","), default=[""])
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    copy = copy_bandwidth_gbps(device)
    spec = get_kernel("conv_transpose_tail")
    results, rows = {"versions": versions(), "problem": PROBLEM, "dtypes": {}}, []
    for dtype in ("float32", "bfloat16"):
        bench = ProblemBench(spec, spec.problem(PROBLEM, dtype), device, seed=0)
        configs = {}
        for block_rows, block_w, warps, evict in itertools.product(
                args.block_rows, args.block_w, args.warps, args.evict):
            config = LaunchConfig(block_rows, block_w, warps, 1, evict)
            m = bench.measure(config, copy)
            configs[config.key()] = {"ms": m.ms, "compile_s": m.compile_s, "error": m.error}
            rows.append([dtype, config.key(), "-" if m.ms is None else f"{m.ms:.3f}",
                         (m.error or "")[:60]])
        results["dtypes"][dtype] = {"configs": configs, "models": models(dtype, rows)}
    write_json("bench_conv_tail.json", results)
    print(results["versions"])
    print_table(["dtype", "config or model", "ms", "error"], rows)


if __name__ == "__main__":
    main()
