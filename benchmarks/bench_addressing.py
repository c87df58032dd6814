"""How the add+LayerNorm kernel addresses rows: the same launch config (the default, and the
``--configs`` given) timed as before (64-bit offsets, no alignment known for widths not
divisible by 16), with 32-bit offsets, with the width's power-of-two factor known, and with
both (the current kernel), beside ``torch.compile`` of ``F.layer_norm(x + s)``, on the
held-out shapes (benchmarks/heldout.py) and the narrow-row shapes where torch.compile led.

    python benchmarks/bench_addressing.py [--shapes 5873773x26:float16,...] [--configs KEY,...]

Results go to $OUT/bench_addressing.json; the table is printed last.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import print_table, time_ms, versions, write_json
from heldout import heldout_shapes

import kernels.add_layernorm as add_layernorm
from kernels import LaunchConfig, fused_add_layernorm
from kernels.add_layernorm import heuristic_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Narrow rows of millions where torch.compile beat every config (HELDOUT_SEED=20261128/27).
NARROW = "5873773x26:float16,12540784x36:bfloat16,2158748x56:bfloat16,27219231x21:bfloat16"


def parse_shapes(text: str) -> list[tuple[int, int, torch.dtype]]:
    shapes = []
    for item in text.split(","):
        dims, dtype = item.split(":")
        rows, width = map(int, dims.split("x"))
        shapes.append((rows, width, DTYPES[dtype]))
    return shapes


# (name, force 64-bit offsets, hide the width's power-of-two factor)
VARIANTS = (("64-bit", True, True), ("32-bit", False, True), ("64-bit + multiple", True, False),
            ("32-bit + multiple", False, False))


def time_variant(x, s, weight, bias, config: LaunchConfig, force_64: bool,
                 hide_multiple: bool) -> float:
    originals = add_layernorm.needs_64bit_offsets, add_layernorm.width_multiple
    if force_64:
        add_layernorm.needs_64bit_offsets = lambda *args: True
    if hide_multiple:
        add_layernorm.width_multiple = lambda width: 16 if width % 16 == 0 else 1
    try:
        out = torch.empty_like(x)
        return time_ms(lambda: fused_add_layernorm(x, s, x.shape[-1], weight, bias,
                                                   config=config, out=out))
    finally:
        add_layernorm.needs_64bit_offsets, add_layernorm.width_multiple = originals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help="ROWSxWIDTH:DTYPE,... (default: held-out "
                                                        "set and the narrow rows)")
    parser.add_argument("--configs", default="", help="extra config keys to time on every shape")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes) if args.shapes else (
        [(rows, width, DTYPES[dtype]) for rows, width, dtype in heldout_shapes()] + parse_shapes(NARROW))
    extra = [LaunchConfig.from_key(key) for key in args.configs.split(",") if key]
    compiled = torch.compile(lambda x, s, w, b: F.layer_norm(x + s, (x.shape[-1],), w, b),
                             dynamic=False)
    records, table = [], []
    for rows, width, dtype in shapes:
        generator = torch.Generator(device="cuda").manual_seed(rows + width)
        x, weight, bias = (torch.randn(shape, device="cuda", generator=generator).to(dtype)
                           for shape in ((rows, width), (width,), (width,)))
        s = torch.tensor([0.5], device="cuda", dtype=dtype)
        torch._dynamo.reset()
        compile_ms = time_ms(lambda: compiled(x, s, weight, bias))
        label = f"{rows}x{width} {str(dtype).removeprefix('torch.')}"
        for config in [heuristic_config(rows, width, dtype)] + extra:
            ms = {name: time_variant(x, s, weight, bias, config, force_64, hide)
                  for name, force_64, hide in VARIANTS}
            records.append({"shape": label, "config": config.key(), "ms": ms,
                            "compile_ms": compile_ms})
            table.append([label, config.key(), *(f"{value:.4f}" for value in ms.values()),
                          f"{compile_ms:.4f}", f"{ms[VARIANTS[-1][0]] / compile_ms:.2f}"])
            print(table[-1], flush=True)
    write_json("bench_addressing.json", {"versions": versions(), "records": records})
    print_table(["shape", "config", *(f"{name} ms" for name, _, _ in VARIANTS), "compile ms",
                 "now/compile"], table)


if __name__ == "__main__":
    main()
