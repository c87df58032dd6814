"""The lookup table of tuned launch configs: schema, load, lookup and atomic merge.

A table is a JSON file::

    {"schema_version": 1,
     "entries": [{"kernel": "add_layernorm", "device": "NVIDIA H100 80GB HBM3",
                  "dtype": "bfloat16", "width": 64, "variant": "", "rows": 4194304,
                  "config": {"block_rows": 64, "block_w": 64, "num_warps": 16, ...},
                  "ms": 0.36, "gbps": 2990.0, "pct_of_copy": 99.1, "trials": 48,
                  "compute_capability": "9.0", "torch": "2.11.0", "triton": "3.6.0",
                  "date": "2026-11-25"}, ...]}

An entry is keyed by (kernel, device, dtype, width, variant, rows). ``variant`` names whatever
else a kernel needs to match exactly (empty for add+LayerNorm). Lookup takes the exact entry,
else the entry with the nearest row count in log2 for the same other keys. A table measured on
one GPU model is never applied to another: device names must match exactly.

The runtime never fails on a bad table: a file that cannot be read or an entry that does not
validate is skipped with one warning (:func:`read_table_leniently`); the CLI reads tables with
:func:`load_table`, which raises :class:`TableError` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import filelock

from .config import LaunchConfig
from .misses import missed_problems_logged, record_miss

SCHEMA_VERSION = 1
SHIPPED_TABLES_DIR = Path(__file__).parent / "tables"
TABLE_ENV = "TUNER_TABLE"
_KEY_FIELDS = ("kernel", "device", "dtype", "width", "variant", "rows")
_REQUIRED = ("kernel", "device", "dtype", "width", "rows", "config")
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "variant": str, "ms": (int, float), "gbps": (int, float), "pct_of_copy": (int, float),
    "trials": int, "compute_capability": str, "torch": str, "triton": str, "date": str,
}


class TableError(ValueError):
    """A table file that cannot be read: corrupt JSON, unknown schema or a bad entry."""


class TableWarning(UserWarning):
    """A bad table file or entry that the runtime skipped."""


# Problems already warned about in this process: each is reported once, not per reload.
_warned: set[str] = set()


@dataclasses.dataclass(frozen=True)
class TableEntry:
    """One tuned config with its provenance."""

    kernel: str
    device: str
    dtype: str
    width: int
    rows: int
    config: LaunchConfig
    variant: str = ""
    ms: float | None = None
    gbps: float | None = None
    pct_of_copy: float | None = None
    trials: int | None = None
    compute_capability: str = ""
    torch: str = ""
    triton: str = ""
    date: str = ""

    @property
    def key(self) -> tuple:
        return tuple(getattr(self, name) for name in _KEY_FIELDS)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.as_dict()
        return {name: value for name, value in data.items() if value is not None}


def user_table_path() -> Path:
    """Where ``tuner`` writes tables by default and the runtime looks after TUNER_TABLE."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tuner" / "table.json"


def _entry_from_json(data: Any, where: str) -> TableEntry:
    if not isinstance(data, dict):
        raise TableError(f"{where}: an entry must be an object, got {type(data).__name__}")
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise TableError(f"{where}: entry is missing {missing}")
    unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise TableError(f"{where}: unknown entry keys {sorted(unknown)}")
    for name in ("kernel", "device", "dtype"):
        if not isinstance(data[name], str) or not data[name]:
            raise TableError(f"{where}: {name} must be a non-empty string, got {data[name]!r}")
    for name in ("width", "rows"):
        if not isinstance(data[name], int) or isinstance(data[name], bool) or data[name] < 1:
            raise TableError(f"{where}: {name} must be a positive integer, got {data[name]!r}")
    for name, kind in _OPTIONAL.items():
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            raise TableError(f"{where}: {name} has the wrong type: {data[name]!r}")
    if not isinstance(data["config"], dict):
        raise TableError(f"{where}: config must be an object")
    try:
        config = LaunchConfig.from_dict(data["config"])
    except (TypeError, ValueError) as error:
        raise TableError(f"{where}: bad config: {error}") from None
    return TableEntry(**{**data, "config": config})


