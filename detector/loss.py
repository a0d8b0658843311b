"""transformers' Grounding DINO loss (5.23) with its label-map offset bug fixed."""

from __future__ import annotations

import torch
from transformers.loss.loss_for_object_detection import _set_aux_loss
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss


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
