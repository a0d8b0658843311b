"""Extract: keep the factual part of the caption, then list its entities {phrase, category, parent_category}.

LLM backends run the two DetCLIPv3 prompts (factual filter, then entity extraction) and the answer must pass
the JSON schema, or the sample is rejected with the reason (or, with `fallback: nltk`, extracted offline).
The `nltk` backend is GLIP's parser path: noun phrases + WordNet, no model at all.
"""

from __future__ import annotations

import json
from concurrent.futures import FIRST_COMPLETED, wait

from engine.backends.base import (
    BackendSpec,
    ChatBackend,
    ChatRequest,
    ChatResult,
    chat_backend_options,
    make_chat_backend,
    streams,
    usage_of,
)
from engine.config import ExtractSpec
from engine.language.entities import (
    EntityFormatError,
    bounded_entities_schema,
    is_none_answer,
    normalize_entities,
    parse_entities_json,
)
from engine.language.noun_phrases import extract_noun_phrase_entities
from engine.models.loading import model_label
from engine.prompts import Prompt, load_prompt
from engine.records import Record
from engine.stages.base import Stage


class Extract(Stage):
    name = "extract"
    requires = ("caption",)
    provides = ("factual_caption", "entities")

    def __init__(self, spec: ExtractSpec, *, cache_dir: str | None = None) -> None:
        super().__init__(spec)
        self.cache_dir = cache_dir
        llm = spec.backend != "nltk"
        self.system = load_prompt("system") if llm else None
        self.factual = load_prompt(spec.factual_prompt) if llm and spec.factual_prompt else None
        self.entities = load_prompt(spec.entities_prompt) if llm else None
        self.backend: ChatBackend | None = None
        self.schema = bounded_entities_schema(max_entities=spec.max_entities, max_chars=spec.max_phrase_chars)
        self._params = {
            "max_tokens": spec.max_tokens,
            "temperature": spec.temperature,
            "max_entities": spec.max_entities,
            "fallback": spec.fallback,
        }

    def setup(self) -> None:
        spec: ExtractSpec = self.spec
        if spec.backend == "nltk" or spec.fallback == "nltk":
            from engine.language.nltk_data import ensure_nltk_path

            ensure_nltk_path()
        if spec.backend == "nltk":
            # The noun lexicon and the tagger load lazily, on first use: do it here, once per actor,
            # rather than inside the first batch, where it would hold up every stage behind this one. (A
            # fallback may never be used: it keeps loading them lazily.)
            self._nltk_entities("a cat on a sofa")
        else:
            options = chat_backend_options(spec, self.cache_dir)
            self.backend = make_chat_backend(spec.backend, BackendSpec(model=spec.model, options=options))

    def _request(self, prompt: Prompt, caption: str, *, schema: dict | None = None) -> ChatRequest:
        spec: ExtractSpec = self.spec
        assert self.system is not None
        return ChatRequest(
            messages=[
                {"role": "system", "content": self.system.template},
                {"role": "user", "content": prompt.render(caption=caption)},
            ],
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            json_schema=schema,
        )

    def _nltk_entities(self, text: str) -> list[dict]:
        spec: ExtractSpec = self.spec
        return extract_noun_phrase_entities(text, max_entities=spec.max_entities, max_phrase_chars=spec.max_phrase_chars)

    def process(self, records: list[Record]) -> None:
        spec: ExtractSpec = self.spec
        if spec.backend == "nltk":
            for record in records:
                record.factual_caption = record.caption
                record.entities = self._nltk_entities(record.caption or "")
                record.stamp(self.name, "nltk", params=json.dumps(self._params, sort_keys=True))
            return
        assert self.backend is not None and self.entities is not None
        used: dict[int, list[ChatResult]] = {id(r): [] for r in records}  # per sample, for its usage
        if self.factual is None:
            for record in records:
                record.factual_caption = record.caption
        if streams(self.backend):
            self._chain(records, used)
        else:
            # (a) factual filter, then (b) entities from the factual caption, each one call over the batch
            if self.factual is not None:
                results = self.backend.generate([self._factual_request(r) for r in records])
                for record, result in zip(records, results, strict=True):
                    self._on_factual(record, result, used)
            todo = [r for r in records if r.ok and r.factual_caption]
            results = self.backend.generate([self._entities_request(r) for r in todo])
            for record, result in zip(todo, results, strict=True):
                self._on_entities(record, result, used)
        for record in records:  # no factual content means no entities
            if record.ok and not record.factual_caption:
                record.entities = []
                self._stamp_llm(record, used[id(record)])

    def _chain(self, records: list[Record], used: dict[int, list[ChatResult]]) -> None:
        """Both prompts on a backend that takes requests while others run: a sample's entities request goes
        out as soon as its factual answer is back, while the rest of the batch is still generating."""
        assert self.backend is not None
        submit = self.backend.submit  # type: ignore[attr-defined]
        if self.factual is not None:
            waiting = {submit(self._factual_request(r)): (r, True) for r in records}
        else:
            waiting = {submit(self._entities_request(r)): (r, False) for r in records if r.factual_caption}
        while waiting:
            done, _ = wait(waiting, return_when=FIRST_COMPLETED)
            for future in done:
                record, factual = waiting.pop(future)
                result = future.result()  # raises only when the worker is lost
                if not factual:
                    self._on_entities(record, result, used)
                elif self._on_factual(record, result, used):
                    waiting[submit(self._entities_request(record))] = (record, False)

    def _factual_request(self, record: Record) -> ChatRequest:
        assert self.factual is not None
        return self._request(self.factual, record.caption or "")

    def _entities_request(self, record: Record) -> ChatRequest:
        assert self.entities is not None
        return self._request(self.entities, record.factual_caption or "", schema=self.schema)

    def _on_factual(self, record: Record, result: ChatResult, used: dict[int, list[ChatResult]]) -> bool:
        """Take a sample's factual-filter answer; whether its entities prompt is to be sent."""
        used[id(record)].append(result)
        if result.error:
            self._stamp_llm(record, used[id(record)])
            record.fail(self.name, "backend_error", result.error)
            return False
        record.factual_caption = None if is_none_answer(result.text) else (result.text.strip() or None)
        return record.factual_caption is not None

    def _on_entities(self, record: Record, result: ChatResult, used: dict[int, list[ChatResult]]) -> None:
        """Take a sample's entities answer: validated entities, the offline fallback, or the sample's error."""
        spec: ExtractSpec = self.spec
        used[id(record)].append(result)
        if result.error:
            self._stamp_llm(record, used[id(record)])
            record.fail(self.name, "backend_error", result.error)
            return
        try:
            record.entities = normalize_entities(
                parse_entities_json(result.text),
                max_entities=spec.max_entities,
                max_phrase_chars=spec.max_phrase_chars,
            )
            self._stamp_llm(record, used[id(record)])
        except EntityFormatError as exc:
            if spec.fallback == "nltk":
                record.entities = self._nltk_entities(record.factual_caption or "")
                self._stamp_llm(record, used[id(record)], note=f"+nltk fallback ({str(exc)[:80]})")
            else:
                self._stamp_llm(record, used[id(record)])
                record.reject(self.name, "invalid_entities_json", str(exc))

    def _stamp_llm(self, record: Record, results: list[ChatResult], *, note: str = "") -> None:
        """One provenance entry per sample with its requests' usage; `note` says when the offline fallback
        produced the entities."""
        spec: ExtractSpec = self.spec
        assert self.entities is not None
        ids = [p for p in (self.factual, self.entities) if p is not None]
        record.stamp(
            self.name,
            spec.backend + note,
            model=model_label(spec.model),
            prompt_id="+".join(p.id for p in ids),
            prompt_sha256="+".join(p.sha256 for p in ids),
            params=json.dumps(self._params | {"usage": usage_of(results)}, sort_keys=True),
        )
