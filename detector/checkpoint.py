"""Training checkpoints: `OUT/checkpoints/step-{N:08d}/` holds the model (`save_pretrained`: safetensors),
the processor, the optimizer state (`optimizer.safetensors` for its tensors, `optimizer.json` for the rest)
and `trainer_state.json`. Each is written into a temporary folder that is renamed into place, so a kill at
any moment leaves the previous checkpoint whole; nothing is unpickled on load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def optimizer_to_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Split `optimizer.state_dict()` into tensors (safetensors) and plain values (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(param_id), {})[name] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "plain": plain}))


def optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path, device: torch.device) -> None:
    """Load what `optimizer_to_files` wrote back into `optimizer` (same parameters, same groups)."""
    meta = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["plain"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = meta["param_groups"]
    for saved, current in zip(groups, optimizer.param_groups):
        for key, value in saved.items():  # JSON turned tuples (betas) into lists
            if isinstance(current.get(key), tuple) and isinstance(value, list):
                saved[key] = tuple(value)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: str | Path, *, step: int, model: Any, processor: Any, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically and drop all but the newest `keep`; returns its folder."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        optimizer_to_files(optimizer, tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
        if target.exists():  # a rerun that reached the same step again
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", target)
    return target


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a killed save are skipped)."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def clean_partial(out: str | Path) -> int:
    """Remove temporary folders that a killed save left behind; returns how many."""
    root = checkpoint_dir(out)
    removed = 0
    if root.is_dir():
        for path in root.iterdir():
            if ".tmp-" in path.name:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())
