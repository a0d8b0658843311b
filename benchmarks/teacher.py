"""Teacher throughput: the ground stage vs an autodistill-style loop, same model and images, one run.

The baseline is what autodistill's GroundingDINO base model does (`autodistill_grounding_dino`'s `predict`:
`for description in ontology.prompts(): predict_with_classes(image, classes=[description])`): per image, one
forward pass per prompt text, in fp32, then post-processing. Here the prompt texts are an image's entity
phrases and categories, deduplicated, exactly the texts the ground stage prompts with. A second, stronger
baseline row runs one forward pass per image with all of its texts in one GLIP prompt ("a. b. c."), i.e. the
stage's own prompting without its batching, to show what batching alone gives. Run by hand (not in CI):

    python benchmarks/teacher.py --images 64 --side 320 --entities 10            # tiny GDINO, CPU
    python benchmarks/teacher.py --model IDEA-Research/grounding-dino-tiny --dummy-weights --device cuda
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time

import numpy as np
from PIL import Image

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "small", "large", "old"]
THINGS = ["cat", "dog", "sofa", "table", "lamp", "chair", "car", "tree", "cup", "bottle", "book", "phone",
          "person", "window", "door", "plant", "bag", "shoe", "clock", "bicycle"]


def make_records(n: int, side: int, entities: int, seed: int = 0):
    from engine.records import Record

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        # smooth random blobs compress like photos; pure noise would make JPEG decode unrealistically slow
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((side, side * 3 // 4), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        ents = []
        for k in range(entities):
            thing = THINGS[int(rng.integers(len(THINGS)))]
            ents.append({"phrase": f"a {COLORS[int(rng.integers(len(COLORS)))]} {thing}", "category": thing,
                         "parent_category": "object"})
        out.append(Record(key=f"b{i}", source="bench", image=buf.getvalue(), width=image.width,
                          height=image.height, caption="", entities=ents))
    return out


def ground_stage(records, spec, cache_dir):
    from engine.stages.ground import Ground

    stage = Ground(spec, cache_dir=cache_dir)
    stage([r.copy() for r in records[:2]])  # setup + warm-up
    start = time.perf_counter()
    out = stage([r.copy() for r in records])
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(r.boxes) for r in out)


def load_fp32(spec, cache_dir):
    import torch
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from engine.models.dummy import build_dummy_model, dummy_source
    from engine.models.loading import pick_device, resolve_model

    device = pick_device(spec.device)
    if spec.dummy_weights:
        path = dummy_source(spec.model, cache_dir)
        model = build_dummy_model(AutoModelForZeroShotObjectDetection, path, torch.float32)
    else:
        path = resolve_model(spec.model, cache_dir)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(path)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, device


def baseline_loop(records, spec, cache_dir, *, per_text: bool):
    """Per image: one forward pass per prompt text (`per_text`, autodistill) or one per GLIP prompt of all
    of its texts; fp32, no batching, transformers post-processing."""
    import torch

    from engine.stages.ground import plan_prompts

    model, processor, device = load_fp32(spec, cache_dir)
    count = lambda text: len(processor.tokenizer(text)["input_ids"])  # noqa: E731
    limit = spec.max_prompt_tokens or model.config.max_text_len

    def run(recs):
        boxes = 0
        for record in recs:
            image = Image.open(io.BytesIO(record.image)).convert("RGB")
            plan = plan_prompts(record.entities, count_tokens=count, max_tokens=limit)
            for prompt in ([f"{t}." for t in plan.texts] if per_text else plan.prompts):
                inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
                with torch.no_grad():
                    outputs = model(**inputs)
                result = processor.post_process_grounded_object_detection(
                    outputs, inputs.input_ids, threshold=spec.box_threshold, text_threshold=spec.text_threshold,
                    target_sizes=[image.size[::-1]])[0]
                boxes += len(result["boxes"])
        return boxes

    run(records[:2])
    start = time.perf_counter()
    boxes = run(records)
    return time.perf_counter() - start, boxes, sum(len(plan_prompts(r.entities, count_tokens=count,
                                                                     max_tokens=limit).texts) for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:grounding-dino")
    parser.add_argument("--dummy-weights", action="store_true", help="real architecture, random weights")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=320)
    parser.add_argument("--entities", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="(image, prompt) pairs per forward pass")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--skip-autodistill", action="store_true", help="only the GLIP-prompt baseline (faster)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "granucap-bench"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    import torch

    from engine.config import GroundSpec

    torch.set_num_threads(args.threads)
    spec = GroundSpec(model=args.model, dummy_weights=args.dummy_weights, box_threshold=0.3, text_threshold=0.25,
                      forward_batch_size=args.batch, device=args.device, dtype=args.dtype)
    records = make_records(args.images, args.side, args.entities)
    print(f"model {args.model}{' (dummy weights)' if args.dummy_weights else ''}, {args.images} images of "
          f"{args.side}px, {args.entities} entities each, {args.threads} thread(s), device {spec.device}", flush=True)
    print(f"{'method':<52} {'seconds':>8} {'images/s':>9} {'boxes':>6} {'stage is':>9}", flush=True)

    # Each row is printed as soon as it is measured: on a machine lent for minutes, a run cut short still
    # reports what it finished.
    def row(label: str, sec: float, boxes: int, ours: float) -> None:
        print(f"{label:<52} {sec:8.2f} {args.images / sec:9.1f} {boxes:6d} {sec / ours:8.2f}x", flush=True)

    ours_s, ours_boxes = ground_stage(records, spec, args.cache_dir)
    row(f"ground stage: batch {args.batch} (image, prompt) pairs, {args.dtype}", ours_s, ours_boxes, ours_s)
    glip_s, glip_boxes, _ = baseline_loop(records, spec, args.cache_dir, per_text=False)
    row("1 image x 1 GLIP prompt of all texts, fp32", glip_s, glip_boxes, ours_s)
    if not args.skip_autodistill:
        auto_s, auto_boxes, texts = baseline_loop(records, spec, args.cache_dir, per_text=True)
        row(f"autodistill-style: 1 image x 1 prompt text, fp32 ({texts / args.images:.1f} texts/image)",
            auto_s, auto_boxes, ours_s)
    print("stage is = how many times faster the ground stage is (target >= 2x CPU, >= 10x GPU vs autodistill-style)")


if __name__ == "__main__":
    main()
