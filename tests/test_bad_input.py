"""Property-based bad input: whatever a user types or a file holds, the API answers with a
ValueError (or TypeError) and the CLI with exit status 2 and one line, never a traceback or a hang.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kernels import TableError, load_table
from tuner import cli
from tuner.problems import KERNELS, get_kernel
from tuner.problems.base import parse_dtype
from tuner.space import SpaceError, parse_space
from tuner.storage import StorageError, open_storage, redact
from tuner.sweep import SpecError, parse_spec

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
SCRATCH = Path(tempfile.mkdtemp(prefix="tuner-bad-input-"))

# JSON/YAML-like values, nested a little: what a hand-edited file may hold.
scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=4), max_leaves=12)
shape_texts = st.text(alphabet="0123456789x X-+.,e_", max_size=16) | st.text(max_size=12)


@FAST
@given(kernel=st.sampled_from(sorted(KERNELS)), shape=shape_texts)
def test_shape_strings(kernel, shape):
    try:
        problem = get_kernel(kernel).problem(shape, "float32")
    except ValueError:
        return
    assert all(isinstance(dim, int) and dim >= 1 for dim in problem.shape)


@FAST
@given(text=st.text(max_size=20))
def test_dtypes(text):
    try:
        parse_dtype(text)
    except ValueError as error:
        assert "accepted: float32, float16, bfloat16" in str(error)


def knob_values():
    return st.lists(st.integers(-4, 300) | st.text(max_size=6) | st.none(), max_size=4) | scalars


@FAST
@given(data=documents | st.fixed_dictionaries({
    "kernel": st.sampled_from(sorted(KERNELS)) | st.text(max_size=6),
    "parameters": st.fixed_dictionaries({}, optional={name: knob_values() for name in (
        "block_rows", "block_w", "num_warps", "num_stages", "eviction_policy", "extra")}),
    "restrictions": documents}))
def test_yaml_spaces(data):
    try:
        parse_space(data)
    except (SpaceError, ValueError, TypeError):
        pass


@FAST
@given(data=documents | st.fixed_dictionaries({}, optional={
    "kernels": documents, "shapes": st.lists(shape_texts, max_size=3) | documents,
    "dtypes": st.lists(st.sampled_from(["float32", "bfloat16", "int8", ""]), max_size=3),
    "trials": scalars, "patience": scalars, "timeout": scalars}))
def test_sweep_specs(data):
    try:
        parse_spec(data)
    except (SpecError, ValueError, TypeError):
        pass


@FAST
@given(data=documents | st.fixed_dictionaries({"schema_version": st.just(1) | scalars,
                                               "entries": st.lists(documents, max_size=3)}),
       raw=st.booleans(), text=st.text(max_size=30))
def test_table_json(data, raw, text):
    path = SCRATCH / "table.json"
    path.write_text(text if raw else json.dumps(data))
    try:
        load_table(path)
    except TableError:
        pass


@FAST
@given(url=st.text(max_size=30) | st.builds(
    str.__add__, st.sampled_from(["sqlite:///", "sqlite://", "nosuchdb://", "postgresql://u:pw@",
                                  "file:///"]), st.text(alphabet=string.printable, max_size=20)))
def test_storage_urls(url):
    """Read-only opening never creates a database and answers a bad URL with StorageError."""
    try:
        open_storage(url, readonly=True)
    except StorageError as error:
        assert "pw@" not in str(error)  # the password is redacted


@pytest.mark.parametrize("text,shown", [
    ("postgresql://tuner:s3cr3t@db.example:5432/tuner", "postgresql://tuner:***@db.example:5432/tuner"),
    ("cannot open mysql+pymysql://a:b@h/db: x", "cannot open mysql+pymysql://a:***@h/db: x"),
    ("sqlite:///tuner.db", "sqlite:///tuner.db"),
    ("postgresql://user@host/db", "postgresql://user@host/db")])
def test_redact(text, shown):
    assert redact(text) == shown


flag_values = st.text(alphabet=string.ascii_letters + string.digits + "x-_.:/ ", max_size=14)


@settings(max_examples=40, deadline=None)
@given(command=st.sampled_from(["search", "sweep", "export", "show"]),
       flags=st.lists(st.tuples(st.sampled_from([
           "--shape", "--dtype", "--kernel", "--trials", "--timeout", "--patience", "--workers",
           "--trial-timeout", "--connect-timeout", "--seed", "--shapes", "--dtypes", "--spec",
           "--space", "--device", "--compile-processes", "--bogus"]), flag_values), max_size=5))
def test_cli_flags(command, flags):
    """Every run is pointed at a bad storage URL, so no input can start a real search."""
    argv = [command]
    for flag, value in flags:
        argv += [flag, value]
    argv += {"search": ["--shape", "8x8", "--storage", "bad", "--table", str(SCRATCH / "t.json")],
             "sweep": ["--storage", "bad", "--out", str(SCRATCH / "out")],
             "export": ["--storage", "bad", "--out", str(SCRATCH / "x.json")],
             "show": ["--table", str(SCRATCH / "shown.json")]}[command]
    try:
        code = cli.main(argv)
    except SystemExit as exited:
        code = exited.code
    assert code in (0, 2)
