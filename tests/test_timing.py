"""tuner.timing: the copies a timing rotates through, and the fallbacks (the interpreter, calls
that cannot be captured in a CUDA graph)."""

from __future__ import annotations

import pytest
import torch

from tuner import get_kernel
from tuner.measure import ProblemBench
from tuner.timing import clone_tensors, tensor_bytes, time_calls_ms


def test_clone_tensors_copies_every_tensor_and_keeps_the_rest():
    values = {"x": torch.randn(3, 5), "pair": (torch.randn(2), 1.5), "eps": 1e-5}
    copies = clone_tensors(values)
    assert copies["eps"] == 1e-5 and copies["pair"][1] == 1.5
    assert torch.equal(copies["x"], values["x"]) and torch.equal(copies["pair"][0], values["pair"][0])
    copies["x"].add_(1.0)
    copies["pair"][0].add_(1.0)
    assert not torch.equal(copies["x"], values["x"])
    assert not torch.equal(copies["pair"][0], values["pair"][0])


def test_tensor_bytes_counts_nested_tensors_by_dtype():
    values = {"x": torch.empty(4, 8, dtype=torch.float16), "rest": [torch.empty(3), 7]}
    assert tensor_bytes(values) == 4 * 8 * 2 + 3 * 4


def test_cpu_timing_is_one_copy_and_wall_clock():
    spec = get_kernel("add_layernorm")
    bench = ProblemBench(spec, spec.problem("16x32", "float32"), torch.device("cpu"), seed=0)
    assert len(bench._copies()) == 1  # no L2 to overflow under the interpreter
    calls = []
    assert time_calls_ms([lambda: calls.append(1)], torch.device("cpu")) >= 0
    assert len(calls) == 1  # one run: the interpreter's clock only ranks configs
    assert bench.time(spec.heuristic(bench.problem)) > 0


def test_calls_that_cannot_be_captured_are_timed_without_a_graph(monkeypatch):
    """Only a failed capture falls back (with a warning); any other error is the trial's."""
    from tuner import timing

    def capture_fails(calls, device, quick):
        raise timing.CaptureError("operation not permitted when stream is capturing")

    monkeypatch.setattr(timing, "graph_time_ms", capture_fails)
    monkeypatch.setattr(timing, "do_bench_ms", lambda fn, quick=False: 1.25)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with pytest.warns(RuntimeWarning, match="without a CUDA graph"):
        assert timing.time_calls_ms([lambda: None], torch.device("cuda")) == 1.25

    def broken(calls, device, quick):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(timing, "graph_time_ms", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        timing.time_calls_ms([lambda: None], torch.device("cuda"))


def test_interleaved_timing_captures_each_candidate_once_and_alternates(monkeypatch):
    """The confirm stage's timing: one capture per candidate, replays taking turns round by
    round, a candidate that cannot be captured timed without a graph each round."""
    from tuner import timing

    captured, replayed, benched = [], [], []

    class FakeTimer:
        def __init__(self, calls, device, quick=False):
            self.name = calls[0]()
            if self.name == "uncapturable":
                raise timing.CaptureError("operation not permitted when stream is capturing")
            captured.append(self.name)

        def samples_ms(self, replays):
            replayed.append((self.name, replays))
            return [{"fast": 1.0, "slow": 3.0}[self.name] + 0.1 * index for index in range(replays)]

        def close(self):
            pass

    def do_bench(fn, quick=False):
        benched.append(fn())
        return 2.0

    monkeypatch.setattr(timing, "GraphTimer", FakeTimer)
    monkeypatch.setattr(timing, "do_bench_ms", do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    candidates = {name: [lambda name=name: name] for name in ("fast", "slow", "uncapturable")}
    with pytest.warns(RuntimeWarning, match="without a CUDA graph"):
        medians = timing.time_interleaved_ms(candidates, torch.device("cuda"), rounds=3)
    per_round = -(-timing.CAREFUL[1] // 3)
    assert captured == ["fast", "slow"]
    assert replayed == [("fast", per_round), ("slow", per_round)] * 3
    assert benched == ["uncapturable"] * 3
    middle = 0.1 * (per_round // 2)  # each round's samples are alike: the median is the middle one
    assert medians == pytest.approx({"fast": 1.0 + middle, "slow": 3.0 + middle, "uncapturable": 2.0})


def test_interleaved_timing_on_the_cpu_is_one_wall_clock_run_each():
    from tuner.timing import time_interleaved_ms

    calls = {"a": [], "b": []}
    medians = time_interleaved_ms({name: [lambda name=name: calls[name].append(1)]
                                   for name in calls}, torch.device("cpu"), rounds=2)
    assert set(medians) == {"a", "b"} and all(value >= 0 for value in medians.values())
    assert len(calls["a"]) == len(calls["b"]) == 1  # the interpreter's clock only ranks configs
