"""Random bad input for every parser the tuner has: mutations of valid shapes, dtypes, search
spaces, sweep specs, tables, storage URLs and command lines, and how each was answered
(benchmarks/reliability.py puts the tally in RELIABILITY.md)."""

from __future__ import annotations

import contextlib
import io
import random
import string
from pathlib import Path

from kernels import load_table
from tuner.problems import KERNELS, get_kernel

ROOT = Path(__file__).resolve().parents[1]


def mutate(text: str, rng: random.Random) -> str:
    """A few random edits: deleted, inserted or replaced characters."""
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(chars) + 1)
        edit = rng.choice(("delete", "insert", "replace"))
        if edit == "delete" and where < len(chars):
            del chars[where]
        elif edit == "insert":
            chars.insert(where, rng.choice(string.printable))
        elif where < len(chars):
            chars[where] = rng.choice(string.printable)
    return "".join(chars)


def answer(call) -> str:
    """How a parser answered: accepted, the ValueError/TypeError it raised, or a traceback."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            value = call()
    except (ValueError, TypeError) as error:
        return type(error).__name__
    except SystemExit as exited:
        return f"exit {exited.code}"
    except BaseException as error:  # what must never happen
        return f"TRACEBACK {type(error).__name__}"
    return f"exit {value}" if isinstance(value, int) else "accepted"


def bad_inputs(count: int, tmp: Path, space_yaml: str, table_text: str) -> dict[str, dict[str, int]]:
    """Per input class, how ``count`` random mutations of a valid input were answered."""
    from tuner import cli
    from tuner.problems.base import parse_dtype
    from tuner.space import load_space
    from tuner.storage import open_storage
    from tuner.sweep import load_spec

    rng = random.Random(0)
    spec_text = (ROOT / "search_spaces" / "sweeps" / "transformer_hidden.yaml").read_text()
    kernels = sorted(KERNELS)

    def with_file(name: str, text: str, reader):
        path = tmp / name
        path.write_text(text)
        return lambda: reader(path)

    def cli_argv() -> list[str]:
        flags = ["--shape", "--dtype", "--kernel", "--trials", "--timeout", "--workers", "--seed",
                 "--connect-timeout", "--shapes", "--dtypes", "--bogus", "--trial-timeout"]
        argv = [rng.choice(["search", "sweep", "export", "show", "nope"])]
        for _ in range(rng.randint(0, 4)):
            argv += [rng.choice(flags), mutate(rng.choice(["128x64", "8", "float32", "x"]), rng)]
        return argv + ["--storage", "bad"] if argv[0] != "show" else argv

    classes = {
        "shape strings": lambda: (lambda shape=mutate(rng.choice(["128x64", "2x3x4x4x8",
                                  "99999999999x64", "32x32x16x32x32x64"]), rng):
                                  get_kernel(rng.choice(kernels)).problem(shape, "float32")),
        "dtypes": lambda: (lambda dtype=mutate(rng.choice(["float32", "bfloat16", "float16"]), rng):
                           parse_dtype(dtype)),
        "search-space YAML": lambda: with_file("space.yaml", mutate(space_yaml, rng), load_space),
        "sweep-spec YAML": lambda: with_file("spec.yaml", mutate(spec_text, rng), load_spec),
        "table JSON": lambda: with_file("table.json", mutate(table_text, rng), load_table),
        "storage URLs": lambda: (lambda url=mutate(rng.choice([f"sqlite:///{tmp}/none.db",
                                 "postgresql://u:pw@h/db", "mysql://h/db"]), rng):
                                 open_storage(url, readonly=True)),
        "CLI flags": lambda: (lambda argv=cli_argv(): cli.main(argv)),
    }
    tally: dict[str, dict[str, int]] = {}
    for name, make in classes.items():
        counts: dict[str, int] = {}
        for _ in range(count):
            outcome = answer(make())
            counts[outcome] = counts.get(outcome, 0) + 1
        tally[name] = counts
    return tally
