"""Entities `{phrase, category, parent_category}`: the LLM answer's JSON schema, its parsing, and the
normalisation every extractor's entities go through (noun_phrases.py, the offline one, included).

Singular categories come from the noun lexicon (lexicon.py) when the NLTK data folder is installed
(`granucap nltk-data install`), else from simple suffix rules.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from engine.language import lexicon
from engine.language.nltk_data import NltkDataMissing

log = logging.getLogger(__name__)

FIELDS = ("phrase", "category", "parent_category")
MAX_ITEMS = 64  # entities one LLM answer may list
MAX_FIELD_CHARS = {"phrase": 200, "category": 100, "parent_category": 100}
MAX_ANSWER_CHARS = 65536  # longer answers are rejected before parsing

ENTITIES_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "entities": {
            "type": "array",
            "maxItems": MAX_ITEMS,
            "items": {
                "type": "object",
                "properties": {
                    name: {"type": "string", "minLength": 1, "maxLength": MAX_FIELD_CHARS[name]}
                    for name in FIELDS
                },
                "required": list(FIELDS),
                "additionalProperties": False,
            },
        }
    },
    "required": ["entities"],
    "additionalProperties": False,
}


def bounded_entities_schema(*, max_entities: int, max_chars: int) -> dict[str, Any]:
    """ENTITIES_JSON_SCHEMA tightened to a stage's own caps: the model is told the bounds `normalize_entities`
    applies anyway, and a constrained decoder's longest possible answer (what max_tokens must cover) shrinks."""
    item = ENTITIES_JSON_SCHEMA["properties"]["entities"]["items"]
    fields = {name: {**spec, "maxLength": min(spec["maxLength"], max_chars)} for name, spec in item["properties"].items()}
    entities = {**ENTITIES_JSON_SCHEMA["properties"]["entities"], "maxItems": min(MAX_ITEMS, max_entities),
                "items": {**item, "properties": fields}}
    return {**ENTITIES_JSON_SCHEMA, "properties": {"entities": entities}}


class EntityFormatError(ValueError):
    """An LLM entity answer that is not one schema-valid JSON object."""


# ------------------------------------------------------------------------------------------- LLM answer parsing

_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)


def _one_json_object(text: str) -> Any:
    """The single JSON object in `text`: fenced, bare, or with prose around it (prose may hold no braces)."""
    fenced = _FENCE.findall(text)
    if len(fenced) > 1:
        raise EntityFormatError("more than one fenced block")
    if fenced:
        text = fenced[0]
    start = text.find("{")
    if start < 0:
        raise EntityFormatError("no JSON object in the answer")
    if "}" in text[:start]:
        raise EntityFormatError("stray '}' before the JSON object")
    try:
        obj, end = json.JSONDecoder(strict=True).raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise EntityFormatError(f"invalid JSON: {exc}") from None
    if "{" in text[end:] or "}" in text[end:]:
        raise EntityFormatError("more than one JSON object, or trailing braces")
    return obj


