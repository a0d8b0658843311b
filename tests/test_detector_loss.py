"""detector.loss: transformers' Grounding DINO loss computed image by image, against upstream's loss.

Upstream (`GroundingDinoForObjectDetectionLoss`) is right for a batch of 1 and for a batch of 2 whose prompts have
the same number of phrases; there both must agree. Beyond that upstream offsets the label maps wrongly, and
`grounding_dino_loss` must equal the per-image losses (each from upstream on a batch of one) combined by hand.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import GroundingDinoConfig
from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

from detector.loss import grounding_dino_loss

QUERIES, TEXT_LEN, LAYERS = 6, 16, 3
CLS, SEP, DOT = 101, 102, 1012
WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # upstream's, with GroundingDinoConfig's defaults


def make_batch(phrases, classes, *, seed=0, auxiliary_loss=True, two_stage=True):
    """The loss's arguments for a random batch, as GroundingDinoForObjectDetection passes them.

    phrases[i]: the token count of each phrase of image i's prompt ("[CLS] a a . b . [SEP]"); classes[i]: the class
    label (phrase index) of each of image i's target boxes. Returns (args, kwargs, leaves), leaves being the tensors
    that gradients flow to: every decoder layer's logits and boxes, and the encoder's."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(phrases)
    input_ids = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    attention_mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    for i, lengths in enumerate(phrases):
        ids = [CLS]
        for length in lengths:
            ids += (2000 + torch.randint(0, 500, (length,), generator=gen)).tolist() + [DOT]
        ids.append(SEP)
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1

    def boxes(*shape):  # cxcywh inside the image, sides in [0.05, 0.55]
        raw = torch.rand(*shape, 4, generator=gen)
        return raw * torch.tensor([0.6, 0.6, 0.5, 0.5]) + torch.tensor([0.2, 0.2, 0.05, 0.05])

    outputs_class = torch.randn(LAYERS, batch, QUERIES, TEXT_LEN, generator=gen).requires_grad_(True)
    outputs_coord = boxes(LAYERS, batch, QUERIES).requires_grad_(True)
    encoder_logits = torch.randn(batch, QUERIES, TEXT_LEN, generator=gen).requires_grad_(True)
    encoder_pred_boxes = boxes(batch, QUERIES).requires_grad_(True)
    labels = [{"class_labels": torch.tensor(c, dtype=torch.long), "boxes": boxes(len(c))} for c in classes]
    logits, pred_boxes = outputs_class[-1], outputs_coord[-1]
    config = GroundingDinoConfig(decoder_layers=LAYERS, auxiliary_loss=auxiliary_loss, two_stage=two_stage)
    args = (logits, labels, torch.device("cpu"), pred_boxes, config, build_label_maps(logits, input_ids),
            build_text_mask(logits, attention_mask))
    kwargs = {"outputs_class": outputs_class, "outputs_coord": outputs_coord, "encoder_logits": encoder_logits,
              "encoder_pred_boxes": encoder_pred_boxes}
    return args, kwargs, (outputs_class, outputs_coord, encoder_logits, encoder_pred_boxes)


def one_image(args, kwargs, i):
    """The arguments for image i alone (a batch of one)."""
    logits, labels, device, pred_boxes, config, label_maps, text_mask = args
    sliced = (logits[i:i + 1], [labels[i]], device, pred_boxes[i:i + 1], config, label_maps[i:i + 1],
              text_mask[i:i + 1])
    return sliced, {"outputs_class": kwargs["outputs_class"][:, i:i + 1],
                    "outputs_coord": kwargs["outputs_coord"][:, i:i + 1],
                    "encoder_logits": kwargs["encoder_logits"][i:i + 1],
                    "encoder_pred_boxes": kwargs["encoder_pred_boxes"][i:i + 1]}


