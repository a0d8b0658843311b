"""Ground: the teacher detector labels boxes, prompted with the entities' phrases and categories.

Prompts are GLIP style ("a. b. c."), deduplicated, and split into several prompts when they pass the text
encoder's token limit. A box is given the whole entity when its phrase or its category matched (DetCLIPv3),
and records which field matched. When one text belongs to several entities, a phrase match wins over a
category match, then the first entity in caption order. A box passes its field's threshold
(`phrase_threshold` / `category_threshold`, else `box_threshold`). With `keep_candidates`, every entity box
over that floor is also kept in the record's `candidates`, before the thresholds (and the filter), so that
thresholds can be replayed without the teacher (`over_thresholds` + the filter's `clean_boxes`).

Optional: CLIP re-scoring of the kept boxes (engine/backends/clip_rescore.py; thresholds apply to the detector
score before it, the filter's `min_score` to the score after it) and visual exemplars
(engine/backends/owlv2_exemplars.py), whose boxes go to the first entity of the exemplar's category with
`matched="exemplar"`. With `generic_prompts`, each sample's entities gain one entity per generic text
("object"), which the describe stage names box by box. With `teachers`, each further teacher runs on the same prompts, its boxes pass the same
thresholds, and the teachers' boxes of each entity are fused (`engine.boxes.fuse_teachers`): each kept box
says which teachers found it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import numpy as np

from engine.backends.base import BackendSpec, Detection, GroundingBackend, make_grounding_backend
from engine.boxes import Boxes, fuse_teachers
from engine.config import GroundSpec
from engine.images import open_rgb
from engine.language.entities import with_generic
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


def field_thresholds(spec: GroundSpec) -> dict[str, float]:
    """The threshold each matched field's boxes must pass (phrase, category)."""
    return {"phrase": spec.box_threshold if spec.phrase_threshold is None else spec.phrase_threshold,
            "category": spec.box_threshold if spec.category_threshold is None else spec.category_threshold}


def passes_thresholds(boxes: Boxes, thresholds: dict[str, float]) -> np.ndarray:
    """Which boxes score over their matched field's threshold; exemplar boxes passed their own already."""
    limits = np.array([thresholds.get(m, -np.inf) for m in boxes.matched], dtype=np.float64)
    return boxes.scores > limits


def over_thresholds(boxes: Boxes, thresholds: dict[str, float]) -> Boxes:
    return boxes.select(passes_thresholds(boxes, thresholds))