def validate_entities_obj(obj: Any) -> list[dict[str, str]]:
    """Check a decoded answer against ENTITIES_JSON_SCHEMA (hand-written: no jsonschema dependency)."""
    if not isinstance(obj, dict):
        raise EntityFormatError(f"top level must be an object, got {type(obj).__name__}")
    extra = set(obj) - {"entities"}
    if extra:
        raise EntityFormatError(f"unexpected top-level keys: {sorted(extra)}")
    items = obj.get("entities")
    if not isinstance(items, list):
        raise EntityFormatError("'entities' must be a list")
    if len(items) > MAX_ITEMS:
        raise EntityFormatError(f"{len(items)} entities, over the limit of {MAX_ITEMS}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise EntityFormatError(f"entities[{i}] must be an object")
        if set(item) != set(FIELDS):
            missing, extra = set(FIELDS) - set(item), set(item) - set(FIELDS)
            raise EntityFormatError(f"entities[{i}]: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name in FIELDS:
            value = item[name]
            if not isinstance(value, str):
                raise EntityFormatError(f"entities[{i}].{name} must be a string, got {type(value).__name__}")
            if not value.strip():  # stricter than minLength: blank counts as empty
                raise EntityFormatError(f"entities[{i}].{name} is empty")
            if len(value) > MAX_FIELD_CHARS[name]:
                raise EntityFormatError(f"entities[{i}].{name} longer than {MAX_FIELD_CHARS[name]} chars")
        out.append({name: item[name] for name in FIELDS})
    return out


def parse_entities_json(text: str) -> list[dict[str, str]]:
    """Parse and validate an LLM entity answer; raise EntityFormatError with the reason otherwise."""
    if not isinstance(text, str):
        raise EntityFormatError(f"answer must be a string, got {type(text).__name__}")
    if len(text) > MAX_ANSWER_CHARS:
        raise EntityFormatError(f"answer longer than {MAX_ANSWER_CHARS} chars")
    return validate_entities_obj(_one_json_object(text.strip()))


_NONE_STRIP = " \t\r\n\"'`*.!_“”‘’"


def is_none_answer(text: str | None) -> bool:
    """True when the factual filter answered 'None' (any case, quoted, fenced or with a full stop)."""
    if not isinstance(text, str):
        return False
    core = text.strip().removeprefix("```").removesuffix("```").strip(_NONE_STRIP)
    return core.lower() == "none"


# ----------------------------------------------------------------------------------------------- normalisation

IRREGULAR_PLURALS = {  # plurals WordNet keeps as lemmas of their own, or rule fallback cannot handle
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "leaves": "leaf",
    "wolves": "wolf", "shelves": "shelf", "loaves": "loaf", "halves": "half", "wives": "wife",
    "oxen": "ox", "sheep": "sheep", "fish": "fish", "deer": "deer", "police": "police",
}
_PLURALIA = {  # plural-only nouns: never singularised
    "glasses", "sunglasses", "eyeglasses", "pants", "trousers", "jeans", "shorts", "scissors", "binoculars",
    "headphones", "earphones", "clothes", "tongs", "pliers", "goggles", "pajamas", "pyjamas", "leggings",
}


def _rule_singular(word: str) -> str:
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses", "ses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def singular_noun(word: str) -> str:
    """Singular of a lower-case noun: irregulars, then WordNet's lemmatiser, else simple suffix rules."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in _PLURALIA or not word.isalpha():
        return word
    try:
        nouns = lexicon.load_installed()
    except NltkDataMissing as exc:
        log.debug("WordNet unavailable, rule-based singulars: %s", exc)
        return _rule_singular(word)
    lemmas = nouns.morphy(word)  # what WordNetLemmatizer.lemmatize uses: the shortest candidate wins
    return min(lemmas, key=len) if lemmas else word


def clean_text(value: Any, *, max_chars: int) -> str:
    """NFKC, lower case, control characters out, whitespace collapsed, outer punctuation stripped, bounded."""
    if not isinstance(value, str):
        return ""
    text = unicodedata.normalize("NFKC", value)
    text = "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in text)
    text = " ".join(text.lower().split()).strip(" .,;:!?\"'`*()[]{}")
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = (cut.rsplit(" ", 1)[0] if " " in cut else cut).strip()
    return text


def _category_form(value: Any, *, max_chars: int) -> str:
    """Category text: cleaned, last word singular ('remote controls' -> 'remote control')."""
    text = clean_text(value, max_chars=max_chars).replace("_", " ")
    if not text:
        return ""
    *head, last = text.split(" ")
    return " ".join([*head, singular_noun(last)])


def normalize_entities(
    entities: Iterable[Mapping[str, Any]], *, max_entities: int, max_phrase_chars: int
) -> list[dict[str, str]]:
    """Lower-case, singular categories, bounded, empty ones dropped, deduplicated on (phrase, category), capped."""
    out: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for entity in entities:
        if len(out) >= max_entities:
            break
        if not isinstance(entity, Mapping):
            continue
        phrase = clean_text(entity.get("phrase"), max_chars=max_phrase_chars)
        category = _category_form(entity.get("category"), max_chars=max_phrase_chars)
        parent = _category_form(entity.get("parent_category"), max_chars=max_phrase_chars)
        if not (phrase and category and parent) or (phrase, category) in seen:
            continue
        seen.add((phrase, category))
        out.append({"phrase": phrase, "category": category, "parent_category": parent})
    return out


def entity_label(entity: Mapping[str, Any]) -> str:
    """`phrase|category|parent_category` (DetCLIPv3's object-captioner label), each field without a "|" of
    its own (it would split the label)."""
    return "|".join(str(entity.get(k) or "").replace("|", "/").strip() for k in FIELDS)


# ------------------------------------------------------------------------------------------- generic prompts


def generic_entity(text: str) -> dict[str, str]:
    """The entity a generic prompt ("object") becomes: the text as phrase, category and parent category."""
    text = " ".join(text.lower().split())
    return {"phrase": text, "category": text, "parent_category": text}


def with_generic(entities: list[dict[str, Any]], texts: Iterable[str]) -> list[dict[str, Any]]:
    """`entities` followed by the generic prompts' entities that are not among them already."""
    out = list(entities)
    seen = {(e.get("phrase"), e.get("category")) for e in out}
    for entity in map(generic_entity, texts):
        if (entity["phrase"], entity["category"]) not in seen:
            seen.add((entity["phrase"], entity["category"]))
            out.append(entity)
    return out


def is_generic(entity: Mapping[str, Any], texts: Iterable[str]) -> bool:
    """Whether `entity` is a generic prompt's entity (as `generic_entity` makes it)."""
    return any(dict(entity) == generic_entity(text) for text in texts)


# ------------------------------------------------------------------------------------------- one named box

ENTITY_JSON_SCHEMA: dict[str, Any] = {
    "title": "entity",
    **ENTITIES_JSON_SCHEMA["properties"]["entities"]["items"],
}


def parse_entity_json(text: str) -> dict[str, str]:
    """One entity object {phrase, category, parent_category} (the describe stage's answer), validated as an
    item of the entities schema; raise EntityFormatError with the reason otherwise."""
    if not isinstance(text, str):
        raise EntityFormatError(f"answer must be a string, got {type(text).__name__}")
    if len(text) > MAX_ANSWER_CHARS:
        raise EntityFormatError(f"answer longer than {MAX_ANSWER_CHARS} chars")
    return validate_entities_obj({"entities": [_one_json_object(text.strip())]})[0]
