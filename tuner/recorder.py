"""A driver's recorder: a process of its own that writes the driver's claims and measurements
to a shared storage, so that the dispatch loop never waits on the database.

On an SQL storage a trial costs the driver tens of milliseconds of ORM work (its claim, then
each attribute and the state of its measurement, each a transaction): as long as a fast trial
on a GPU, so a driver feeding several GPUs spent its time on the storage while the GPUs waited
(BENCHMARKS.md). With a recorder the driver proposes, sends and learns in memory, and hands
the writes over; they happen in order, in the recorder, on another core.

What stays true: each measured config is claimed in the storage before its result is written,
so concurrent drivers still split a study's configs (tuner.claims), and a lost claim's
measurement is dropped, not stored twice. What changes: a claim is made while its config is
already being measured, so a driver learns that it lost a race (another driver claimed the
config first) after the fact (:meth:`RecordedClaims.lost_keys`), and that config has been
measured twice, once recorded. A recorder that falls behind writes a claim and its
measurement in one transaction. Writes not flushed when the driver is killed are lost with
it, like its trials in flight: their configs are measured again on resume.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing.connection
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .claims import ClaimBook
from .storage import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, _rdb

# Seconds a driver waits at the end of its run for the recorder to write what it was given.
FLUSH_TIMEOUT_S = 120.0


class RecorderError(RuntimeError):
    """The recorder could not write to the storage (or died)."""


def storage_url(storage: Any) -> str | None:
    """The URL of an SQL storage (a URL, which tuner.storage opens as one, or an RDBStorage,
    through Optuna's cache or not), None for others."""
    if isinstance(storage, str):
        return storage
    backend = getattr(storage, "_backend", storage)
    return backend.url if isinstance(backend, optuna.storages.RDBStorage) else None


class Recorder:
    """The recorder process of one driver, for the SQL storage at ``url``."""

    def __init__(self, url: str, heartbeat_interval: int | None, grace_period: int | None) -> None:
        # A fresh interpreter (`python -m tuner.recorder`), not a fork of this process, whose
        # Ray threads may hold locks, nor multiprocessing's spawn, which re-runs the user's
        # script; requests and replies go over a socket pair.
        ours, theirs = socket.socketpair()
        # It imports this very package, wherever this process found it.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tuner.recorder", str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path})
        theirs.close()
        self._connection = multiprocessing.connection.Connection(ours.detach())
        # The URL goes over the socket, not the command line, where `ps` would show a password.
        self._connection.send((url, heartbeat_interval, grace_period))
        # Requests are sent by a thread of their own, so that the dispatch loop never blocks
        # on a full socket.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._send_requests, daemon=True, name="tuner-recorder-send").start()
        self._tokens = itertools.count()
        self._lost: dict[int, set[str]] = collections.defaultdict(set)  # study id -> keys
        self._flushes = itertools.count()
        self._flushed = -1
        self._error: str | None = None
        self._changed = threading.Condition()
        # Replies are read by a thread of their own: the dispatch loop only looks at what it
        # has read (no system call a trial), and a flush waits on it.
        threading.Thread(target=self._read_replies, daemon=True, name="tuner-recorder-replies").start()

    @classmethod
    def for_storage(cls, storage: Any) -> Recorder | None:
        """A recorder for ``storage`` if it is an SQL one (others are fast in memory)."""
        url = storage_url(storage)
        if url is None:
            return None
        if isinstance(storage, str):  # opened by tuner.storage.open_storage, with its heartbeats
            return cls(url, HEARTBEAT_INTERVAL_S, GRACE_PERIOD_S)
        backend = getattr(storage, "_backend", storage)
        return cls(url, backend.heartbeat_interval, backend.grace_period)

    def book(self, claims: ClaimBook) -> RecordedClaims:
        """``claims`` (a study run's book, in this process) with its writes made here."""
        return RecordedClaims(self, claims)

    def send(self, *request: Any) -> None:
        self._outbox.put(request)

    def new_token(self) -> int:
        return next(self._tokens)

    def lost_keys(self, study_id: int) -> set[str]:
        """Configs of the study whose claims lost a race, learnt since the last call; raises
        RecorderError once a write has failed."""
        with self._changed:
            if self._error is not None:
                raise RecorderError(f"writing to the storage failed: {self._error}")
            return self._lost.pop(study_id, set())

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Waits until everything sent so far is written; raises RecorderError if it cannot be."""
        number = next(self._flushes)
        self.send("flush", number)
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._flushed < number and self._error is None:
                if self._process.poll() is not None:
                    raise RecorderError("the recorder process died; the trials it had not "
                                        "written are measured again on resume")
                if time.monotonic() > deadline:
                    raise RecorderError("the storage did not take the run's trials in "
                                        f"{timeout:g} s")
                self._changed.wait(timeout=1.0)
            if self._error is not None:
                raise RecorderError(f"writing to the storage failed: {self._error}")

    def close(self) -> None:
        """Writes what is left, then ends the process."""
        try:
            if self._process.poll() is None:
                self.flush()
        finally:
            self.send("stop")
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _send_requests(self) -> None:
        while True:
            request = self._outbox.get()
            try:
                self._connection.send(request)
            except OSError:  # the process is gone: flush() says so
                return
            if request[0] == "stop":
                return

    def _read_replies(self) -> None:
        while True:
            try:
                reply = self._connection.recv()
            except (EOFError, OSError):  # the process is gone
                with self._changed:
                    self._changed.notify_all()
                return
            with self._changed:
                if reply[0] == "stopped":
                    return
                if reply[0] == "lost":  # ("lost", study id, config key)
                    self._lost[reply[1]].add(reply[2])
                elif reply[0] == "error":
                    self._error = self._error or reply[1]
                elif reply[0] == "flushed":
                    self._flushed = reply[1]
                self._changed.notify_all()


class RecordedClaims:
    """A study run's claims with their writes handed to the recorder: :meth:`claim` answers a
    token at once, and a lost race shows up later in :meth:`lost_keys`. Reading the study
    (live claims, dead drivers' claims) stays with the run's own book."""

    def __init__(self, recorder: Recorder, claims: ClaimBook) -> None:
        self.recorder, self.local = recorder, claims
        self.enabled, self.owner, self.study_id = claims.enabled, claims.owner, claims.study_id

    def claim(self, template: FrozenTrial, key: str) -> int:
        token = self.recorder.new_token()
        self.recorder.send("claim", self.study_id, self.owner, token, template, key)
        return token

    def finish(self, token: int, frozen: FrozenTrial) -> None:
        self.recorder.send("finish", token, frozen)

    def release(self, token: int, reason: str) -> None:
        self.recorder.send("release", token, reason)

    def lost_keys(self) -> set[str]:
        return self.recorder.lost_keys(self.study_id)

    def is_live_claim(self, trial: FrozenTrial) -> bool:
        return self.local.is_live_claim(trial)

    def expire(self, trials: list[FrozenTrial], study: optuna.Study) -> None:
        self.local.expire(trials, study)

    def close(self) -> None:
        self.local.close()


def _serve(connection: multiprocessing.connection.Connection) -> None:
    """The recorder process: takes requests in order, writes them, answers lost claims,
    flushes and errors."""
    url, heartbeat_interval, grace_period = connection.recv()
    # Optuna's cache: a claim's look at its rivals reads only the trials changed since the last.
    storage = optuna.storages.get_storage(
        _rdb(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period))
    books: dict[tuple[int, str], ClaimBook] = {}
    claims: dict[int, tuple[ClaimBook, int | None]] = {}  # token -> (book, trial id; None: lost)
    backlog: collections.deque = collections.deque()
    while True:
        # Everything waiting: a claim whose result waits too is written with it.
        while not backlog or connection.poll(0):
            backlog.append(connection.recv())
        request = backlog.popleft()
        kind = request[0]
        try:
            if kind == "stop":
                connection.send(("stopped",))
                return
            if kind == "flush":
                connection.send(("flushed", request[1]))
            elif kind == "claim":
                _, study_id, owner, token, template, key = request
                book = books.get((study_id, owner))
                if book is None:  # once per study, not per claim
                    book = books[(study_id, owner)] = ClaimBook(storage, study_id, owner)
                if _take(backlog, "release", token) is not None:
                    continue  # given up before it was written: nothing to write
                result = _take(backlog, "finish", token)
                if result is not None:  # written in the claim, then only its state
                    template = optuna.trial.create_trial(
                        params=result.params, distributions=result.distributions,
                        user_attrs=dict(result.user_attrs), state=TrialState.RUNNING)
                trial_id = book.claim(template, key)
                claims[token] = (book, trial_id)
                if trial_id is None:
                    connection.send(("lost", study_id, key))
                elif result is not None:
                    book.finish(trial_id, result, attrs_written=True)
            elif kind == "finish":
                book, trial_id = claims.pop(request[1], (None, None))
                if trial_id is not None:  # a lost claim's measurement is another's to write
                    book.finish(trial_id, request[2])
            elif kind == "release":
                book, trial_id = claims.pop(request[1], (None, None))
                if trial_id is not None:
                    book.release(trial_id, request[2])
        except Exception as error:  # the driver raises it; later requests are still tried
            connection.send(("error", f"{type(error).__name__}: {error}"))


def _take(backlog: collections.deque, kind: str, token: int) -> Any:
    """Removes the ``kind`` request ("finish" or "release") of claim ``token`` from the
    backlog; its argument (the measurement, the reason), or None if it is not there."""
    for index, request in enumerate(backlog):
        if request[0] == kind and request[1] == token:
            del backlog[index]
            return request[2]
    return None


if __name__ == "__main__":
    from .compiling import die_with_parent

    die_with_parent(int(sys.argv[2]))
    try:
        _serve(multiprocessing.connection.Connection(int(sys.argv[1])))
    except (EOFError, OSError):  # the driver is gone
        pass
