"""Entities `{phrase, category, parent_category}`: the LLM answer's JSON schema, its parsing and normalisation,
and the offline NLTK extractor (GLIP's NLP-parser path: noun-phrase chunks + WordNet hypernyms).

WordNet and the POS tagger come from the folder `python -m engine.nltk_data install` fills (no downloads).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from engine.lexicon import NounLexicon
from engine.lexicon import load as load_lexicon
from engine.nltk_data import NltkDataMissing, ensure_nltk_path

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

_lex: NounLexicon | None = None  # once loaded; failures are not cached so a later install is picked up
_IRREGULAR = {  # plurals WordNet keeps as lemmas of their own, or rule fallback cannot handle
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "leaves": "leaf",
    "wolves": "wolf", "shelves": "shelf", "loaves": "loaf", "halves": "half", "wives": "wife",
    "oxen": "ox", "sheep": "sheep", "fish": "fish", "deer": "deer", "police": "police",
}
_PLURALIA = {  # plural-only nouns: never singularised
    "glasses", "sunglasses", "eyeglasses", "pants", "trousers", "jeans", "shorts", "scissors", "binoculars",
    "headphones", "earphones", "clothes", "tongs", "pliers", "goggles", "pajamas", "pyjamas", "leggings",
}


def _lexicon() -> NounLexicon | None:
    """The noun lexicon (engine/lexicon.py), or None when the NLTK data folder is not installed."""
    global _lex
    if _lex is None:
        try:
            root = ensure_nltk_path()
            _lex = load_lexicon(root)
        except NltkDataMissing as exc:
            log.debug("WordNet unavailable, rule-based singulars: %s", exc)
            return None
    return _lex


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
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _PLURALIA or not word.isalpha():
        return word
    lexicon = _lexicon()
    if lexicon is None:
        return _rule_singular(word)
    lemmas = lexicon.morphy(word)  # what WordNetLemmatizer.lemmatize uses: the shortest candidate wins
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


# ------------------------------------------------------------------------------------------ NLTK noun phrases

# Determiners/numbers/possessives, then adjectives or participles ("a sleeping cat"), then nouns; without a
# determiner only adjectives may lead, so "man holding umbrella" does not become one chunk.
_GRAMMAR = r"""
NP: {<DT|PDT|PRP\$|CD>+<JJ.*|VBN|VBG>*<NN.*>+}
    {<JJ.*>*<NN.*>+}
