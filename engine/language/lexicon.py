"""The noun lexicon of the offline extractor: what it needs from WordNet, precomputed once into one JSON file,
and the rules that compute it.

For every noun lemma WordNet knows, the extractor asks two questions: is it a physical thing (among its
three most frequent senses, `physical_sense`), and what basic-level parent does it print ("sofa" ->
"furniture", `parent_of`). Plurals are reduced with WordNet's own morphology (its noun exception list, then
its suffix rules, keeping forms that are noun lemmas). NLTK's WordNet reader answers all of that but costs
seconds and hundreds of MB in every process that loads it (each extract actor, each LLM extract actor that
normalises categories); this file holds only the answers, so no such process loads WordNet
(docs/performance.md has the measurements).

The file lives in the NLTK data folder (`{DATA}/granucap/noun-lexicon.json`); `granucap nltk-data install`
writes it, and a process that finds it missing, or built by other rules or from other WordNet files than
its own, builds it from WordNet and saves it. What "other rules" means is `RULES_VERSION` (bump it when the
code of the rules changes) plus the rule tables below; "other WordNet files" is their sizes. Answers are the same as asking WordNet directly, but for doubly inflected non-words
(`NounLexicon.parent`); tests/test_entities.py compares them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.io.atomic import atomic_write_bytes
from engine.language import nltk_data

log = logging.getLogger(__name__)

FORMAT = "granucap-noun-lexicon/2"
FILE = Path("granucap") / "noun-lexicon.json"
# Bump when the code of the rules (wordnet_parent_synsets, physical_sense, parent_of) or of `build` changes
# what they answer: a saved lexicon of another version is rebuilt. Changes to the tables below need no bump
# (they are fingerprinted themselves).
RULES_VERSION = 1

PHYSICAL_LEXNAMES = frozenset({
    "noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.object", "noun.person", "noun.plant",
    "noun.substance",
    "noun.shape",  # drawn shapes, signs and markings are visible objects too (circle, square, triangle)
})
PHYSICAL_TOPS = frozenset({"person.n.01", "animal.n.01", "plant.n.02", "food.n.01", "food.n.02"})
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
# Hypernyms too general to print as a parent.
ABSTRACT_PARENTS = frozenset({
    "entity", "physical entity", "object", "whole", "abstraction", "thing", "matter", "artifact",
    "instrumentality", "causal agent", "living thing", "part", "unit", "commodity", "consumer goods",
    "article", "creation", "psychological feature", "attribute", "relation", "measure", "group",
})
# The parent of a physical noun whose hypernyms name none.
LEXNAME_PARENT: dict[str, str] = {
    "noun.animal": "animal", "noun.person": "person", "noun.plant": "plant", "noun.food": "food",
    "noun.body": "body part", "noun.substance": "material", "noun.object": "natural object",
    "noun.artifact": "man-made object",
}


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


# ------------------------------------------------------------------------------------------- the rules


def wordnet_parent_synsets(wn: Any) -> dict[str, Any]:
    """PARENT_SYNSETS as WordNet synsets with their search order: the `tools` of `parent_of`."""
    parents = {}
    for name, label in PARENT_SYNSETS:
        try:
            parents[wn.synset(name)] = label
        except Exception:  # a WordNet build without this synset: the list still works without it
            log.debug("parent synset %s not in this WordNet", name)
    return {"parents": parents, "order": {syn: i for i, syn in enumerate(parents)}}


def physical_sense(wn: Any, lemma: str) -> Any | None:
    """The first physical noun sense among the 3 most frequent; a 3rd sense must not be a rare one."""
    senses = wn.synsets(lemma, pos="n")[:3]
    for rank, syn in enumerate(senses):
        if syn.lexname() in PHYSICAL_LEXNAMES or syn.name() in PHYSICAL_TOPS:
            if rank == 2:  # e.g. "love" -> beloved (person): only when not much rarer than sense 1
                first = sum(l.count() for l in senses[0].lemmas())
                if sum(l.count() for l in syn.lemmas()) * 4 < first:
                    return None
            return syn
    return None


def parent_of(syn: Any, category: str, tools: dict[str, Any]) -> str:
    """Nearest preferred basic-level hypernym, else the nearest concrete hypernym's first lemma."""
    parents, order = tools["parents"], tools["order"]
    seen = {syn}
    frontier = [syn]
    fallback = ""
    while frontier:
        nxt = []
        for s in frontier:
            # sorted: NLTK keeps a synset's pointers in a set, so its hypernym order follows the process's
            # string hash seed, and the fallback parent (first concrete hypernym) would differ between processes
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
                if name != category and name not in ABSTRACT_PARENTS:
                    fallback = name
                    break
        frontier = nxt
    return fallback or LEXNAME_PARENT.get(syn.lexname(), "")


