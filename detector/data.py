"""Student data: stream GranuCap shards into (image, boxes, concepts) samples and Grounding DINO batches.

A box is named by its entity's category or phrase (DetCLIPv3 trains on both); the prompt holds the sample's
positive concepts plus negative concepts drawn from the corpus' concept dictionary (DetCLIPv2, T-Rex2),
capped to the text encoder's token limit, in shuffled order.

The run is a local folder or a URI of any fsspec filesystem (engine/io/storage.py); only its complete units
are read (`engine.io.shard_reader.complete_unit_ids`: their marker exists).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from engine.boxes import Boxes
from engine.io.shard_reader import complete_unit_ids, open_run, read_index, read_shard
from engine.io.storage import Location

logger = logging.getLogger(__name__)

# Characters that Grounding DINO treats as phrase delimiters ("." 1012, "?" 1029) or that could spell a
# special token ("[SEP]"); inside a concept they would split it into several label groups.
_UNSAFE = re.compile(r"[.?\[\]]")


class Sample(NamedTuple):
    """One training sample: RGB image, boxes (n, 4) xyxy pixels, and per box its entity's category and phrase."""

    image: Image.Image
    boxes: torch.Tensor
    concepts: list[str]  # per box: the entity's category (its phrase when the category is empty)
    phrases: list[str]  # per box: the entity's phrase (its category when the phrase is empty)
    key: str


def normalize_concept(text: str) -> str:
    """Lower-cased, single-spaced concept text without characters that would split its label group."""
    return " ".join(_UNSAFE.sub(" ", str(text)).lower().split())


def record_to_sample(*, image: Image.Image, record: dict[str, Any]) -> Sample:
    """Turn a decoded shard member pair into a `Sample`; boxes are clipped to the image, empty ones dropped.

    Raises ValueError when the record's boxes are malformed (`engine.boxes.Boxes` says how)."""
    width, height = image.size
    entities = record.get("entities") or []
    boxes = Boxes.from_rows(record.get("boxes") or [])
    known = (boxes.entity >= 0) & (boxes.entity < len(entities))
    for index in boxes.entity[~known].tolist():
        logger.warning("%s: box points to entity %r of %d, dropped", record.get("key"), index, len(entities))
    # each entity's (category, phrase) as concepts, normalised once however many boxes it has
    names = [(normalize_concept(e.get("category") or ""), normalize_concept(e.get("phrase") or "")) for e in entities]
    boxes = boxes.select(known).clip(width, height)
    named = np.array([any(names[index]) for index in boxes.entity.tolist()], dtype=bool)
    boxes = boxes.select(named & boxes.has_area())
    concepts = [names[index][0] or names[index][1] for index in boxes.entity.tolist()]
    phrases = [names[index][1] or names[index][0] for index in boxes.entity.tolist()]
    tensor = torch.as_tensor(boxes.xyxy, dtype=torch.float32).reshape(-1, 4)
    return Sample(image=image, boxes=tensor, concepts=concepts, phrases=phrases, key=str(record.get("key")))


def iter_shard_samples(run: str | Path | Location, *, shuffle_buffer: int = 0, seed: int = 0, rank: int = 0,
                       world_size: int = 1) -> Iterator[Sample]:
    """Stream the samples of a run's complete units with webdataset, one at a time (nothing is preloaded).

    Shards and samples are shuffled when asked (same seed, same order). With `world_size` > 1 this worker
    keeps every `world_size`-th sample from position `rank`: every worker reads the same seeded stream, so
    the split is disjoint and complete even when there are fewer shards than workers.
    """
    location = open_run(run)
    units = complete_unit_ids(location)
    if not units:
        logger.warning("no complete shards under %s", location.uri_of("shards"))
        return
    if shuffle_buffer > 0:
        random.Random(seed).shuffle(units)
    items: Iterator[dict[str, Any]] = itertools.chain.from_iterable(read_shard(location, unit) for unit in units)
    if shuffle_buffer > 0:
        items = wds.shuffle(shuffle_buffer, rng=random.Random(seed))(items)
    position = -1
    for item in items:
        position += 1
        if position % world_size != rank:
            continue
        raw_record, raw_image = item.get("json"), item.get("jpg")
        if raw_record is None or raw_image is None:
            logger.warning("%s: missing jpg or json member, skipped", item.get("__key__"))
            continue
        record = json.loads(raw_record)
        if record.get("status", "ok") != "ok":
            continue
        try:
            image = Image.open(io.BytesIO(raw_image))
            image = image.convert("RGB")
        except (OSError, ValueError) as exc:  # a corrupt image costs its sample, not the run
            logger.warning("%s: image does not decode (%s), skipped", item.get("__key__"), exc)
            continue
        try:
            sample = record_to_sample(image=image, record=record)
        except ValueError as exc:  # so do malformed boxes
            logger.warning("%s: %s, skipped", item.get("__key__"), exc)
            continue
        yield sample


