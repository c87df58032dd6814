"""On a GPU: the cached launch path (``kernels/launch.py``) gives the results Triton's own
launch gives, and is taken.

For each dtype, shapes with aligned, odd and chunked rows, weight/bias given or not and
sum_weight as tensor or number: a first call compiles through Triton, then repeated calls with
fresh random data into a NaN-poisoned ``out`` must match a float64 reference without entering
``JITFunction.run`` again. Then the cases the fast path must hand back to Triton or honour: an
input not 16-byte aligned, a non-default stream, the autograd path (row statistics stored), and
a config change for the same shape. Needs no tables (it hides them).

    python benchmarks/check_launch.py      # exits 1 on any failure; $OUT/check_launch.json
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ["TUNER_TABLE"] = os.path.join(tempfile.mkdtemp(), "none.json")
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from common import versions, write_json  # noqa: E402
from kernels import LaunchConfig, fused_add_layernorm  # noqa: E402
from kernels import launch as launch_module  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [(64, 64), (1000, 1), (37, 4097), (300, 770), (3, 70000), (2, 16, 96)]
REPEATS = 3

jit_runs = 0
_run = JITFunction.run


def counting_run(self, *args, **kwargs):
    global jit_runs
    jit_runs += 1
    return _run(self, *args, **kwargs)


JITFunction.run = counting_run


def inputs(shape, dtype, seed, affine=True):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, device="cuda", generator=generator) * 2.5 + 1.3).to(dtype)
    width = shape[-1]
    weight = (torch.randn(width, device="cuda", generator=generator) * 0.5 + 1).to(dtype)
    bias = (torch.randn(width, device="cuda", generator=generator) * 0.5).to(dtype)
    return x, (weight, bias) if affine else (None, None)


def error(out, x, sum_weight, weight, bias):
    shift = sum_weight.double() if isinstance(sum_weight, torch.Tensor) else sum_weight
    expected = F.layer_norm(x.double() + shift, x.shape[-1:],
                            None if weight is None else weight.double(),
                            None if bias is None else bias.double())
    return ((out.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def main() -> int:
    failures, checked = [], 0

    def expect(ok: bool, what: str) -> None:
        nonlocal checked
        checked += 1
        if not ok:
            failures.append(what)
            print("FAIL", what, flush=True)

    seed = 0
    for dtype in TOLERANCE:
        for shape in SHAPES:
            for affine in (True, False):
                for tensor_sum in (True, False):
                    name = f"{dtype} {shape} affine={affine} tensor_sum={tensor_sum}"
                    for repeat in range(REPEATS + 1):
                        seed += 1
                        x, (weight, bias) = inputs(shape, dtype, seed, affine)
                        sum_weight = torch.tensor(0.75, device="cuda", dtype=dtype) \
                            if tensor_sum else 0.75
                        out = torch.full_like(x, float("nan"))
                        before = jit_runs
                        fused_add_layernorm(x, sum_weight, shape[-1], weight, bias, out=out)
                        torch.cuda.synchronize()
                        err = error(out, x, sum_weight, weight, bias)
                        expect(err < TOLERANCE[dtype], f"{name} call {repeat}: error {err:.2e}")
                        if repeat:
                            expect(jit_runs == before, f"{name} call {repeat}: went through Triton")

    # Unaligned x (a view one element into a buffer) for a shape already launched aligned:
    # Triton's own path, still right.
    x, (weight, bias) = inputs((300, 770), torch.float16, 1000)
    buffer = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)
    unaligned = buffer[1:].view_as(x).copy_(x)
    before = jit_runs
    out = fused_add_layernorm(unaligned, 0.5, 770, weight, bias)
    torch.cuda.synchronize()
    expect(error(out, x, 0.5, weight, bias) < TOLERANCE[torch.float16], "unaligned x: error")
    expect(jit_runs > before, "unaligned x: not handed to Triton")

    # A non-default stream: the launch goes to the current stream.
    stream = torch.cuda.Stream()
    x, (weight, bias) = inputs((4096, 256), torch.float32, 1001)
    fused_add_layernorm(x, 0.5, 256, weight, bias)  # compiles, on the default stream
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        outs = [fused_add_layernorm(x, 0.5, 256, weight, bias) for _ in range(3)]
    stream.synchronize()
    expect(all(error(out, x, 0.5, weight, bias) < 1e-5 for out in outs), "side stream: error")

    # Autograd: the forward stores row statistics (another specialisation), gradients right.
    x, (weight, bias) = inputs((512, 384), torch.float32, 1002)
    for _ in range(2):
        leaf = x.clone().requires_grad_(True)
        fused_add_layernorm(leaf, 0.5, 384, weight, bias).square().sum().backward()
        reference = x.double().requires_grad_(True)
        F.layer_norm(reference + 0.5, (384,), weight.double(), bias.double()).square().sum() \
            .backward()
        expect(((leaf.grad.double() - reference.grad).norm() / reference.grad.norm()).item()
               < 1e-4, "autograd: dx")

    # Another config for the same shape: its own kernel, not the cached one.
    x, (weight, bias) = inputs((1024, 128), torch.bfloat16, 1003)
    for config in (LaunchConfig(8, 128, 4, 1, ""), LaunchConfig(1, 32, 1, 1, "evict_first"),
                   LaunchConfig(8, 128, 4, 1, "")):
        out = fused_add_layernorm(x, 0.5, 128, weight, bias, config=config)
        torch.cuda.synchronize()
        expect(error(out, x, 0.5, weight, bias) < TOLERANCE[torch.bfloat16],
               f"config {config.key()}: error")

    cached = sum(value is not None for value in launch_module._launches.values())
    expect(cached > 0, "no launch was cached")
    write_json("check_launch.json", {"versions": versions(), "checked": checked,
                                     "failures": failures, "cached_launches": cached})
    print(f"{versions()['device']}: {checked} checks, {len(failures)} failures, "
          f"{cached} cached launches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