class Ground(Stage):
    """Teacher boxes for each sample's entities; optional CLIP re-scoring and exemplar boxes (see module doc)."""

    name = "ground"
    requires = ("image", "entities")
    provides = ("boxes", "candidates", "entities")  # entities: the generic prompts' added

    def __init__(self, spec: GroundSpec, *, cache_dir: str | None = None) -> None:
        super().__init__(spec)
        self.cache_dir = cache_dir
        self.backend: GroundingBackend | None = None
        self.others: list[GroundingBackend] = []  # the ensemble's further teachers
        self.rescorer = None
        self.exemplars = None
        self.thresholds = field_thresholds(spec)
        params = {"box_threshold": spec.box_threshold, "text_threshold": spec.text_threshold}
        if spec.phrase_threshold is not None or spec.category_threshold is not None:
            params.update({f"{k}_threshold": v for k, v in self.thresholds.items()})
        if spec.rescore.enabled:
            params["rescore"] = spec.rescore.model
        if spec.exemplars.dir:
            params["exemplars"] = {"dir": spec.exemplars.dir, "model": spec.exemplars.model,
                                   "threshold": spec.exemplars.threshold}
        if spec.keep_candidates is not None:
            params["keep_candidates"] = spec.keep_candidates
        if spec.teachers:
            params.update(teachers=[spec.model, *spec.teachers], fusion_iou=spec.fusion_iou,
                          single_teacher_threshold=spec.single_teacher_threshold)
        if spec.generic_prompts:
            params["generic_prompts"] = spec.generic_prompts
        self._params = json.dumps(params, sort_keys=True)
        self._dummy = spec.dummy_weights or is_dummy(spec.model)

    def setup(self) -> None:
        spec: GroundSpec = self.spec
        options = {
            # The backend keeps everything above the lowest threshold (or the candidates' floor); `process`
            # applies each field's own.
            "box_threshold": min(self.thresholds.values()) if spec.keep_candidates is None else spec.keep_candidates,
            "text_threshold": spec.text_threshold,
            "batch_size": spec.forward_batch_size,
            "dummy_weights": spec.dummy_weights,
            "dtype": spec.dtype,
            "device": spec.device,
            "cache_dir": self.cache_dir,
        }
        self.backend = make_grounding_backend(spec.backend, BackendSpec(model=spec.model, options=options))
        self.others = [make_grounding_backend(spec.backend, BackendSpec(model=model, options=options))
                       for model in spec.teachers]
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
            record.boxes, record.candidates = [], []
            if spec.generic_prompts:
                record.entities = with_generic(record.entities, spec.generic_prompts)
            if not record.entities:
                continue  # nothing to look for; the filter decides what that means for the sample
            plan = plan_prompts(record.entities, count_tokens=self.backend.count_tokens, max_tokens=limit)
            todo.append(record)
            images.append(open_rgb(record.image))
            prompts.append(plan.prompts)
            plans.append(plan)
        results = self.backend.detect(images, prompts) if todo else []
        found = [self._text_boxes(plan, detections) for plan, detections in zip(plans, results)]
        candidates = [c for c, _, _ in found]
        boxes = [b for _, b, _ in found]
        if self.others:  # an ensemble: every teacher on the same prompts, its boxes over the same thresholds
            teams = [[b] for b in boxes]
            for other in self.others:
                more = other.detect(images, prompts) if todo else []
                for team, plan, detections in zip(teams, plans, more):
                    team.append(self._text_boxes(plan, detections, other.model_id)[1])
            boxes = [fuse_teachers(team, spec.fusion_iou, spec.single_teacher_threshold) for team in teams]
        if self.rescorer is not None:
            boxes = self._rescore(boxes, images, plans, [texts for _, _, texts in found])
        if self.exemplars is not None:
            exemplar_boxes = self._exemplar_boxes(todo, images)
            boxes = [Boxes.concat([b, ex]) for b, ex in zip(boxes, exemplar_boxes)]
            candidates = [Boxes.concat([c, ex]) for c, ex in zip(candidates, exemplar_boxes)]
        for record, b, c in zip(todo, boxes, candidates):
            record.boxes = b.to_rows()
            if spec.keep_candidates is not None:
                record.candidates = c.to_rows()
        for record in records:
            record.stamp(self.name, spec.backend, params=self._params,
                         model=" + ".join([spec.model, *spec.teachers]) + (" (dummy weights)" if self._dummy else ""))

    def _text_boxes(self, plan: PromptPlan, detections: list[Detection],
                    teacher: str | None = None) -> tuple[Boxes, Boxes, list[str]]:
        """The detections whose label names one of the plan's texts, as boxes of that text's entity: all of
        them (the candidates), and those over the threshold of the field they came from, with each one's text
        (what re-scoring compares the box with)."""
        hits = [(det, text) for det in detections
                if (text := match_label(det.label, plan.prompt_texts[det.prompt_index])) is not None]
        owners = [plan.owners[text] for _, text in hits]
        boxes = Boxes(xyxy=[det.xyxy for det, _ in hits], scores=[det.score for det, _ in hits],
                      entity=[entity for entity, _ in owners], matched=[field for _, field in owners],
                      teacher=[teacher or self.backend.model_id] * len(hits))
        keep = passes_thresholds(boxes, self.thresholds)
        return boxes, boxes.select(keep), [text for (_, text), kept in zip(hits, keep) if kept]

    def _rescore(self, boxes: list[Boxes], images: list, plans: list[PromptPlan],
                 texts: list[list[str]]) -> list[Boxes]:
        """score <- sqrt(score * CLIP prob of the box's text among the sample's texts), YOLO-World style."""
        from engine.backends.clip_rescore import Crop, combine

        crops = [Crop(k, tuple(xyxy), plans[k].texts.index(text))
                 for k, b in enumerate(boxes) for xyxy, text in zip(b.xyxy.tolist(), texts[k])]
        probs = iter(self.rescorer.probs(images, [p.texts for p in plans], crops))
        return [dataclasses.replace(b, scores=[combine(score, next(probs)) for score in b.scores.tolist()])
                for b in boxes]

    def _exemplar_boxes(self, records: list[Record], images: list) -> list[Boxes]:
        """Boxes found by a category's exemplar crops, given to the first entity of that category."""
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
        return [Boxes(xyxy=[ex.xyxy for ex in found], scores=[ex.score for ex in found],
                      entity=[owner[ex.category] for ex in found], matched=["exemplar"] * len(found),
                      teacher=[self.exemplars.model_id] * len(found))
                for owner, found in zip(owners, self.exemplars.detect(images, wanted))]