def rules_fingerprint() -> str:
    """sha256 of the rules the parents come from: RULES_VERSION and the tables; a lexicon built by other
    rules is rebuilt."""
    parts = [f"rules {RULES_VERSION}", repr(PARENT_SYNSETS), repr(sorted(PHYSICAL_LEXNAMES)),
             repr(sorted(PHYSICAL_TOPS)), repr(sorted(ABSTRACT_PARENTS)), repr(sorted(LEXNAME_PARENT.items()))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def wordnet_files(root: Path) -> dict[str, int]:
    """The WordNet files under the data folder `root` that the lexicon is built from, with their sizes (an
    empty dict when there are none): a lexicon built from other files is rebuilt. Sizes, because hashing
    them would cost every process that loads the lexicon more than the lexicon saves."""
    folder = root / "corpora" / "wordnet"
    try:
        return {name: (folder / name).stat().st_size for name in (*nltk_data.WORDNET_FILES, "lexnames")}
    except FileNotFoundError:
        return {}


def noun_exceptions(root: Path) -> dict[str, list[str]]:
    """WordNet's irregular noun forms (`noun.exc` under the data folder `root`): form -> lemmas, read as NLTK's
    reader reads the file (one form and its lemmas per line)."""
    exceptions = {}
    with open(root / "corpora" / "wordnet" / "noun.exc", encoding="utf-8") as fh:
        for line in fh:
            terms = line.split()
            if terms:
                exceptions[terms[0]] = terms[1:]
    return dict(sorted(exceptions.items()))


# ------------------------------------------------------------------------------------- the saved document


def build(root: Path) -> dict[str, Any]:
    """The lexicon's JSON document from the WordNet under the data folder `root`; raises NltkDataMissing
    when there is none."""
    wn = nltk_data.wordnet_reader(root)
    tools = wordnet_parent_synsets(wn)
    nouns = sorted(wn.all_lemma_names("n"))
    parents = {}
    for lemma in nouns:
        syn = physical_sense(wn, lemma)
        if syn is not None:
            parents[lemma] = parent_of(syn, lemma.replace("_", " "), tools)
    return {
        "format": FORMAT,
        "wordnet": wn.get_version(),
        "wordnet_files": wordnet_files(root),
        "rules": rules_fingerprint(),
        "nouns": nouns,
        "exceptions": noun_exceptions(root),
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


def load(root: Path) -> NounLexicon:
    """The lexicon saved under `root`, built (and saved, where the folder is writable) when missing or
    stale. Raises NltkDataMissing when it must be built and WordNet is not installed."""
    path = root / FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") == FORMAT and doc.get("rules") == rules_fingerprint() \
                and doc.get("wordnet_files") == wordnet_files(root):
            return from_document(doc)
        log.warning("noun lexicon %s was built by other rules or from other WordNet files: rebuilding it", path)
    except FileNotFoundError:
        log.info("noun lexicon %s missing: building it from WordNet once", path)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("noun lexicon %s unreadable (%s): rebuilding it", path, exc)
    start = time.perf_counter()
    doc = build(root)
    log.info("noun lexicon: %d nouns, %d physical, built in %.1f s", len(doc["nouns"]), len(doc["parents"]),
             time.perf_counter() - start)
    try:
        save(root, doc)
    except OSError as exc:  # a read-only data folder: use the lexicon without saving it
        log.warning("cannot save the noun lexicon under %s (%s); it is rebuilt in every process", root, exc)
    return from_document(doc)


_installed: NounLexicon | None = None  # failures are not cached, so that a later install is picked up


def load_installed() -> NounLexicon:
    """The lexicon of the installed data folder (`nltk_data.data_dir()`), loaded once per process. Raises
    NltkDataMissing when the folder is not installed."""
    global _installed
    if _installed is None:
        _installed = load(nltk_data.ensure_nltk_path())
    return _installed
