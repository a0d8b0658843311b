"""Helpers shared by the benchmarks: run the CLI in its own session and sample the whole session's RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pss_bytes(pid: str) -> int:
    """Proportional set size: each shared page (torch's libraries, Ray's shared-memory object store) counted
    once in all, split between the processes that map it, where summed RSS counts it in every process."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def session_memory(sid: int, breakdown: dict | None = None) -> tuple[int, int]:
    """(summed RSS, summed PSS) of every process in session `sid` (the driver, Ray's daemons, its workers);
    `breakdown` (if given) is filled with process title -> RSS bytes."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss_total = pss_total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                rss = int((entry / "statm").read_text().split()[1]) * page
                rss_total += rss
                pss_total += _pss_bytes(entry.name)
                if breakdown is not None:
                    title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60]
                    breakdown[f"{entry.name} {title}"] = rss
        except (OSError, IndexError, ValueError):
            continue
    return rss_total, pss_total


def run_cli(args: list[str], *, env: dict | None = None, sample_every: float = 0.25) -> dict:
    """Run `granucap ARGS` in a new session; returns wall seconds, exit code, peak session RSS and PSS."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    peak_pss = [0]
    at_peak: dict = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            breakdown: dict = {}
            total, pss = session_memory(proc.pid, breakdown)
            peak_pss[0] = max(peak_pss[0], pss)
            if total > peak[0]:
                peak[0] = total
                at_peak.clear()
                at_peak.update(breakdown)
            time.sleep(sample_every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    return {"seconds": time.perf_counter() - start, "returncode": proc.returncode, "peak_rss": peak[0], "peak_pss": peak_pss[0],
            "at_peak": at_peak, "stdout": out, "stderr": err}
