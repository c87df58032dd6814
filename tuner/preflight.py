"""Checks made before any trial runs: the Ray address answers, the table can be written, and
each problem fits in the memory of the devices that would measure it."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from kernels import TableError, load_table

from .errors import InputError
from .problems import Problem, get_kernel
from .storage import StorageError, check_writable_folder

RAY_DEFAULT_PORT = 6379


class PreflightError(InputError):
    """Something that would make the run fail later: reported before it starts."""


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address to check; None for ``local`` and ``auto`` (no remote host).

    Accepts ``HOST:PORT``, ``HOST`` (port 6379), ``ray://HOST:PORT`` and ``[IPv6]:PORT``.
    """
    text = address.strip()
    if text in ("local", "auto"):
        return None
    for prefix in ("ray://", "gcs://"):
        text = text.removeprefix(prefix)
    if text.startswith("["):  # [::1]:6379
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise PreflightError(f"bad --address {address!r}: expected auto, local or HOST:PORT")
    if not port_text:
        return host, RAY_DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise PreflightError(f"bad --address {address!r}: the port must be a number in 1..65535")
    return host, int(port_text)


def check_address(address: str, timeout: float) -> None:
    """Raises PreflightError unless the Ray head at ``address`` accepts a TCP connection
    within ``timeout`` seconds (Ray itself would retry for minutes)."""
    target = parse_address(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise PreflightError(f"cannot reach the Ray cluster at {address}: no answer from "
                             f"{host}:{port} within {timeout:g} s (--connect-timeout)") from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PreflightError(f"cannot reach the Ray cluster at {address}: {host}:{port}: "
                             f"{reason}") from None


@contextlib.contextmanager
def connect_deadline(address: str, timeout: float) -> Iterator[None]:
    """Runs the body (``ray.init``) with a deadline: past it, a one-line error and exit status 2.

    A port that answers but is no Ray head keeps ``ray.init`` retrying for minutes, in C++ code
    no signal interrupts, and printing warnings meanwhile: those are held back and shown only
    if the body ends. ``local`` (a Ray this process starts) has no deadline.
    """
    if address == "local":
        yield
        return
    sys.stderr.flush()
    real_stderr = os.dup(2)
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)

    def give_up() -> None:
        os.dup2(real_stderr, 2)
        os.write(2, f"tuner: error: the Ray cluster at {address} did not answer within "
                    f"{timeout:g} s (--connect-timeout); is it a Ray head's GCS port?\n".encode())
        os._exit(2)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        sys.stderr.flush()
        os.dup2(real_stderr, 2)
        os.close(real_stderr)
        held.seek(0)
        os.write(2, held.read())
        held.close()


def check_table(path: str | os.PathLike) -> None:
    """Raises PreflightError unless the table (and its lock file) can be written and an
    existing table can be read, so a finished search is never lost to its final merge."""
    path = Path(path)
    if path.is_dir():
        raise PreflightError(f"table {path} is a folder; expected a .json file path")
    try:
        check_writable_folder(path.parent, f"table {path}")
        with open(str(path) + ".lock", "a"):
            pass
        if path.exists():
            with open(path, "r+"):
                pass
        load_table(path)
    except StorageError as error:
        raise PreflightError(str(error)) from None
    except OSError as error:
        raise PreflightError(f"table {path}: cannot write {error.filename or path}: "
                             f"{error.strerror or type(error).__name__}") from None
    except TableError as error:
        raise PreflightError(f"{error}; fix or move it, the winner is merged into it") from None


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.3g} GiB"


def check_fits(problems: list[Problem], memory_by_device: dict[str, int]) -> None:
    """Raises PreflightError naming every problem whose inputs and output alone exceed the
    memory of a device that would measure it."""
    too_big = []
    for problem in problems:
        needed = get_kernel(problem.kernel).bytes_moved(problem)
        for device, memory in sorted(memory_by_device.items()):
            if memory and needed > memory:
                too_big.append(f"{problem} needs at least {_gib(needed)} ({needed} bytes) for "
                               f"its inputs and output, more than the {_gib(memory)} of {device}")
    if too_big:
        raise PreflightError("problem too large: " + "; ".join(too_big))
