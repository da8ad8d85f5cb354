"""How the command line ends when it does not succeed: Ctrl-C / SIGTERM, internal errors.

- SIGINT and SIGTERM stop every ONNX Runtime run at once (a helper thread woken through
  ``signal.set_wakeup_fd`` calls :func:`rdprune_onnx.runtime.terminate_runs`, even while the
  main thread waits inside ONNX Runtime), queued work is dropped, and the command exits 130
  (SIGINT) or 143 (SIGTERM) with one line saying what is kept and how to resume.
- An ``InternalError`` (a graph the library built that ONNX Runtime refuses, a check of the
  library's own output that fails) is a bug: its traceback, then one line asking to report
  it, exit 2. Any other exception that is not a ``UserError`` is a bug too: one line asking
  to report it, exit 2; the traceback only with ``--debug``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from types import FrameType
from typing import Any, NoReturn

import click

from rdprune_onnx.runtime import reset_terminate, terminate_runs

DEBUG = False
CACHE: Any = None  # the curve cache folder of the running command, if any
MEASURES = False  # the running command measures curves (prune, curves)
ISSUES = "https://github.com/rdprune/rdprune-onnx/issues"

_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    if not _received:
        _received.append(signum)
    terminate_runs()
    raise KeyboardInterrupt


def _watch(read_fd: int) -> None:
    """Owns ``read_fd``: reads signal numbers until EOF (the write end closed), then closes
    it (closing it from another thread could let a reused descriptor be read here)."""
    try:
        while True:
            try:
                data = os.read(read_fd, 64)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in (signal.SIGINT, signal.SIGTERM):
                    if not _received:
                        _received.append(signum)
                    terminate_runs()
    finally:
        os.close(read_fd)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Install the SIGINT/SIGTERM handling for one command (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global CACHE, MEASURES
    _received.clear()
    reset_terminate()
    CACHE, MEASURES = None, False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_fd = -1
    try:
        old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in previous:
            signal.signal(sig, _handler)
    except ValueError:  # not the main interpreter thread
        os.close(read_fd)
        os.close(write_fd)
        yield
        return
    threading.Thread(target=_watch, args=(read_fd,), daemon=True, name="rdprune-signals").start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)  # the watcher reads EOF, closes its end and ends


def exit_interrupted() -> NoReturn:
    signum = _received[0] if _received else signal.SIGINT
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    if CACHE is not None:
        kept = (
            f"; the curves of every finished layer are kept in the cache {CACHE}: "
            "run the same command again to resume"
        )
    elif MEASURES:
        kept = "; no curve cache was in use (--no-cache): a new run starts over"
    else:
        kept = ""
    click.echo(f"Interrupted ({name}): stopped; no output was written{kept}.", err=True)
    sys.exit(128 + int(signum))


def exit_internal(exc: BaseException) -> NoReturn:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    detail = f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
    click.echo(
        f"Internal error: {detail} (a bug in rdprune-onnx, not in your input: please report "
        f"it at {ISSUES} with the output of the same command run with --debug)",
        err=True,
    )
    sys.exit(2)


def exit_internal_error(exc: BaseException) -> NoReturn:
    """An :class:`~rdprune_onnx.errors.InternalError`: the traceback, kept for the report,
    then the one line of :func:`exit_internal` (exit 2)."""
    click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    exit_internal(exc)
