"""Prompt templates live as files in prompts/ (one file each); every use is stamped with id and sha256."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PROMPTS_DIR = Path(os.environ.get("GRANUCAP_PROMPTS_DIR", Path(__file__).resolve().parent.parent / "prompts"))


@dataclass(frozen=True, slots=True)
class Prompt:
    id: str  # file name without .txt
    template: str  # str.format template; `{caption}` is the usual field
    sha256: str

    def render(self, **fields: str) -> str:
        """Fill the template; field values are data, so the marker tags prompts put around them are
        defused inside the values (a caption containing `</caption>` cannot close its own marker)."""
        return self.template.format(**{k: defuse_markers(v) for k, v in fields.items()})


_MARKERS = ("<caption>", "</caption>")


def defuse_markers(text: str) -> str:
    """Replace our prompt marker tags inside user data with look-alikes that do not close anything."""
    for tag in _MARKERS:
        text = text.replace(tag, tag.replace("<", "‹").replace(">", "›"))
    return text


@lru_cache(maxsize=64)
def load_prompt(prompt_id: str, directory: str | None = None) -> Prompt:
    """Read prompts/{prompt_id}.txt. A path ending in .txt is read as given."""
    base = Path(directory) if directory else PROMPTS_DIR
    path = Path(prompt_id) if prompt_id.endswith(".txt") else base / f"{prompt_id}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"prompt {prompt_id!r} not found at {path}")
    text = path.read_text(encoding="utf-8").strip("\n")
    return Prompt(id=path.stem, template=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
