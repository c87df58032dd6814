"""Results for people and scripts: the end-of-run summary, its JSON form, and ``tuner report``
(per study, PNG plots and a Markdown summary read back from an Optuna storage)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState

from kernels import LaunchConfig

from .claims import is_measurement
from .columns import format_columns
from .errors import InputError
from .result import StudyResult
from .study import StudyRun, study_name

# Fewer complete trials than this give parameter importances that mean nothing.
MIN_TRIALS_FOR_IMPORTANCE = 5
TOP_CONFIGS = 10


def print_summary(results: list[StudyResult], stream: TextIO) -> None:
    """Best config, time, GB/s, % of copy bandwidth and speedups, per shape and GPU model."""
    header = ("device", "kernel", "shape", "dtype", "best config", "ms", "GB/s", "% copy",
              "vs heuristic", "vs eager", "trials")
    rows = [(
        result.device, result.problem.kernel, result.problem.shape_text, result.problem.dtype,
        result.config.key(), f"{result.ms:.4g}", f"{result.gbps:.0f}", f"{result.pct_of_copy:.0f}%",
        "failed" if result.speedup_vs_heuristic is None else f"{result.speedup_vs_heuristic:.2f}x",
        "-" if result.speedup_vs_eager is None else f"{result.speedup_vs_eager:.2f}x",
        str(result.trials) + (" (resumed)" if result.resumed else ""))
        for result in results]
    for line in format_columns(header, rows):
        print(line, file=stream)


def results_document(results: list[StudyResult], failures: list[tuple[StudyRun, str]],
                     tables: dict[str, str]) -> dict[str, Any]:
    """The run's outcome as JSON-ready data: ``results`` (one per confirmed study),
    ``unfinished`` (studies without a result, with the reason) and ``tables`` (per GPU model)."""
    return {
        "results": [{**result.to_json(), "study": study_name(result.problem, result.device),
                     "speedup_vs_heuristic": result.speedup_vs_heuristic,
                     "speedup_vs_eager": result.speedup_vs_eager, "resumed": result.resumed}
                    for result in results],
        "unfinished": [{"study": study_name(run.problem, run.device), "kernel": run.problem.kernel,
                        "shape": list(run.problem.shape), "dtype": run.problem.dtype,
                        "device": run.device, "reason": reason} for run, reason in failures],
        "tables": tables,
    }


# -- tuner report --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Heuristic:
    """A study's default config (the runtime's fallback) and its time, if it was timed."""

    config: str  # empty for studies stored before the config was recorded
    ms: float | None
    retimed: bool = False  # timed by the confirm stage rather than in the search

    @property
    def label(self) -> str:
        name = f" {self.config}" if self.config else ""
        where = ", confirm stage" if self.retimed else ""
        return f"heuristic config{name} ({_ms(self.ms)} ms{where})"


@dataclasses.dataclass
class StudyData:
    """What a report shows of one study, read from the storage."""

    name: str
    attrs: dict[str, Any]
    measured: list[optuna.trial.FrozenTrial]  # in measurement order; failed ones included
    importances: dict[str, float] | None
    importance_note: str = ""

    @property
    def title(self) -> str:
        shape = "x".join(map(str, self.attrs.get("shape", []))) or "?"
        return (f"{self.attrs.get('kernel', '?')} {shape} {self.attrs.get('dtype', '?')} "
                f"on {self.attrs.get('device', '?')}")

    @property
    def complete(self) -> list[optuna.trial.FrozenTrial]:
        return [trial for trial in self.measured if trial.state == TrialState.COMPLETE]

    @property
    def failed(self) -> list[optuna.trial.FrozenTrial]:
        return [trial for trial in self.measured if trial.state != TrialState.COMPLETE]

    @property
    def heuristic(self) -> Heuristic | None:
        """The default config and its time: as measured in the search, else as re-timed by the
        confirm stage (a config outside the search space is only timed there)."""
        key = self.attrs.get("heuristic_config")
        for trial in self.complete:
            if key and trial.user_attrs.get("config") == key:
                return Heuristic(key, trial.value)
        result = self.attrs.get("result")
        if result and result.get("heuristic_ms"):
            return Heuristic(key or "", result["heuristic_ms"], retimed=True)
        return Heuristic(key, None) if key else None


def _importances(study: optuna.Study, complete: int) -> tuple[dict[str, float] | None, str]:
    if complete < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"not computed: {complete} complete trials, at least "
                      f"{MIN_TRIALS_FOR_IMPORTANCE} are needed")
    try:
        # PED-ANOVA: Optuna's default from 5.0, and the only evaluator that needs no scikit-learn.
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        return optuna.importance.get_param_importances(study, evaluator=evaluator), ""
    except (ValueError, RuntimeError) as error:  # e.g. every knob had a single value
        return None, f"not computed: {error}"


def load_study_data(storage: optuna.storages.BaseStorage | str, name: str) -> StudyData:
    """One study's attributes, measured trials and parameter importances."""
    study = optuna.load_study(study_name=name, storage=storage)
    measured = sorted((trial for trial in study.get_trials(deepcopy=False)
                       if is_measurement(trial)), key=lambda trial: trial.number)
    complete = sum(trial.state == TrialState.COMPLETE for trial in measured)
    importances, note = _importances(study, complete)
    return StudyData(name, dict(study.user_attrs), measured, importances, note)


