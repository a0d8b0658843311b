"""Ground: the teacher detector labels boxes, prompted with the entities' phrases and categories.

Prompts are GLIP style ("a. b. c."), deduplicated, and split into several prompts when they pass the text
encoder's token limit. A box is given the whole entity when its phrase or its category matched (DetCLIPv3),
and records which field matched. When one text belongs to several entities, a phrase match wins over a
category match, then the first entity in caption order. A box passes its field's threshold
(`phrase_threshold` / `category_threshold`, else `box_threshold`).

Optional: CLIP re-scoring of the kept boxes (engine/backends/clip_rescore.py; thresholds apply to the detector
score before it, the filter's `min_score` to the score after it) and visual exemplars
(engine/backends/owlv2_exemplars.py), whose boxes go to the first entity of the exemplar's category with
`matched="exemplar"`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from engine.backends.base import BackendSpec, GroundingBackend, make_grounding_backend
from engine.config import GroundSpec
from engine.images import open_rgb
from engine.models.loading import is_dummy
from engine.records import Record
from engine.stages.base import Stage

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
    """Teacher boxes for each sample's entities; optional CLIP re-scoring and exemplar boxes (see module doc)."""

    name = "ground"
    requires = ("image", "entities")
    provides = ("boxes",)

    def __init__(self, spec: GroundSpec, *, cache_dir: str | None = None) -> None:
        super().__init__(spec)
        self.cache_dir = cache_dir
        self.backend: GroundingBackend | None = None
        self.rescorer = None
        self.exemplars = None
        self.thresholds = {
            "phrase": spec.box_threshold if spec.phrase_threshold is None else spec.phrase_threshold,
            "category": spec.box_threshold if spec.category_threshold is None else spec.category_threshold,
        }
        params = {"box_threshold": spec.box_threshold, "text_threshold": spec.text_threshold}
        if spec.phrase_threshold is not None or spec.category_threshold is not None:
            params.update({f"{k}_threshold": v for k, v in self.thresholds.items()})
        if spec.rescore.enabled:
            params["rescore"] = spec.rescore.model
        if spec.exemplars.dir:
            params["exemplars"] = {"dir": spec.exemplars.dir, "model": spec.exemplars.model,
                                   "threshold": spec.exemplars.threshold}
        self._params = json.dumps(params, sort_keys=True)
        self._dummy = spec.dummy_weights or is_dummy(spec.model)

    def setup(self) -> None:
        spec: GroundSpec = self.spec
        options = {
            # The backend keeps everything above the lowest threshold; `process` applies each field's own.
            "box_threshold": min(self.thresholds.values()),
            "text_threshold": spec.text_threshold,
            "batch_size": spec.forward_batch_size,
            "dummy_weights": spec.dummy_weights,
            "dtype": spec.dtype,
            "device": spec.device,
            "cache_dir": self.cache_dir,
        }
        self.backend = make_grounding_backend(spec.backend, BackendSpec(model=spec.model, options=options))
        if spec.rescore.enabled:
            from engine.backends.clip_rescore import ClipRescorer

            self.rescorer = ClipRescorer(spec.rescore.model, cache_dir=self.cache_dir, device=spec.device,
                                         dtype=spec.dtype, batch_size=spec.rescore.batch_size)
        if spec.exemplars.dir:
            from engine.backends.owlv2_exemplars import ExemplarDetector

            ex = spec.exemplars
            self.exemplars = ExemplarDetector(ex.dir, model=ex.model, threshold=ex.threshold, nms_iou=ex.nms_iou,
                                              cache_dir=self.cache_dir, device=spec.device, dtype=spec.dtype,
                                              batch_size=spec.forward_batch_size)

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
        texts: list[list[str]] = [[] for _ in todo]  # each box's matched text, for re-scoring
        for k, (record, plan, detections) in enumerate(zip(todo, plans, results)):
            for det in detections:
                text = match_label(det.label, plan.prompt_texts[det.prompt_index])
                if text is None:
                    continue
                entity, field = plan.owners[text]
                if det.score <= self.thresholds[field]:
                    continue
                record.boxes.append(_box(det.xyxy, det.score, entity, field, self.backend.model_id))
                texts[k].append(text)
        if self.rescorer is not None:
            self._rescore(todo, images, plans, texts)
        if self.exemplars is not None:
            self._add_exemplar_boxes(todo, images)
        for record in records:
            record.stamp(self.name, spec.backend, model=spec.model + (" (dummy weights)" if self._dummy else ""),
                         params=self._params)

    def _rescore(self, records: list[Record], images: list, plans: list[PromptPlan],
                 texts: list[list[str]]) -> None:
        """score <- sqrt(score * CLIP prob of the box's text among the sample's texts), YOLO-World style."""
        from engine.backends.clip_rescore import Crop, combine

        crops = [Crop(k, tuple(box["xyxy"]), plans[k].texts.index(text))
                 for k, record in enumerate(records) for box, text in zip(record.boxes, texts[k])]
        probs = iter(self.rescorer.probs(images, [p.texts for p in plans], crops))
        for record in records:
            for box in record.boxes:
                box["score"] = combine(box["score"], next(probs))

    def _add_exemplar_boxes(self, records: list[Record], images: list) -> None:
        """Boxes found by a category's exemplar crops go to the first entity of that category."""
        folder = {normalize_text(name): name for name in self.exemplars.categories}
        owners, wanted = [], []
        for record in records:
            owner: dict[str, int] = {}
            for i, entity in enumerate(record.entities):
                name = folder.get(normalize_text(entity.get("category") or ""))
                if name is not None:
                    owner.setdefault(name, i)
            owners.append(owner)
            wanted.append(list(owner))
        for record, owner, found in zip(records, owners, self.exemplars.detect(images, wanted)):
            for ex in found:
                record.boxes.append(_box(ex.xyxy, ex.score, owner[ex.category], "exemplar", self.exemplars.model_id))


def _box(xyxy, score: float, entity: int, matched: str, teacher: str) -> dict:
    return {"xyxy": [float(v) for v in xyxy], "score": float(score), "entity": entity, "matched": matched,
            "teacher": teacher}