def _parse_table(path: Path) -> tuple[list[TableEntry], list[str]]:
    """The valid entries of a table file and one message per problem (file-level problems
    leave no entries); a missing file is an empty table."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], []
    except (OSError, UnicodeDecodeError) as error:
        return [], [f"table {path} cannot be read: {error}"]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return [], [f"table {path} is not valid JSON: {error}"]
    if not isinstance(data, dict) or "schema_version" not in data:
        return [], [f"table {path} has no schema_version; is it a tuner table?"]
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version != SCHEMA_VERSION:
        return [], [f"table {path} has schema_version {data['schema_version']!r}; "
                    f"this version of kernels reads schema_version {SCHEMA_VERSION}"]
    entries = data.get("entries")
    if not isinstance(entries, list):
        return [], [f"table {path}: 'entries' must be a list"]
    good, problems = [], []
    for index, entry in enumerate(entries):
        try:
            good.append(_entry_from_json(entry, f"table {path}, entry {index}"))
        except TableError as error:
            problems.append(str(error))
    return good, problems


def load_table(path: str | os.PathLike) -> list[TableEntry]:
    """Reads and validates a table file; a missing file is an empty table and any problem
    (bad JSON, schema or entry) is a TableError naming the file."""
    entries, problems = _parse_table(Path(path))
    if problems:
        raise TableError(problems[0] + (f" (and {len(problems) - 1} more problems)"
                                        if len(problems) > 1 else ""))
    return entries


def read_table_leniently(path: str | os.PathLike) -> list[TableEntry]:
    """The valid entries of a table file, for the runtime: a bad file or bad entries are
    skipped with one warning per process naming the file and the problem, so that one broken
    table never stops a kernel call (the CLI uses :func:`load_table`, which raises instead)."""
    entries, problems = _parse_table(Path(path))
    if problems:
        what = "these entries" if entries or ", entry " in problems[0] else "this file"
        message = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        if message not in _warned:
            _warned.add(message)
            warnings.warn(f"{message}. Skipping {what}: the next table or the default config "
                          "is used instead", TableWarning, stacklevel=2)
    return entries


def merge_entries(path: str | os.PathLike, entries: Iterable[TableEntry]) -> int:
    """Merges entries into the table at ``path`` atomically; returns the number of entries.

    An entry replaces the one with the same key. Writers are serialised by a lock file and
    the new table is written to a temporary file and renamed over the old, so readers see the
    old table or the new one and concurrent writers lose nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        merged = {entry.key: entry for entry in load_table(path)}
        merged.update((entry.key, entry) for entry in entries)
        ordered = sorted(merged.values(), key=lambda entry: tuple(map(str, entry.key[:-1])) + (entry.rows,))
        document = {"schema_version": SCHEMA_VERSION,
                    "entries": [entry.to_json() for entry in ordered]}
        handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".",
                                             suffix=".tmp", delete=False)
        try:
            with handle:
                json.dump(document, handle, indent=1)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(handle.name, 0o644)  # NamedTemporaryFile is private; a table is for everyone
            os.replace(handle.name, path)
        except BaseException:
            os.unlink(handle.name)
            raise
    reload_tables()
    return len(ordered)


def table_paths() -> list[Path]:
    """The tables the runtime reads, first match wins: TUNER_TABLE (os.pathsep-separated
    files), then the user's table, then those shipped in ``kernels/tables/``."""
    paths = [Path(part) for part in os.environ.get(TABLE_ENV, "").split(os.pathsep) if part]
    paths.append(user_table_path())
    paths.extend(sorted(SHIPPED_TABLES_DIR.glob("*.json")))
    return paths


