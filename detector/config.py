"""Student training config: a pydantic model validated when built; YAML files and CLI flags fill it.

A bad value names the field and the value (`TrainConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class TrainConfigError(ValueError):
    """A train config file or flag is invalid; the message names the field and the value. A ValueError, so
    that the CLI reports it as a usage error (exit 2) like a bad pipeline config."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    """Which Grounding DINO to start from, and what to keep fixed."""

    init: str = "tiny:grounding-dino"  # hub id, local dir (a teacher or a student checkpoint), or tiny:NAME
    from_config: bool = False  # True: only the architecture of `init`, with fresh random weights
    freeze_backbone: bool = False  # keep the image backbone (Swin) fixed
    freeze_text_encoder: bool = False  # keep the text encoder (BERT) fixed
    cache_dir: str | None = None  # where tiny:NAME models are built


class DataSpec(_Strict):
    """How shards become batches."""

    batch_size: int = Field(2, ge=1)  # per worker
    shuffle_buffer: int = Field(256, ge=0)
    scales: list[int] | None = None  # shorter-side sizes drawn per sample; None: the processor's own size
    max_size: int | None = Field(None, ge=16)  # cap on the longer side; None: the processor's own cap
    flip_prob: float = Field(0.5, ge=0, le=1)
    negatives: int = Field(8, ge=0)  # negative concepts per sample from the corpus' concept dictionary
    phrase_prob: float = Field(0.5, ge=0, le=1)  # chance a box is named by its phrase instead of its category
    max_text_len: int | None = Field(None, ge=8)  # None: the model's max_text_len

    @model_validator(mode="after")
    def _scales(self) -> "DataSpec":
        if self.scales is not None and (not self.scales or min(self.scales) < 16):
            raise ValueError(f"scales must be a non-empty list of sizes >= 16, got {self.scales}")
        return self


class OptimSpec(_Strict):
    """AdamW with warmup then cosine or step decay, and gradient clipping."""

    lr: float = Field(1e-4, gt=0)
    backbone_lr: float | None = Field(None, gt=0)  # None: same as lr (Grounding DINO uses 0.1 x lr)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(0, ge=0)  # linear warmup from 0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine ends at lr * min_lr_ratio
    step_milestones: list[float] = [0.8]  # step schedule: fractions of `steps` where lr is multiplied by gamma
    step_gamma: float = Field(0.1, gt=0, le=1)
    max_grad_norm: float | None = Field(0.1, gt=0)  # DETR / Grounding DINO default; None: no clipping


class TrainConfig(_Strict):
    """Everything `granucap train` needs besides where the shards are and where checkpoints go."""

    steps: int = Field(100, ge=1)
    seed: int = 0
    workers: int = Field(1, ge=1)  # 1: one process; more: Ray Train data-parallel workers
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | None = None  # None: when CUDA is available
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU
    checkpoint_every: int = Field(50, ge=1)  # steps
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads per worker; None: torch's default
    ray_address: str | None = None  # None: an embedded Ray on this machine
    max_failures: int = Field(0, ge=0)  # Ray Train restarts of a failed worker group (each resumes)
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    optim: OptimSpec = OptimSpec()


def _describe(err: ValidationError, origin: str) -> str:
    lines = [f"invalid train config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        value = e.get("input")
        lines.append(f"  {loc}: {e['msg']} (got {'{...}' if isinstance(value, dict) else repr(value)[:120]})")
    return "\n".join(lines)


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Config from a YAML file (or defaults), then `overrides` ("a.b" -> value; None values are skipped)."""
    data: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise TrainConfigError(f"train config not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise TrainConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise TrainConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise TrainConfigError(_describe(err, origin)) from None
