"""The held-out shapes: drawn by a seeded generator, never used to fit a heuristic or a prior.

Every claim of quality on unseen work (search within 2% of the exhaustive best, the default
config against the tuned best and torch.compile) is measured on these shapes. Widths are
log-uniform over 16-65536 and rounded to any integer (so odd and non-power-of-two widths
dominate), tensor sizes log-uniform over 1 MB-2 GB, and the dtypes cycle through all three.

    python benchmarks/heldout.py            # prints the set
    HELDOUT_SEED=20261127 python benchmarks/bench_default.py ...   # another set, same generator

The first set (seed 20261126) was looked at while the default config's failures on it were
diagnosed; a claim about a change made after that is checked on a later seed's set.
"""

from __future__ import annotations

import math
import os
import random

SEED = int(os.environ.get("HELDOUT_SEED", "20261126"))
COUNT = 10
DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MIN_WIDTH, MAX_WIDTH = 16, 65536
MIN_BYTES, MAX_BYTES = 1 << 20, 2 << 30


def heldout_shapes(seed: int = SEED, count: int = COUNT) -> list[tuple[int, int, str]]:
    """``count`` (rows, width, dtype) triples from a seeded generator."""
    rng = random.Random(seed)
    shapes = []
    for index in range(count):
        dtype = DTYPES[index % len(DTYPES)]
        width = round(math.exp(rng.uniform(math.log(MIN_WIDTH), math.log(MAX_WIDTH))))
        n_bytes = math.exp(rng.uniform(math.log(MIN_BYTES), math.log(MAX_BYTES)))
        rows = max(1, round(n_bytes / (width * ITEMSIZE[dtype])))
        shapes.append((rows, width, dtype))
    return shapes


if __name__ == "__main__":
    for rows, width, dtype in heldout_shapes():
        size = rows * width * ITEMSIZE[dtype]
        print(f"{rows}x{width} {dtype}  ({size / 2**20:.1f} MiB)")
