"""Helpers shared by the benchmarks: run the CLI in its own session and sample the whole session's RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


ROLLUP_FIELDS = {"Pss:": "pss", "Pss_Anon:": "anon", "Pss_Shmem:": "shmem"}


def _rollup_bytes(pid: str) -> dict[str, int]:
    """From /proc/PID/smaps_rollup: PSS (proportional set size: each shared page, e.g. torch's libraries or
    Ray's shared-memory object store, counted once in all, split between the processes that map it, where
    summed RSS counts it in every process), and its anonymous (the process's own heap) and shared-memory
    (Ray's object store) parts."""
    out = dict.fromkeys(ROLLUP_FIELDS.values(), 0)
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = ROLLUP_FIELDS.get(line.split(maxsplit=1)[0]) if line.strip() else None
        if key:
            out[key] = int(line.split()[1]) * 1024
    return out


def session_memory(sid: int, breakdown: dict | None = None) -> dict[str, int]:
    """Summed over every process in session `sid` (the driver, Ray's daemons, its workers): `rss`, `pss`,
    `anon` (anonymous PSS: the processes' own memory) and `shmem` (shared-memory PSS: the pages of Ray's
    object store that are in use or were once touched); `breakdown` (if given) is filled with process
    title -> RSS bytes."""
    page = os.sysconf("SC_PAGE_SIZE")
    totals = {"rss": 0, **dict.fromkeys(ROLLUP_FIELDS.values(), 0)}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                rss = int((entry / "statm").read_text().split()[1]) * page
                totals["rss"] += rss
                for key, value in _rollup_bytes(entry.name).items():
                    totals[key] += value
                if breakdown is not None:
                    title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60]
                    breakdown[f"{entry.name} {title}"] = rss
        except (OSError, IndexError, ValueError):
            continue
    return totals


def run_cli(args: list[str], *, env: dict | None = None, sample_every: float | None = 0.25) -> dict:
    """Run `granucap ARGS` in a new session; returns wall seconds, exit code, the session's peaks (`peak_rss`,
    `peak_pss`, `peak_anon`, `peak_shmem`: each its own maximum over the run) and the processes at the RSS peak.
    `sample_every` None: no sampling (peaks 0). Sampling is not free: reading every process's smaps_rollup four
    times a second took ≈ 10% of a 2,000-sample run's wall time on two cores, so timing benchmarks turn it off."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"rss": 0, "pss": 0, "anon": 0, "shmem": 0}
    at_peak: dict = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            breakdown: dict = {}
            now = session_memory(proc.pid, breakdown)
            if now["rss"] > peaks["rss"]:
                at_peak.clear()
                at_peak.update(breakdown)
            for key, value in now.items():
                peaks[key] = max(peaks[key], value)
            time.sleep(sample_every)

    thread = threading.Thread(target=sample, daemon=True)
    if sample_every is not None:
        thread.start()
    out, err = proc.communicate()
    done.set()
    if sample_every is not None:
        thread.join()
    return {"seconds": time.perf_counter() - start, "returncode": proc.returncode, **{f"peak_{k}": v for k, v in peaks.items()},
            "at_peak": at_peak, "stdout": out, "stderr": err}


def allocator_line(overrides: list[str]) -> str:
    """Which allocator the run's Ray workers get with these `--set` overrides (engine/allocator.py)."""
    from engine.allocator import resolve
    from engine.config import load_config

    config = load_config(ROOT / "pipelines" / "smoke.yaml", overrides)
    return f"Ray workers' allocator: {resolve(config.ray.worker_allocator).why}"
