"""Where add + LayerNorm forward + backward time goes on one GPU, and which backward config
wins: the data to set the backward's heuristic (kernels/add_layernorm_backward.py) from.

For each problem (4194304x64 float32 and bfloat16, 65536x1024 and 16384x4096 bfloat16):

* the forward with the statistics autograd saves, alone (the forward's runtime config);
* the backward alone: the runtime default (table or heuristic config, reduction by width,
  one-wave grid), then a sweep: a grid of block_rows x num_warps with whole rows in registers
  (and a chunked block_w for the widest rows), then, around the grid's best, one knob at a
  time: num_stages, eviction policy, the other reduction, the program count (waves of the
  default grid); then the changes that helped, together;
* forward + backward: directly (forward kernel, then the backward call) and through autograd
  (``fused_add_layernorm`` + ``torch.autograd.grad``), with the runtime default and with the
  sweep's best backward, next to torch.compile of the same function;
* host time: CPU milliseconds to enqueue one autograd step, ours and torch.compile's. A step
  cannot take less than that, whatever the GPU does.

Every config's gradients are checked against float32 eager before it is timed. Floors: five
tensors of x's size for forward + backward, two for the forward, three for the backward, at
the copy bandwidth measured in the same run. The sweep of each problem stops after its share
of ``--budget-s`` (what was left out is listed in the JSON).

    cd benchmarks && python explore_backward.py [--budget-s 120]
                                              (results in $OUT/explore_backward.json)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import time
from typing import Callable

import torch
import torch.nn.functional as F
import triton

from common import out_dir, print_table, versions, write_json  # first: puts the repo on sys.path
from kernels import LaunchConfig, fused_add_layernorm
from kernels import add_layernorm as forward_module
from kernels import add_layernorm_backward as backward_module
from kernels.add_layernorm_backward import add_layernorm_backward
from kernels.backward_reduce import REDUCTIONS, choose_reduction
from tuner.measure import copy_bandwidth_gbps, time_ms

SHAPES = [(4194304, 64, torch.float32), (4194304, 64, torch.bfloat16),
          (65536, 1024, torch.bfloat16), (16384, 4096, torch.bfloat16)]
EPS = 1e-5
# Relative error of each gradient against float32 eager allowed before a config is timed.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
WAVES = (0.25, 0.5, 2.0, 4.0)
STAGES = (2, 3)
EVICTIONS = ("evict_first", "evict_last")
# Elements a thread holds per tile: from one 16-byte vector to what registers still allow
# (the backward keeps about seven float32 values an element live).
MIN_VECTOR_BYTES, MAX_ELEMENTS_PER_THREAD = 16, 32
MAX_TILE = 16384
HOST_REPEATS = 20
DEVICE = torch.device("cuda")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A backward launch: config, reduction (None: by width) and program count (None: the
    default one-wave grid)."""

    config: LaunchConfig
    reduction: str | None = None
    programs: int | None = None

    def label(self) -> str:
        reduction = self.reduction or "auto"
        programs = "default" if self.programs is None else str(self.programs)
        return f"{self.config.key()} {reduction} p={programs}"