class _Index:
    """Entries grouped by everything but rows, each group sorted by log2(rows)."""

    def __init__(self, entries: Iterable[TableEntry]) -> None:
        self._groups: dict[tuple, dict[int, LaunchConfig]] = {}
        for entry in entries:
            group = self._groups.setdefault(entry.key[:-1], {})
            group.setdefault(entry.rows, entry.config)  # earlier tables take precedence

    def nearest(self, group_key: tuple, rows: int) -> list[tuple[int, LaunchConfig]]:
        """The group's entries, nearest row count (in log2) first."""
        group = self._groups.get(group_key, {})
        order = sorted(group, key=lambda candidate: (abs(math.log2(candidate) - math.log2(rows)),
                                                     -candidate))
        return [(candidate, group[candidate]) for candidate in order]

    def lookup(self, group_key: tuple, rows: int) -> tuple[LaunchConfig, str] | None:
        found = self.nearest(group_key, rows)
        if not found:
            return None
        nearest_rows, config = found[0]
        return config, "table" if nearest_rows == rows else f"table (nearest: rows={nearest_rows})"


@functools.lru_cache(maxsize=1)
def _index() -> _Index:
    entries: list[TableEntry] = []
    for path in table_paths():
        entries.extend(read_table_leniently(path))
    return _Index(entries)


@functools.lru_cache(maxsize=4096)
def _cached_lookup(kernel: str, device: str, dtype: str, width: int, rows: int,
                   variant: str) -> tuple[LaunchConfig, str] | None:
    return _index().lookup((kernel, device, dtype, width, variant), max(rows, 1))


def lookup_config(kernel: str, device: str, dtype: str, width: int, rows: int, *,
                  heuristic: Callable[[], LaunchConfig], variant: str = "",
                  miss: Callable[[], tuple[str, str] | None] | None = None,
                  ) -> tuple[LaunchConfig, str]:
    """The table's config for a problem (exact, else nearest rows), else ``heuristic()``.

    Tables are read once and the answer is cached; call :func:`reload_tables` after the
    files change. ``miss()`` names the problem as the tuner does, ``(kernel, shape)`` (None:
    the tuner cannot tune it): called only when there is no exact entry, to log the miss for
    ``tuner sweep --misses`` (see :mod:`kernels.misses`).
    """
    found = _cached_lookup(kernel, device, dtype, width, rows, variant)
    if found is not None and found[1] == "table":
        return found
    if miss is not None and missed_problems_logged():
        named = miss()
        if named is not None:
            record_miss(named[0], device, dtype, named[1])
    if found is not None:
        return found
    return heuristic(), "heuristic"


def nearest_rows(kernel: str, device: str, dtype: str, width: int, rows: int, *,
                 variant: str = "") -> int | None:
    """The row count of the table entry nearest to ``rows`` (in log2) for the same device,
    dtype, width and variant, or None when the tables have none."""
    found = _index().nearest((kernel, device, dtype, width, variant), max(rows, 1))
    return found[0][0] if found else None


def nearest_configs(kernel: str, device: str, dtype: str, width: int, rows: int, *,
                    variant: str = "", count: int = 3) -> list[LaunchConfig]:
    """Up to ``count`` distinct table configs for the same device, dtype and width, nearest
    row count first (the tuner seeds its search with them)."""
    configs: list[LaunchConfig] = []
    for _, config in _index().nearest((kernel, device, dtype, width, variant), max(rows, 1)):
        if config not in configs:
            configs.append(config)
    return configs[:count]


# What else remembers lookups (the wrappers' chosen configs), forgotten with the tables.
_reload_callbacks: list[Callable[[], None]] = []


def on_reload(callback: Callable[[], None]) -> None:
    """Calls ``callback`` whenever :func:`reload_tables` runs (a cache of lookups clears)."""
    _reload_callbacks.append(callback)


def reload_tables() -> None:
    """Forgets the cached tables and lookups, so the next lookup reads the files again (and
    the runtime reads TUNER_AUTOTUNE and TUNER_MISS_LOG again for every call signature)."""
    _index.cache_clear()
    _cached_lookup.cache_clear()
    for callback in _reload_callbacks:
        callback()
