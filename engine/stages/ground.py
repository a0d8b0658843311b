"""Ground: the teacher detector labels boxes, prompted with the entities' phrases and categories.

Prompts are GLIP style ("a. b. c."), deduplicated, and split into several prompts when they pass the text
encoder's token limit. A box is given the whole entity when its phrase or its category matched (DetCLIPv3),
and records which field matched. When one text belongs to several entities, a phrase match wins over a
category match, then the first entity in caption order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from engine.backends.base import BackendSpec, GroundingBackend, make_grounding_backend
from engine.config import GroundSpec
from engine.models.loading import is_dummy
from engine.records import Record
from engine.stages.base import Stage
from engine.stages.decode import open_rgb

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower case, punctuation around words dropped, single spaces: the form labels are matched in."""
    text = text.lower().replace(" ##", "").replace("##", "")
    text = re.sub(r"[^\w\s'-]", " ", text)
    return _SPACES.sub(" ", text).strip()


@dataclass(slots=True)
class PromptPlan:
    """The texts of one image, where each came from, and how they are packed into prompts."""

    texts: list[str]  # unique normalized texts in entity order
    owners: dict[str, tuple[int, str]]  # text -> (entity index, "phrase"|"category")
    prompts: list[str]  # GLIP-style prompts
    prompt_texts: list[list[str]]  # the texts packed into each prompt


def plan_prompts(entities: list[dict], *, count_tokens, max_tokens: int) -> PromptPlan:
    """Dedupe the entity texts and pack them greedily into prompts of at most `max_tokens` tokens."""
    owners: dict[str, tuple[int, str]] = {}
    for field in ("phrase", "category"):  # phrase ownership first: a phrase match beats a category match
        for i, entity in enumerate(entities):
            text = normalize_text(entity.get(field) or "")
            if text and text not in owners:
                owners[text] = (i, field)
    texts = sorted(owners, key=lambda t: (owners[t][0], owners[t][1] != "phrase"))
    prompts: list[str] = []
    packed: list[list[str]] = []
    current: list[str] = []
    for text in texts:
        candidate = current + [text]
        if current and count_tokens(". ".join(candidate) + ".") > max_tokens:
            prompts.append(". ".join(current) + ".")
            packed.append(current)
            candidate = [text]
        current = candidate
    if current:
        prompts.append(". ".join(current) + ".")
        packed.append(current)
    return PromptPlan(texts=texts, owners=owners, prompts=prompts, prompt_texts=packed)


def match_label(label: str, candidates: list[str]) -> str | None:
    """Which prompt text a detector label refers to: exact, then containment, then most shared words."""
    norm = normalize_text(label)
    if not norm:
        return None
    if norm in candidates:
        return norm
    contained = [c for c in candidates if norm in c or c in norm]
    if contained:
        return max(contained, key=lambda c: (len(set(c.split()) & set(norm.split())), -abs(len(c) - len(norm))))
    words = set(norm.split())
    best = max(candidates, key=lambda c: len(words & set(c.split())), default=None)
    if best is not None and words & set(best.split()):
        return best
    return None


class Ground(Stage):
    name = "ground"
    requires = ("image", "entities")
    provides = ("boxes",)

    def __init__(self, spec: GroundSpec, *, cache_dir: str | None = None) -> None:
        super().__init__(spec)
        self.cache_dir = cache_dir
        self.backend: GroundingBackend | None = None
        self._params = json.dumps(
            {"box_threshold": spec.box_threshold, "text_threshold": spec.text_threshold}, sort_keys=True
        )

    def setup(self) -> None:
        spec: GroundSpec = self.spec
        options = {
            "box_threshold": spec.box_threshold,
            "text_threshold": spec.text_threshold,
            "dtype": spec.dtype,
            "device": spec.device,
            "cache_dir": self.cache_dir,
        }
        self.backend = make_grounding_backend(spec.backend, BackendSpec(model=spec.model, options=options))

    def process(self, records: list[Record]) -> None:
        assert self.backend is not None
        spec: GroundSpec = self.spec
        limit = spec.max_prompt_tokens or self.backend.max_text_tokens
        todo, images, prompts, plans = [], [], [], []
        for record in records:
            record.boxes = []
            if not record.entities:
                continue  # nothing to look for; the filter decides what that means for the sample
            plan = plan_prompts(record.entities, count_tokens=self.backend.count_tokens, max_tokens=limit)
            todo.append(record)
            images.append(open_rgb(record.image))
            prompts.append(plan.prompts)
            plans.append(plan)
        results = self.backend.detect(images, prompts) if todo else []
        teacher = self.backend.model_id
        for record, plan, detections in zip(todo, plans, results):
            for det in detections:
                text = match_label(det.label, plan.prompt_texts[det.prompt_index])
                if text is None:
                    continue
                entity, field = plan.owners[text]
                record.boxes.append(
                    {
                        "xyxy": [float(v) for v in det.xyxy],
                        "score": float(det.score),
                        "entity": entity,
                        "matched": field,
                        "teacher": teacher,
                    }
                )
        for record in records:
            record.stamp(
                self.name,
                spec.backend,
                model=spec.model + (" (dummy weights)" if is_dummy(spec.model) else ""),
                params=self._params,
            )