"""
# Leading words dropped from a phrase (articles, demonstratives, possessives); numbers and adjectives stay.
_DROP_LEADING = {
    "a", "an", "the", "this", "that", "these", "those", "its", "his", "her", "their", "my", "our", "your",
    "some", "any", "each", "every", "another", "such",
}
# Head nouns that name the picture, a place in it, or nothing in particular: not groundable objects.
_SKIP_HEADS = {
    "photo", "photograph", "picture", "image", "shot", "view", "scene", "background", "foreground", "front",
    "side", "top", "bottom", "middle", "left", "right", "center", "centre", "thing", "something", "someone",
    "somebody", "anything", "everything", "nothing", "one", "lot", "couple", "pair", "group", "kind", "type",
    "sort", "piece", "part", "area", "way", "closeup", "close-up", "instruction", "output",
    "i", "you", "he", "she", "it", "we", "they", "me", "him", "us", "them", "who", "what",
}
PHYSICAL_LEXNAMES = {
    "noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.object", "noun.person", "noun.plant",
    "noun.substance",
    "noun.shape",  # drawn shapes, signs and markings are visible objects too (circle, square, triangle)
}
_PHYSICAL_TOPS = {"person.n.01", "animal.n.01", "plant.n.02", "food.n.01", "food.n.02"}
# Basic-level parents, searched along hypernyms (nearest wins, ties by this order), with the word we print.
PARENT_SYNSETS: tuple[tuple[str, str], ...] = (
    ("person.n.01", "person"), ("bird.n.01", "bird"), ("fish.n.01", "fish"), ("insect.n.01", "insect"),
    ("animal.n.01", "animal"), ("fruit.n.01", "fruit"), ("vegetable.n.01", "vegetable"),
    ("beverage.n.01", "drink"), ("baked_goods.n.01", "baked goods"), ("dish.n.02", "food"),
    ("food.n.01", "food"), ("food.n.02", "food"), ("flower.n.01", "flower"), ("tree.n.01", "tree"),
    ("plant.n.02", "plant"), ("furniture.n.01", "furniture"),
    ("plane_figure.n.01", "shape"), ("solid.n.03", "shape"),
    ("public_transport.n.01", "vehicle"),  # bus, train: WordNet puts them under conveyance, not vehicle
    ("aircraft.n.01", "aircraft"), ("vehicle.n.01", "vehicle"), ("footwear.n.02", "footwear"),
    ("clothing.n.01", "clothing"), ("jewelry.n.01", "jewelry"), ("bag.n.01", "bag"),
    ("computer.n.01", "computer"), ("electronic_equipment.n.01", "electronic device"),
    ("home_appliance.n.01", "appliance"), ("musical_instrument.n.01", "musical instrument"),
    ("weapon.n.01", "weapon"), ("plaything.n.01", "toy"), ("sports_equipment.n.01", "sports equipment"),
    ("cutlery.n.02", "cutlery"), ("kitchen_utensil.n.01", "kitchen utensil"), ("tool.n.01", "tool"),
    ("container.n.01", "container"), ("device.n.01", "device"), ("machine.n.01", "machine"),
    ("building.n.01", "building"), ("road.n.01", "road"), ("structure.n.01", "structure"),
    ("body_part.n.01", "body part"), ("geological_formation.n.01", "landform"),
    ("body_of_water.n.01", "body of water"),
)
_ABSTRACT_PARENTS = {
    "entity", "physical entity", "object", "whole", "abstraction", "thing", "matter", "artifact",
    "instrumentality", "causal agent", "living thing", "part", "unit", "commodity", "consumer goods",
    "article", "creation", "psychological feature", "attribute", "relation", "measure", "group",
}
_LEXNAME_PARENT = {
    "noun.animal": "animal", "noun.person": "person", "noun.plant": "plant", "noun.food": "food",
    "noun.body": "body part", "noun.substance": "material", "noun.object": "natural object",
    "noun.artifact": "man-made object",
}
_tools: dict[str, Any] = {}


def _nlp() -> dict[str, Any]:
    """The noun lexicon, tagger and chunker, loaded once per process; raises NltkDataMissing when the data
    folder is not installed."""
    if not _tools:
        ensure_nltk_path()
        from nltk.chunk import RegexpParser
        from nltk.tag.perceptron import PerceptronTagger

        lexicon = _lexicon()
        if lexicon is None:  # pragma: no cover - ensure_nltk_path above already raised
            raise NltkDataMissing("the noun lexicon did not load")
        _tools.update(lexicon=lexicon, tagger=PerceptronTagger(), chunker=RegexpParser(_GRAMMAR))
    return _tools


def wordnet_parent_synsets(wn: Any) -> dict[str, Any]:
    """PARENT_SYNSETS as WordNet synsets with their search order, for `_parent_of`."""
    parents = {}
    for name, label in PARENT_SYNSETS:
        try:
            parents[wn.synset(name)] = label
        except Exception:  # a WordNet build without this synset: the list still works without it
            log.debug("parent synset %s not in this WordNet", name)
    return {"parents": parents, "order": {syn: i for i, syn in enumerate(parents)}}


def _physical_sense(wn: Any, lemma: str) -> Any | None:
    """The first physical noun sense among the 3 most frequent; a 3rd sense must not be a rare one."""
    senses = wn.synsets(lemma, pos="n")[:3]
    for rank, syn in enumerate(senses):
        if syn.lexname() in PHYSICAL_LEXNAMES or syn.name() in _PHYSICAL_TOPS:
            if rank == 2:  # e.g. "love" -> beloved (person): only when not much rarer than sense 1
                first = sum(l.count() for l in senses[0].lemmas())
                if sum(l.count() for l in syn.lemmas()) * 4 < first:
                    return None
            return syn
    return None


def _parent_of(syn: Any, category: str, tools: dict[str, Any]) -> str:
    """Nearest preferred basic-level hypernym, else the nearest concrete hypernym's first lemma."""
    parents, order = tools["parents"], tools["order"]
    seen = {syn}
    frontier = [syn]
    fallback = ""
    while frontier:
        nxt = []
        for s in frontier:
            # sorted: NLTK keeps a synset's pointers in a set, so its hypernym order follows the process's
            # string hash seed, and the fallback parent (first concrete hypernym) differed between processes
            for h in sorted(s.hypernyms() + s.instance_hypernyms(), key=lambda h: h.name()):
                if h not in seen:
                    seen.add(h)
                    nxt.append(h)
        hits = sorted((order[h], parents[h]) for h in nxt if h in parents and parents[h] != category)
        if hits:
            return hits[0][1]
        if not fallback:
            for h in nxt:
                name = h.lemmas()[0].name().replace("_", " ").lower()
                if name != category and name not in _ABSTRACT_PARENTS:
                    fallback = name
                    break
        frontier = nxt
    return fallback or _LEXNAME_PARENT.get(syn.lexname(), "")


