"""The Ray workers' stdout and stderr (vLLM, transformers, Ray Data, granucap's own stages): kept in the run's
output, not printed on the driver's terminal.

    ray.init(..., **ray_init_kwargs())     the workers' lines no longer stream to the driver
    logs = WorkerLogs.start(out, run_id)  right after Ray is up: where each node keeps its workers' files
    ...the run...
    uri = logs.collect()                  when the run ends, however it ends: OUT/logs/<run_id>/workers-<host>.log

Ray redirects each worker process's stdout and stderr to files in its node's log folder
(`<temp dir>/session_*/logs/worker-<worker id>-<job id>-<pid>.out` and `.err`; `ffffffff` as the job id for
a worker started before any job asked for it; `.out.1`, `.out.2`... older parts when `RAY_ROTATION_MAX_BYTES`
is set; moved into `logs/old/` by Ray's log monitor once the worker is dead and many files are open). Ray
writes a line `:job_id:<hex>` into a worker's files when a job takes the worker, and `:task_name:` /
`:actor_name:` lines before the output of each task or actor; its log monitor reads them to tell the driver
whose lines it sends, and so does this module: only lines of this run's job are kept, so a run on a shared
cluster never copies another job's output. The Ray daemons' own files (raylet, GCS, `python-core-*` logs) and
the driver's stdout are not workers' output and are not copied.

Where a node's log folder is: `<temp dir>/<session name>/logs` (Ray's documented layout) from
`ray.get_runtime_context().get_temp_dir()` (the node's own: nodes may be started with `--temp-dir`) and
`get_session_name()`; with a Ray that lacks them, a worker finds the folder of the log files it holds open
(Linux `/proc/self/fd`). `start` notes the driver's node's folder at once: it is on this machine (a driver
always joins through a raylet of its machine), so `collect` reads it without Ray, which still works after Ray
has stopped (an interrupted run, an embedded session already shut down). An embedded session has no other
node, so nothing more is done. On a cluster `start` runs one zero-CPU task pinned to each other alive node
(in a thread) to learn its host and folder, and `collect` reads each such folder with a task pinned to one of
its nodes that writes the node's file straight into the output (that needs Ray up; nodes that joined since
`start` are found then). Nodes whose raylets share one folder (several raylets on one machine, one temp dir)
make one file.

Each node's file keeps the tail of each worker file (`MAX_STREAM_BYTES`) and at most `MAX_NODE_BYTES` in all,
the most recently written workers first; secrets are blanked (`storage.redact`). `OUT/logs/` keeps the newest
`KEEP_RUNS` runs' folders: run ids sort by age (as `engine.io.lock.new_run_id` makes them), so the oldest names
go first, never the current run's.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine.io.storage import Location, redact, register_secrets

log = logging.getLogger(__name__)

LOGS = "logs"
KEEP_RUNS = 10
# The end of a log is what explains a failure: a worker file larger than this keeps only its last part.
MAX_STREAM_BYTES = 8 * 2**20
# One node's file stays small enough to open in an editor and to build in memory on a busy node.
MAX_NODE_BYTES = 64 * 2**20
# Pieces of this length at most: a file written without newlines is never read into memory in one go.
MAX_LINE_BYTES = 64 * 2**10
# Zero-CPU tasks start a worker on a node that has none idle, which takes seconds on a loaded node; a node
# that does not answer within these is reported, not waited for.
PROBE_TIMEOUT_S = 60.0
COLLECT_TIMEOUT_S = 120.0

# worker-<worker id>-[<job id>-]<pid>.out|.err[.<n>]: the job id is missing in old Ray versions, and <n>
# numbers the older parts of a rotated file.
_WORKER_FILE = re.compile(r"^worker-(?P<worker>[0-9a-f]+)-(?:(?P<job>[0-9a-f]+)-)?(?P<pid>\d+)"
                          r"\.(?P<kind>out|err)(?:\.(?P<part>\d+))?$")
_NIL_JOB = "ffffffff"
_JOB_MARK = b":job_id:"
_NAME_MARKS = (b":task_name:", b":actor_name:")


def ray_init_kwargs(echo: bool = False) -> dict[str, Any]:
    """What `ray.init` needs so that the workers' output no longer reaches the driver's terminal (`echo`: it
    still does, as Ray's default; the files are collected either way). The cluster's error messages (a worker
    died, a task will be retried) still come: the driver prints them to `sys.stdout` whatever this says."""
    return {"log_to_driver": echo}


# --- on a node: which files, and the job's lines in them ---------------------------------------------------


def logs_dir() -> str | None:
    """The log folder of the node this Ray process (driver or worker) runs on, None when it cannot tell."""
    import ray

    context = ray.get_runtime_context()
    try:
        # Ray's documented layout, <temp dir>/<session>/logs, from the node's own temp dir (nodes may have
        # their own, `ray start --temp-dir`)
        folder = os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")
    except Exception:  # a Ray without these methods
        folder = ""
    return folder if os.path.isdir(folder) else open_logs_dir()


def open_logs_dir() -> str | None:
    """The folder of the log files this Ray worker process holds open (Linux), None when there are none: its
    core worker log always, its stdout/stderr files too unless rotation makes them pipes."""
    import ray

    worker = ray.get_runtime_context().get_worker_id()
    names = (f"worker-{worker}-", f"python-core-worker-{worker}_")
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.basename(target).startswith(names):
            folder = os.path.dirname(target)
            return os.path.dirname(folder) if os.path.basename(folder) == "old" else folder
    return None


@dataclass
class _Stream:
    """One worker's stdout or stderr: its file and, with rotation, its older parts (oldest first)."""

    name: str
    job: str | None
    parts: list[tuple[int, str]] = field(default_factory=list)  # (part number, path); 0 is the current file
    mtime: float = 0.0

    def paths(self) -> list[str]:
        return [path for _, path in sorted(self.parts, reverse=True)]


def _streams(folder: str) -> list[_Stream]:
    """The worker files in `folder` and `folder/old`, each stream once (Ray may move a file while we list)."""
    streams: dict[str, _Stream] = {}
    seen: set[str] = set()
    for where in (folder, os.path.join(folder, "old")):
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        for entry in entries:
            match = _WORKER_FILE.match(entry.name)
            if not match or entry.name in seen:
                continue
            try:
                mtime = entry.stat().st_mtime
            except OSError:  # gone since the listing
                continue
            seen.add(entry.name)
            base = entry.name if match["part"] is None else entry.name[: -len(match["part"]) - 1]
            stream = streams.setdefault(base, _Stream(base, match["job"]))
            stream.parts.append((int(match["part"] or 0), entry.path))
            stream.mtime = max(stream.mtime, mtime)
    return list(streams.values())


class _Tail:
    """The last `limit` bytes' worth of whole lines, and how many bytes were dropped before them. A
    `:task_name:` / `:actor_name:` line followed by another one is left out: a task worker runs thousands of
    Ray Data tasks that print nothing, each announced by such a line."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: deque[bytes] = deque()
        self.size = 0
        self.dropped = 0

    def add(self, line: bytes) -> None:
        if line.startswith(_NAME_MARKS):
            self.end()
        self.lines.append(line)
        self.size += len(line)
        while self.size > self.limit:
            first = self.lines.popleft()
            self.size -= len(first)
            self.dropped += len(first)

    def take(self, other: _Tail) -> None:
        self.dropped += other.dropped
        for line in other.lines:
            self.add(line)

    def end(self) -> None:
        """Leave out a last `:task_name:` line: its task printed nothing."""
        if self.lines and self.lines[-1].startswith(_NAME_MARKS):
            self.size -= len(self.lines.pop())


def _open_part(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:  # moved into old/ by Ray's log monitor since the listing
        folder, name = os.path.split(path)
        return open(os.path.join(folder, "old", name), "rb")


def _job_lines(stream: _Stream, job: str, limit: int) -> _Tail | None:
    """The lines of `stream` that belong to `job` (their last `limit` bytes), None when it has no output of
    the job. A worker's file belongs to the job named in it, or, for a worker started before any job took it,
    to the job of its first `:job_id:` line; lines after a `:job_id:` line belong to that job."""
    named = stream.job is not None and stream.job != _NIL_JOB
    owner = stream.job if named else None
    kept, waiting = _Tail(limit), _Tail(limit)  # `waiting`: lines before the first `:job_id:` line
    for path in stream.paths():
        try:
            handle = _open_part(path)
        except OSError:
            continue
        with handle:
            for line in iter(lambda: handle.readline(MAX_LINE_BYTES), b""):
                if line.startswith(_JOB_MARK):
                    marked = line[len(_JOB_MARK):].strip().decode("ascii", "replace")
                    if owner is None and marked == job:
                        kept.take(waiting)
                    owner = marked
                    waiting = _Tail(limit)
                    continue
                if owner is None:
                    waiting.add(line)
                elif owner == job:
                    kept.add(line)
    kept.end()
    output = any(line.strip() and not line.startswith(_NAME_MARKS) for line in kept.lines)
    return kept if output else None


def node_log(folder: str, job: str, title: str, storage_options: dict[str, Any] | None = None) -> bytes | None:
    """One node's file: `title`, then the job's lines of each worker file in `folder`, each under a
    `==> name <==` header; None when no worker of the job wrote anything there."""
    register_secrets(storage_options)
    workers: dict[str, list[tuple[_Stream, _Tail]]] = {}
    for stream in _streams(folder):
        if stream.job not in (None, _NIL_JOB, job):  # another job's worker: not even opened
            continue
        lines = _job_lines(stream, job, MAX_STREAM_BYTES)
        if lines is not None:
            workers.setdefault(stream.name.rsplit(".", 1)[0], []).append((stream, lines))
    if not workers:
        return None
    # newest first into the budget; the file lists them oldest first
    order = sorted(workers.values(), key=lambda group: max(s.mtime for s, _ in group), reverse=True)
    chosen, budget = [], MAX_NODE_BYTES
    for group in order:
        size = sum(lines.size for _, lines in group)
        if size > budget:
            break
        chosen.append(group)
        budget -= size
    head = [title]
    if len(chosen) < len(order):
        head.append(f"{len(order) - len(chosen)} older workers' output left out: over {MAX_NODE_BYTES // 2**20} "
                    f"MiB in all")
    parts = ["".join(f"# {line}\n" for text in head for line in text.splitlines()).encode()]
    for group in reversed(chosen):
        for stream, lines in sorted(group, key=lambda pair: pair[0].name.endswith(".err")):  # stdout first
            note = f" (its first {lines.dropped} bytes left out)" if lines.dropped else ""
            parts.append(f"\n==> {stream.name}{note} <==\n".encode())
            parts.extend(lines.lines)
            if lines.lines and not lines.lines[-1].endswith(b"\n"):
                parts.append(b"\n")
    text = b"".join(parts).decode("utf-8", "surrogateescape")
    return redact(text).encode("utf-8", "surrogateescape")


# --- the driver ---------------------------------------------------------------------------------------------


@dataclass
class _Node:
    """One log folder of the cluster: the nodes whose workers write there."""

    host: str
    folder: str
    node_ids: list[str]
    ip: str = ""
    local: bool = False  # on the driver's machine: the driver reads it itself
    file: str = ""  # its file's name in the run's log folder

    def title(self, job: str, run_id: str) -> str:
        nodes = ", ".join(n[:12] for n in self.node_ids)
        where = f"{self.host} ({self.ip}, node {nodes})" if self.ip else f"{self.host} (node {nodes})"
        return (f"run {run_id}, Ray job {job}: stdout and stderr of the job's workers on {where}, read from "
                f"{self.folder}\n`:task_name:` and `:actor_name:` lines are Ray's: they name the task or actor "
                f"whose output follows")


def _probe() -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "folder": logs_dir()}


def _collect_on_node(uri: str, storage_options: dict[str, Any], rel: str, job: str, title: str) -> str | None:
    """On one node: write its file to `rel` in the output; `rel`, or None when the node has nothing of the
    job."""
    folder = logs_dir()
    if folder is None:
        raise RuntimeError(f"cannot find the Ray log folder on {socket.gethostname()}")
    data = node_log(folder, job, title, storage_options)
    if data is None:
        return None
    Location(uri, storage_options).write_bytes(rel, data)
    return rel


def _pinned(fn, node_id: str):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))


def _alive_nodes() -> dict[str, str]:
    """Node id -> IP of every alive node."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}


def _wait(refs: list, timeout: float) -> tuple[list, list]:
    """(results or exceptions of the refs done within `timeout`, in order; refs not done)."""
    import ray

    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    done = set(ready)
    results = []
    for ref in refs:
        if ref not in done:
            continue
        try:
            results.append(ray.get(ref))
        except Exception as exc:  # a node lost, a task that failed: reported by the caller
            results.append(exc)
    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # already ended, or Ray stopping: nothing left to stop
            pass
    return results, [r for r in refs if r not in done]


class WorkerLogs:
    """The run's workers' logs: `start` once Ray is up, `collect` when the run ends."""

    def __init__(self, output: Location, run_id: str) -> None:
        self.output = output
        self.run_id = run_id
        self.job: str | None = None
        self.nodes: list[_Node] = []
        self.driver_node: str | None = None
        self._probing: threading.Thread | None = None
        self._learning = threading.Lock()  # the probing thread and `collect` both add nodes

    @classmethod
    def start(cls, output: Location, run_id: str) -> WorkerLogs:
        """Note where this run's workers write: this machine's folder at once (no Ray call needed to read it
        later); the other alive nodes' ones from one zero-CPU task on each, in a thread, so that the run goes on
        meanwhile. Never raises: a node not learnt about now is looked for again by `collect`."""
        logs = cls(output, run_id)
        try:
            import ray

            context = ray.get_runtime_context()
            logs.job = context.get_job_id()
            logs.driver_node = context.get_node_id()
            alive = _alive_nodes()
            folder = logs_dir()
            if folder is not None:  # this machine's: a driver always joins through a raylet of its own machine
                logs._add(logs.driver_node, socket.gethostname(), folder, alive.get(logs.driver_node, ""), True)
            if folder is None or any(n != logs.driver_node for n in alive):
                logs._probing = threading.Thread(target=logs._probe_nodes, args=(alive,),
                                                 name="granucap-worker-logs", daemon=True)
                logs._probing.start()
        except Exception as exc:  # keeping logs must never stop a run
            log.warning("cannot find the Ray workers' log folders (%s: %s); their logs are looked for when the "
                        "run ends", type(exc).__name__, exc)
        return logs

    def _probe_nodes(self, alive: dict[str, str]) -> None:
        try:
            self._learn(alive)
        except Exception as exc:
            log.warning("cannot find the Ray workers' log folders (%s: %s); their logs are looked for when the "
                        "run ends", type(exc).__name__, exc)

    def ready(self, timeout: float | None = PROBE_TIMEOUT_S) -> bool:
        """Wait (at most `timeout`) until the nodes alive at `start` have told where their workers write;
        whether they have. `collect` waits for it too; a caller that may stop Ray before it calls `collect`
        waits here first."""
        if self._probing is not None:
            self._probing.join(timeout)
            if self._probing.is_alive():
                return False
        return self.job is not None and bool(self.nodes)

    @property
    def folder(self) -> str:
        return f"{LOGS}/{self.run_id}"

    def _learn(self, alive: dict[str, str]) -> list[str]:
        """Probe the alive nodes not known yet and add their folders; returns the nodes that did not answer."""
        with self._learning:
            return self._learn_now(alive)

    def _learn_now(self, alive: dict[str, str]) -> list[str]:
        known = {n for node in self.nodes for n in node.node_ids}
        todo = [n for n in alive if n not in known]
        if not todo:
            return []
        results, _ = _wait([_pinned(_probe, n).remote() for n in todo], PROBE_TIMEOUT_S)
        answered = set()
        for answer in results:
            if isinstance(answer, Exception) or not answer.get("folder"):
                continue
            answered.add(answer["node_id"])
            local = (answer["node_id"] == self.driver_node and answer["host"] == socket.gethostname()
                     and os.path.isdir(answer["folder"]))
            self._add(answer["node_id"], answer["host"], answer["folder"], alive.get(answer["node_id"], ""), local)
        return [n for n in todo if n not in answered]

    def _add(self, node_id: str, host: str, folder: str, ip: str, local: bool) -> None:
        node = next((n for n in self.nodes if (n.host, n.folder) == (host, folder)), None)
        if node is None:
            node = _Node(host, folder, [], ip=ip, file=self._file_name(host))
            self.nodes.append(node)
        node.node_ids.append(node_id)
        node.local = node.local or local

    def _file_name(self, host: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", host) or "node"
        taken = {n.file for n in self.nodes}
        name, k = f"workers-{base}.log", 1
        while name in taken:
            k += 1
            name = f"workers-{base}-{k}.log"
        return name

    def collect(self) -> str | None:
        """Copy the run's workers' output into OUT/logs/<run id>/ (one file per node), delete the oldest runs'
        folders beyond `KEEP_RUNS`; the run's folder's URI, or None when no worker wrote anything (or nothing
        could be copied). Never raises: what it could not copy it logs as a warning."""
        try:
            return self._collect()
        except Exception as exc:  # keeping logs must never turn a run's end into another error
            log.warning("cannot keep the Ray workers' logs of run %s: %s: %s", self.run_id, type(exc).__name__, exc)
            return None

    def _collect(self) -> str | None:
        written: list[str] = []
        missed: list[str] = []
        self.ready()
        if self.job is None:
            log.warning("the Ray workers' logs of run %s were not kept: Ray was not up when they were set up",
                        self.run_id)
        else:
            for node in [n for n in list(self.nodes) if n.local]:
                try:
                    data = node_log(node.folder, self.job, node.title(self.job, self.run_id),
                                    self.output.storage_options)
                    if data is not None:
                        self.output.write_bytes(f"{self.folder}/{node.file}", data)
                        written.append(node.file)
                except Exception as exc:
                    missed.append(f"{self._describe(node)} ({type(exc).__name__}: {exc})")
            missed += self._collect_remote(written)
        if missed:
            log.warning("the Ray workers' logs of run %s were not kept from %s", self.run_id, "; ".join(missed))
        try:
            self._rotate()
        except Exception as exc:
            log.warning("cannot delete old runs' worker logs in %s: %s: %s", self.output.uri_of(LOGS),
                        type(exc).__name__, exc)
        return self.output.uri_of(self.folder) if written else None

    def _collect_remote(self, written: list[str]) -> list[str]:
        """The folders not on this machine, each read by a task on one of its nodes, in a thread: a Ray that is
        stopping can block its calls, and a run's end must not wait on it past `COLLECT_TIMEOUT_S`. Returns
        what was missed."""
        remote = [n for n in list(self.nodes) if not n.local]
        if not _ray_up():
            return [f"{self._describe(n)} (Ray is not up)" for n in remote]
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["missed"] = self._collect_remote_now(written)
            except Exception as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=work, name="granucap-worker-logs", daemon=True)
        thread.start()
        thread.join(PROBE_TIMEOUT_S + COLLECT_TIMEOUT_S)
        if thread.is_alive():
            return [f"nodes other than this machine's (no answer from Ray within "
                    f"{PROBE_TIMEOUT_S + COLLECT_TIMEOUT_S:.0f} s)"]
        if "error" in outcome:
            exc = outcome["error"]
            return [f"nodes other than this machine's ({type(exc).__name__}: {exc})"]
        return outcome["missed"]

    def _collect_remote_now(self, written: list[str]) -> list[str]:
        alive = _alive_nodes()
        missed = [f"node {n[:12]} (no answer)" for n in self._learn(alive)]
        tasks, nodes = [], []
        for node in self.nodes:
            if node.local:
                continue
            up = [n for n in node.node_ids if n in alive]
            if not up:
                missed.append(f"{self._describe(node)} (node gone)")
                continue
            title = node.title(self.job or "", self.run_id)
            tasks.append(_pinned(_collect_on_node, up[0]).remote(
                self.output.uri, self.output.storage_options, f"{self.folder}/{node.file}", self.job, title))
            nodes.append(node)
        if not tasks:
            return missed
        results, pending = _wait(tasks, COLLECT_TIMEOUT_S)
        done = iter(results)
        for node, ref in zip(nodes, tasks):
            if ref in pending:
                missed.append(f"{self._describe(node)} (no answer within {COLLECT_TIMEOUT_S:.0f} s)")
                continue
            result = next(done)
            if isinstance(result, Exception):
                missed.append(f"{self._describe(node)} ({type(result).__name__}: "
                              f"{(str(result).strip().splitlines() or [''])[-1]})")
            elif result:
                written.append(node.file)
        return missed

    @staticmethod
    def _describe(node: _Node) -> str:
        return f"{node.host} ({node.ip or 'node ' + node.node_ids[0][:12]}, {node.folder})"

    def _rotate(self) -> None:
        """Delete the oldest runs' folders under OUT/logs/ beyond the newest `KEEP_RUNS`."""
        base = self.output.path(LOGS)
        fs = self.output.fs
        if self.output.remote:
            fs.invalidate_cache(base)  # folders of earlier runs were written by other processes
        try:
            entries = fs.ls(base, detail=True)
        except FileNotFoundError:
            return
        runs = sorted(os.path.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")
        # the current run counts even before it has a folder: the driver's log may be written there later
        others = [r for r in runs if r != self.run_id]
        for run in others[: max(len(others) - (KEEP_RUNS - 1), 0)]:
            fs.rm(self.output.path(f"{LOGS}/{run}"), recursive=True)


def _ray_up() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:
        return False


__all__ = ["KEEP_RUNS", "LOGS", "WorkerLogs", "ray_init_kwargs"]
