"""A config's identity: the fingerprint of everything that shapes the records a run writes.

In it: the pipeline config without what only decides where and how fast the work runs (every stage's
`resources`, devices, the Ray and storage settings, server endpoints, retry and concurrency knobs, names),
the hashes of the prompt files the pipeline uses, and granucap's version. Two configs with the same
fingerprint write the same records from the same input; the plan records the fingerprint of the run that made
it, each unit's marker the one it was written with (engine/io/shards.py), and a rerun under another one stops
unless asked to mix them (engine/runner/loop.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from engine import __version__
from engine.config import PipelineConfig
from engine.prompts import load_prompt

# Settings that decide where or how fast a stage runs, not what it writes; dropped wherever they appear
_OPERATIONAL = {
    "resources", "device", "max_concurrency", "timeout_s", "max_retries", "backoff_base_s", "backoff_max_s",
    "api_key_env", "base_url", "gpu_memory_utilization", "tensor_parallel_size", "enforce_eager",
    "cpu_kv_cache_gb", "forward_batch_size", "batch_size", "max_concurrent_batches", "max_num_seqs",
}
# Top-level sections and fields of the same kind
_OPERATIONAL_TOP = {"name", "description", "cache_dir", "ray", "storage_options"}


def describe_prompts(config: PipelineConfig) -> dict[str, str]:
    """The prompt files the pipeline uses: id -> sha256 of the text."""
    ids = ["system"]
    if config.stages.describe is not None:
        ids.append(config.stages.describe.prompt)
    if config.stages.annotate is not None:
        return {p.id: p.sha256 for p in map(load_prompt, ids + [config.stages.annotate.prompt])}
    if config.stages.recaption.backend != "passthrough":
        ids.append(config.stages.recaption.prompt)
    if config.stages.extract.backend != "nltk":
        ids += [p for p in (config.stages.extract.factual_prompt, config.stages.extract.entities_prompt) if p]
    return {p.id: p.sha256 for p in map(load_prompt, ids)}


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in _OPERATIONAL}
    return node


def shaping(config: PipelineConfig) -> dict[str, Any]:
    """What shapes the records: the config's record-shaping fields, the prompts' hashes, the version."""
    data = config.model_dump(mode="json")
    for key in _OPERATIONAL_TOP:
        data.pop(key, None)
    data = _strip(data)
    data["write"] = {"shard_size": config.write.shard_size}
    return {"config": data, "prompts": describe_prompts(config), "granucap": __version__}


def fingerprint_of(shape: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of `shape` (from `shaping`) as canonical JSON."""
    return hashlib.sha256(json.dumps(shape, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def fingerprint(config: PipelineConfig) -> str:
    return fingerprint_of(shaping(config))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two `shaping` results."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key, missing), b.get(key, missing)
        if before != after:
            show = lambda v: "(unset)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key.removeprefix('config.')}: {show(before)} -> {show(after)}")
    return lines


__all__ = ["describe_prompts", "differences", "fingerprint", "fingerprint_of", "shaping"]