def _chunk_entity(words: list[tuple[str, str]], tools: dict[str, Any]) -> dict[str, str] | None:
    """One NP chunk -> entity, or None when its head is not a physical thing WordNet knows."""
    words = [(w.lower(), t) for w, t in words]
    while words and words[0][0] in _DROP_LEADING:
        words = words[1:]
    if not words or words[-1][0] in _SKIP_HEADS or len(words[-1][0]) < 2 or not words[-1][0].isalpha():
        return None
    head = singular_noun(words[-1][0]) if words[-1][1] in ("NNS", "NNPS") or words[-1][0] in _IRREGULAR \
        else words[-1][0]
    # Longest compound ending in the head that WordNet knows and that names a physical thing wins.
    for n in range(min(3, len(words)), 0, -1):
        mods = [w for w, t in words[-n:-1]]
        if any(not re.fullmatch(r"[a-z][a-z'-]*", w) for w in mods):
            continue
        lemma = "_".join([*mods, head])
        parent = tools["lexicon"].parent(lemma)  # physical things only; "" when WordNet names no parent
        if parent is not None:
            if not parent:
                return None
            return {"phrase": " ".join(w for w, _ in words), "category": lemma.replace("_", " "),
                    "parent_category": parent}
    return None


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def extract_noun_phrase_entities(
    caption: str, *, max_entities: int = 32, max_phrase_chars: int = 80
) -> list[dict[str, str]]:
    """Noun-phrase entities of a caption, offline: NP chunks, head lemma (or WordNet compound), parent hypernym.

    Phrases drop leading articles/demonstratives/possessives ("a red sofa" -> "red sofa"); numbers and
    adjectives stay ("two fluffy cats"). Raises NltkDataMissing when the NLTK data folder is not installed.
    """
    if not isinstance(caption, str) or not caption.strip():
        return []
    from nltk.tokenize import word_tokenize

    tools = _nlp()
    found = []
    # preserve_line=True splits no sentences (it needs no punkt data), so a chunk could run across a full
    # stop ("remote control. Best"): split sentences first with a plain rule.
    for sentence in _SENTENCE_END.split(caption[:20000]):
        tokens = word_tokenize(sentence, preserve_line=True)
        tree = tools["chunker"].parse(tools["tagger"].tag(tokens))
        for subtree in tree.subtrees(filter=lambda t: t.label() == "NP"):
            entity = _chunk_entity(list(subtree.leaves()), tools)
            if entity is not None:
                found.append(entity)
    return normalize_entities(found, max_entities=max_entities, max_phrase_chars=max_phrase_chars)
