"""Claims: concurrent drivers on one storage split a study's configs instead of each
measuring all of them.

A driver claims a config before measuring it by creating a RUNNING trial with the config's key
in the study, and finishes that same trial with the measurement. The lowest-numbered claim of a
config wins, so two drivers claiming at the same moment agree on the winner. A claim lives while
its owner does: owners on this host are checked by process id, owners elsewhere by Optuna's
trial heartbeats (the storage's ``heartbeat_interval`` / ``grace_period``, see tuner.storage).
A dead owner's claims are failed, and their configs measured again.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

HOST = socket.gethostname()
# Tokens of the claim books alive in this process: a claim of this process whose token is not
# here was left by a book that was closed without releasing it (a driver that died in-process).
_LIVE_TOKENS: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def owner_alive(owner: str) -> bool:
    """Whether the driver that wrote ``owner`` may still be running (unknown hosts: yes; their
    claims expire through heartbeats instead)."""
    host, _, rest = owner.partition("/")
    pid_text, _, token = rest.partition("/")
    if host != HOST or not pid_text.isdigit():
        return True
    if int(pid_text) == os.getpid():
        return token in _LIVE_TOKENS
    return _pid_alive(int(pid_text))


def is_measurement(trial: FrozenTrial) -> bool:
    """A trial holding a measurement: not a claim given up, nor one whose driver died while
    recording its result (attributes written, state not yet), which is measured again."""
    return bool(trial.user_attrs.get("measured")) and "released" not in trial.user_attrs \
        and trial.state in (TrialState.COMPLETE, TrialState.FAIL)


class _Heartbeats:
    """One thread per process recording heartbeats of every claim held, whatever the driver's
    loop is doing (a worker replacement may block it for minutes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[Any, set[int]]] = {}
        self._thread: threading.Thread | None = None

    def add(self, storage: Any, trial_id: int) -> None:
        interval = storage.get_heartbeat_interval()
        with self._lock:
            self._held.setdefault(id(storage), (storage, set()))[1].add(trial_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(interval,),
                                                name="tuner-heartbeats", daemon=True)
                self._thread.start()

    def remove(self, storage: Any, trial_id: int) -> None:
        with self._lock:
            held = self._held.get(id(storage))
            if held:
                held[1].discard(trial_id)
                if not held[1]:
                    del self._held[id(storage)]

    def _run(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            with self._lock:
                work = [(storage, sorted(ids)) for storage, ids in self._held.values()]
            for storage, ids in work:
                for trial_id in ids:
                    try:
                        storage.record_heartbeat(trial_id)
                    except Exception:  # the database may be briefly away; the next beat retries
                        pass


_HEARTBEATS = _Heartbeats()


class ClaimBook:
    """The claims one study run holds in one study of a storage."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_id: int,
                 owner: str | None = None) -> None:
        """``owner`` names the driver the claims are made for (by default this process): a
        driver's recorder process (tuner.recorder) claims in the name of its driver."""
        self.storage, self.study_id = storage, study_id
        # Only storages other processes can open need claims; InMemoryStorage is one process's.
        self.enabled = callable(getattr(storage, "record_heartbeat", None))
        self.heartbeats = self.enabled and bool(storage.get_heartbeat_interval())
        self.token = uuid.uuid4().hex if owner is None else owner.rpartition("/")[2]
        self.owner = owner or f"{HOST}/{os.getpid()}/{self.token}"
        self.held: set[int] = set()
        if owner is None:
            _LIVE_TOKENS.add(self.token)

    def close(self) -> None:
        """Forgets this book: claims still held count as left by a dead driver."""
        _LIVE_TOKENS.discard(self.token)
        for trial_id in self.held:
            _HEARTBEATS.remove(self.storage, trial_id)

    def is_live_claim(self, trial: FrozenTrial) -> bool:
        """A RUNNING claim whose owner may still measure it."""
        owner = trial.user_attrs.get("claim")
        return trial.state == TrialState.RUNNING and bool(owner) and owner_alive(owner)

    def is_dead_claim(self, trial: FrozenTrial) -> bool:
        owner = trial.user_attrs.get("claim")
        return trial.state == TrialState.RUNNING and bool(owner) and not owner_alive(owner)

    def claim(self, template: FrozenTrial, key: str) -> int | None:
        """Claims ``key`` with a RUNNING trial made from ``template``; its trial id, or None
        when an earlier claim (or a measurement) of the same config exists."""
        template.user_attrs.update(config=key, claim=self.owner)
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        if self.heartbeats:
            # Without a first heartbeat a claim never goes stale, so it is recorded at once.
            self.storage.record_heartbeat(trial_id)
            _HEARTBEATS.add(self.storage, trial_id)
        self.held.add(trial_id)
        # Trials come numbered in order, this claim among them (the only RUNNING trial of
        # this book with this config): what precedes it is what it competes with.
        trials = self.storage.get_all_trials(self.study_id, deepcopy=False)
        for trial in sorted(trials, key=lambda trial: trial.number):
            if trial.user_attrs.get("config") != key:
                continue
            if trial.state == TrialState.RUNNING and trial.user_attrs.get("claim") == self.owner:
                break
            if is_measurement(trial) or self.is_live_claim(trial):
                self.release(trial_id, "lost: an earlier claim of the same config")
                return None
        return trial_id

    def lost_keys(self) -> set[str]:
        """Configs whose claims were found lost since the last call: none here, where
        :meth:`claim` answers at once (see tuner.recorder for claims that answer later)."""
        return set()

    def finish(self, trial_id: int, frozen: FrozenTrial, attrs_written: bool = False) -> None:
        """Turns the claim into the measured trial ``frozen`` (attributes, unless the claim was
        made with them, then state)."""
        _HEARTBEATS.remove(self.storage, trial_id)
        self.held.discard(trial_id)
        try:
            for name, value in frozen.user_attrs.items():
                if name != "config" and not attrs_written:  # each write is a transaction
                    self.storage.set_trial_user_attr(trial_id, name, value)
            self.storage.set_trial_state_values(
                trial_id, frozen.state, None if frozen.value is None else [frozen.value])
        except optuna.exceptions.UpdateFinishedTrialError:
            # Our claim was taken for dead (the driver stalled past the grace period): the
            # measurement is kept all the same, as a trial of its own.
            self.storage.create_new_trial(self.study_id, template_trial=frozen)

    def release(self, trial_id: int, reason: str) -> None:
        """Gives a claim up unmeasured: its config may be claimed again."""
        _HEARTBEATS.remove(self.storage, trial_id)
        self.held.discard(trial_id)
        try:
            self.storage.set_trial_user_attr(trial_id, "released", reason)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # failed already (stale, or by another driver)

    def expire(self, trials: list[FrozenTrial], study: optuna.Study) -> None:
        """Fails the claims of dead drivers: on this host at once, elsewhere after the grace
        period of their heartbeats."""
        for trial in trials:
            if self.is_dead_claim(trial):
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                    self.study_id, trial.number)
                self.release(trial_id, "expired: its driver died")
        if self.heartbeats:
            with warnings.catch_warnings():  # experimental in Optuna; relied on here
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
