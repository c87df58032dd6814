"""The tools around a run: ``tuner report`` (plots and Markdown from a storage), the storage read
by optuna-dashboard's own server, the progress bar and status lines, and the libraries' routine
notices kept quiet. Studies here are filled by StudyRun with made-up times (no Ray, no kernel)."""

from __future__ import annotations

import io
import json
import logging
import warnings
from wsgiref.util import setup_testing_defaults

import optuna
import pytest

from tuner import cli
from tuner.measure import Confirmation, Measurement
from tuner.problems import get_kernel
from tuner.progress import Progress, quiet_library_noise
from tuner.report import file_stem, load_study_data, write_report
from tuner.space import parse_space
from tuner.study import Settings, StudyRun

SPEC = get_kernel("add_layernorm")
PROBLEM = SPEC.problem("128x64", "float32")
STUDY = "add_layernorm:interpreter:float32:128x64"
SPACE = parse_space({"kernel": "add_layernorm", "restrictions": {}, "parameters": {
    "block_rows": [1, 2, 4, 8], "block_w": [64], "num_warps": [1, 2, 4], "num_stages": [1],
    "eviction_policy": ["", "evict_first"]}})  # 24 configs; the heuristic is among them


def fill_study(storage, measured: int, failing: int = 0, confirm: bool = True) -> StudyRun:
    """A study with ``measured`` made-up measurements, the last ``failing`` of them failed."""
    run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, storage, Settings(trials=measured))
    for index in range(measured):
        config = run.ask()
        if index >= measured - failing:
            measurement = Measurement(config.key(), error="WrongResult: relative error 0.5")
        else:
            ms = 1.0 + config.block_rows * 0.3 + config.num_warps * 0.05 + (index % 3) * 0.01
            measurement = Measurement(config.key(), ms=ms, gbps=100 / ms, pct_of_copy=10 / ms,
                                      compile_s=0.1)
        run.tell(config, measurement, "worker-1")
    if confirm:
        candidates = run.confirm_candidates()
        run.finish(Confirmation({config.key(): 1.0 + i * 0.1 for i, config in enumerate(candidates)},
                                eager_ms=2.0, n_bytes=65536, copy_gbps=1000.0),
                   {"torch": "2.13.0", "triton": "3.9.0"})
    return run


def test_report_writes_plots_and_a_summary_per_study(tmp_path):
    storage = optuna.storages.get_storage(f"sqlite:///{tmp_path}/r.db")
    run = fill_study(storage, measured=12, failing=1)
    out = tmp_path / "report"
    [page] = write_report(storage, out)
    stem = file_stem(STUDY)
    assert page == out / f"{stem}.md" and stem == "add_layernorm_interpreter_float32_128x64"
    for suffix in ("progress", "distribution", "importance"):
        image = (out / f"{stem}_{suffix}.png").read_bytes()
        assert image.startswith(b"\x89PNG") and len(image) > 10_000
    text = page.read_text()
    heuristic = SPEC.heuristic(PROBLEM).key()
    assert text.startswith("# add_layernorm 128x64 float32 on interpreter")
    assert "| measured configs | 12 (1 failed) |" in text
    assert f"| heuristic (default) config | `{heuristic}`: " in text
    assert f"`{run.result.config.key()}`: 1 ms" in text and "2x PyTorch eager" in text
    assert "## Fastest 10 of 11 measured configs" in text
    assert "WrongResult: relative error 0.5" in text
    for knob in ("block_rows", "num_warps", "eviction_policy"):  # the knobs that varied
        assert f"| {knob} | " in text
    assert f"({stem}_progress.png)" in text
    index = (out / "index.md").read_text()
    assert f"[add_layernorm 128x64 float32 on interpreter]({stem}.md) | 12 |" in index


