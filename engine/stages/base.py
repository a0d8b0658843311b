"""What a stage is: cheap construction from its spec, `setup()` once per worker, `__call__` on a batch.

A stage returns its batch 1:1 and in order. Samples that are not `ok` pass through untouched. A per-sample
exception becomes that sample's error; only infrastructure failures (`InfrastructureError`, out of memory)
propagate, so that Ray can restart the worker and retry the batch.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from engine.records import Record

log = logging.getLogger(__name__)


class InfrastructureError(RuntimeError):
    """The worker cannot go on (engine dead, device lost): not the sample's fault, so it is not a row."""


# Errors that say the machine, not the sample, is the problem. torch's OOM subclasses RuntimeError and is
# matched by name so that this module does not import torch.
_INFRA_NAMES = {"OutOfMemoryError", "InfrastructureError"}


def is_infrastructure_error(exc: BaseException) -> bool:
    return isinstance(exc, (InfrastructureError, MemoryError)) or type(exc).__name__ in _INFRA_NAMES


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
            try:
                self.process(todo)
            except Exception as exc:  # noqa: BLE001 - sorted into infra (raise) and sample errors below
                if is_infrastructure_error(exc) or len(todo) == 1:
                    if is_infrastructure_error(exc):
                        raise
                    self._fail(todo[0], exc)
                else:
                    # One bad sample must not cost its batch: redo the batch one sample at a time.
                    log.warning("%s: batch of %d failed (%s); retrying per sample", self.name, len(todo), exc)
                    for record in todo:
                        self._run_alone(record)
        return records

    def process(self, records: list[Record]) -> None:
        """Fill the fields of `records` (all `ok`) in place. Default: one at a time, errors per sample."""
        for record in records:
            self._run_alone(record)

    def process_one(self, record: Record) -> None:
        raise NotImplementedError(f"{type(self).__name__} implements neither process nor process_one")

    def _run_alone(self, record: Record) -> None:
        if not record.ok:
            return
        try:
            if type(self).process is Stage.process:
                self.process_one(record)
            else:
                self.process([record])
        except Exception as exc:  # noqa: BLE001
            if is_infrastructure_error(exc):
                raise
            self._fail(record, exc)

    def _fail(self, record: Record, exc: BaseException) -> None:
        log.debug("%s failed on %s: %s", self.name, record.key, exc, exc_info=True)
        record.fail(self.name, error_kind(exc), str(exc) or repr(exc))