class ConceptDictionary:
    """The corpus' concepts (entity phrases and categories of ok samples) with their counts, read from the
    run's parquet index. Negative concepts for a sample are drawn from it (DetCLIPv2, T-Rex2)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = {c: n for c, n in counts.items() if c and n > 0}
        self.concepts = sorted(self.counts)
        # frequency ** 0.5 flattens the head of the distribution, so rare concepts are seen as negatives too
        self.weights = [self.counts[c] ** 0.5 for c in self.concepts]

    def __len__(self) -> int:
        return len(self.concepts)

    @classmethod
    def from_run(cls, run: str | Path | Location) -> "ConceptDictionary":
        """Count phrases and categories of the entities of ok samples in the complete units' index parts."""
        location = open_run(run)
        counts: Counter[str] = Counter()
        units = complete_unit_ids(location)
        for unit in units:
            table = read_index(location, unit, columns=["status", "entities"])
            for status, entities in zip(table.column("status").to_pylist(), table.column("entities").to_pylist()):
                if status != "ok":
                    continue
                for entity in entities or []:
                    for field in ("phrase", "category"):
                        text = normalize_concept((entity or {}).get(field) or "")
                        if text:
                            counts[text] += 1
        logger.info("concept dictionary: %d concepts from %d index files", len(counts), len(units))
        return cls(dict(counts))

    def sample(self, k: int, *, exclude: set[str], rng: random.Random) -> list[str]:
        """Up to `k` distinct concepts not in `exclude`, drawn by weight without replacement."""
        if k <= 0 or not self.concepts:
            return []
        pool = [(c, w) for c, w in zip(self.concepts, self.weights) if c not in exclude]
        chosen: list[str] = []
        while pool and len(chosen) < k:
            pick = rng.choices(range(len(pool)), weights=[w for _, w in pool])[0]
            chosen.append(pool.pop(pick)[0])
        return chosen


def augment(sample: Sample, *, rng: random.Random, scales: Sequence[int], max_size: int,
            flip_prob: float) -> Sample:
    """Resize (shorter side drawn from `scales`, longer side at most `max_size`) and maybe flip horizontally;
    boxes follow the image."""
    image, boxes = sample.image, sample.boxes.clone()
    width, height = image.size
    short = rng.choice(list(scales))
    ratio = min(short / min(width, height), max_size / max(width, height))
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
        boxes = boxes * torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
    if flip_prob > 0 and rng.random() < flip_prob:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=-1)
    return sample._replace(image=image, boxes=boxes.reshape(-1, 4))


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


def prompt_concepts(sample: Sample, *, tokenizer: Any, max_text_len: int, rng: random.Random | None = None,
                    dictionary: ConceptDictionary | None = None, negatives: int = 0,
                    phrase_prob: float = 0.0) -> tuple[list[str], list[str]]:
    """A sample's prompt concepts and the concept of each of its boxes.

    A box is named by its entity's phrase with probability `phrase_prob`, else by its category (DetCLIPv3
    trains on both). Positives go first, then up to `negatives` dictionary concepts that are none of the
    sample's phrases or categories, while they fit the text encoder's `max_text_len`; then the order is
    shuffled (with `rng`) so that position says nothing about being positive.
    """
    if rng is None and (negatives or phrase_prob):
        raise ValueError("negatives and phrase_prob need an rng")
    box_texts = [
        phrase if rng is not None and phrase_prob > 0 and rng.random() < phrase_prob else concept
        for concept, phrase in zip(sample.concepts, sample.phrases)
    ]
    positives = list(dict.fromkeys(box_texts))
    sampled = []
    if dictionary is not None and negatives > 0 and rng is not None:
        sampled = dictionary.sample(negatives, exclude={*sample.concepts, *sample.phrases}, rng=rng)
    budget = max_text_len - 2  # [CLS] and [SEP]
    kept = []
    for concept in [*positives, *sampled]:
        cost = len(tokenizer.tokenize(concept)) + 1  # its tokens and the "." after it
        if cost > budget:
            logger.debug("%s: concept %r does not fit the %d-token prompt", sample.key, concept, max_text_len)
            continue
        kept.append(concept)
        budget -= cost
    if rng is not None:
        rng.shuffle(kept)
    return kept, box_texts


def collate(samples: Sequence[Sample], processor: Any, *, max_text_len: int = 256, rng: random.Random | None = None,
            dictionary: ConceptDictionary | None = None, negatives: int = 0, phrase_prob: float = 0.0,
            do_resize: bool = True) -> dict[str, Any]:
    """Grounding DINO inputs for a batch, plus `labels` as the transformers loss expects them: per image
    `class_labels` (index of the box's concept among the prompt's "."-separated phrases) and `boxes`
    (cxcywh normalised by the image's own size). `do_resize=False` when `augment` already resized."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    tokenizer = processor.tokenizer
    prompts, counts, labels = [], [], []
    for sample in samples:
        concepts, box_texts = prompt_concepts(sample, tokenizer=tokenizer, max_text_len=max_text_len, rng=rng,
                                              dictionary=dictionary, negatives=negatives, phrase_prob=phrase_prob)
        prompt, spans = build_prompt(concepts)
        counts.append(len(spans))
        index = {concept: i for i, concept in enumerate(spans)}
        keep = [i for i, text in enumerate(box_texts) if text in index]
        if len(keep) < len(box_texts):
            logger.warning("%s: %d boxes dropped, their concepts did not fit the prompt",
                           sample.key, len(box_texts) - len(keep))
        width, height = sample.image.size
        xyxy = sample.boxes[keep]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        x0, y0, x1, y1 = (xyxy / scale).clamp(0.0, 1.0).unbind(-1)
        boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1).reshape(-1, 4)
        class_labels = torch.tensor([index[box_texts[i]] for i in keep], dtype=torch.long)
        prompts.append(prompt)
        labels.append({"class_labels": class_labels, "boxes": boxes})
    image_kwargs = {} if do_resize else {"do_resize": False}
    inputs = processor(images=[s.image for s in samples], text=prompts, return_tensors="pt", padding="longest",
                       truncation=True, max_length=max_text_len, **image_kwargs)
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