def test_report_guards_studies_with_few_or_no_trials(tmp_path):
    storage = optuna.storages.get_storage(f"sqlite:///{tmp_path}/r.db")
    fill_study(storage, measured=3, confirm=False)
    data = load_study_data(storage, STUDY)
    assert data.importances is None and "at least 5" in data.importance_note
    [page] = write_report(storage, tmp_path / "report", study=STUDY)
    text = page.read_text()
    assert "not computed: 3 complete trials, at least 5 are needed" in text
    assert "the search has not finished" in text
    assert sorted(path.name.rsplit("_", 1)[-1] for path in (tmp_path / "report").glob("*.png")) == \
        ["distribution.png", "progress.png"]

    optuna.create_study(study_name="empty", storage=storage)
    [empty] = write_report(storage, tmp_path / "empty", study="empty")
    assert "| measured configs | 0 (0 failed) |" in empty.read_text()
    assert not list((tmp_path / "empty").glob("*.png"))


def test_cli_report(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/r.db"
    fill_study(url, measured=6)
    out = tmp_path / "report"
    assert cli.main(["report", "--storage", url, "--out", str(out)]) == 0
    assert f"start at {out / 'index.md'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "--storage", url, "--study", "nope", "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"no study 'nope' in the storage; studies: {STUDY}" in capsys.readouterr().err


def test_optuna_dashboard_reads_a_tuner_storage(tmp_path):
    dashboard = pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed")
    storage = optuna.storages.get_storage(f"sqlite:///{tmp_path}/r.db")
    run = fill_study(storage, measured=6)
    app = dashboard.wsgi(storage)

    def get(path: str) -> dict:
        environ: dict = {}
        setup_testing_defaults(environ)
        environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
        status = []
        body = b"".join(app(environ, lambda line, headers, exc_info=None: status.append(line)))
        assert status == ["200 OK"], body[:500]
        return json.loads(body)

    [summary] = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == STUDY
    attrs = {item["key"]: item["value"] for item in summary["user_attrs"]}
    assert attrs["kernel"] == "add_layernorm" and attrs["dtype"] == "float32"
    assert attrs["heuristic_config"] == SPEC.heuristic(PROBLEM).key()
    assert json.loads(attrs["result"])["config"] == run.result.config.as_dict()
    detail = get(f"/api/studies/{summary['study_id']}")
    assert len(detail["trials"]) == 6
    trial_attrs = {item["key"] for item in detail["trials"][0]["user_attrs"]}
    assert {"config", "gbps", "pct_of_copy", "compile_s", "worker"} <= trial_attrs
    assert set(detail["trials"][0]["params"][0]) >= {"name", "param_internal_value"}


def test_progress_bar_lines_and_quiet():
    run = fill_study(optuna.storages.InMemoryStorage(), measured=4, confirm=False)
    run.settings.trials = 10  # four of ten measured, the study still searching

    stream = io.StringIO()
    bar = Progress(stream=stream, bar=True)
    bar.update([run], busy=1, workers=2)
    bar.close()
    shown = stream.getvalue()
    assert "tuning" in shown and "4/10" in shown and "GPUs busy 1/2" in shown
    assert f"best {run.best[0]:.4g} ms {run.best[1]}" in shown

    stream = io.StringIO()  # not a terminal: status lines
    Progress(stream=stream).update([run], busy=1, workers=2, force=True)
    assert "studies 0/1 done" in stream.getvalue() and "4/10 measured" in stream.getvalue()

    stream = io.StringIO()
    Progress(stream=stream, bar=True, quiet=True).update([run], busy=1, workers=2, force=True)
    assert stream.getvalue() == ""


def test_routine_library_notices_are_hidden_and_real_warnings_kept():
    quiet_library_noise()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("Token authentication is enabled for this Ray cluster. Set ...")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone ...")
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage()[:34] for record in records] == ["Token authentication is disabled f"]
    with warnings.catch_warnings(record=True) as caught:
        quiet_library_noise()
        warnings.warn("multivariate is experimental", optuna.exceptions.ExperimentalWarning)
        warnings.warn("a real problem", UserWarning)
    assert [str(warning.message) for warning in caught] == ["a real problem"]