def file_stem(name: str) -> str:
    """A study name as a file name: ``add_layernorm:NVIDIA H100:float32:128x64`` ->
    ``add_layernorm_NVIDIA_H100_float32_128x64``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def study_markdown(data: StudyData, images: dict[str, str]) -> str:
    """The Markdown summary of one study; ``images`` maps a plot's caption to its file name."""
    attrs, complete = data.attrs, data.complete
    best = min(complete, key=lambda trial: trial.value, default=None)
    heuristic = data.heuristic
    rows = [("study", f"`{data.name}`"), ("kernel", f"`{attrs.get('kernel', '?')}`"),
            ("shape", "x".join(map(str, attrs.get("shape", [])))), ("dtype", attrs.get("dtype", "?")),
            ("device", attrs.get("device", "?")),
            ("measured configs", f"{len(data.measured)} ({len(data.failed)} failed)")]
    if attrs.get("space"):
        rows.append(("search space", f"`{attrs['space']}`"))
    if best is not None:
        rows.append(("best measured", f"`{best.user_attrs.get('config')}`: {_ms(best.value)} ms, "
                                      f"{_number(best.user_attrs.get('gbps'))} GB/s, "
                                      f"{_number(best.user_attrs.get('pct_of_copy'))}% of copy"))
    if heuristic is not None:
        rows.append(("heuristic (default) config", f"`{heuristic.config or '?'}`: "
                     f"{_ms(heuristic.ms)} ms" + (" (confirm stage)" if heuristic.retimed else "")))
    result = attrs.get("result")
    if result:
        eager = result.get("eager_ms")
        config = LaunchConfig.from_dict(result["config"]).key()
        rows.append(("confirmed winner (re-timed)",
                     f"`{config}`: {_ms(result['ms'])} ms, {_number(result['gbps'])} GB/s, "
                     + (f"{result['heuristic_ms'] / result['ms']:.2f}x the heuristic"
                        if result.get("heuristic_ms") else "the heuristic failed")
                     + (f", {eager / result['ms']:.3g}x PyTorch eager" if eager else "")))
        rows.append(("measured with", f"torch {result.get('torch') or '?'}, triton "
                                      f"{result.get('triton') or '?'}, compute capability "
                                      f"{result.get('compute_capability') or '-'}, {result.get('date', '')}"))
    elif attrs.get("confirm_error"):
        rows.append(("no result", attrs["confirm_error"]))
    else:
        rows.append(("no result", "the search has not finished"))
    lines = [f"# {data.title}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    for caption, file_name in images.items():
        lines += ["", f"![{caption}]({file_name})"]
    lines += ["", f"## Fastest {min(TOP_CONFIGS, len(complete))} of {len(complete)} measured configs",
              "", "| rank | config | ms | GB/s | % of copy | compile s |", "|---|---|---|---|---|---|"]
    for rank, trial in enumerate(sorted(complete, key=lambda trial: trial.value)[:TOP_CONFIGS], 1):
        attrs_of = trial.user_attrs
        lines.append(f"| {rank} | `{attrs_of.get('config')}` | {_ms(trial.value)} | "
                     f"{_number(attrs_of.get('gbps'))} | {_number(attrs_of.get('pct_of_copy'))} | "
                     f"{_number(attrs_of.get('compile_s'))} |")
    lines += ["", "## Parameter importances", ""]
    if data.importances:
        lines += ["| knob | importance |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in data.importances.items()]
    else:
        lines.append(data.importance_note)
    if data.failed:
        lines += ["", f"## Failed configs ({len(data.failed)})", ""]
        lines += [f"- `{trial.user_attrs.get('config')}`: {trial.user_attrs.get('error', 'failed')}"
                  for trial in data.failed]
    return "\n".join(lines) + "\n"


def write_report(storage: optuna.storages.BaseStorage | str, out: str | os.PathLike,
                 study: str | None = None) -> list[Path]:
    """Writes, per study (or only ``study``), its plots and ``<study>.md`` into ``out``, and an
    ``index.md`` linking them; returns the Markdown files written."""
    from .plots import plot_study

    names = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
    if study is not None:
        if study not in names:
            raise InputError(f"no study {study!r} in the storage; studies: {', '.join(names) or 'none'}")
        names = [study]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, index = [], ["# Tuning report", "", "| study | measured | best ms | result |",
                          "|---|---|---|---|"]
    for name in names:
        data = load_study_data(storage, name)
        stem = file_stem(name)
        images = plot_study(data, out, stem)
        page = out / f"{stem}.md"
        page.write_text(study_markdown(data, images))
        written.append(page)
        best = min((trial.value for trial in data.complete), default=None)
        result = data.attrs.get("result")
        index.append(f"| [{data.title}]({page.name}) | {len(data.measured)} | {_ms(best)} | "
                     + (f"{_ms(result['ms'])} ms confirmed" if result else "none yet") + " |")
    (out / "index.md").write_text("\n".join(index) + "\n")
    return written
