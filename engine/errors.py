"""What an operator sees when granucap stops early: the exit codes, and one line for each kind of failure.

    0    done
    1    the run or its input/output failed: storage unreachable, output not writable, disk full, read-only
         file system, a unit that could not be written, an incomplete run given to export/inspect
    2    bad command line or config, or a config that differs from the one the output was made with
    3    the output is locked by another run that is still alive
    130  stopped by SIGINT (Ctrl-C); 143  stopped by SIGTERM: rerun the same command to resume

`granucap --debug` shows the Python traceback as well (engine/cli.py).

The error types here are shared by every layer (stages, backends, the runner, the command line), so that
none of them imports another layer for its exceptions.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class Interrupted(BaseException):
    """The process got SIGTERM (or SIGINT): a BaseException like KeyboardInterrupt, so that no `except
    Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)


class RunError(RuntimeError):
    """The run cannot start or finish (output belongs to another plan, units left incomplete...)."""


class ConfigChanged(RuntimeError):
    """A rerun's config differs from the one the output's complete units were made with."""


class InfrastructureError(RuntimeError):
    """The worker cannot go on (engine dead, device lost, endpoint unreachable): not the sample's fault, so
    it is not a row; it propagates so that Ray restarts the worker (engine/stages/base.py)."""


class WorkerLost(InfrastructureError):
    """The worker process can serve nothing more (its inference engine died): the stage actor exits instead of
    raising, so that Ray starts a fresh actor and retries every batch the lost one held (engine/runner/dataset.py)."""


def is_infrastructure_error(exc: BaseException) -> bool:
    """The machine, not the sample, is the problem: the worker should die and Ray retry elsewhere."""
    return isinstance(exc, (InfrastructureError, MemoryError))


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises Interrupted in the main thread (Ray's driver installs a handler that exits
    with status 15 as it starts, so this is called again after Ray starts)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)


def _existing(path: str) -> str:
    """The nearest existing folder of `path` (where free space can be measured)."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    return path if os.path.isdir(path) else os.path.dirname(path)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe_os_error(exc: OSError, fallback_path: str | None = None) -> str:
    """One line for a file system error of the output: what happened, to which path, and for a full disk how
    much space is left there."""
    # a task's error rebuilt by Ray may carry a message where the file name was
    named = isinstance(exc.filename, str) and os.path.isabs(exc.filename)
    path = str(exc.filename if named else fallback_path or "the output")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            usage = shutil.disk_usage(_existing(path))
            space = f" ({_gib(usage.free)} free of {_gib(usage.total)})"
        except OSError:
            space = ""
        return f"no space left on the device writing {path}{space}: free some space, then rerun to resume"
    if exc.errno == errno.EROFS:
        return f"cannot write {path}: the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and os.path.isfile(_existing(path)):
        return f"cannot write {path}: a file stands where a folder must be"
    return f"cannot write {path}: {exc.strerror or exc}"


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then what caused it, nearest first, each once: a Ray task's error (RayTaskError) keeps the task's
    own exception as `cause`; Python chains the rest through `__cause__` / `__context__`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError of the output's file system behind `exc` (itself, or a cause of it, as Ray hands on the
    error of a task), None when there is none."""
    return next((e for e in causes(exc) if isinstance(e, OSError) and e.errno in _OUTPUT_ERRNOS), None)


__all__ = [
    "ConfigChanged",
    "causes",
    "RunError",
    "EXIT_ERROR",
    "EXIT_LOCKED",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "InfrastructureError",
    "WorkerLost",
    "Interrupted",
    "describe_os_error",
    "is_infrastructure_error",
    "os_error_in",
    "raise_on_sigterm",
]
