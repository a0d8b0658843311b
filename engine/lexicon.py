"""The noun lexicon of the offline extractor: what it needs from WordNet, precomputed once into one JSON file.

For every noun lemma WordNet knows, the extractor asks two questions: is it a physical thing (among its
three most frequent senses), and what basic-level parent does it print ("sofa" -> "furniture"). Plurals are
reduced with WordNet's own morphology (its noun exception list, then its suffix rules, keeping forms that
are noun lemmas). NLTK's WordNet reader answers all of that but costs ≈ 3 s and ≈ 400 MB in every process
that loads it (each extract actor, each LLM extract actor that normalises categories); this file holds only
the answers (≈ 118k noun lemmas, ≈ 78k of them physical, 3.8 MB), and the extractor with it starts in ≈ 1.2 s
and ≈ 290 MB instead of ≈ 3.7 s and ≈ 380 MB.

The file lives in the NLTK data folder (`{DATA}/granucap/noun-lexicon.json`); `python -m engine.nltk_data
install` writes it, and a process that finds it missing, or built by other rules than the code's (a
fingerprint of the rules in engine/entities.py is stored in it), builds it from WordNet and saves it.
Answers are the same as asking WordNet directly, but for doubly inflected non-words (`NounLexicon.parent`);
tests/test_entities.py compares them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "granucap-noun-lexicon/1"
FILE = Path("granucap") / "noun-lexicon.json"


@dataclass(frozen=True)
class NounLexicon:
    nouns: frozenset[str]  # every noun lemma (multiword ones joined by "_")
    exceptions: dict[str, list[str]]  # irregular noun forms -> lemmas (WordNet's noun.exc)
    substitutions: tuple[tuple[str, str], ...]  # WordNet's noun suffix rules, in its order
    parents: dict[str, str]  # physical lemma -> parent category ("" when none could be named)

    def morphy(self, form: str) -> list[str]:
        """WordNet's `_morphy(form, "n")`: the form itself and its rule (or exception) reductions that are
        noun lemmas, in that order, without repeats."""
        if form in self.exceptions:
            candidates = [form, *self.exceptions[form]]
        else:
            candidates = [form, *(form[: -len(old)] + new for old, new in self.substitutions if form.endswith(old))]
        return [c for c in dict.fromkeys(candidates) if c in self.nouns]

    def parent(self, word: str) -> str | None:
        """The parent category of a physical noun ("" when none could be named), None for anything else.
        A word that is no lemma is looked up by its first reduction, as WordNet's `synsets` finds it. Not
        the same answer only where WordNet pools senses: a reduction with reductions of its own ("wingss"
        -> "wings", whose entry also counts "wing"'s senses) or a word with several."""
        if word in self.parents or word in self.nouns:
            return self.parents.get(word)
        forms = self.morphy(word)
        return self.parents.get(forms[0]) if forms else None


def rules_fingerprint() -> str:
    """sha256 of the extractor rules the parents come from; a lexicon built by other rules is rebuilt."""
    from engine import entities

    parts = [repr(entities.PARENT_SYNSETS), repr(sorted(entities.PHYSICAL_LEXNAMES)),
             repr(sorted(entities._PHYSICAL_TOPS)), repr(sorted(entities._ABSTRACT_PARENTS)),
             repr(sorted(entities._LEXNAME_PARENT.items())), inspect.getsource(entities._physical_sense),
             inspect.getsource(entities._parent_of)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def build(wn: Any) -> dict[str, Any]:
    """The lexicon's JSON document from NLTK's WordNet reader (≈ 7 s)."""
    from engine import entities

    tools = entities.wordnet_parent_synsets(wn)
    nouns = sorted(wn.all_lemma_names("n"))
    parents = {}
    for lemma in nouns:
        syn = entities._physical_sense(wn, lemma)
        if syn is not None:
            parents[lemma] = entities._parent_of(syn, lemma.replace("_", " "), tools)
    return {
        "format": FORMAT,
        "wordnet": wn.get_version(),
        "rules": rules_fingerprint(),
        "nouns": nouns,
        "exceptions": {k: list(v) for k, v in sorted(wn._exception_map["n"].items())},
        "substitutions": [list(pair) for pair in wn.MORPHOLOGICAL_SUBSTITUTIONS["n"]],
        "parents": parents,
    }


def from_document(doc: dict[str, Any]) -> NounLexicon:
    return NounLexicon(
        nouns=frozenset(doc["nouns"]),
        exceptions=doc["exceptions"],
        substitutions=tuple((old, new) for old, new in doc["substitutions"]),
        parents=doc["parents"],
    )


def save(root: Path, doc: dict[str, Any]) -> Path:
    """Save the lexicon document under the data folder `root` (atomically); returns the path."""
    path = root / FILE
    atomic_write_bytes(path, json.dumps(doc, separators=(",", ":")).encode())
    return path


def _wordnet_under(root: Path) -> Any:
    """NLTK's WordNet reader for the WordNet files under the data folder `root`."""
    import nltk

    from engine.nltk_data import NltkDataMissing, missing_files

    if missing_files(root=root):
        raise NltkDataMissing(f"no WordNet under {root} to build the noun lexicon from")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    return wordnet


def load(root: Path) -> NounLexicon:
    """The lexicon saved under `root`, built (and saved, where the folder is writable) when missing or
    stale. Raises NltkDataMissing when it must be built and WordNet is not installed."""
    path = root / FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") == FORMAT and doc.get("rules") == rules_fingerprint():
            return from_document(doc)
        log.warning("noun lexicon %s was built by other rules: rebuilding it", path)
    except FileNotFoundError:
        log.info("noun lexicon %s missing: building it from WordNet once", path)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("noun lexicon %s unreadable (%s): rebuilding it", path, exc)
    start = time.perf_counter()
    doc = build(_wordnet_under(root))
    log.info("noun lexicon: %d nouns, %d physical, built in %.1f s", len(doc["nouns"]), len(doc["parents"]),
             time.perf_counter() - start)
    try:
        save(root, doc)
    except OSError as exc:  # a read-only data folder: use the lexicon without saving it
        log.warning("cannot save the noun lexicon under %s (%s); it is rebuilt in every process", root, exc)
    return from_document(doc)
