"""What a stage is: cheap construction from its spec, `setup()` once per worker, `__call__` on a batch.

A stage returns its batch 1:1 and in order. Samples that are not `ok` pass through untouched. A per-sample
exception becomes that sample's error; accelerator out-of-memory halves the batch and retries; only
infrastructure failures (`InfrastructureError`, host `MemoryError`) propagate, so that Ray can restart the
worker and retry the batch.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from engine.errors import is_infrastructure_error
from engine.records import Record

log = logging.getLogger(__name__)


def is_device_oom(exc: BaseException) -> bool:
    """Accelerator out of memory (torch's OutOfMemoryError, matched by name so torch is not imported here)."""
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def _free_device_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_kind(exc: BaseException) -> str:
    return type(exc).__name__


class Stage:
    """Base class. Subclasses set `name`, `requires` and implement `process` (batch) or `process_one`."""

    name: ClassVar[str] = "stage"
    # Record fields the stage reads; the runner checks the previous stages provide them.
    requires: ClassVar[tuple[str, ...]] = ()
    # Record fields the stage fills.
    provides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self._ready = False

    def setup(self) -> None:
        """Load models / open engines. Called once per worker before the first batch."""

    def __call__(self, records: list[Record]) -> list[Record]:
        if not self._ready:
            self.setup()
            self._ready = True
        todo = [r for r in records if r.ok]
        if todo:
            self._process_guarded(todo)
        return records

    def _process_guarded(self, todo: list[Record]) -> None:
        """`process` with the failure rules: device OOM halves the batch and retries (a lone sample that
        still does not fit fails with kind out_of_memory); another error redoes the batch one sample at a
        time so it costs only the sample that raised; infrastructure errors propagate."""
        marks = [len(r.provenance) for r in todo]
        try:
            self.process(todo)
            return
        except Exception as exc:  # noqa: BLE001 - sorted below
            for record, mark in zip(todo, marks):
                del record.provenance[mark:]  # a retried sample must not carry the failed attempt's stamps
            if is_infrastructure_error(exc):
                raise
            if is_device_oom(exc):
                _free_device_memory()
                if len(todo) == 1:
                    self._fail(todo[0], exc, kind="out_of_memory")
                    return
                half = len(todo) // 2
                log.warning("%s: out of memory on a batch of %d; retrying as %d + %d", self.name, len(todo),
                            half, len(todo) - half)
                self._process_guarded(todo[:half])
                self._process_guarded(todo[half:])
                return
            if len(todo) == 1:
                self._fail(todo[0], exc)
                return
            log.warning("%s: batch of %d failed (%s); retrying per sample", self.name, len(todo), exc)
        for record in todo:
            self._run_alone(record)

    def process(self, records: list[Record]) -> None:
        """Fill the fields of `records` (all `ok`) in place. Default: one at a time, errors per sample."""
        for record in records:
            self._run_alone(record)

    def process_one(self, record: Record) -> None:
        raise NotImplementedError(f"{type(self).__name__} implements neither process nor process_one")

    def _run_alone(self, record: Record) -> None:
        if not record.ok:
            return
        if type(self).process is not Stage.process:
            self._process_guarded([record])
            return
        mark = len(record.provenance)
        try:
            self.process_one(record)
        except Exception as exc:  # noqa: BLE001
            del record.provenance[mark:]
            if is_infrastructure_error(exc):
                raise
            self._fail(record, exc, kind="out_of_memory" if is_device_oom(exc) else None)

    def _fail(self, record: Record, exc: BaseException, *, kind: str | None = None) -> None:
        log.debug("%s failed on %s: %s", self.name, record.key, exc, exc_info=True)
        record.fail(self.name, kind or error_kind(exc), str(exc) or repr(exc))