def by_hand(args, kwargs):
    """(loss, loss_dict) from upstream run on each image alone (where its offsets are right), combined as a batch.

    Upstream divides each term by its batch's box count clamped to >= 1, so image i's sum is its term times
    max(n_i, 1) and the batch's term is the sum of those over max(N, 1); cardinality_error is a mean over images."""
    labels = args[1]
    total_boxes = max(sum(len(t["boxes"]) for t in labels), 1)
    parts = []
    for i in range(len(labels)):
        _, loss_dict, _ = GroundingDinoForObjectDetectionLoss(*one_image(args, kwargs, i)[0],
                                                              **one_image(args, kwargs, i)[1])
        parts.append((max(len(labels[i]["boxes"]), 1), loss_dict))
    combined = {}
    for key in parts[0][1]:
        if key.startswith("cardinality_error"):
            combined[key] = sum(d[key] for _, d in parts) / len(parts)
        else:
            combined[key] = sum(d[key] * n for n, d in parts) / total_boxes
    loss = sum(value * WEIGHTS[re.sub(r"_(\d+|enc)$", "", key)]
               for key, value in combined.items() if not key.startswith("cardinality_error"))
    return loss, combined


def assert_same(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_by_hand_weights_every_term():
    args, kwargs, _ = make_batch([[1, 2]], [[0]])
    keys = by_hand(args, kwargs)[1].keys()
    assert {"loss_ce", "loss_ce_0", "loss_ce_1", "loss_ce_enc", "loss_giou_1", "cardinality_error_enc"} <= set(keys)
    assert "loss_ce_2" not in keys  # LAYERS - 1 auxiliary heads


@pytest.mark.parametrize("auxiliary_loss, two_stage", [(True, True), (False, False)])
@pytest.mark.parametrize("phrases, classes", [
    ([[1, 2, 1]], [[0, 2]]),  # batch of 1
    ([[1, 2, 1], [2, 1, 3]], [[0, 2], [1, 2, 2]]),  # batch of 2, the same number of phrases
    ([[2, 1], [1, 1]], [[1], [0, 1, 1]]),
], ids=["batch1", "batch2-a", "batch2-b"])
def test_equals_upstream_where_upstream_is_right(phrases, classes, auxiliary_loss, two_stage):
    flags = {"auxiliary_loss": auxiliary_loss, "two_stage": two_stage}
    for seed in range(3):
        args, kwargs, leaves = make_batch(phrases, classes, seed=seed, **flags)
        loss, loss_dict, auxiliary = grounding_dino_loss(*args, **kwargs)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        args, kwargs, leaves = make_batch(phrases, classes, seed=seed, **flags)
        up_loss, up_dict, up_auxiliary = GroundingDinoForObjectDetectionLoss(*args, **kwargs)
        up_grads = torch.autograd.grad(up_loss, leaves, allow_unused=True)

        assert list(loss_dict) == list(up_dict)
        for key in up_dict:
            assert_same(loss_dict[key], up_dict[key])
        assert_same(loss, up_loss)
        for ours, theirs in zip(grads, up_grads):
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert_same(ours, theirs)
        if auxiliary_loss:
            assert len(auxiliary) == len(up_auxiliary) == LAYERS - 1
            for ours, theirs in zip(auxiliary, up_auxiliary):
                assert list(ours) == list(theirs) == ["logits", "pred_boxes", "label_maps", "text_mask"]
                for key in ours:
                    assert all(torch.equal(a, b) for a, b in zip(ours[key], theirs[key]))
        else:
            assert auxiliary is None and up_auxiliary is None


def test_batch_of_three_with_different_prompts_is_the_per_image_sum_and_not_upstreams():
    phrases, classes = [[1, 2, 1], [2, 1], [1, 1, 3, 1]], [[0, 2], [1], [3, 0, 2]]
    for seed in range(3):
        args, kwargs, _ = make_batch(phrases, classes, seed=seed)
        loss, loss_dict, _ = grounding_dino_loss(*args, **kwargs)
        hand_loss, hand_dict = by_hand(args, kwargs)
        assert list(loss_dict) == list(hand_dict)
        for key in hand_dict:
            assert_same(loss_dict[key], hand_dict[key])
        assert_same(loss, hand_loss)

        # upstream matches the same boxes (the matcher has no offset bug) but puts images 1 and 2's positives
        # on the wrong tokens: its box terms agree, its classification terms do not (by little with random logits;
        # test_positives_land_on_each_images_own_phrase_tokens shows how much it can matter)
        up_loss, up_dict, _ = GroundingDinoForObjectDetectionLoss(*args, **kwargs)
        for key in up_dict:
            if key.startswith(("loss_bbox", "loss_giou", "cardinality_error")):
                assert_same(loss_dict[key], up_dict[key])
            else:
                assert not torch.allclose(loss_dict[key], up_dict[key], rtol=1e-4, atol=1e-4), key
        assert not torch.allclose(loss, up_loss, rtol=1e-4, atol=1e-4)


def test_positives_land_on_each_images_own_phrase_tokens():
    """Query 0 of each image sits on its target, sure of the target's phrase tokens, the other queries are sure of
    nothing: the focal loss is near zero if the positives are on each image's own tokens, as they are here only."""
    phrases, classes = [[1, 2, 1], [2, 1], [1, 1, 3, 1]], [[2], [1], [2]]
    args, kwargs, _ = make_batch(phrases, classes, auxiliary_loss=False, two_stage=False)
    logits, labels, _, pred_boxes, _, label_maps, text_mask = args
    right = torch.stack([label_maps[i][labels[i]["class_labels"][0]] for i in range(3)]).bool()
    with torch.no_grad():
        logits.fill_(-12.0)
        logits[:, 0] = torch.where(right, 12.0, -12.0)
        pred_boxes[:, 0] = torch.stack([label["boxes"][0] for label in labels])
    _, loss_dict, _ = grounding_dino_loss(*args, **kwargs)
    _, up_dict, _ = GroundingDinoForObjectDetectionLoss(*args, **kwargs)
    assert loss_dict["loss_ce"].item() < 1e-6
    assert loss_dict["loss_bbox"].item() < 1e-6 and loss_dict["loss_giou"].item() < 1e-6
    assert up_dict["loss_ce"].item() > 1.0  # upstream supervises other tokens of images 1 and 2


def negatives(logits, text_mask, alpha=0.25):
    """Sigmoid focal loss (gamma 2) of logits whose targets are all 0, summed over the text mask."""
    x = logits[text_mask]
    return ((1 - alpha) * torch.nn.functional.softplus(x) * torch.sigmoid(x) ** 2).sum()


def test_an_image_without_boxes_contributes_its_negatives():
    phrases, classes = [[1, 2, 1], [2, 1], [1, 1, 3, 1]], [[0, 2], [], [3, 0, 2]]
    args, kwargs, leaves = make_batch(phrases, classes)
    logits, labels, _, _, _, _, text_mask = args
    loss, loss_dict, _ = grounding_dino_loss(*args, **kwargs)
    hand_loss, hand_dict = by_hand(args, kwargs)
    for key in hand_dict:
        assert_same(loss_dict[key], hand_dict[key])
    assert_same(loss, hand_loss)

    # its classification term is its negatives, over the batch's 5 boxes; the other two images' terms are theirs
    rest_args = (logits[[0, 2]], [labels[0], labels[2]], args[2], args[3][[0, 2]], args[4],
                 (args[5][0], args[5][2]), text_mask[[0, 2]])
    rest_kwargs = {"outputs_class": kwargs["outputs_class"][:, [0, 2]],
                   "outputs_coord": kwargs["outputs_coord"][:, [0, 2]],
                   "encoder_logits": kwargs["encoder_logits"][[0, 2]],
                   "encoder_pred_boxes": kwargs["encoder_pred_boxes"][[0, 2]]}
    _, rest_dict, _ = grounding_dino_loss(*rest_args, **rest_kwargs)
    assert_same(loss_dict["loss_ce"] * 5, rest_dict["loss_ce"] * 5 + negatives(logits[1], text_mask[1]))
    assert_same(loss_dict["loss_bbox"], rest_dict["loss_bbox"])

    # and it gets gradients: on its prompt's tokens, none past them
    grad = torch.autograd.grad(loss, leaves[0])[0][-1, 1]
    assert bool((grad[text_mask[1]] != 0).all()) and bool((grad[~text_mask[1]] == 0).all())


def test_a_batch_without_any_box_is_all_negatives():
    phrases, classes = [[1, 2], [3]], [[], []]
    args, kwargs, _ = make_batch(phrases, classes, auxiliary_loss=False, two_stage=False)
    loss, loss_dict, _ = grounding_dino_loss(*args, **kwargs)
    logits, text_mask = args[0], args[6]
    assert_same(loss_dict["loss_ce"], negatives(logits, text_mask))  # the box count is clamped to 1
    assert loss_dict["loss_bbox"].item() == loss_dict["loss_giou"].item() == 0.0
    assert_same(loss, 2.0 * loss_dict["loss_ce"])
