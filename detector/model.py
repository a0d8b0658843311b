"""The student: an HF Grounding DINO, from a checkpoint (a teacher, a student dir, tiny:NAME) or a config."""

from __future__ import annotations

import logging
from typing import Any

from detector.config import ModelSpec

logger = logging.getLogger(__name__)


def resolve(ref: str, cache_dir: str | None = None) -> str:
    """A path or hub id that `from_pretrained` loads: `tiny:NAME` is built through engine.models.loading."""
    from engine.models.loading import resolve_model

    return resolve_model(ref, cache_dir=cache_dir)


def load_student(spec: ModelSpec) -> tuple[Any, Any]:
    """(model, processor) as `spec` says, in train mode, with the transformers loss fix installed."""
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

    from detector.loss import grounding_dino_loss

    source = resolve(spec.init, spec.cache_dir)
    processor = AutoProcessor.from_pretrained(source)
    if spec.from_config:
        config = AutoConfig.from_pretrained(source)
        model = AutoModelForZeroShotObjectDetection.from_config(config)
    else:
        model = AutoModelForZeroShotObjectDetection.from_pretrained(source)
    if type(model).__name__ != "GroundingDinoForObjectDetection":
        raise ValueError(f"the student must be a Grounding DINO, {spec.init!r} is a {type(model).__name__}")
    model.loss_function = grounding_dino_loss
    frozen = freeze(model, backbone=spec.freeze_backbone, text_encoder=spec.freeze_text_encoder)
    model.train()
    total = sum(p.numel() for p in model.parameters())
    logger.info("student from %s (%s%s): %d parameters, %d frozen", spec.init, source,
                ", fresh weights" if spec.from_config else "", total, frozen)
    return model, processor


def backbone_parameters(model: Any) -> list[Any]:
    """The image backbone's parameters (the Swin / ResNet encoder)."""
    return list(model.model.backbone.parameters())


def freeze(model: Any, *, backbone: bool, text_encoder: bool) -> int:
    """Stop gradients into the image backbone and/or the text encoder; returns how many values are frozen."""
    frozen = 0
    parts = ([model.model.backbone] if backbone else []) + ([model.model.text_backbone] if text_encoder else [])
    for part in parts:
        for param in part.parameters():
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
