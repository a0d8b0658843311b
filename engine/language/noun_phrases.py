"""The offline entity extractor (GLIP's NLP-parser path): noun-phrase chunks of a caption, each head looked
up in the noun lexicon (lexicon.py) for whether it is a physical thing and which parent category it has.

The POS tagger and the lexicon come from the NLTK data folder `granucap nltk-data install` fills (no
downloads); without it `extract_noun_phrase_entities` raises NltkDataMissing.
"""

from __future__ import annotations

import re
from typing import Any

from engine.language import lexicon
from engine.language.entities import IRREGULAR_PLURALS, normalize_entities, singular_noun
from engine.language.nltk_data import ensure_nltk_path

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
_tools: dict[str, Any] = {}


def _nlp() -> dict[str, Any]:
    """The noun lexicon, tagger and chunker, loaded once per process; raises NltkDataMissing when the data
    folder is not installed."""
    if not _tools:
        ensure_nltk_path()
        from nltk.chunk import RegexpParser
        from nltk.tag.perceptron import PerceptronTagger

        _tools.update(lexicon=lexicon.load_installed(), tagger=PerceptronTagger(), chunker=RegexpParser(_GRAMMAR))
    return _tools


def _chunk_entity(words: list[tuple[str, str]], tools: dict[str, Any]) -> dict[str, str] | None:
    """One NP chunk -> entity, or None when its head is not a physical thing WordNet knows."""
    words = [(w.lower(), t) for w, t in words]
    while words and words[0][0] in _DROP_LEADING:
        words = words[1:]
    if not words or words[-1][0] in _SKIP_HEADS or len(words[-1][0]) < 2 or not words[-1][0].isalpha():
        return None
    head = singular_noun(words[-1][0]) if words[-1][1] in ("NNS", "NNPS") or words[-1][0] in IRREGULAR_PLURALS \
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
