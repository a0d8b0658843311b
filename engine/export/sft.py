"""`export sft`: an instruction-tuning set for the fused annotator (DetCLIPv3 step 3), from a finished run.

LLaVA conversation format: DEST/images/KEY.jpg and DEST/sft.json, a list of
`{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n" + prompt}, {"from": "gpt",
"value": entities JSON}]}`. The human turn is the `annotate` prompt filled with the raw caption, the very
text the `annotate` stage sends at inference, so the tuned model sees what it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.export import iter_run_samples
from engine.export.common import UniqueNames
from engine.prompts import load_prompt
from engine.io.atomic import atomic_write_bytes
from engine.io.shards import tar_key
from engine.io.storage import Location


def export(run: Location, dest: Path, *, prompt: str = "annotate", min_entities: int = 1) -> dict[str, Any]:
    template = load_prompt(prompt)
    images = dest / "images"
    images.mkdir(parents=True, exist_ok=True)
    out_path = dest / "sft.json"
    tmp = out_path.with_name(out_path.name + ".tmp")
    written = skipped = 0
    names = UniqueNames()  # one flat folder: unique across the run, case aside
    with open(tmp, "w", encoding="utf-8") as out:  # streamed: one conversation at a time
        out.write("[\n")
        for record, jpeg in iter_run_samples(run):
            entities = [
                {k: e[k] for k in ("phrase", "category", "parent_category")} for e in record.get("entities") or []
            ]
            if len(entities) < min_entities:
                skipped += 1
                continue
            stem = names(tar_key(record["key"]))
            (images / f"{stem}.jpg").write_bytes(jpeg)
            item = {
                "id": record["key"],
                "image": f"images/{stem}.jpg",
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
    atomic_write_bytes(dest / "sft_manifest.json", json.dumps(summary, indent=2).encode())
    return summary
