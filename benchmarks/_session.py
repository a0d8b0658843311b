"""Helpers shared by the benchmarks: run the CLI in its own session and sample the whole session's RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def session_rss_bytes(sid: int) -> int:
    """Resident memory of every process in session `sid` (the driver, Ray's daemons, its workers)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                total += int((entry / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_cli(args: list[str], *, env: dict | None = None, sample_every: float = 0.25) -> dict:
    """Run `granucap ARGS` in a new session; returns wall seconds, exit code and peak session RSS."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], session_rss_bytes(proc.pid))
            time.sleep(sample_every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    return {"seconds": time.perf_counter() - start, "returncode": proc.returncode, "peak_rss": peak[0],
            "stdout": out, "stderr": err}