def grid_configs(width: int, dtype: torch.dtype) -> list[LaunchConfig]:
    """block_rows x num_warps with the whole row in registers (tiles of 1024 to 16384
    elements, 1 vector to 32 elements a thread), plus a chunked block_w for rows wider than
    2048."""
    block_w = triton.next_power_of_2(width)
    fewest = MIN_VECTOR_BYTES // dtype.itemsize
    configs = []
    block_rows = max(1, 1024 // block_w)
    while block_rows * block_w <= MAX_TILE and block_rows <= 256:
        for warps in (1, 2, 4, 8, 16, 32):
            per_thread = block_rows * block_w // (32 * warps)
            if fewest <= per_thread <= MAX_ELEMENTS_PER_THREAD:
                configs.append(LaunchConfig(block_rows, block_w, warps))
        block_rows *= 2
    if width > 2048:
        configs += [LaunchConfig(1, block_w // 2, warps) for warps in (4, 8)]
    return configs


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def percent(floor_ms: float, ms: float | None) -> str:
    return f"{100 * floor_ms / ms:.0f}%" if ms else "-"


@contextlib.contextmanager
def backward_launch(candidate: Candidate | None):
    """Within the block, autograd's backward of fused_add_layernorm runs ``candidate``
    (None: the runtime default)."""
    if candidate is None:
        yield
        return
    real = forward_module.add_layernorm_backward
    forward_module.add_layernorm_backward = functools.partial(
        real, config=candidate.config, reduction=candidate.reduction,
        programs=candidate.programs)
    try:
        yield
    finally:
        forward_module.add_layernorm_backward = real


def launched_programs(run: Callable[[], object]) -> int:
    """The grid size of the backward kernel launched by ``run()`` (which runs)."""
    real, grids = backward_module._add_layernorm_backward_kernel, []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid[0])
            return real[grid]

        def __getattr__(self, name):
            return getattr(real, name)

    backward_module._add_layernorm_backward_kernel = Spy()
    try:
        run()
    finally:
        backward_module._add_layernorm_backward_kernel = real
    return grids[-1]


def host_ms(step: Callable[[], object]) -> float:
    """CPU milliseconds to enqueue one ``step`` (back to back, no synchronisation)."""
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_REPEATS):
        step()
    elapsed = (time.perf_counter() - start) * 1e3 / HOST_REPEATS
    torch.cuda.synchronize()
    return elapsed


class Problem:
    """One problem's inputs, float32-eager reference gradients and timed pieces."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, copy_gbps: float) -> None:
        self.rows, self.width, self.dtype = rows, width, dtype
        generator = torch.Generator(device=DEVICE).manual_seed(rows + width)

        def randn(*shape, scale=1.0, shift=0.0):
            values = torch.randn(shape, device=DEVICE, generator=generator) * scale + shift
            return values.to(dtype).requires_grad_()

        self.x = randn(rows, width, scale=2.0, shift=0.5)
        self.sum_weight = randn(scale=0.5, shift=1.0)
        self.weight = randn(width, scale=0.5, shift=1.0)
        self.bias = randn(width, scale=0.5)
        self.dy = torch.randn(rows, width, device=DEVICE, generator=generator).to(dtype)
        self.leaves = (self.x, self.sum_weight, self.weight, self.bias)
        x_bytes = self.x.numel() * self.x.element_size()
        self.floor_ms = 5 * x_bytes / copy_gbps / 1e6
        with torch.no_grad():
            shifted = self.x.float() + self.sum_weight.float()
            self.mean = shifted.mean(-1)
            self.rstd = torch.rsqrt(shifted.var(-1, unbiased=False) + EPS)
        self.plain = tuple(t.detach() for t in self.leaves)
        leaves32 = [t.detach().float().requires_grad_() for t in self.leaves]
        with torch.enable_grad():
            grads = torch.autograd.grad(self.eager(*leaves32), leaves32, self.dy.float())
        # dx, dweight, dbias (dsum_weight is zero in exact arithmetic: nothing to compare).
        self.want = (grads[0], grads[2], grads[3])

    def name(self) -> str:
        return f"{self.rows}x{self.width} {str(self.dtype).removeprefix('torch.')}"

    def eager(self, x, s, w, b):
        return F.layer_norm(x + s, (self.width,), w, b, EPS)

    def ours(self, x, s, w, b):
        return fused_add_layernorm(x, s, self.width, w, b, EPS)

    def autograd_step(self, fn) -> Callable[[], object]:
        # torch.autograd.grad, not .backward(): accumulating into .grad would add a read and a
        # write of x's size to every step.
        return lambda: torch.autograd.grad(fn(*self.leaves), self.leaves, self.dy)

    def backward(self, candidate: Candidate | None):
        x, s, w, _ = self.plain
        if candidate is None:
            return add_layernorm_backward(self.dy, x, w, self.mean, self.rstd, s)
        return add_layernorm_backward(self.dy, x, w, self.mean, self.rstd, s,
                                      config=candidate.config, reduction=candidate.reduction,
                                      programs=candidate.programs)

    def check(self, grads) -> float:
        """The largest relative error of dx, dweight and dbias; an AssertionError past the
        tolerance."""
        errors = [relative_error(got, want) for got, want in zip(grads[:3], self.want)]
        assert max(errors) <= TOLERANCE[self.dtype], f"relative errors {errors}"
        return max(errors)

    def forward_with_stats(self) -> Callable[[], None]:
        """The forward kernel as autograd launches it (saving mean and rstd), nothing else."""
        x, s, w, b = self.plain
        config, _ = forward_module.select_config(self.rows, self.width, self.dtype)
        out = torch.empty_like(x)
        mean, rstd = torch.empty((2, self.rows), dtype=torch.float32, device=DEVICE)
        return lambda: forward_module.ADD_LAYERNORM.launch(x, out, w, b, s, 0.0, self.rows,
                                                           self.width, EPS, config,
                                                           stats=(mean, rstd))


def measure_backward(problem: Problem, candidate: Candidate) -> dict:
    """Checks then times one backward launch; the error instead when it fails."""
    record = {"candidate": candidate.label(), "config": candidate.config.as_dict(),
              "reduction": candidate.reduction or choose_reduction(problem.width),
              "programs": candidate.programs}
    try:
        programs = launched_programs(lambda: record.update(error_vs_float32=problem.check(
            problem.backward(candidate))))
        record["programs"] = programs
        record["ms"] = time_ms(lambda: problem.backward(candidate), DEVICE)
    except Exception as error:  # a config that cannot run is recorded, not fatal
        record["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    return record


def sweep(problem: Problem, deadline: float) -> tuple[list, list]:
    """(records, skipped labels): the grid, then one knob at a time around its best (each
    record naming its ``knob`` and ``value``), then the changes that helped, together."""
    records, skipped = [], []

    def run(candidate: Candidate, stage: str, knob: str = "", value: object = None) -> float:
        """The candidate's ms (inf when it failed or was skipped)."""
        if time.monotonic() > deadline:
            skipped.append(candidate.label())
            return float("inf")
        record = measure_backward(problem, candidate)
        record["stage"] = stage
        if knob:
            record.update(knob=knob, value=str(value))
        records.append(record)
        return record.get("ms", float("inf"))

    for config in grid_configs(problem.width, problem.dtype):
        run(Candidate(config), "grid")
    timed = [r for r in records if "ms" in r]
    if not timed:
        return records, skipped
    base = min(timed, key=lambda r: r["ms"])
    base_config = LaunchConfig.from_dict(base["config"])
    changes = [("num_stages", stages, dict(num_stages=stages)) for stages in STAGES]
    changes += [("eviction_policy", policy, dict(eviction_policy=policy)) for policy in EVICTIONS]
    helpful = {}
    for knob, value, change in changes:
        if run(Candidate(dataclasses.replace(base_config, **change)), "one knob", knob,
               value) < base["ms"]:
            helpful[knob] = change
    other = next(r for r in REDUCTIONS if r != base["reduction"])
    reduction = other if run(Candidate(base_config, reduction=other), "one knob", "reduction",
                             other) < base["ms"] else None
    programs, programs_ms = None, base["ms"]
    for waves in WAVES:
        count = max(1, round(base["programs"] * waves))
        ms = run(Candidate(base_config, programs=count), "one knob", "waves", waves)
        if ms < programs_ms:
            programs, programs_ms = count, ms
    if helpful or reduction or programs:
        config = base_config
        for change in helpful.values():
            config = dataclasses.replace(config, **change)
        run(Candidate(config, reduction=reduction, programs=programs), "together")
    return records, skipped


def knob_effects(records: list[dict]) -> dict[str, dict[str, float]]:
    """How much each knob matters, as times over a best time. Grid knobs (block_rows,
    num_warps, block_w): for each value, the best grid time with that value over the grid's
    best. One-knob changes (num_stages, eviction_policy, reduction, waves of the default grid):
    each variant's time over that of the grid's best config it changes (value "base")."""
    grid = [r for r in records if r["stage"] == "grid" and "ms" in r]
    if not grid:
        return {}
    fastest = min(r["ms"] for r in grid)
    effects: dict[str, dict[str, float]] = {}
    for knob in ("block_rows", "num_warps", "block_w"):
        values = effects[knob] = {}
        for record in grid:
            value = str(record["config"][knob])
            values[value] = round(min(values.get(value, float("inf")), record["ms"] / fastest), 3)
    for record in records:
        if record["stage"] == "one knob":
            values = effects.setdefault(record["knob"], {"base": 1.0})
            values[record["value"]] = round(record["ms"] / fastest, 3) if "ms" in record \
                else float("nan")
    return effects


def explore(problem: Problem, budget_s: float) -> tuple[dict, list[list]]:
    """Everything timed for one problem, and its summary rows."""
    floor = problem.floor_ms
    result = {"rows": problem.rows, "width": problem.width,
              "dtype": str(problem.dtype).removeprefix("torch."), "floor_ms": floor}
    forward_config, forward_source = forward_module.select_config(problem.rows, problem.width,
                                                                  problem.dtype)
    result["forward_config"] = {"config": forward_config.key(), "source": forward_source}
    result["forward_stats_ms"] = time_ms(problem.forward_with_stats(), DEVICE)

    backward_config, backward_source = backward_module.ADD_LAYERNORM_BACKWARD.select(
        backward_module.AddLayerNormBackwardCall(problem.rows, problem.width, problem.dtype))
    default = measure_backward(problem, Candidate(backward_config))
    default["source"] = backward_source
    result["backward_default"] = default
    records, skipped = sweep(problem, time.monotonic() + budget_s)
    result["backward_sweep"], result["skipped"] = records, skipped
    timed = [r for r in records + [default] if "ms" in r]
    best = min(timed, key=lambda r: r["ms"])
    result["backward_best"] = best
    result["knob_effects"] = knob_effects(records)
    best_candidate = Candidate(LaunchConfig.from_dict(best["config"]), best["reduction"],
                               best["programs"])

    forward = problem.forward_with_stats()

    def direct(candidate: Candidate | None) -> Callable[[], object]:
        return lambda: (forward(), problem.backward(candidate))

    compiled = torch.compile(problem.eager, dynamic=False)
    compile_step = problem.autograd_step(compiled)
    started = time.monotonic()
    compile_step()
    result["torch_compile_s"] = time.monotonic() - started
    ours_step = problem.autograd_step(problem.ours)
    fwd_bwd = {"direct default": time_ms(direct(None), DEVICE),
               "direct best": time_ms(direct(best_candidate), DEVICE)}
    for name, candidate in (("autograd default", None), ("autograd best", best_candidate)):
        with backward_launch(candidate):
            grads = ours_step()
            problem.check((grads[0], grads[2], grads[3]))
            fwd_bwd[name] = time_ms(ours_step, DEVICE)
            if candidate is None:
                result["host_ms"] = {"ours": host_ms(ours_step)}
    fwd_bwd["torch.compile"] = time_ms(compile_step, DEVICE)
    result["host_ms"]["torch.compile"] = host_ms(compile_step)
    result["fwd_bwd_ms"] = fwd_bwd

    compile_ms = fwd_bwd["torch.compile"]
    name = problem.name()
    rows = [[name, f"fwd with stats ({forward_config.key()}, {forward_source})",
             f"{result['forward_stats_ms']:.3f}", percent(0.4 * floor, result["forward_stats_ms"]),
             ""]]
    for label, record in (("bwd default", default), ("bwd best", best)):
        config = LaunchConfig.from_dict(record["config"]).key()
        rows.append([name, f"{label} ({config}, {record['reduction']}, "
                           f"{record.get('programs')} programs)",
                     f"{record.get('ms', float('nan')):.3f}",
                     percent(0.6 * floor, record.get("ms")), ""])
    rows += [[name, f"fwd+bwd {label}", f"{ms:.3f}", percent(floor, ms), f"{compile_ms / ms:.2f}x"]
             for label, ms in fwd_bwd.items()]
    rows.append([name, "host ms a step: ours / torch.compile",
                 f"{result['host_ms']['ours']:.3f} / {result['host_ms']['torch.compile']:.3f}",
                 "", ""])
    return result, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=120.0,
                        help="seconds of backward sweep in all, shared out over the problems")
    args = parser.parse_args()
    started = time.monotonic()
    info = versions()
    copy_gbps = copy_bandwidth_gbps(DEVICE)
    print(f"{info}  copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    results = {"versions": info, "copy_gbps": copy_gbps, "problems": []}
    table, effects = [], []
    for rows, width, dtype in SHAPES:
        problem = Problem(rows, width, dtype, copy_gbps)
        result, summary = explore(problem, args.budget_s / len(SHAPES))
        results["problems"].append(result)
        table += summary
        effects += [[problem.name(), knob, "  ".join(f"{value}: {ratio:.2f}x"
                                                     for value, ratio in values.items())]
                    for knob, values in result["knob_effects"].items()]
        print("\n".join(" | ".join(row) for row in summary), flush=True)
        write_json("explore_backward.json", results)  # what is done so far survives a crash
        del problem
        torch.cuda.empty_cache()
    results["wall_s"] = time.monotonic() - started
    write_json("explore_backward.json", results)
    print("\nknob effects (best time with that value / best time of the sweep):")
    print_table(["problem", "knob", "values"], effects)
    print(f"\n{info}; copy {copy_gbps:.0f} GB/s; floors: 5 tensors of x's size (fwd+bwd), "
          f"2 (fwd), 3 (bwd); {results['wall_s']:.0f} s; JSON in {out_dir()}")
    print_table(["problem", "what", "ms", "% of floor", "vs torch.compile"], table)


if __name__ == "__main__":
    main()
