"""The output lock (engine/io/lock.py): flock on a local folder, a lease with heartbeats on a real S3 server.
A holder in another process is seen and named; its death frees the output (at once locally, once its lease is
stale on S3); of runs that race for a free output exactly one wins; a holder whose lease was taken notices."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.io.lock import LOCK_FILE, OutputLock, OutputLocked, check_unlocked
from engine.io.storage import Location

HOLDER = """
import sys, time
from engine.io.lock import OutputLock
from engine.io.storage import Location
lock = OutputLock(Location(sys.argv[1]), sys.argv[2], heartbeat_s=float(sys.argv[3]), stale_s=float(sys.argv[4]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(uri: str, run_id: str, heartbeat_s: float = 0.2, stale_s: float = 1.5):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, run_id, str(heartbeat_s), str(stale_s)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def assert_refused_while_held(out: Location, holder: subprocess.Popen, detail: str = "") -> None:
    """A run, and a dry run, are refused while `holder` (run-a) holds `out`; the message names it."""
    with pytest.raises(OutputLocked, match=rf"in use by run run-a \(pid {holder.pid} on {detail}"):
        OutputLock(out, "run-b").acquire()
    with pytest.raises(OutputLocked, match="run-a"):
        check_unlocked(out)


def kill(holder: subprocess.Popen) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_a_local_lock_names_its_holder_and_dies_with_it(tmp_path):
    out = Location(tmp_path / "out")
    (tmp_path / "out").mkdir()
    holder = hold_in_another_process(out.uri, "run-a")
    try:
        assert_refused_while_held(out, holder)
    finally:
        kill(holder)
    with OutputLock(out, "run-b"):  # the kernel released the dead holder's lock
        assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["run_id"] == "run-b"
        with pytest.raises(OutputLocked, match="run-b"):
            OutputLock(out, "run-c").acquire()  # in the same process too
    check_unlocked(out)
    with OutputLock(out, "run-c"):
        pass


def test_an_s3_lease_names_its_holder_and_is_void_when_its_process_dies(s3):
    out = Location(f"{s3}/run")
    holder = hold_in_another_process(out.uri, "run-a", heartbeat_s=0.2, stale_s=1.5)
    try:
        first = json.loads(out.read_bytes(LOCK_FILE))["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads(out.read_bytes(LOCK_FILE))["heartbeat"] == first:  # the holder renews its lease
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert_refused_while_held(out, holder, ".* last heartbeat")
    finally:
        kill(holder)
    # its process is gone and it ran on this host: its lease is void at once, stale or not
    lock = OutputLock(out, "run-b", heartbeat_s=0.2, stale_s=1.5)
    lock.acquire()
    assert json.loads(out.read_bytes(LOCK_FILE))["run_id"] == "run-b"
    lock.release()
    assert not out.exists(LOCK_FILE)  # released: the next run need not wait for anything
    with OutputLock(out, "run-c"):
        pass


def test_a_lease_from_another_host_is_taken_only_once_stale(s3):
    out = Location(f"{s3}/elsewhere")
    beat = time.time()
    out.write_bytes(LOCK_FILE, json.dumps({"run_id": "run-a", "pid": 1, "host": "another-host",
                                           "heartbeat": beat, "stale_after_s": 1.5}).encode())
    refused = 0
    deadline = time.monotonic() + 20
    while True:  # refused while the lease is fresh (its holder may be alive over there), taken once stale
        try:
            lock = OutputLock(out, "run-b", heartbeat_s=0.2, stale_s=1.5)
            lock.acquire()
            break
        except OutputLocked as exc:
            assert "run-a" in str(exc) and "another-host" in str(exc)
            refused += 1
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert refused and time.time() - beat >= 1.5
    assert json.loads(out.read_bytes(LOCK_FILE))["run_id"] == "run-b"
    lock.release()


def test_of_runs_racing_for_a_free_s3_output_exactly_one_wins(s3):
    out = Location(f"{s3}/race")
    barrier = threading.Barrier(4)
    results: dict[str, str] = {}
    locks = {f"run-{i}": OutputLock(Location(out.uri), f"run-{i}", heartbeat_s=5, stale_s=60) for i in range(4)}

    def contend(run_id: str) -> None:
        barrier.wait()
        try:
            locks[run_id].acquire()
            results[run_id] = "held"
        except OutputLocked:
            results[run_id] = "refused"

    threads = [threading.Thread(target=contend, args=(run_id,)) for run_id in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, what in results.items() if what == "held"]
    assert len(winners) == 1 and len(results) == 4
    assert json.loads(out.read_bytes(LOCK_FILE))["run_id"] == winners[0]
    locks[winners[0]].release()


def test_a_holder_whose_lease_was_taken_over_stops(s3):
    out = Location(f"{s3}/taken")
    lock = OutputLock(out, "run-a", heartbeat_s=0.1, stale_s=1.0)
    lock.acquire()
    lock.check()
    # another run took the lease while this one stalled past its staleness
    out.write_bytes(LOCK_FILE, json.dumps({"run_id": "run-b", "pid": 1, "host": "elsewhere",
                                           "heartbeat": time.time(), "stale_after_s": 60}).encode())
    deadline = time.monotonic() + 10
    while True:
        try:
            lock.check()
        except OutputLocked as exc:
            assert "taken over by run run-b" in str(exc)
            break
        assert time.monotonic() < deadline, "the holder never noticed"
        time.sleep(0.05)
    lock.release()
    assert json.loads(out.read_bytes(LOCK_FILE))["run_id"] == "run-b"  # the new holder's lease stays
