"""What a run shows while it works: a progress bar on a terminal, status lines elsewhere, and
the libraries' routine notices kept out of the way."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import TYPE_CHECKING, Mapping, TextIO

if TYPE_CHECKING:
    from .study import StudyRun

# Ray logs this on every start of a local cluster; it announces a default, not a problem. The
# warning that authentication is *disabled* stays visible.
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_RAY_AUTH_NOTICE = "Token authentication is enabled"


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_RAY_AUTH_NOTICE)


def quiet_library_noise() -> None:
    """Hides Ray's token-authentication notice and Optuna's info logs and experimental-feature
    warnings, which every run would otherwise print."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logger = logging.getLogger(_RAY_AUTH_LOGGER)
    if not any(isinstance(existing, _DropNotice) for existing in logger.filters):
        logger.addFilter(_DropNotice())


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _budget(run: StudyRun) -> int:
    return min(run.settings.trials, len(run.valid))


class Progress:
    """Reports a run's progress on ``stream`` (None: ``sys.stderr`` as it is when the run starts).

    On a terminal (or with ``bar=True``): a tqdm bar of trials measured out of the run's budget,
    with the rate, ETA, studies done, GPUs busy and the best config so far; :meth:`close` ends
    it. Elsewhere: a status line every ``interval`` seconds. Nothing at all with ``quiet``.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 2.0, *,
                 bar: bool | None = None, quiet: bool = False) -> None:
        # Not a default argument: sys.stderr may be replaced after this module is imported.
        stream = sys.stderr if stream is None else stream
        self.stream, self.interval, self.quiet = stream, interval, quiet
        self.use_bar = _is_terminal(stream) if bar is None else bar
        self.start = self.last = time.monotonic()
        self.measured = 0
        self._bar = None

    def update(self, runs: list[StudyRun], busy: int, workers: int, force: bool = False) -> None:
        """Called by the driver as trials finish; ``force`` reports now (at the end of a run)."""
        if self.quiet:
            return
        if self.use_bar:
            self._update_bar(runs, busy, workers)
            return
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        line = (f"[{elapsed:6.1f}s] {self._studies(runs)} | {self.measured} trials "
                f"({self.measured / max(elapsed, 1e-9):.2f}/s) | GPUs busy {busy}/{workers}")
        focus = self._focus(runs)
        if focus is not None:
            line += " | " + focus.progress_line()
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Ends the bar, leaving its last state on screen."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @staticmethod
    def _studies(runs: list[StudyRun]) -> str:
        return f"studies {sum(run.done for run in runs)}/{len(runs)} done"

    @staticmethod
    def _focus(runs: list[StudyRun]) -> StudyRun | None:
        """The one study worth detailing: the only one, or the only one still running."""
        active = [run for run in runs if not run.done]
        if len(runs) == 1 or len(active) == 1:
            return (active or runs)[0]
        return None

    def _update_bar(self, runs: list[StudyRun], busy: int, workers: int) -> None:
        from tqdm import tqdm

        total = sum(_budget(run) for run in runs)
        done = sum(min(run.n_measured, _budget(run)) for run in runs)
        if self._bar is None:
            # Trials measured by earlier runs of a resumed study count from the start, so the
            # rate and ETA cover this run's trials only.
            self._bar = tqdm(total=total, initial=done, unit="trial", desc="tuning",
                             file=self.stream, dynamic_ncols=True, leave=True)
        self._bar.total = total
        self._bar.n = done
        postfix = f"{self._studies(runs)}, GPUs busy {busy}/{workers}"
        focus = self._focus(runs)
        if focus is not None and focus.best is not None:
            ms, key = focus.best
            postfix += f", best {ms:.4g} ms {key}"
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.refresh()


def format_phases(seconds: Mapping[str, float], trials_with: Mapping[str, int], trials: int) -> str:
    """Milliseconds per measured trial of each phase (and how many of the ``trials`` had a
    phase that not all had), as ``--verbose`` prints them."""
    trials = max(1, trials)

    def count(name: str) -> str:
        having = trials_with.get(name, trials)
        return f" ({having} trials)" if having < trials else ""

    return "per trial (ms): " + ", ".join(
        f"{name} {1e3 * spent / trials:.0f}{count(name)}" for name, spent in seconds.items())
