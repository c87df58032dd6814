"""The reference model's ConvTranspose3d at batch 32 under layouts and cuDNN settings: how fast
can the convolution in front of the fused tail be without writing a kernel for it?

    python benchmarks/bench_conv.py     (results in $OUT/bench_conv.json)
"""

from __future__ import annotations

import torch

from common import print_table, time_ms, versions, write_json
from kernels.model import REFERENCE_ARGS, REFERENCE_INPUT_SHAPE, Model


def main() -> None:
    rows, results = [], {"versions": versions(), "ms": {}}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        conv = Model(**REFERENCE_ARGS).cuda().to(dtype).eval().conv_transpose
        x = torch.randn(REFERENCE_INPUT_SHAPE, device="cuda", dtype=dtype)
        conv_cl = Model(**REFERENCE_ARGS).cuda().to(dtype).eval().conv_transpose.to(
            memory_format=torch.channels_last_3d)
        conv_cl.load_state_dict(conv.state_dict())
        x_cl = x.to(memory_format=torch.channels_last_3d)
        variants = {"NCDHW": lambda: conv(x),
                    "channels_last_3d": lambda: conv_cl(x_cl),
                    "channels_last_3d, then .contiguous()": lambda: conv_cl(x_cl).contiguous()}
        timings = results["ms"].setdefault(str(dtype), {})
        with torch.no_grad():
            for benchmark in (False, True):
                torch.backends.cudnn.benchmark = benchmark
                for name, fn in variants.items():
                    timings[name + (" + cudnn.benchmark" if benchmark else "")] = time_ms(fn)
        torch.backends.cudnn.benchmark = False
        for name, ms in results["ms"][str(dtype)].items():
            rows.append([str(dtype).removeprefix("torch."), name, f"{ms:.3f}"])
    write_json("bench_conv.json", results)
    print_table(["dtype", "convolution", "ms"], rows)


if __name__ == "__main__":
    main()
