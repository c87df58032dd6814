"""The PNG plots of ``tuner report``: best time so far per trial, the distribution of every
measured config, and Optuna's parameter importances. Needs matplotlib (``pip install
tuner[report]``); drawn with the Agg backend, so no display is needed."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import StudyData

HEURISTIC_COLOUR, BEST_COLOUR, TRIAL_COLOUR, FAILED_COLOUR = "tab:orange", "tab:blue", "0.55", "tab:red"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("tuner report draws its plots with matplotlib: "
                          "pip install matplotlib (or the project's [report] extra)") from None
    matplotlib.use("Agg", force=True)  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    return plt


def _log_scale_if_wide(values: list[float]) -> bool:
    """Times that span more than a decade read better on a log axis."""
    return len(values) > 1 and min(values) > 0 and max(values) / min(values) > 10


def _best_so_far(data: StudyData, plt, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 5), layout="constrained")
    numbers = range(1, len(data.measured) + 1)
    done = [(n, trial.value) for n, trial in zip(numbers, data.measured) if trial.value is not None]
    values = [value for _, value in done]
    axes.scatter([n for n, _ in done], values, s=18, color=TRIAL_COLOUR, label="each measured config",
                 zorder=2)
    best = list(itertools.accumulate(values, min))
    axes.step([n for n, _ in done], best, where="post", color=BEST_COLOUR, linewidth=2,
              label=f"best so far (final {best[-1]:.4g} ms)", zorder=3)
    failed = [n for n, trial in zip(numbers, data.measured) if trial.value is None]
    if failed:
        # Failed configs have no time: marked along the top edge of the plot.
        axes.plot(failed, [max(values)] * len(failed), "x", color=FAILED_COLOUR,
                  label=f"failed ({len(failed)})", zorder=3)
    heuristic, extent = data.heuristic, list(values)
    if heuristic is not None and heuristic.ms is not None:
        axes.axhline(heuristic.ms, color=HEURISTIC_COLOUR, linestyle="--", linewidth=1.5,
                     label=heuristic.label, zorder=1)
        extent.append(heuristic.ms)
    if _log_scale_if_wide(extent):
        axes.set_yscale("log")
    axes.set_xlabel("measured config (in measurement order)")
    axes.set_ylabel("time per call (ms, lower is better)")
    axes.set_title(f"Search progress: {data.title}")
    axes.set_xlim(0.5, len(data.measured) + 0.5)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    # Below the axes: inside, it would hide trials wherever it went.
    figure.legend(loc="outside lower center", ncols=2, fontsize="small")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _distribution(data: StudyData, plt, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4.5), layout="constrained")
    values = sorted(trial.value for trial in data.complete)
    log = _log_scale_if_wide(values)
    bins = min(30, max(5, len(values) // 2))
    if log:
        import numpy

        bins = numpy.geomspace(values[0], values[-1], bins + 1)
        axes.set_xscale("log")
    axes.hist(values, bins=bins, color=TRIAL_COLOUR, edgecolor="white")
    axes.axvline(values[0], color=BEST_COLOUR, linewidth=2, label=f"best measured ({values[0]:.4g} ms)")
    heuristic = data.heuristic
    if heuristic is not None and heuristic.ms is not None:
        axes.axvline(heuristic.ms, color=HEURISTIC_COLOUR, linestyle="--", linewidth=1.5,
                     label=heuristic.label)
    axes.set_xlabel("time per call (ms, lower is better)")
    axes.set_ylabel("number of configs")
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.set_title(f"{len(values)} measured configs"
                   + (f" ({len(data.failed)} more failed)" if data.failed else "")
                   + f": {data.title}")
    axes.legend(loc="upper right", fontsize="small")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _importances(data: StudyData, plt, path: Path) -> None:
    names = list(data.importances)[::-1]  # the most important knob on top
    values = [data.importances[name] for name in names]
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5), layout="constrained")
    bars = axes.barh(names, values, color=BEST_COLOUR)
    axes.bar_label(bars, fmt="%.3f", padding=3)
    axes.set_xlim(0, max(values) * 1.15 or 1)
    axes.set_xlabel("importance (Optuna PED-ANOVA, normalised to sum to 1)")
    axes.set_title(f"Knob importances over {len(data.complete)} configs: {data.title}")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_study(data: StudyData, out: Path, stem: str) -> dict[str, str]:
    """Draws the study's plots into ``out`` as ``<stem>_*.png``; returns caption -> file name
    (none when no config was measured; no importances when they could not be computed)."""
    if not data.complete:
        return {}
    plt = _pyplot()
    plots = [("best time so far per measured config", "progress", _best_so_far),
             ("distribution of measured configs", "distribution", _distribution)]
    if data.importances:
        plots.append(("parameter importances", "importance", _importances))
    images = {}
    for caption, suffix, draw in plots:
        file_name = f"{stem}_{suffix}.png"
        draw(data, plt, out / file_name)
        images[caption] = file_name
    return images
