"""transformers' Grounding DINO loss, computed image by image so that any batch supervises the right tokens.

Upstream's `GroundingDinoImageLoss` (transformers 5.x) builds the focal-loss targets of a batch by concatenating the
images' label maps and offsetting image i's class labels by `len(label_maps[i])`, where the offset should be the
number of labels of images 0..i-1. So a batch of more than 2 images, or of 2 whose prompts have different numbers
of phrases, puts the positives of images 1.. on the wrong tokens (or on another image's). With a single image the
offset is 0 and the stock code is right, so `grounding_dino_loss` runs the stock (public) criterion one image at a
time and combines the parts exactly as upstream normalises a batch:

* every loss term of `GroundingDinoImageLoss` (`loss_ce`: focal loss summed over the text-masked logits of all
  queries; `loss_bbox`, `loss_giou`: summed over the matched boxes) is a sum over images divided by `num_boxes`, the
  batch's number of target boxes clamped to >= 1. Each image's term is computed with `num_boxes=1` (its plain sum),
  the sums are added and divided once by the batch's `num_boxes`;
* `cardinality_error` (logged only, never weighted into the loss) is upstream's mean over the batch's images of
  |predicted boxes - target boxes|, so it is the mean of the per-image values;
* the Hungarian matching is per image upstream too (one assignment per image on its own cost block).

`num_boxes` is this process's box count. Upstream reduces it across processes only when accelerate is installed and
its `PartialState` is initialised, which the Ray Train workers (and this project's environment) do not do; a
per-image call of the criterion's `forward` would also run that collective once per image, so it is avoided.
"""

from __future__ import annotations

import torch
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss

LOSSES = ["labels", "boxes", "cardinality"]
MEANS = {"cardinality_error"}  # averaged over images; every other term is normalised by the batch's box count


def auxiliary_heads(outputs_class, outputs_coord) -> list[dict]:
    """One {"logits", "pred_boxes"} dict per intermediate decoder layer (all but the last), as upstream builds."""
    return [{"logits": logits, "pred_boxes": boxes} for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1])]


def _image(head: dict, i: int) -> dict:
    """Image i of a head's outputs, as a batch of one."""
    return {"logits": head["logits"][i:i + 1], "pred_boxes": head["pred_boxes"][i:i + 1],
            "label_maps": head["label_maps"][i:i + 1], "text_mask": head["text_mask"][i:i + 1]}


def _head_losses(criterion: GroundingDinoImageLoss, head: dict, labels: list[dict], num_boxes: float) -> dict:
    """The criterion's losses for one head (decoder layer or encoder) of the batch, computed image by image."""
    parts: list[dict] = []
    for i, target in enumerate(labels):
        one, targets = _image(head, i), [target]
        indices = criterion.matcher(one, targets)
        found: dict = {}
        for name in criterion.losses:
            found.update(criterion.get_loss(name, one, targets, indices, 1.0))  # sums: normalised below
        parts.append(found)
    return {key: sum(part[key] for part in parts) / (len(parts) if key in MEANS else num_boxes) for key in parts[0]}


def grounding_dino_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, outputs_class=None,
                        outputs_coord=None, encoder_logits=None, encoder_pred_boxes=None):
    """transformers' `GroundingDinoForObjectDetectionLoss` (same arguments, terms, keys, weights and return value
    (loss, loss_dict, auxiliary_outputs)), with each image's terms computed on its own (see the module docstring)."""
    matcher = GroundingDinoHungarianMatcher(
        class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost
    )
    criterion = GroundingDinoImageLoss(matcher=matcher, focal_alpha=config.focal_alpha, losses=LOSSES)
    criterion.to(device)
    num_boxes = max(float(sum(len(target["class_labels"]) for target in labels)), 1.0)
    heads = {"": {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps, "text_mask": text_mask}}
    auxiliary_outputs = None
    if config.auxiliary_loss:
        auxiliary_outputs = auxiliary_heads(outputs_class, outputs_coord)
        for k, aux in enumerate(auxiliary_outputs):
            aux["label_maps"], aux["text_mask"] = label_maps, text_mask
            heads[f"_{k}"] = aux
    if config.two_stage:
        heads["_enc"] = {"logits": encoder_logits, "pred_boxes": encoder_pred_boxes, "label_maps": label_maps,
                         "text_mask": text_mask}
    loss_dict = {}
    for suffix, head in heads.items():
        loss_dict.update({key + suffix: value for key, value in _head_losses(criterion, head, labels,
                                                                             num_boxes).items()})
    # upstream weighs loss_ce by a literal 2.0, not config.class_loss_coefficient; kept for parity
    base = {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
    weights = {key + suffix: value for suffix in heads for key, value in base.items()}
    loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    return loss, loss_dict, auxiliary_outputs
