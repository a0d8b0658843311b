"""Language stages: granucap's recaption and extract stages on vLLM vs raw `vllm.LLM.chat`, same engine, one run.

Both sides share one engine per model (so neither pays a start the other does not), the same prompts, the same
greedy sampling and, for extract, the same JSON-schema structured output. The baseline is what a hand-written
script does: render the DetCLIPv3 prompts, one `LLM.chat` over every sample at once (two dependent calls for
extract: factual filter, then entities), `json.loads` the answers. granucap runs the stage itself over the same
records in batches of `--batch` (the stage's Ray Data batch size), with its per-sample validation, schema checks,
provenance and usage accounting. Greedy decoding makes both sides generate the same tokens; the script checks.
Run by hand in the vLLM environment (`GRANUCAP_VLLM=1 bash install.sh`, or CI's `.venv-vllm`):

    .venv-vllm/bin/python benchmarks/language.py --samples 64 --batch 64     # tiny random-weight models, CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_records(samples: int, tmp: Path) -> list:
    """Decoded records of the demo dump (images resized by the decode stage, raw captions)."""
    from engine.config import DecodeSpec
    from engine.demo import write_demo_input
    from engine.io.plan import plan_units
    from engine.io.readers import read_unit
    from engine.stages.decode import Decode

    write_demo_input(tmp / "in", samples=samples, per_tar=max(samples, 1), seed=0)
    records = [r for u in plan_units([str(tmp / "in")], shard_size=10**9) for r in read_unit(u)]
    decoded = Decode(DecodeSpec(max_side=320))(records)
    return [r for r in decoded if r.ok]


def alternate(raw, ours, repeat: int):
    """Best of `repeat` timings of each side, the two sides taking turns (so that drift on a shared machine
    hits both alike): (raw seconds, raw result, granucap seconds, granucap result)."""
    best = {"raw": float("inf"), "ours": float("inf")}
    out = {}
    for _ in range(repeat):
        for side, fn in (("raw", raw), ("ours", ours)):
            start = time.perf_counter()
            out[side] = fn()
            best[side] = min(best[side], time.perf_counter() - start)
    return best["raw"], out["raw"], best["ours"], out["ours"]


def through_stage(stage, records: list, batch: int) -> list:
    out = []
    for i in range(0, len(records), batch):
        out.extend(stage([r.copy() for r in records[i : i + batch]]))
    return out


# -- recaption --------------------------------------------------------------------------------------------


def bench_recaption(records: list, args, cache_dir: str) -> dict:
    from engine.config import RecaptionSpec, VllmOptions
    from engine.prompts import load_prompt
    from engine.images import open_rgb
    from engine.stages.recaption import Recaption

    spec = RecaptionSpec(backend="vllm", model=args.vlm, max_tokens=args.recaption_tokens, image_max_side=64,
                         vllm=VllmOptions(enforce_eager=True, max_model_len=2048, cpu_kv_cache_gb=1))
    stage = Recaption(spec, cache_dir=cache_dir)
    stage([r.copy() for r in records[:2]])  # setup (engine start) + warm-up
    llm = stage.backend.llm
    import vllm

    system, prompt = load_prompt("system"), load_prompt(spec.prompt)

    def raw() -> tuple[list[str], int]:
        conversations = []
        for r in records:
            image = open_rgb(r.image)
            image.thumbnail((spec.image_max_side, spec.image_max_side))
            conversations.append([
                {"role": "system", "content": system.template},
                {"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                             {"type": "text", "text": prompt.render(caption=r.raw_caption or "")}]},
            ])
        params = vllm.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0)
        outputs = llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs)

    raw_s, (raw_text, raw_tokens), ours_s, ours = alternate(
        raw, lambda: through_stage(stage, records, args.batch), args.repeat)
    same = sum(o.caption == t for o, t in zip(ours, raw_text) if o.ok)
    stage.backend.close()
    return {"stage": f"recaption ({args.vlm})", "raw": raw_s, "ours": ours_s, "samples": len(records),
            "same": same, "ok": sum(r.ok for r in ours), "tokens": _tokens(ours, "recaption"),
            "raw_tokens": raw_tokens}


def _tokens(records: list, stage: str) -> int:
    """Completion tokens of `stage` summed from the records' provenance (granucap's own usage accounting)."""
    return sum(json.loads(p["params"])["usage"]["completion_tokens"]
               for r in records for p in r.provenance if p["stage"] == stage)


# -- extract ----------------------------------------------------------------------------------------------


def bench_extract(records: list, args, cache_dir: str) -> dict:
    from engine.config import ExtractSpec, VllmOptions
    from engine.language.entities import (EntityFormatError, bounded_entities_schema, normalize_entities,
                                          parse_entities_json)
    from engine.prompts import load_prompt
    from engine.stages.extract import Extract

    spec = ExtractSpec(backend="vllm", model=args.llm, max_tokens=args.extract_tokens,
                       factual_prompt="factual" if args.factual else None,
                       max_entities=args.max_entities, max_phrase_chars=args.max_phrase_chars,
                       vllm=VllmOptions(enforce_eager=True, max_model_len=2048, cpu_kv_cache_gb=1))
    for r in records:
        r.caption = r.raw_caption
    stage = Extract(spec, cache_dir=cache_dir)
    stage([r.copy() for r in records[:2]])  # setup (engine start) + warm-up
    llm = stage.backend.llm
    import vllm
    from vllm.sampling_params import StructuredOutputsParams

    system, entities = load_prompt("system"), load_prompt(spec.entities_prompt)
    factual = load_prompt(spec.factual_prompt) if spec.factual_prompt else None
    schema = bounded_entities_schema(max_entities=spec.max_entities, max_chars=spec.max_phrase_chars)

    def conv(p, text):
        return [{"role": "system", "content": system.template}, {"role": "user", "content": p.render(caption=text)}]

    def raw() -> tuple[list, int]:
        texts = [r.caption or "" for r in records]
        tokens = 0
        if factual is not None:
            params = vllm.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0)
            outs = llm.chat([conv(factual, t) for t in texts], sampling_params=params, use_tqdm=False)
            texts = [o.outputs[0].text.strip() for o in outs]
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        params = vllm.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, structured_outputs=(
            StructuredOutputsParams(json=schema, disable_any_whitespace=True)))
        outs = llm.chat([conv(entities, t) for t in texts], sampling_params=params, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        answers = []
        for text, o in zip(texts, outs, strict=True):
            try:
                entities_json = json.loads(o.outputs[0].text)
            except ValueError:
                entities_json = None
            answers.append((text, o.outputs[0].text, entities_json))
        return answers, tokens

    raw_s, (raw_answers, raw_tokens), ours_s, ours = alternate(
        raw, lambda: through_stage(stage, records, args.batch), args.repeat)
    # Same generations: the same factual text, and the entities granucap kept are the raw answer's after
    # granucap's validation (or both sides have none: unparseable, or rejected by the schema bounds).
    same = 0
    for r, (text, answer, _) in zip(ours, raw_answers, strict=True):
        try:
            expected = normalize_entities(parse_entities_json(answer), max_entities=spec.max_entities,
                                          max_phrase_chars=spec.max_phrase_chars)
        except EntityFormatError:
            expected = None
        kept = r.entities if r.ok else None
        same += (factual is None or r.factual_caption == (text or None)) and kept == expected
    stage.backend.close()
    return {"stage": f"extract ({args.llm}, {'2 prompts' if factual else 'entities prompt'})", "raw": raw_s,
            "ours": ours_s, "samples": len(records), "same": same, "ok": sum(r.ok for r in ours),
            "tokens": _tokens(ours, "extract"), "raw_tokens": raw_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="granucap's stage batch size")
    parser.add_argument("--repeat", type=int, default=2, help="best of N timings per side")
    parser.add_argument("--vlm", default="tiny:llava")
    parser.add_argument("--llm", default="tiny:llama-chat-bpe")
    parser.add_argument("--recaption-tokens", type=int, default=64)
    parser.add_argument("--extract-tokens", type=int, default=400)
    parser.add_argument("--max-entities", type=int, default=3)
    parser.add_argument("--max-phrase-chars", type=int, default=24)
    parser.add_argument("--factual", action=argparse.BooleanOptionalAction, default=True,
                        help="run the factual-filter prompt before the entities prompt (DetCLIPv3's two calls)")
    parser.add_argument("--only", choices=["recaption", "extract"])
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING)
    import vllm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = os.environ.get("GRANUCAP_CACHE_DIR", str(tmp / "cache"))
        records = make_records(args.samples, tmp)
        if args.only in (None, "recaption"):
            rows.append(bench_recaption(records, args, cache))
        if args.only in (None, "extract"):
            rows.append(bench_extract(records, args, cache))
    print(f"vllm {vllm.__version__}  {platform.processor() or platform.machine()}  cpus {os.cpu_count()}  "
          f"samples {args.samples}  granucap batch {args.batch}  best of {args.repeat}")
    print(f"{'stage':<46}{'raw vLLM s':>11}{'granucap s':>11}{'ratio':>8}{'tokens raw/ours':>17}{'same':>6}")
    for row in rows:
        ratio = row["ours"] / row["raw"]
        print(f"{row['stage']:<46}{row['raw']:>11.2f}{row['ours']:>11.2f}{ratio:>7.2f}x"
              f"{str(row['raw_tokens']) + '/' + str(row['tokens']):>17}{str(row['same']) + '/' + str(row['samples']):>6}")
    print("ratio = granucap seconds / raw vLLM seconds (target <= 1.10x); same = samples whose granucap output "
          "equals the raw script's")


if __name__ == "__main__":
    main()
