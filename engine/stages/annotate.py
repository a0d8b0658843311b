"""Annotate: the fused annotator of DetCLIPv3 (step 3). One VLM call per image, image + raw caption in,
entities JSON out, replacing recaption + extract at scale once a VLM is fine-tuned on `export sft` data.

The answer must pass the entities schema or the sample is rejected with the reason (or, with
`fallback: nltk`, the raw caption's noun phrases are used and the provenance says so).
"""

from __future__ import annotations

import json

from engine.backends.base import BackendSpec, ChatBackend, ChatRequest, chat_backend_options, make_chat_backend
from engine.backends.base import usage_of
from engine.config import AnnotateSpec
from engine.images import open_rgb
from engine.language.entities import ENTITIES_JSON_SCHEMA, EntityFormatError, bounded_entities_schema
from engine.language.entities import normalize_entities, parse_entities_json
from engine.language.noun_phrases import extract_noun_phrase_entities
from engine.models.loading import model_label
from engine.prompts import Prompt, load_prompt
from engine.records import Record
from engine.stages.base import Stage


def annotate_request(prompt: Prompt, system: Prompt, *, caption: str, image=None, max_tokens: int = 384,
                     temperature: float = 0.0, schema: dict | None = None) -> ChatRequest:
    """The request of the fused annotator; `export sft` writes training conversations with the same text."""
    return ChatRequest(
        messages=[
            {"role": "system", "content": system.template},
            {"role": "user", "content": prompt.render(caption=caption)},
        ],
        image=image,
        max_tokens=max_tokens,
        temperature=temperature,
        json_schema=schema or ENTITIES_JSON_SCHEMA,
    )


class Annotate(Stage):
    name = "annotate"
    requires = ("image", "raw_caption")
    provides = ("caption", "factual_caption", "entities")

    def __init__(self, spec: AnnotateSpec, *, cache_dir: str | None = None) -> None:
        super().__init__(spec)
        self.cache_dir = cache_dir
        self.prompt = load_prompt(spec.prompt)
        self.system = load_prompt("system")
        self.backend: ChatBackend | None = None
        # the stage's own caps as schema bounds: a constrained decoder's longest answer must fit max_tokens
        self.schema = bounded_entities_schema(max_entities=spec.max_entities, max_chars=spec.max_phrase_chars)
        self._params = {"max_tokens": spec.max_tokens, "temperature": spec.temperature,
                        "max_entities": spec.max_entities, "fallback": spec.fallback}

    def setup(self) -> None:
        spec: AnnotateSpec = self.spec
        if spec.fallback == "nltk":
            from engine.language.nltk_data import ensure_nltk_path

            ensure_nltk_path()
        options = chat_backend_options(spec, self.cache_dir)
        self.backend = make_chat_backend(spec.backend, BackendSpec(model=spec.model, options=options))

    def process(self, records: list[Record]) -> None:
        spec: AnnotateSpec = self.spec
        assert self.backend is not None
        requests = []
        for record in records:
            image = open_rgb(record.image)
            image.thumbnail((spec.image_max_side, spec.image_max_side))
            requests.append(annotate_request(self.prompt, self.system, caption=record.raw_caption or "",
                                             image=image, max_tokens=spec.max_tokens,
                                             temperature=spec.temperature, schema=self.schema))
        results = self.backend.generate(requests)
        for record, result in zip(records, results, strict=True):
            record.caption = record.raw_caption
            record.factual_caption = None  # the fused annotator goes straight to entities
            note = ""
            if result.error:
                record.fail(self.name, "backend_error", result.error)
            else:
                try:
                    record.entities = normalize_entities(
                        parse_entities_json(result.text),
                        max_entities=spec.max_entities,
                        max_phrase_chars=spec.max_phrase_chars,
                    )
                except EntityFormatError as exc:
                    if spec.fallback != "nltk":
                        record.reject(self.name, "invalid_entities_json", str(exc))
                    else:
                        record.entities = extract_noun_phrase_entities(
                            record.raw_caption or "", max_entities=spec.max_entities,
                            max_phrase_chars=spec.max_phrase_chars,
                        )
                        note = f"+nltk fallback ({str(exc)[:80]})"
            record.stamp(self.name, spec.backend + note, model=model_label(spec.model),
                         prompt_id=self.prompt.id, prompt_sha256=self.prompt.sha256,
                         params=json.dumps(self._params | {"usage": usage_of([result])}, sort_keys=True))
