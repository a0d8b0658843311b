"""First student loop: fine-tune a Grounding DINO on GranuCap shards in one process (Ray Train comes later)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
from transformers.loss.loss_for_object_detection import _set_aux_loss
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss

from detector.data import Sample, collate, iter_shard_samples

logger = logging.getLogger(__name__)

_SHUFFLE_BUFFER = 256
_MAX_GRAD_NORM = 0.1  # DETR / Grounding DINO default
_WEIGHT_DECAY = 1e-4


class _ImageLoss(GroundingDinoImageLoss):
    """transformers' Grounding DINO criterion with the label-map offsets fixed for any batch.

    Upstream (5.23) offsets image i's class labels by len(label_maps[i]) instead of the number of labels of
    images 0..i-1, so batches above 2, or of 2 with different prompt lengths, supervise the wrong tokens.
    """

    def _get_target_classes_one_hot(self, outputs, targets, indices):
        logits = outputs["logits"]
        label_maps = outputs["label_maps"]
        offsets = [0]
        for label_map in label_maps[:-1]:
            offsets.append(offsets[-1] + len(label_map))
        class_labels = torch.cat(
            [target["class_labels"][j] + offset for target, (_, j), offset in zip(targets, indices, offsets)]
        )
        idx = self._get_source_permutation_idx(indices)
        onehot = torch.zeros_like(logits, dtype=torch.long)
        onehot[idx] = torch.cat(label_maps, dim=0)[class_labels].to(torch.long)
        return onehot


def grounding_dino_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, outputs_class=None,
                        outputs_coord=None, encoder_logits=None, encoder_pred_boxes=None):
    """Same as transformers' GroundingDinoForObjectDetectionLoss (weights included), using `_ImageLoss`."""
    matcher = GroundingDinoHungarianMatcher(
        class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost
    )
    criterion = _ImageLoss(matcher=matcher, focal_alpha=config.focal_alpha, losses=["labels", "boxes", "cardinality"])
    criterion.to(device)
    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps, "text_mask": text_mask}
    auxiliary_outputs = None
    if config.auxiliary_loss:
        auxiliary_outputs = _set_aux_loss(outputs_class, outputs_coord)
        for aux in auxiliary_outputs:
            aux["label_maps"], aux["text_mask"] = label_maps, text_mask
        outputs["auxiliary_outputs"] = auxiliary_outputs
    loss_dict = criterion(outputs, labels)
    # upstream weighs loss_ce by a literal 2.0, not config.class_loss_coefficient; kept for parity
    weights = {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
    if config.two_stage:
        encoder_outputs = {"logits": encoder_logits, "pred_boxes": encoder_pred_boxes, "label_maps": label_maps,
                           "text_mask": text_mask}
        loss_dict.update({k + "_enc": v for k, v in criterion(encoder_outputs, labels).items()})
        weights.update({k + "_enc": v for k, v in list(weights.items())})
    if config.auxiliary_loss:
        base = {k: v for k, v in weights.items() if not k.endswith("_enc")}
        for i in range(config.decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    return loss, loss_dict, auxiliary_outputs


def _resolve(model: str, cache_dir: str | None) -> str:
    """A local directory for `model`: through engine.models.loading when present, else the ref itself."""
    try:
        from engine.models.loading import resolve_model
    except ImportError:
        if model.startswith("tiny:"):
            raise ValueError(f"{model!r} needs engine.models.loading, which is not available") from None
        return model
    return resolve_model(model, cache_dir=cache_dir)


def _batches(shards: Path, *, batch_size: int, seed: int) -> Iterator[list[Sample]]:
    """Endless batches over the shards, reshuffled each pass; samples without boxes are skipped for now."""
    epoch = 0
    while True:
        seen = 0
        batch: list[Sample] = []
        for sample in iter_shard_samples(shards, shuffle_buffer=_SHUFFLE_BUFFER, seed=seed + epoch):
            if len(sample.boxes) == 0:  # no positives; useful once negative concepts are sampled
                continue
            seen += 1
            batch.append(sample)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        if seen == 0:
            raise ValueError(f"no samples with boxes in the complete shards of {shards}")
        epoch += 1


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    moved["labels"] = [{k: v.to(device) for k, v in target.items()} for target in batch["labels"]]
    return moved


def train(*, shards: str | Path, out: str | Path, model: str = "tiny:grounding-dino", steps: int = 100,
          batch_size: int = 2, lr: float = 1e-4, seed: int = 0, cache_dir: str | None = None,
          log_every: int = 10) -> dict:
    """Fine-tune `model` on the run dir `shards` for `steps` steps; save model, processor, train_log.jsonl in `out`."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = _resolve(model, cache_dir)
    processor = AutoProcessor.from_pretrained(source)
    net = AutoModelForZeroShotObjectDetection.from_pretrained(source).to(device)
    net.loss_function = grounding_dino_loss
    net.train()
    max_text_len = int(getattr(net.config, "max_text_len", 256))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=_WEIGHT_DECAY)
    logger.info("training %s (%s) on %s for %d steps, batch %d, lr %g, device %s",
                model, source, shards, steps, batch_size, lr, device)

    losses: list[float] = []
    start = time.perf_counter()
    batches = _batches(Path(shards), batch_size=batch_size, seed=seed)
    with open(out / "train_log.jsonl", "w", encoding="utf-8") as log:
        for step in range(1, steps + 1):
            batch = _to_device(collate(next(batches), processor, max_text_len=max_text_len), device)
            output = net(**batch)
            loss = output.loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), _MAX_GRAD_NORM)
            optimizer.step()
            losses.append(loss.item())
            parts = {k: round(float(v.detach()), 6) for k, v in output.loss_dict.items()}
            log.write(json.dumps({"step": step, "loss": losses[-1], "grad_norm": float(grad_norm), **parts,
                                  "seconds": round(time.perf_counter() - start, 3)}) + "\n")
            log.flush()
            if step % log_every == 0 or step == 1 or step == steps:
                logger.info("step %d/%d loss %.4f", step, steps, losses[-1])
    seconds = time.perf_counter() - start

    net.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "mean_loss_first_10": sum(losses[:10]) / len(losses[:10]),
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": seconds,
    }
    logger.info("trained %d steps in %.1f s: loss %.4f -> %.4f", steps, seconds, losses[0], losses[-1])
    return summary
