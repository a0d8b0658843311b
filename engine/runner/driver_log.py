"""The driver's library output goes to a log file, the terminal keeps granucap's own lines.

Ray's driver writes to the process's stderr from C++ (core worker messages) and from Python loggers that
captured `sys.stderr` when Ray and Ray Data were imported (their start, plan and exception reports, with
tracebacks). None of it is for the operator of a run: `DriverLog` points file descriptor 2 at a log file for
the run's life (`sys.stderr` included, since libraries imported during the run make their handlers from it),
and gives granucap's own output (the progress view, records of the `granucap` / `engine` / `detector`
loggers) `terminal`, a stream on the original descriptor. The runner copies
the file into OUT/logs/RUN_ID/ with the workers' logs when the run ends (worker_logs.py).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import IO


OWN_LOGGERS = ("granucap", "engine", "detector")


def _ours(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OWN_LOGGERS


class DriverLog:
    """Context manager: while active, fd 2 writes to `path` and `terminal` is the original stderr."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="granucap-driver-", suffix=".log")
        os.close(fd)
        self.terminal: IO[str] = sys.stderr
        self._saved_fd: int | None = None
        self._saved_stdout: IO[str] | None = None
        self._handlers: list[tuple[logging.StreamHandler, IO[str]]] = []
        self._file_handler: logging.FileHandler

    def __enter__(self) -> "DriverLog":
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        self.terminal = os.fdopen(os.dup(self._saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
        with open(self.path, "ab") as log_file:
            os.dup2(log_file.fileno(), 2)
        # Ray's driver prints the cluster's messages (a worker died, a task retried) to `sys.stdout` as it is
        # when it prints; the run's own stdout is the summary, printed after this context ends
        self._saved_stdout = sys.stdout
        sys.stdout = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        # granucap's own loggers keep the terminal; other libraries' records that reach the root logger go to the
        # file, as does everything that holds the old stream object (fd 2)
        root = logging.getLogger()
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                self._handlers.append((handler, handler.stream))
                handler.setStream(self.terminal)
                handler.addFilter(_ours)
        self._file_handler = logging.FileHandler(self.path, encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._file_handler.addFilter(lambda record: not _ours(record))
        root.addHandler(self._file_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        """Give the terminal its descriptor back; the file stays, for the runner to keep and then remove."""
        sys.stderr.flush()
        root = logging.getLogger()
        root.removeHandler(self._file_handler)
        self._file_handler.close()
        for handler, stream in self._handlers:
            handler.setStream(stream)
            handler.removeFilter(_ours)
        if self._saved_stdout is not None:
            sys.stdout.close()
            sys.stdout = self._saved_stdout
            self._saved_stdout = None
        if self._saved_fd is not None:
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._saved_fd = None
        self.terminal.close()

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


__all__ = ["DriverLog"]
