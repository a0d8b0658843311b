"""Student data: stream GranuCap shards into (image, boxes, concepts) samples and Grounding DINO batches.

A box's concept is its entity's `category` in this first version (DetCLIPv3 trains on phrase and category;
the phrase of every boxed entity is still put in the prompt, so it is seen as text but supervises no box).
Negative concepts from the corpus dictionary (DetCLIPv2) come later.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import webdataset as wds
from PIL import Image

logger = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"^(\d{6})\.tar$")
# Characters that Grounding DINO treats as phrase delimiters ("." 1012, "?" 1029) or that could spell a
# special token ("[SEP]"); inside a concept they would split it into several label groups.
_UNSAFE = re.compile(r"[.?\[\]]")


class Sample(NamedTuple):
    """One training sample: RGB image, boxes (n, 4) xyxy pixels, one concept per box, prompt concepts."""

    image: Image.Image
    boxes: torch.Tensor
    concepts: list[str]
    positives: list[str]
    key: str


def complete_shards(run_dir: str | Path) -> list[Path]:
    """The finished shards of a run: `shards/{n:06d}.tar` whose `{n:06d}.stats.json` marker exists."""
    shard_dir = Path(run_dir) / "shards"
    shards = []
    for path in sorted(shard_dir.glob("*.tar")):
        match = _SHARD_NAME.match(path.name)
        if match is None:  # temp names of shards being written, anything foreign
            continue
        if not (shard_dir / f"{match.group(1)}.stats.json").exists():
            logger.info("skipping %s: no stats marker, shard is not complete", path.name)
            continue
        shards.append(path)
    return shards


def normalize_concept(text: str) -> str:
    """Lower-cased, single-spaced concept text without characters that would split its label group."""
    return " ".join(_UNSAFE.sub(" ", str(text)).lower().split())


def record_to_sample(*, image: Image.Image, record: dict[str, Any]) -> Sample:
    """Turn a decoded shard member pair into a `Sample`; boxes are clipped to the image, empty ones dropped."""
    width, height = image.size
    entities = record.get("entities") or []
    boxes, concepts, positives = [], [], []
    for box in record.get("boxes") or []:
        index = box.get("entity")
        if index is None or not 0 <= index < len(entities):
            logger.warning("%s: box points to entity %r of %d, dropped", record.get("key"), index, len(entities))
            continue
        entity = entities[index]
        concept = normalize_concept(entity.get("category") or "") or normalize_concept(entity.get("phrase") or "")
        x0, y0, x1, y1 = (float(v) for v in box["xyxy"])
        x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
        y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
        if not concept or x1 <= x0 or y1 <= y0:
            continue
        boxes.append([x0, y0, x1, y1])
        concepts.append(concept)
        for field in ("phrase", "category"):
            text = normalize_concept(entity.get(field) or "")
            if text and text not in positives:
                positives.append(text)
    tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return Sample(image=image, boxes=tensor, concepts=concepts, positives=positives, key=str(record.get("key")))


def iter_shard_samples(run_dir: str | Path, *, shuffle_buffer: int = 0, seed: int = 0) -> Iterator[Sample]:
    """Stream the samples of a run's complete shards with webdataset; shuffles shards and samples when asked."""
    shards = complete_shards(run_dir)
    if not shards:
        logger.warning("no complete shards under %s", Path(run_dir) / "shards")
        return
    urls = [str(path) for path in shards]
    if shuffle_buffer > 0:
        random.Random(seed).shuffle(urls)
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer, rng=random.Random(seed))
    dataset = dataset.decode("pilrgb")
    for item in dataset:
        record = item.get("json")
        image = item.get("jpg")
        if record is None or image is None:
            logger.warning("%s: missing jpg or json member, skipped", item.get("__key__"))
            continue
        if record.get("status", "ok") != "ok":
            continue
        yield record_to_sample(image=image, record=record)


def build_prompt(concepts: Sequence[str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """GLIP-style prompt "a. b. c." from deduplicated concepts, with each concept's character span in it.

    The spans dict keeps prompt order, so a concept's label index is its position in the dict.
    """
    spans: dict[str, tuple[int, int]] = {}
    parts, cursor = [], 0
    for concept in concepts:
        text = normalize_concept(concept)
        if not text or text in spans:
            continue
        spans[text] = (cursor, cursor + len(text))
        parts.append(text)
        cursor += len(text) + 2  # ". "
    prompt = ". ".join(parts) + "." if parts else ""
    return prompt, spans


def _fit_concepts(sample: Sample, tokenizer: Any, max_text_len: int) -> list[str]:
    """Prompt concepts that fit the text encoder: box concepts first, then the other positives."""
    ordered = list(dict.fromkeys([*sample.concepts, *sample.positives]))
    budget = max_text_len - 2  # [CLS] and [SEP]
    kept = []
    for concept in ordered:
        cost = len(tokenizer.tokenize(concept)) + 1  # its tokens and the "." after it
        if cost > budget:
            logger.debug("%s: concept %r does not fit the %d-token prompt", sample.key, concept, max_text_len)
            continue
        kept.append(concept)
        budget -= cost
    return kept


def collate(samples: Sequence[Sample], processor: Any, *, max_text_len: int = 256) -> dict[str, Any]:
    """Grounding DINO inputs for a batch, plus `labels`: per image `class_labels` (index of the box's concept
    among the prompt's "."-separated phrases) and `boxes` (cxcywh normalised by the image's own size)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    tokenizer = processor.tokenizer
    prompts, counts, labels = [], [], []
    for sample in samples:
        prompt, spans = build_prompt(_fit_concepts(sample, tokenizer, max_text_len))
        counts.append(len(spans))
        index = {concept: i for i, concept in enumerate(spans)}
        keep = [i for i, concept in enumerate(sample.concepts) if concept in index]
        if len(keep) < len(sample.concepts):
            logger.warning("%s: %d boxes dropped, their concepts did not fit the prompt",
                           sample.key, len(sample.concepts) - len(keep))
        width, height = sample.image.size
        xyxy = sample.boxes[keep]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        x0, y0, x1, y1 = (xyxy / scale).clamp(0.0, 1.0).unbind(-1)
        boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1).reshape(-1, 4)
        class_labels = torch.tensor([index[sample.concepts[i]] for i in keep], dtype=torch.long)
        prompts.append(prompt)
        labels.append({"class_labels": class_labels, "boxes": boxes})
    inputs = processor(images=[s.image for s in samples], text=prompts, return_tensors="pt", padding="longest",
                       truncation=True, max_length=max_text_len)
    _check_label_groups(inputs["input_ids"], prompts, counts)
    batch = dict(inputs)
    batch["labels"] = labels
    return batch


def _check_label_groups(input_ids: torch.Tensor, prompts: Sequence[str], counts: Sequence[int]) -> None:
    """Fail loudly when the tokenised prompt's phrase groups (what the GDINO loss indexes) miss a concept."""
    special = torch.tensor([101, 102, 1012, 1029, 0])  # GDINO's hard-coded delimiters, plus [PAD]
    delimiter = torch.isin(input_ids, special)
    groups = torch.cumsum(delimiter, dim=1) * (~delimiter)
    for row, prompt, expected in zip(groups, prompts, counts):
        found = len(torch.unique(row[row > 0]))
        if found != expected:
            raise ValueError(f"prompt {prompt!r} tokenises into {found} phrase groups, expected {expected}")
