"""Describe: a vision-language model names each kept box from its crop, as one entity {phrase, category,
parent_category} (DetCLIPv3's object-captioner labels); vocabulary-free annotation when the teacher was
prompted with generic texts.

Runs after the filter, so only the boxes that will be written are described. Each box's crop (the box grown
by `context` of its size on each side, clipped to the image, shrunk to `image_max_side`) is one chat request
with the `describe` prompt and the one-entity JSON schema. Then, per box:

- a box of a generic prompt's entity (`ground.generic_prompts`, e.g. "object") takes the name as its entity:
  the name joins the sample's entities (once per phrase and category) and the box points at it; such a box
  with no valid name is dropped unless `keep_unnamed`;
- any other box keeps its entity and is marked with `label_agreement`: whether the name agrees with the
  entity (engine/language/agreement.py); `drop_disagreeing` drops those that do not.

Every box that got a valid name keeps it in `described` ("phrase|category|parent_category"). A sample left
with fewer than the filter's `min_boxes` is rejected (too_few_boxes); a request the backend failed fails the
sample (backend_error), as in the other language stages.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from engine.backends.base import (
    BackendSpec,
    ChatBackend,
    ChatRequest,
    ChatResult,
    chat_backend_options,
    make_chat_backend,
    usage_of,
)
from engine.boxes import Boxes
from engine.config import DescribeSpec
from engine.images import open_rgb
from engine.language.agreement import agrees
from engine.language.entities import (
    ENTITY_JSON_SCHEMA,
    EntityFormatError,
    entity_label,
    is_generic,
    normalize_entities,
    parse_entity_json,
)
from engine.models.loading import model_label
from engine.prompts import load_prompt
from engine.records import Record
from engine.stages.base import Stage


def crop_box(image: Image.Image, xyxy: Any, context: float) -> Image.Image:
    """The box grown by `context` of its width and height on each side, clipped to the image, at least one
    pixel each way."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    dx, dy = (x1 - x0) * context, (y1 - y0) * context
    left, top = max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy)))
    right, bottom = min(image.width, int(np.ceil(x1 + dx))), min(image.height, int(np.ceil(y1 + dy)))
    right, bottom = max(right, min(left + 1, image.width)), max(bottom, min(top + 1, image.height))
    return image.crop((left, top, right, bottom))


class Describe(Stage):
    name = "describe"
    requires = ("image", "entities", "boxes")
    provides = ("boxes", "entities")

    def __init__(self, spec: DescribeSpec, *, generic_prompts: list[str] = (), min_boxes: int = 0,
                 cache_dir: str | None = None) -> None:
        super().__init__(spec)
        self.generic = list(generic_prompts)
        self.min_boxes = min_boxes
        self.cache_dir = cache_dir
        self.prompt = load_prompt(spec.prompt)
        self.system = load_prompt("system")
        self.backend: ChatBackend | None = None
        self.wordnet: Any = None
        self._params = {"max_tokens": spec.max_tokens, "temperature": spec.temperature, "context": spec.context,
                        "image_max_side": spec.image_max_side, "agreement": spec.agreement,
                        "drop_disagreeing": spec.drop_disagreeing, "keep_unnamed": spec.keep_unnamed}

    def setup(self) -> None:
        spec: DescribeSpec = self.spec
        if spec.agreement == "wordnet":
            from engine.language import nltk_data

            # Missing data stops the worker with the install hint rather than quietly comparing words only.
            self.wordnet = nltk_data.wordnet_reader(nltk_data.data_dir())
        options = chat_backend_options(spec, self.cache_dir)
        self.backend = make_chat_backend(spec.backend, BackendSpec(model=spec.model, options=options))

    def _request(self, crop: Image.Image) -> ChatRequest:
        spec: DescribeSpec = self.spec
        crop.thumbnail((spec.image_max_side, spec.image_max_side))
        return ChatRequest(messages=[{"role": "system", "content": self.system.template},
                                     {"role": "user", "content": self.prompt.render()}],
                           image=crop, max_tokens=spec.max_tokens, temperature=spec.temperature,
                           json_schema=ENTITY_JSON_SCHEMA)

    def process(self, records: list[Record]) -> None:
        assert self.backend is not None
        requests: list[ChatRequest] = []
        spans: list[tuple[int, int]] = []
        parsed = [Boxes.from_rows(record.boxes) for record in records]
        for record, boxes in zip(records, parsed):
            start = len(requests)
            if len(boxes):
                image = open_rgb(record.image)
                requests += [self._request(crop_box(image, xyxy, self.spec.context)) for xyxy in boxes.xyxy]
            spans.append((start, len(requests)))
        results = self.backend.generate(requests) if requests else []
        for record, boxes, (start, end) in zip(records, parsed, spans):
            self._apply(record, boxes, results[start:end])

    def _name(self, result: ChatResult) -> dict[str, str] | None:
        try:
            named = parse_entity_json(result.text)
        except EntityFormatError:
            return None
        named = normalize_entities([named], max_entities=1, max_phrase_chars=self.spec.max_phrase_chars)
        return named[0] if named else None

    def _apply(self, record: Record, boxes: Boxes, results: list[ChatResult]) -> None:
        spec: DescribeSpec = self.spec
        params = self._params | {"usage": usage_of(results)}
        failed = next((r.error for r in results if r.error), None)
        if failed:
            self._stamp(record, params)
            record.fail(self.name, "backend_error", failed)
            return
        entities = list(record.entities)
        index = {(e["phrase"], e["category"]): i for i, e in enumerate(entities)}
        entity, agreement, described = boxes.entity.copy(), [None] * len(boxes), [None] * len(boxes)
        keep = np.ones(len(boxes), dtype=bool)
        counts: Counter[str] = Counter()
        for j, result in enumerate(results):
            named = self._name(result)
            generic = is_generic(entities[int(boxes.entity[j])], self.generic)
            if named is None:
                counts["unnamed"] += 1
                keep[j] = not generic or spec.keep_unnamed
                continue
            described[j] = entity_label(named)
            if generic:
                key = (named["phrase"], named["category"])
                if key not in index:
                    index[key] = len(entities)
                    entities.append(named)
                entity[j] = index[key]
                counts["relabelled"] += 1
            else:
                agreement[j] = agrees(entities[int(boxes.entity[j])], named, self.wordnet)
                counts["agreed" if agreement[j] else "disagreed"] += 1
                keep[j] = agreement[j] or not spec.drop_disagreeing
        kept = dataclasses.replace(boxes, entity=entity, label_agreement=agreement, described=described).select(keep)
        record.entities = entities
        record.boxes = kept.to_rows()
        # What happened to the sample's boxes rides in the stamp, next to usage, for audits.
        self._stamp(record, params | {"boxes": dict(sorted(counts.items()))})
        if len(kept) < self.min_boxes:
            record.reject(self.name, "too_few_boxes", f"{len(kept)} boxes < {self.min_boxes} after naming them")

    def _stamp(self, record: Record, params: dict[str, Any]) -> None:
        record.stamp(self.name, self.spec.backend, model=model_label(self.spec.model), prompt_id=self.prompt.id,
                     prompt_sha256=self.prompt.sha256, params=json.dumps(params, sort_keys=True))
