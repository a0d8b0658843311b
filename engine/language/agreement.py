"""Whether the name a vision-language model gives a box's crop agrees with the entity the teacher gave the box.

The rule (the describe stage's `label_agreement`), on the entities' categories as `normalize_entities` leaves
them (lower case, last word singular):

1. words: the two categories are equal, or one is the other's phrase, or they end in the same noun ("red car"
   and "car", "sports car" and "car");
2. WordNet (when given): the categories share a sense (synonyms: "couch" and "sofa"), or a sense of one is a
   kind of a sense of the other at any depth ("puppy" and "dog", "dog" and "animal"), over each word's three
   most common noun senses.

Anything else disagrees ("cat" and "dog"). Parent categories alone never make two names agree: "cat" and "dog"
are both animals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SENSES = 3  # a word's most common noun senses that count: rare senses make everything agree


def _head(text: str) -> str:
    words = text.split()
    return words[-1] if words else ""


def words_agree(entity: Mapping[str, Any], named: Mapping[str, Any]) -> bool:
    a, b = (entity.get("category") or "").strip(), (named.get("category") or "").strip()
    if not a or not b:
        return False
    if a == b or a == (named.get("phrase") or "").strip() or b == (entity.get("phrase") or "").strip():
        return True
    return _head(a) == _head(b)


def _senses(wordnet: Any, category: str) -> list[Any]:
    senses = wordnet.synsets(category.replace(" ", "_"), pos="n")[:SENSES]
    if not senses and " " in category:  # "red car" is no lemma: its head noun is
        senses = wordnet.synsets(_head(category), pos="n")[:SENSES]
    return senses


def _kinds_of(senses: list[Any]) -> set[Any]:
    """The senses and every sense above them (hypernyms and instance hypernyms, any depth)."""
    seen = set(senses)
    frontier = list(senses)
    while frontier:
        frontier = [h for s in frontier for h in s.hypernyms() + s.instance_hypernyms() if h not in seen]
        seen.update(frontier)
    return seen


def wordnet_agree(wordnet: Any, entity: Mapping[str, Any], named: Mapping[str, Any]) -> bool:
    a, b = _senses(wordnet, entity.get("category") or ""), _senses(wordnet, named.get("category") or "")
    if not a or not b:
        return False
    return bool(set(a) & _kinds_of(b)) or bool(set(b) & _kinds_of(a))


def agrees(entity: Mapping[str, Any], named: Mapping[str, Any], wordnet: Any = None) -> bool:
    """The rule of the module doc; `wordnet` is NLTK's WordNet reader, or None for the words alone."""
    if words_agree(entity, named):
        return True
    return wordnet is not None and wordnet_agree(wordnet, entity, named)
