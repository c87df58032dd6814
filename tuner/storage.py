"""Opening Optuna storages safely: URL checks, writability, concurrent creation, heartbeats,
read-only opening for export/show, and passwords kept out of every message."""

from __future__ import annotations

import re
import tempfile
import time
import warnings
from pathlib import Path

import filelock
import optuna

from .errors import InputError

# A claimed trial's driver records a heartbeat this often; a claim whose heartbeat is older
# than the grace period is failed by any other driver and its config measured again.
HEARTBEAT_INTERVAL_S = 5
GRACE_PERIOD_S = 30
# Schema creation by several drivers at once may still collide on databases without a shared
# file lock (PostgreSQL, MySQL across hosts): retry this many times.
CREATE_ATTEMPTS = 5

_URL = re.compile(r"^[a-z][a-z0-9+]*://")
_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)


class StorageError(InputError):
    """A storage URL that is malformed, missing, unreachable or not writable."""


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _PASSWORD.sub(lambda match: match.group("head") + "***@", str(text))


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; None for other URLs and in-memory SQLite."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_writable_folder(folder: Path, what: str) -> None:
    """Raises StorageError unless a file can be created in ``folder`` (created if missing).

    A real write, not ``os.access``: that answers for root as if nothing were read-only.
    """
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise StorageError(f"{what}: {parent} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".tuner-write-check-"):
            pass
    except OSError as error:
        raise StorageError(f"{what}: cannot write in folder {folder}: "
                           f"{error.strerror or type(error).__name__}") from None


def _check_sqlite_writable(path: Path, url: str) -> None:
    # SQLite writes a journal next to the database, so the folder must be writable too.
    check_writable_folder(path.parent if str(path.parent) else Path("."),
                          f"--storage {redact(url)}")
    if path.exists():
        try:
            with open(path, "r+b"):
                pass
        except OSError as error:
            raise StorageError(f"--storage {redact(url)}: database file {path} is not writable: "
                               f"{error.strerror or type(error).__name__}") from None


def _sqlite_write_ahead_log() -> None:
    """SQLite storages journal ahead (WAL) and sync at checkpoints: a trial's commit costs a
    third as much, and a committed trial still survives the process being killed."""
    import sqlalchemy

    if getattr(_sqlite_write_ahead_log, "installed", False):
        return

    @sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "connect")
    def _pragmas(connection, _record) -> None:
        if type(connection).__module__.startswith("sqlite3"):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    _sqlite_write_ahead_log.installed = True


def _rdb(url: str, **kwargs) -> optuna.storages.RDBStorage:
    if url.startswith("sqlite:"):
        _sqlite_write_ahead_log()
    with warnings.catch_warnings():  # heartbeats are marked experimental; we rely on them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, **kwargs)


def open_storage(url: str, *, readonly: bool = False) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``, checked before any trial runs.

    For writing (``readonly=False``): SQLite's file and folder must be writable, the schema is
    created once even when several drivers start at the same moment, and trials get heartbeats
    so that claims of a dead driver expire. For reading: the database must already exist and
    is never created or migrated.
    """
    if not isinstance(url, str) or not _URL.match(url):
        raise StorageError(f"bad --storage {redact(str(url))!r}: expected an Optuna storage URL "
                           "such as sqlite:///tuner.db, postgresql://user:pass@host/db or "
                           "mysql://...")
    path = sqlite_path(url)
    if readonly:
        if path is not None and not path.is_file():
            raise StorageError(f"--storage {redact(url)}: no such database file {path}")
        return _attempt(url, lambda: _rdb(url, skip_table_creation=True))
    if path is not None:
        _check_sqlite_writable(path, url)

    def create() -> optuna.storages.RDBStorage:
        return _rdb(url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S)

    if path is None:
        return _attempt(url, create, retries=CREATE_ATTEMPTS)
    # Optuna creates the schema and stamps its version in separate steps; two drivers racing
    # on a new file fail with an IntegrityError on alembic_version. One at a time, per file.
    with filelock.FileLock(str(path) + ".lock"):
        return _attempt(url, create)


def _attempt(url: str, open_it, retries: int = 1) -> optuna.storages.BaseStorage:
    attempt = 0
    while True:
        attempt += 1
        try:
            return open_it()
        except Exception as error:  # SQLAlchemy, drivers and Optuna raise many kinds
            if attempt < retries and _creation_race(error):
                time.sleep(0.2 * attempt)
                continue
            hint = ("; install its database driver or name one in the URL, such as "
                    "postgresql+psycopg://... (pip install the [postgres] extra)" if isinstance(error, ImportError) else "")
            raise StorageError(f"cannot open --storage {redact(url)}: "
                               f"{type(error).__name__}: {one_line(error)}{hint}") from None


def _creation_race(error: BaseException) -> bool:
    """Whether another driver was creating the schema at the same moment."""
    text = f"{type(error).__name__} {error}"
    return "IntegrityError" in text or "already exists" in text or "DuplicateTable" in text


def one_line(error: BaseException) -> str:
    """The first line of an error's message, passwords redacted."""
    text = str(error).strip()
    return redact(text.splitlines()[0] if text else "")


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Closes a storage's database connections; SQLite then folds its write-ahead log back
    into the database file, so that the file alone holds every trial."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()
