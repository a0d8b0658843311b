"""One run per output: the lock a run holds on its output folder for its whole life.

    local folder:   OUT/.granucap-lock.json, held with flock(2); the kernel releases it when the holder's
                    process ends, however it ends (SIGKILL included), so a lock is never left behind
    object store:   OUT/.granucap-lock.json is a lease: the holder's run id, host, pid and a heartbeat that a
                    thread renews every `heartbeat_s`; created with a conditional PUT (If-None-Match) where the
                    filesystem supports it, so of two runs that start together exactly one gets it. A lease
                    whose heartbeat is older than `stale_s` belongs to a holder that died: the next run deletes
                    it and takes it (at once when the holder ran on the same host and its process is gone).

A run that finds the lock held stops at once with `OutputLocked`, whose one line names the holder. Temporary
files of killed writers are removed only by the lock's holder (engine/runner/loop.py), so a starting run never
deletes the files of a run that is writing.

A holder that stalls longer than `stale_s` (a suspended laptop, a long GC pause of the process) may find its
lease taken over when it wakes; its heartbeat notices, and `check()` then raises, so it stops writing rather
than run beside the new holder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from engine.io.storage import Location, StorageError, describe

log = logging.getLogger(__name__)

LOCK_FILE = ".granucap-lock.json"
HEARTBEAT_S = 15.0
STALE_S = 120.0


class OutputLocked(RuntimeError):
    """Another run holds the output; the message names it."""


def new_run_id() -> str:
    """A run's id: its UTC start time (so ids sort by age) and a random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _died_here(lease: dict[str, Any]) -> bool:
    """Whether the lease's holder ran on this host and its process is gone (its lease is void at once rather
    than when it goes stale: a run killed with SIGKILL and rerun on the same machine need not wait)."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _live(lease: dict[str, Any], stale_s: float) -> float | None:
    """The lease's age in seconds if its holder may still be alive, None when the lease is void."""
    if not lease:
        return None
    age = time.time() - float(lease.get("heartbeat", 0) or 0)
    if age > float(lease.get("stale_after_s", stale_s)) or _died_here(lease):
        return None
    return age


def _holder(info: Any) -> str:
    if not isinstance(info, dict):
        return "a run whose lock file cannot be read"
    return (f"run {info.get('run_id', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"started {info.get('started_at', '?')})")


class OutputLock:
    """The exclusive lock of `run_id` on `output`; a context manager (`acquire` / `release`)."""

    def __init__(
        self, output: Location, run_id: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S
    ) -> None:
        if stale_s <= heartbeat_s:
            raise ValueError("a lease must go stale only after several missed heartbeats")
        self.output = output
        self.run_id = run_id
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.info = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                     "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # --- taking and giving back ---------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, or raise OutputLocked naming the holder."""
        if self.output.remote:
            self._acquire_lease()
        else:
            self._acquire_flock()
        log.info("holding the lock on %s as run %s", self.output.uri, self.run_id)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self._lost is None:
                try:
                    if self._read_lease().get("run_id") == self.run_id:
                        self.output.remove(LOCK_FILE)
                except Exception as exc:  # a lease left behind goes stale; the next run takes it then
                    log.warning("could not remove the lease %s: %s", self.output.uri_of(LOCK_FILE), exc)

    def check(self) -> None:
        """OutputLocked if this run no longer holds the lock (its lease was taken over while it stalled)."""
        if self._lost:
            raise OutputLocked(self._lost)

    # --- local: flock --------------------------------------------------------------------------------------

    def _acquire_flock(self) -> None:
        import fcntl

        path = self.output.path(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"null")
            except ValueError:
                info = None
            os.close(fd)
            raise OutputLocked(f"{self.output.uri} is in use by {_holder(info)}; wait for it to end, or stop it "
                               "(a killed run releases the lock at once)") from None
        data = json.dumps(self.info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd

    # --- object stores: a lease ----------------------------------------------------------------------------

    def _read_lease(self) -> dict[str, Any]:
        try:
            data = json.loads(self.output.read_bytes(LOCK_FILE))
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"heartbeat": 0}  # unreadable: treated as stale
        return data if isinstance(data, dict) else {"heartbeat": 0}

    def _lease_bytes(self) -> bytes:
        return json.dumps(self.info | {"heartbeat": time.time(), "stale_after_s": self.stale_s}).encode()

    def _create_lease(self) -> bool:
        """Create the lease object if none exists; False when another run created one first."""
        path = self.output.path(LOCK_FILE)
        try:
            self.output.fs.pipe_file(path, self._lease_bytes(), mode="create")
        except TypeError:  # a filesystem without exclusive creation: write, then see whose lease stands
            self.output.write_bytes(LOCK_FILE, self._lease_bytes())
            time.sleep(1.0)  # a run that wrote in the same instant has overwritten ours by now, or we theirs
            return self._read_lease().get("run_id") == self.run_id
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise
        return True

    def _acquire_lease(self) -> None:
        try:
            for _ in range(2):  # at most once more, after removing a stale lease
                if self._create_lease():
                    break
                lease = self._read_lease()
                age = _live(lease, self.stale_s)
                if age is not None:
                    raise OutputLocked(
                        f"{self.output.uri} is in use by {_holder(lease)}, last heartbeat {age:.0f} s ago; wait "
                        f"for it to end (the lease of a run that died goes stale {self.stale_s:.0f} s after its "
                        "last heartbeat)"
                    )
                log.warning("taking over the lease of %s, which is stale or whose process is gone", _holder(lease))
                self.output.remove(LOCK_FILE)
            else:
                raise OutputLocked(f"{self.output.uri} is in use by {_holder(self._read_lease())}")
        except (OutputLocked, StorageError):
            raise
        except Exception as exc:  # botocore, gcsfs, adlfs each have their own exception trees
            raise StorageError(describe(exc, self.output.uri_of(LOCK_FILE), "take the lease")) from None
        self._thread = threading.Thread(target=self._heartbeat, name="granucap-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                lease = self._read_lease()
                if lease.get("run_id") != self.run_id:
                    self._lost = (f"this run's lease on {self.output.uri} was taken over by {_holder(lease)} "
                                  "(this run stalled longer than the lease lasts); it stops here")
                    log.error("%s", self._lost)
                    return
                self.output.write_bytes(LOCK_FILE, self._lease_bytes())
            except Exception as exc:  # storage down for a while: the next beat tries again
                log.warning("could not renew the lease on %s: %s", self.output.uri, exc)


def check_unlocked(output: Location) -> None:
    """OutputLocked if a live run holds `output` (`granucap run --dry-run`); takes nothing."""
    probe = OutputLock(output, "dry-run")
    if not output.remote:
        if output.exists(LOCK_FILE):
            probe.acquire()  # held for an instant: a live holder makes this raise
            probe.release()
        return
    lease = probe._read_lease()
    age = _live(lease, probe.stale_s)
    if age is not None:
        raise OutputLocked(f"{output.uri} is in use by {_holder(lease)}, last heartbeat {age:.0f} s ago")


__all__ = ["LOCK_FILE", "OutputLock", "OutputLocked", "check_unlocked", "new_run_id"]
