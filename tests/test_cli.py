"""The command line (tuner.cli): bad input exits 2 with a one-line message before any Ray
cluster starts, a bug keeps its traceback, and the Ray address is taken from the flag or the
environment."""

from __future__ import annotations

import pytest

from tuner import cli, runner


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the CLI would start (or join) a Ray cluster."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("bad input must be rejected before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    captured = capsys.readouterr()
    return raised.value.code, captured.err


@pytest.mark.parametrize("argv,match", [
    (["search", "--shape", "12x", "--interpret"], "bad shape '12x'"),
    (["search", "--shape", "0x64", "--interpret"], "every dim must be >= 1"),
    (["search", "--shape", "128x64", "--dtype", "float64", "--interpret"],
     "unknown dtype 'float64'; accepted: float32, float16, bfloat16"),
    (["search", "--shape", "128x64", "--kernel", "softmax", "--interpret"], "unknown kernel 'softmax'"),
    (["search", "--shape", "128x64", "--storage", "notaurl", "--interpret"],
     "notaurl"),
    (["search", "--shape", "128x64", "--storage", "foo://x", "--interpret"],
     "cannot open --storage foo://x"),
    (["search", "--shape", "128x64", "--trials", "0", "--interpret"],
     "argument --trials: expected a positive int, got '0'"),
    (["search", "--shape", "128x64", "--trials", "many", "--interpret"],
     "argument --trials: expected a positive int, got 'many'"),
    (["search", "--shape", "128x64", "--trial-timeout", "-1", "--interpret"],
     "argument --trial-timeout: expected a positive float"),
    (["search", "--interpret"], "the following arguments are required: --shape"),
    (["search", "--shape", "128x64", "--table", "t.json", "--out", "tables", "--interpret"],
     "give --table FILE or --out FOLDER, not both"),
    (["sweep", "--interpret"], "give one of --spec FILE, --shapes A,B"),
    (["sweep", "--spec", "x.yaml", "--shapes", "128x64", "--interpret"],
     "give one of --spec FILE, --shapes A,B"),
    (["sweep", "--shapes", "128x64,40x", "--interpret"], "command line: bad shape '40x'"),
    (["sweep", "--shapes", "128x64", "--dtypes", "float32,int8", "--interpret"],
     "command line: unknown dtype 'int8'"),
    (["sweep", "--shapes", "128x64", "--kernel", "softmax", "--interpret"],
     "unknown kernel 'softmax'"),
    (["sweep", "--spec", "does/not/exist.yaml", "--interpret"], "cannot read sweep spec"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_cli_bad_input_exits_2(argv, match, capsys, no_ray):
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert match in err and "Traceback" not in err


def test_cli_bad_space_exits_2(tmp_path, capsys, no_ray):
    path = tmp_path / "space.yaml"
    path.write_text("kernel: add_layernorm\nparameters: {}\nextra: 1\n")
    code, err = run_cli(["search", "--shape", "128x64", "--interpret", "--space", str(path),
                         "--storage", f"sqlite:///{tmp_path}/t.db"], capsys)
    assert code == 2
    assert f"{path}: unknown keys ['extra']" in err


def test_cli_bad_spec_exits_2(tmp_path, capsys, no_ray):
    path = tmp_path / "sweep.yaml"
    path.write_text("shapes: [128x64]\ndtypes: [float32]\ntrials: 0\n")
    code, err = run_cli(["sweep", "--spec", str(path), "--interpret"], capsys)
    assert code == 2
    assert err == f"tuner: error: {path}: trials: must be positive, got 0\n"


def test_cli_without_an_address_runs_no_ray(monkeypatch):
    """No cluster named: local worker processes, not a Ray cluster of our own."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    args = cli.build_parser().parse_args(["search", "--shape", "128x64"])
    assert not runner.use_ray(args)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert runner.use_ray(args)


@pytest.mark.parametrize("argv,env,address", [
    (["--address", "auto"], None, "auto"),
    (["--address", "10.0.0.1:6379"], "ignored:1", "10.0.0.1:6379"),
    ([], "10.0.0.2:6379", "10.0.0.2:6379"),  # set by Ray Jobs
])
def test_cli_ray_address(argv, env, address, tmp_path, monkeypatch):
    import ray

    class Started(BaseException):  # not an Exception: the CLI would report it as a Ray error
        pass

    calls = []
    monkeypatch.setattr("tuner.preflight.check_address", lambda address, timeout: None)

    def init(**kwargs):
        calls.append(kwargs)
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    with pytest.raises(Started):
        cli.main(["search", "--shape", "128x64", "--interpret",
                  "--storage", f"sqlite:///{tmp_path}/t.db", *argv])
    assert calls[0]["address"] == address


def test_a_bug_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """Only input errors become one-line messages: any other ValueError keeps its traceback."""
    def broken(path, stream):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr("tuner.export.show_table", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["show", "--table", str(tmp_path / "t.json")])
