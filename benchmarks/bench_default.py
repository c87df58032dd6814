"""The default config on a GPU with no table (leave-one-device-out): for every held-out shape
(benchmarks/heldout.py) the add+LayerNorm default against torch eager, torch.compile, the
config TUNER_AUTOTUNE picks, and (with ``--exhaustive FILE``) the exhaustive best re-timed in
this process; then the fused tail (both layouts; also TUNER_AUTOTUNE's pick) and the
whole-model kernel at the reference shapes, default against torch.compile.

    python benchmarks/bench_default.py [--exhaustive best.json] [--no-compile] [--no-autotune]

``--exhaustive`` reads {"shapes": {"ROWSxWIDTH dtype": {"best": [ms, config_key], ...}}}
(bench_search.py --part exhaustive writes it). Every table is hidden: TUNER_TABLE names an
empty file, the user table and the shipped tables point into a temporary folder. Results go
to $OUT/bench_default.json; the summary table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

# Hide every table before kernels is imported: the default is what runs.
_HIDDEN = Path(tempfile.mkdtemp(prefix="bench-default-"))
(_HIDDEN / "empty.json").write_text('{"schema_version": 1, "entries": []}\n')
os.environ["TUNER_TABLE"] = str(_HIDDEN / "empty.json")
os.environ["XDG_DATA_HOME"] = str(_HIDDEN / "data")
for _name in ("TUNER_AUTOTUNE", "TUNER_MISS_LOG", "TUNER_DEVICE_NAME", "TRITON_INTERPRET"):
    os.environ.pop(_name, None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# common puts this checkout first on sys.path, so kernels is imported from here.
from common import print_table, time_ms, versions, write_json  # noqa: E402
from heldout import heldout_shapes  # noqa: E402

import kernels.table  # noqa: E402
from kernels import LaunchConfig, Model, fused_add_layernorm, reload_tables, select_config  # noqa: E402
from kernels import add_layernorm_pool_gelu as tail  # noqa: E402
from kernels import autotune  # noqa: E402
from kernels import conv_transpose_tail as conv_tail  # noqa: E402
from kernels.defaults import device_properties  # noqa: E402
from kernels.model import REFERENCE_ARGS, REFERENCE_INPUT_SHAPE  # noqa: E402

kernels.table.SHIPPED_TABLES_DIR = _HIDDEN / "shipped"
reload_tables()
# Each shape recompiles the same Python function: without room for all of them, Dynamo would
# silently run the later shapes eagerly (the limit's name differs across PyTorch releases).
for _limit in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 256)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected).norm() / expected.norm()).item()


def checked_ms(fn, expected: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """Median ms of ``fn`` after checking its output against the float64 reference."""
    error = relative_error(fn(), expected)
    if not error < TOLERANCE[dtype] * 5:  # torch's own kernels round differently
        raise AssertionError(f"{what}: relative error {error:.2e}")
    return time_ms(fn)


def attempt(row: dict, key: str, measure) -> None:
    """``row[key] = measure()``; a failure is recorded as ``row[key + "_error"]`` instead, so
    that one bad comparison does not lose the rest of the run."""
    try:
        row[key] = measure()
    except Exception as error:
        row[key + "_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        print(f"  {key}: {row[key + '_error']}", flush=True)


def bench_layernorm(exhaustive: dict, compile_: bool, tune: bool) -> list[dict]:
    results = []
    for rows, width, dtype_name in heldout_shapes():
        dtype = DTYPES[dtype_name]
        label = f"{rows}x{width} {dtype_name}"
        generator = torch.Generator(device="cuda").manual_seed(rows ^ width)
        x = (torch.randn(rows, width, device="cuda", generator=generator) * 2 + 0.5).to(dtype)
        weight = (torch.randn(width, device="cuda", generator=generator) * 0.5 + 1).to(dtype)
        bias = (torch.randn(width, device="cuda", generator=generator) * 0.5).to(dtype)
        shift = torch.tensor(0.75, device="cuda", dtype=dtype)
        expected = F.layer_norm(x.double() + shift.double(), (width,), weight.double(),
                                bias.double())
        config, source = select_config(rows, width, dtype)
        assert source == "heuristic", f"{label}: a table leaked in ({source})"

        def run(config: LaunchConfig):
            return lambda: fused_add_layernorm(x, shift, width, weight, bias, config=config)

        def eager():
            return F.layer_norm(x + shift, (width,), weight, bias)

        row = {"shape": label, "default_config": config.key()}
        attempt(row, "default_ms", lambda: checked_ms(run(config), expected, dtype,
                                                      f"{label} default"))
        attempt(row, "eager_ms", lambda: checked_ms(eager, expected, dtype, f"{label} eager"))
        if compile_:
            compiled = torch.compile(eager, dynamic=False)
            attempt(row, "compile_ms",
                    lambda: checked_ms(compiled, expected, dtype, f"{label} torch.compile"))
        if tune:
            os.environ["TUNER_AUTOTUNE"] = "1"
            started = time.perf_counter()
            fused_add_layernorm(x, shift, width, weight, bias)  # tunes and saves
            row["autotune_s"] = time.perf_counter() - started
            os.environ.pop("TUNER_AUTOTUNE")
            tuned, _ = select_config(rows, width, dtype)
            row["autotune_config"] = tuned.key()
            attempt(row, "autotune_ms",
                    lambda: checked_ms(run(tuned), expected, dtype, f"{label} autotuned"))
        best = exhaustive.get(label, {}).get("best")
        if best:
            row["best_config"] = best[1]
            row["best_ms_recorded"] = best[0]
            attempt(row, "best_ms", lambda: checked_ms(run(LaunchConfig.from_key(best[1])), expected,
                                                       dtype, f"{label} exhaustive best"))
        results.append(row)
        print(f"{label}: default {row['default_config']} {milliseconds(row, 'default_ms')}, "
              f"compile {milliseconds(row, 'compile_ms')}, best {milliseconds(row, 'best_ms')}",
              flush=True)
        del x, expected
        torch.cuda.empty_cache()
    return results


def bench_tail(compile_: bool, tune: bool) -> list[dict]:
    """The fused tail on the reference conv output, both layouts, and the whole-model kernel."""
    n, c_in, d, h, w = REFERENCE_INPUT_SHAPE
    c_out = REFERENCE_ARGS["out_channels"]
    results = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = DTYPES[dtype_name]
        generator = torch.Generator(device="cuda").manual_seed(7)
        conv_out = torch.randn((n, c_out, 2 * d, 2 * h, 2 * w), device="cuda", generator=generator,
                               dtype=dtype) + 0.3
        ln_weight = (torch.randn(2 * w, device="cuda", generator=generator) * 0.5 + 1).to(dtype)
        ln_bias = (torch.randn(2 * w, device="cuda", generator=generator) * 0.5).to(dtype)
        shift = torch.tensor(1.0, device="cuda", dtype=dtype)

        def torch_tail(x, shift=shift, weight=ln_weight, bias=ln_bias):
            return F.gelu(F.avg_pool3d(F.layer_norm(x + shift, (2 * w,), weight, bias), 2))

        compiled_tail = torch.compile(torch_tail, dynamic=False) if compile_ else None
        for layout_name, layout in (("contiguous", torch.contiguous_format),
                                    ("channels_last", torch.channels_last_3d)):
            x = conv_out.contiguous(memory_format=layout)
            expected = torch_tail(x.double(), shift.double(), ln_weight.double(), ln_bias.double())
            descriptor = tail.ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST \
                if layout_name == "channels_last" else tail.ADD_LAYERNORM_POOL_GELU
            call = tail.PoolGeluCall(tuple(x.shape), dtype)
            config, source = descriptor.select(call)
            assert source == "heuristic", source
            row = {"kernel": f"add_layernorm_pool_gelu {layout_name}", "dtype": dtype_name,
                   "default_config": config.key()}
            attempt(row, "default_ms", lambda: checked_ms(lambda: tail.fused_add_layernorm_pool_gelu(
                x, shift, ln_weight, ln_bias), expected, dtype, "tail"))
            attempt(row, "eager_ms", lambda: checked_ms(lambda: torch_tail(x), expected, dtype,
                                                        "tail eager"))
            if compiled_tail is not None:
                attempt(row, "compile_ms", lambda: checked_ms(lambda: compiled_tail(x), expected,
                                                              dtype, "tail torch.compile"))
            if tune:
                os.environ["TUNER_AUTOTUNE"] = "1"
                started = time.perf_counter()
                tail.fused_add_layernorm_pool_gelu(x, shift, ln_weight, ln_bias)  # tunes, saves
                row["autotune_s"] = time.perf_counter() - started
                os.environ.pop("TUNER_AUTOTUNE")
                tuned, _ = descriptor.select(call)
                row["autotune_config"] = tuned.key()
                attempt(row, "autotune_ms", lambda: checked_ms(
                    lambda: tail.fused_add_layernorm_pool_gelu(x, shift, ln_weight, ln_bias,
                                                               config=tuned),
                    expected, dtype, "tail autotuned"))
            results.append(row)
            print(row, flush=True)
            del x, expected
        del conv_out
        torch.cuda.empty_cache()

        model = Model(**REFERENCE_ARGS).to("cuda", dtype)
        x = torch.randn(REFERENCE_INPUT_SHAPE, device="cuda", generator=generator, dtype=dtype)
        conv = model.conv_transpose
        config, source = conv_tail.CONV_TRANSPOSE_TAIL.select(
            conv_tail.ConvTailCall(tuple(x.shape), c_out, dtype))
        assert source == "heuristic", source
        with torch.no_grad():
            expected = Model(**REFERENCE_ARGS).to("cuda", torch.float64)
            expected.load_state_dict(model.state_dict())
            expected = expected(x.double())

            def fused():
                return conv_tail.fused_conv_transpose_tail(
                    x, conv.weight, conv.bias, model.sum_weight.to(dtype), model.norm.weight,
                    model.norm.bias, model.norm.eps)

            # TF32 dots in float32, as cuDNN's convolution by default: a looser check.
            row = {"kernel": "conv_transpose_tail", "dtype": dtype_name,
                   "default_config": config.key()}
            attempt(row, "default_ms", lambda: checked_ms(fused, expected, torch.bfloat16,
                                                          "model kernel"))
            attempt(row, "eager_ms", lambda: checked_ms(lambda: model(x), expected,
                                                        torch.bfloat16, "model eager"))
            if compile_:
                compiled = torch.compile(model, dynamic=False)
                attempt(row, "compile_ms", lambda: checked_ms(lambda: compiled(x), expected,
                                                              torch.bfloat16, "model torch.compile"))
        results.append(row)
        print(row, flush=True)
        del model, x, expected
        torch.cuda.empty_cache()
    return results


def milliseconds(row: dict, key: str) -> str:
    return f"{row[key]:.4f}" if key in row else "-"


def ratio(row: dict, numerator: str, denominator: str) -> str:
    return f"{row[numerator] / row[denominator]:.2f}" if numerator in row and denominator in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exhaustive", default=None, help="JSON of exhaustive-best configs")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-autotune", action="store_true", help="skip TUNER_AUTOTUNE's pick")
    args = parser.parse_args()
    exhaustive = json.loads(Path(args.exhaustive).read_text())["shapes"] if args.exhaustive else {}
    started = time.perf_counter()
    info = {**versions(), "properties": dataclasses.asdict(device_properties())}
    print(info, flush=True)
    layernorm = bench_layernorm(exhaustive, not args.no_compile, not args.no_autotune)
    fused = bench_tail(not args.no_compile, not args.no_autotune)
    write_json("bench_default.json", {"versions": info, "layernorm": layernorm, "fused": fused,
                                      "seconds": time.perf_counter() - started,
                                      "autotune_budget_s": autotune.BUDGET_S})
    print(f"\n{info['device']}, torch {info['torch']}, triton {info['triton']}; no tables; "
          "time ratios (> 1: the default is slower)")
    print_table(["shape", "default config", "default ms", "default/best", "default/compile",
                 "default/eager", "autotuned/default", "autotune s"],
                [[row["shape"], row["default_config"], milliseconds(row, "default_ms"),
                  ratio(row, "default_ms", "best_ms"), ratio(row, "default_ms", "compile_ms"),
                  ratio(row, "default_ms", "eager_ms"), ratio(row, "autotune_ms", "default_ms"),
                  f"{row['autotune_s']:.1f}" if "autotune_s" in row else "-"]
                 for row in layernorm])
    print()
    print_table(["kernel", "dtype", "default config", "default ms", "default/compile",
                 "default/eager", "autotuned/default"],
                [[row["kernel"], row["dtype"], row["default_config"], milliseconds(row, "default_ms"),
                  ratio(row, "default_ms", "compile_ms"), ratio(row, "default_ms", "eager_ms"),
                  ratio(row, "autotune_ms", "default_ms")]
                 for row in fused])
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
