"""Finding a process session's processes in /proc: a driver started with `start_new_session` and everything
Ray starts under it (its daemons and workers keep the session, though they get process groups of their own)."""

from __future__ import annotations

from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (a zombie has ended; only its parent has not collected it yet)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields 6 and 3 of /proc/PID/stat: session, state
                pids.append(int(entry.name))
    return pids
