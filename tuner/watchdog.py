"""Ends the local Ray instance a driver started when the driver dies without shutting it down
(``kill -9``): Ray's GCS and raylet go with it, but its dashboard and runtime-env agents would
keep retrying the dead GCS for minutes.

The driver starts this file as a script (standard library only, so it starts in milliseconds),
keeps the write end of its stdin and passes the ids of the processes its ``ray.init`` started.
When stdin closes (the driver exited, however it died) the watchdog gives Ray a moment to shut
down cleanly, then ends those processes that are still the same processes (same start time).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 3.0  # a clean ray.shutdown() at exit finishes within this


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # Field 22 (start time); the command name (field 2) may hold spaces: split after it.
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree, now."""
    found, stack = [], _children(pid)
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(_children(child))
    return found


def watch_ray_processes() -> subprocess.Popen | None:
    """Starts a watchdog over the processes this process has started so far (call it right
    after ``ray.init`` started a local instance); None where /proc is missing (not Linux)."""
    if not os.path.isdir("/proc"):
        return None
    targets = [f"{pid}:{_start_time(pid)}" for pid in descendants(os.getpid())]
    # Its own session: Ctrl-C in the terminal reaches the driver, not the watchdog.
    return subprocess.Popen([sys.executable, "-S", "-I", os.path.abspath(__file__), *targets],
                            stdin=subprocess.PIPE, start_new_session=True, close_fds=True)


def _main(targets: list[str]) -> None:
    sys.stdin.buffer.read()  # returns when the driver's end closes
    time.sleep(GRACE_S)
    alive = [(int(pid), start) for pid, start in (target.split(":") for target in targets)
             if _start_time(int(pid)) == start]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in alive:
            if _start_time(pid) == start:  # not a new process that reused the id
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        time.sleep(1.0)


if __name__ == "__main__":
    _main(sys.argv[1:])
