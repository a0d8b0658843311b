"""`export regions`: region-caption data for an object captioner (DetCLIPv3's hierarchical object labels),
from a finished run.

Every kept box becomes one region labelled `phrase|category|parent_category` (its entity's three fields).
Under DEST, with each sample's image once in `images/{shard}/{stem}.jpg`:
- `regions.json`: LLaVA conversations, the `sft` export's format, one per region: the human turn is the
  `region` prompt (prompts/region.txt) with the box as `[x0, y0, x1, y1]` in thousandths of the image's
  width and height (the integer grid grounding VLMs such as Qwen-VL read and write), the answer its label.
- `regions.odvg.jsonl`: ODVG grounding lines (Open-GroundingDino, MM-Grounding-DINO), one per image: the
  labels joined by ". " as the caption, and each region's pixel `bbox`, its label as `phrase` and the span
  of that label in the caption as `tokens_positive`.
- `regions_manifest.json`: counts, the prompt's id and sha256, the run.
Boxes are clipped to the image first; a box with nothing of positive area left is dropped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.export.common import PartFile, assemble_json, image_boxes, iter_samples, write_image
from engine.export.odvg import grounding_caption
from engine.io.atomic import atomic_write_bytes
from engine.io.storage import Location
from engine.language.entities import entity_label
from engine.prompts import load_prompt

CONVERSATIONS = "regions.json"
JSONL = "regions.odvg.jsonl"


def thousandths(xyxy: list[float], width: int, height: int) -> list[int]:
    x0, y0, x1, y1 = xyxy
    return [round(1000 * x0 / width), round(1000 * y0 / height), round(1000 * x1 / width), round(1000 * y1 / height)]


def export_regions(run: Location, dest: Path, *, prompt: str = "region", write_images: bool = True) -> dict[str, Any]:
    template = load_prompt(prompt)
    dest.mkdir(parents=True, exist_ok=True)
    conversations = PartFile(dest / CONVERSATIONS, "conversations")
    jsonl_target = dest / JSONL
    jsonl_tmp = jsonl_target.with_name(f".{jsonl_target.name}.tmp")
    images = regions = dropped = 0
    try:
        with open(jsonl_tmp, "w", encoding="utf-8") as jsonl:
            for sample in iter_samples(run):
                record = sample.record
                boxes, _ = image_boxes(record)
                dropped += len(record["boxes"]) - len(boxes)
                if not len(boxes):
                    continue
                filename = "images/" + sample.image_name()
                if write_images:
                    write_image(dest, filename, sample.jpg)
                labels = [entity_label(record["entities"][e]) for e in boxes.entity.tolist()]
                pixels = [[round(v, 2) for v in xyxy] for xyxy in boxes.xyxy.tolist()]
                for n, (xyxy, label) in enumerate(zip(pixels, labels)):
                    box = thousandths(xyxy, record["width"], record["height"])
                    conversations.add({
                        "id": f"{record['key']}#{n}", "image": filename,
                        "conversations": [{"from": "human", "value": "<image>\n" + template.render(box=str(box))},
                                          {"from": "gpt", "value": label}],
                    })
                caption, spans = grounding_caption({"caption": ""}, labels)
                jsonl.write(json.dumps({
                    "filename": filename, "height": record["height"], "width": record["width"],
                    "grounding": {"caption": caption, "regions": [
                        {"bbox": xyxy, "phrase": label, "tokens_positive": [spans[label]]}
                        for xyxy, label in zip(pixels, labels)]},
                }, ensure_ascii=False) + "\n")
                images += 1
                regions += len(labels)
        assemble_json(dest / CONVERSATIONS, {}, {"conversations": conversations}, array="conversations")
        jsonl_tmp.replace(jsonl_target)
    finally:
        conversations.close()
        conversations.path.unlink(missing_ok=True)
        jsonl_tmp.unlink(missing_ok=True)
    summary = {"format": "regions", "conversations": str(dest / CONVERSATIONS), "jsonl": str(jsonl_target),
               "images": images, "regions": regions, "dropped_boxes": dropped, "prompt_id": template.id,
               "prompt_sha256": template.sha256, "run": run.uri}
    # the manifest travels with DEST: it names its files relative to DEST (the summary, for the caller, in full)
    manifest = {**summary, "conversations": CONVERSATIONS, "jsonl": JSONL}
    atomic_write_bytes(dest / "regions_manifest.json", json.dumps(manifest, indent=2).encode())
    return summary
