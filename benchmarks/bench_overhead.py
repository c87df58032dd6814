"""Per-call host overhead of the runtime wrapper (issue 11, goal 5).

On a GPU host: host microseconds per call, measured as the time to enqueue batches of calls
(the GPU drained between batches, so a full launch queue never blocks the host), of
``fused_add_layernorm`` on a small tensor, of its launcher alone (``ADD_LAYERNORM.launch``:
the compiled kernel launched again without Triton's binding, ``kernels/launch.py``), of the
same kernel through Triton's own ``kernel[grid](...)`` (what any Triton kernel pays), and of
``F.layer_norm`` for scale. Without a GPU (``TRITON_INTERPRET=1``, CPU
tensors) the launch is stubbed out and only validation plus the cached lookup is timed.

    python benchmarks/bench_overhead.py [--profile]    # --profile: where the wrapper's time goes
Results: $OUT/bench_overhead.json.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors are accepted; nothing launched

import torch.nn.functional as F  # noqa: E402

from common import print_table, versions, write_json  # noqa: E402
import kernels.add_layernorm as add_layernorm  # noqa: E402

BATCH = 200      # launches enqueued between drains: well under the driver's queue depth
BATCHES = 100


def per_call_us(fn, synchronize) -> float:
    """Median over batches of the host's microseconds per enqueued call."""
    for _ in range(BATCH):
        fn()
    synchronize()
    samples = []
    for _ in range(BATCHES):
        start = time.perf_counter()
        for _ in range(BATCH):
            fn()
        samples.append((time.perf_counter() - start) / BATCH * 1e6)
        synchronize()
    samples.sort()
    return samples[len(samples) // 2]


def raw_launch(x, out, weight, bias, sum_weight, rows, width, config):
    """The kernel, grid, arguments and constexprs of ADD_LAYERNORM.launch, for Triton's own
    launch path (``kernel[grid](*args, **meta)``: binding and specialising every call)."""
    captured = {}

    def capture(kernel, grid, args, meta, key):
        captured.update(kernel=kernel, grid=grid, args=args, meta=meta())

    launch = add_layernorm.launch
    add_layernorm.launch = capture
    try:
        add_layernorm.ADD_LAYERNORM.launch(x, out, weight, bias, sum_weight, 0.0, rows, width,
                                           1e-5, config)
    finally:
        add_layernorm.launch = launch
    return captured["kernel"], captured["grid"], captured["args"], captured["meta"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="print the wrapper's profile")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:
        add_layernorm.ADD_LAYERNORM.launch = lambda *args, **kwargs: None  # the wrapper only
    rows, width = 64, 64
    x = torch.randn(rows, width, device=device)
    weight, bias = torch.randn(width, device=device), torch.randn(width, device=device)
    sum_weight = torch.tensor(1.0, device=device)
    out, scratch = torch.empty_like(x), torch.zeros_like(x)
    config, source = add_layernorm.select_config(rows, width, x.dtype)
    calls = {
        "fused_add_layernorm": lambda: add_layernorm.fused_add_layernorm(
            x, sum_weight, width, weight, bias),
        "fused_add_layernorm(out=...)": lambda: add_layernorm.fused_add_layernorm(
            x, sum_weight, width, weight, bias, out=out),
        "F.layer_norm(x + s)": lambda: F.layer_norm(x + sum_weight, (width,), weight, bias),
        "one PyTorch kernel, scratch.add_(1) (a launch's floor)": lambda: scratch.add_(1),
    }
    if cuda:
        calls["the launcher alone (ADD_LAYERNORM.launch)"] = \
            lambda: add_layernorm.ADD_LAYERNORM.launch(x, out, weight, bias, sum_weight, 0.0,
                                                       rows, width, 1e-5, config)
        kernel, grid, launch_args, meta = raw_launch(x, out, weight, bias, sum_weight, rows, width, config)
        calls["Triton's own launch, kernel[grid](...), same config"] = \
            lambda: kernel[grid](*launch_args, **meta)
    results = {name: per_call_us(fn, synchronize) for name, fn in calls.items()}
    if cuda:
        results["wrapper (out=...) over its launcher"] = (
            results["fused_add_layernorm(out=...)"]
            - results["the launcher alone (ADD_LAYERNORM.launch)"])
    write_json("bench_overhead.json", {"versions": versions(), "config": config.key(),
                                       "source": source, "us_per_call": results})
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(per_call_us, calls["fused_add_layernorm(out=...)"], synchronize)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    print(f"{versions()['device']}, torch {torch.__version__}; config {config.key()} ({source})")
    print_table(["call", "host us per call"], [[name, f"{us:.2f}"] for name, us in results.items()])


if __name__ == "__main__":
    main()
