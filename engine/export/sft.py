"""`export sft`: an instruction-tuning set for the fused annotator (DetCLIPv3 step 3), from a finished run.

LLaVA conversation format: DEST/images/{shard}/{STEM}.jpg (one folder per shard, as every export) and
DEST/sft.json, a list of `{"id": key, "image": "images/{shard}/{STEM}.jpg", "conversations": [{"from":
"human", "value": "<image>\\n" + prompt}, {"from": "gpt", "value": '{"entities": [{phrase, category,
parent_category}, ...]}'}]}`, and DEST/sft_manifest.json (counts, the prompt's id and sha256, the run).
The human turn is the `annotate` prompt filled with the raw caption, the very text the `annotate` stage
sends at inference, so the tuned model sees what it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.export.common import iter_samples, write_image
from engine.prompts import load_prompt
from engine.io.atomic import atomic_write_bytes
from engine.io.storage import Location


def export(run: Location, dest: Path, *, prompt: str = "annotate", min_entities: int = 1) -> dict[str, Any]:
    template = load_prompt(prompt)
    dest.mkdir(parents=True, exist_ok=True)
    out_path = dest / "sft.json"
    tmp = out_path.with_name(out_path.name + ".tmp")
    written = skipped = 0
    with open(tmp, "w", encoding="utf-8") as out:  # streamed: one conversation at a time
        out.write("[\n")
        for sample in iter_samples(run):
            record = sample.record
            entities = [
                {k: e[k] for k in ("phrase", "category", "parent_category")} for e in record.get("entities") or []
            ]
            if len(entities) < min_entities:
                skipped += 1
                continue
            image = "images/" + sample.image_name()
            write_image(dest, image, sample.jpg)
            item = {
                "id": record["key"],
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + template.render(caption=record.get("raw_caption") or "")},
                    {"from": "gpt", "value": json.dumps({"entities": entities}, ensure_ascii=False)},
                ],
            }
            out.write((",\n" if written else "") + json.dumps(item, ensure_ascii=False))
            written += 1
        out.write("\n]\n")
    tmp.replace(out_path)
    summary = {
        "format": "llava-conversations",
        "file": str(out_path),
        "conversations": written,
        "skipped_few_entities": skipped,
        "prompt_id": template.id,
        "prompt_sha256": template.sha256,
        "run": run.uri,
    }
    # the manifest travels with DEST: it names its files relative to DEST (the summary, for the caller, in full)
    manifest = {**summary, "file": out_path.name}
    atomic_write_bytes(dest / "sft_manifest.json", json.dumps(manifest, indent=2).encode())
    return summary
