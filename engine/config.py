"""Pipeline configuration: pydantic models for the YAML, `--set a.b=c` overrides, errors that name the field.

A model reference is a hub id (`IDEA-Research/grounding-dino-tiny`), a local directory, or `tiny:NAME`
for a random-weight model that granucap builds itself (see engine/models/tiny.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A pipeline file or override is invalid; the message names the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(_Strict):
    """How a stage is mapped onto Ray Data."""

    batch_size: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)  # actors (model stages) or max parallel tasks (CPU stages)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    # Ray custom resources per actor of a model stage, e.g. {accel_a100: 1} to pin it to nodes started with
    # `ray start --resources='{"accel_a100": 4}'`; checked against the cluster before a run
    # (engine/runner/capacity.py)
    custom: dict[str, float] = {}

    @field_validator("custom")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        if "CPU" in v or "GPU" in v:
            raise ValueError("CPUs and GPUs are num_cpus and num_gpus, not custom resources")
        negative = {k: q for k, q in v.items() if q < 0}
        if negative:
            raise ValueError(f"amounts must not be negative, got {negative}")
        return v


class DecodeSpec(_Strict):
    max_pixels: int = Field(89_478_485, ge=1)  # PIL's own bomb limit; larger images are rejected
    max_side: int = Field(1333, ge=16)  # longer side is resized down to this
    min_side: int = Field(8, ge=1)  # smaller images are rejected
    jpeg_quality: int = Field(95, ge=1, le=100)
    max_caption_chars: int = Field(4000, ge=1)  # longer captions are cut to this
    # Decode runs in the tasks that read the input (see engine/runner/dataset.py): `concurrency` of them at once,
    # each reading one work unit and decoding it `batch_size` rows at a time, one block per batch.
    resources: Resources = Resources(batch_size=32)


class OpenAIOptions(_Strict):
    """Any OpenAI-compatible chat endpoint (OpenAI, `vllm serve`, SGLang, llama.cpp server)."""

    base_url: str | None = None  # None: the openai client's default (OPENAI_BASE_URL or api.openai.com)
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key; never the key
    server: Literal["openai", "vllm", "other"] = "openai"  # vllm: also send vLLM's structured_outputs
    max_concurrency: int = Field(8, ge=1)  # requests in flight per stage worker
    # batches (of resources.batch_size) one stage actor holds at once, sharing its `max_concurrency` connections;
    # None: enough to keep them all busy and one batch more, whatever the batch size
    max_concurrent_batches: int | None = Field(4, ge=1)
    timeout_s: float = Field(60.0, gt=0)  # per HTTP attempt
    max_retries: int = Field(5, ge=0)  # retries after the first attempt (engine/retry.py says which errors)
    backoff_base_s: float = Field(0.5, ge=0)  # first backoff ceiling; doubles per retry, full jitter
    backoff_max_s: float = Field(30.0, ge=0)  # cap on one wait, Retry-After included


class VllmOptions(_Strict):
    """vLLM's offline engine inside the stage's actors."""

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=16)
    enforce_eager: bool = False  # True: skip torch.compile / CUDA graphs (starts ~2x faster, runs slower)
    dtype: str = "auto"
    # xgrammar let raw control characters into length-bounded strings (ENVIRONMENT.md); guidance did not.
    structured_outputs_backend: Literal["guidance", "xgrammar", "outlines", "auto"] = "guidance"
    cpu_kv_cache_gb: int | None = Field(None, ge=1)  # CPU only: VLLM_CPU_KVCACHE_SPACE; None: vLLM's default
    # sequences the engine runs at once (vLLM's max_num_seqs); None: vLLM's default for the device
    max_num_seqs: int | None = Field(None, ge=1)
    # batches (of resources.batch_size) one stage actor holds at once (threads sharing its engine): the next
    # batch's requests join while the current batch's longest answers finish (engine/backends/vllm_chat.py).
    # None: enough to fill the engine (its max_num_seqs sequences) and one batch more, whatever the batch size
    # (not the default: on CPU it made recaption slower, docs/performance.md).
    max_concurrent_batches: int | None = Field(4, ge=1)


class RecaptionSpec(_Strict):
    backend: Literal["transformers", "vllm", "openai", "passthrough"] = "transformers"
    model: str | None = None
    prompt: str = "recaption"  # file name (without .txt) in prompts/
    max_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.0, ge=0)
    image_max_side: int = Field(768, ge=16)  # image is resized to this before it goes to the VLM
    dtype: str = "auto"
    device: str = "auto"
    openai: OpenAIOptions = OpenAIOptions()  # used when backend is openai
    vllm: VllmOptions = VllmOptions()  # used when backend is vllm
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _model_needed(self) -> "RecaptionSpec":
        if self.backend != "passthrough" and not self.model:
            raise ValueError(f"recaption backend {self.backend!r} needs a model")
        return self


class ExtractSpec(_Strict):
    backend: Literal["transformers", "vllm", "openai", "nltk"] = "transformers"
    model: str | None = None
    factual_prompt: str | None = "factual"  # None: skip the factual filter
    entities_prompt: str = "entities"
    max_tokens: int = Field(384, ge=1)
    temperature: float = Field(0.0, ge=0)
    max_entities: int = Field(32, ge=1)
    max_phrase_chars: int = Field(80, ge=1)
    fallback: Literal["nltk"] | None = None  # when the LLM output is not valid, extract with this instead
    dtype: str = "auto"
    device: str = "auto"
    openai: OpenAIOptions = OpenAIOptions()  # used when backend is openai
    vllm: VllmOptions = VllmOptions()  # used when backend is vllm
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _model_needed(self) -> "ExtractSpec":
        if self.backend != "nltk" and not self.model:
            raise ValueError(f"extract backend {self.backend!r} needs a model")
        return self


class AnnotateSpec(_Strict):
    """DetCLIPv3 step 3: one VLM call per image (image + raw caption -> entities JSON) replaces
    recaption + extract; meant for a VLM fine-tuned on `granucap export sft` output."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str
    prompt: str = "annotate"
    max_tokens: int = Field(384, ge=1)
    temperature: float = Field(0.0, ge=0)
    image_max_side: int = Field(768, ge=16)
    max_entities: int = Field(32, ge=1)
    max_phrase_chars: int = Field(80, ge=1)
    fallback: Literal["nltk"] | None = None  # invalid output: noun phrases of the raw caption instead
    dtype: str = "auto"
    device: str = "auto"
    openai: OpenAIOptions = OpenAIOptions()
    vllm: VllmOptions = VllmOptions()
    resources: Resources = Resources()


class RescoreSpec(_Strict):
    """YOLO-World style re-scoring: score = sqrt(detector score * CLIP prob of the box's text on its crop)."""

    enabled: bool = False
    model: str = "openai/clip-vit-base-patch32"  # any CLIPModel checkpoint (hub id, directory, tiny:clip)
    batch_size: int = Field(32, ge=1)  # crops per CLIP forward pass


class ExemplarSpec(_Strict):
    """T-Rex2 style visual prompts: crops in `dir/CATEGORY/*.jpg` find more boxes of that category (OWLv2)."""

    dir: str | None = None  # None: off
    model: str = "google/owlv2-base-patch16-ensemble"  # an OWLv2 / OWL-ViT checkpoint
    threshold: float = Field(0.5, ge=0, le=1)
    nms_iou: float = Field(0.3, gt=0, le=1)  # within one category's exemplar boxes


class GroundSpec(_Strict):
    backend: Literal["transformers"] = "transformers"
    model: str
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    phrase_threshold: float | None = Field(None, ge=0, le=1)  # boxes matched by a phrase; None: box_threshold
    category_threshold: float | None = Field(None, ge=0, le=1)  # boxes matched by a category; None: box_threshold
    max_prompt_tokens: int | None = Field(None, ge=8)  # default: the text encoder's own limit
    forward_batch_size: int = Field(8, ge=1)  # (image, prompt) pairs per teacher forward pass
    dummy_weights: bool = False  # the model's real architecture from its config, random weights (throughput)
    # Also keep every box of an entity scoring over this floor, before the thresholds and the filter, in the
    # record's `candidates`: `granucap eval --run --sweep` and `granucap refilter` replay thresholds on them
    # without the teacher (docs/quality.md). None: no candidates.
    keep_candidates: float | None = Field(None, ge=0, le=1)
    # More teachers on the same prompts (an ensemble): each runs as `model` does (same backend, thresholds,
    # dtype, device) in the same actor, one after another on each batch; their boxes are fused per entity
    # (weighted boxes fusion, `engine.boxes.fuse_teachers`) when they overlap by `fusion_iou`, and a box only
    # one teacher found must score over `single_teacher_threshold` (None: over the usual thresholds only).
    teachers: list[str] = []
    # Vocabulary-free annotation: these texts are added to every sample's entities as entities of their own
    # (phrase = category = parent_category = the text, e.g. "object"), so the teacher also proposes boxes that
    # no caption named; the describe stage then names each such box from its crop.
    generic_prompts: list[str] = []
    fusion_iou: float = Field(0.55, gt=0, le=1)
    single_teacher_threshold: float | None = Field(None, ge=0, le=1)
    rescore: RescoreSpec = RescoreSpec()
    exemplars: ExemplarSpec = ExemplarSpec()
    dtype: str = "auto"
    device: str = "auto"
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _candidates_replayable(self) -> "GroundSpec":
        if len({self.model, *self.teachers}) != 1 + len(self.teachers):
            raise ValueError("teachers must differ from each other and from model: boxes are told apart by teacher")
        if self.teachers and (self.rescore.enabled or self.keep_candidates is not None):
            raise ValueError("teachers (an ensemble) cannot be combined with rescore or keep_candidates yet: both "
                             "work on one teacher's boxes")
        if self.keep_candidates is not None and self.rescore.enabled:
            raise ValueError("keep_candidates cannot be combined with rescore: a replay has no CLIP to re-score with")
        if self.keep_candidates is not None and self.keep_candidates > min(
                t for t in (self.box_threshold, self.phrase_threshold, self.category_threshold) if t is not None):
            raise ValueError("keep_candidates must not exceed the thresholds: it is the floor they are tuned over")
        return self


class DescribeSpec(_Strict):
    """After the filter, a vision-language model names each kept box's crop as one entity {phrase, category,
    parent_category} (DetCLIPv3's object captioner data). A box of a generic prompt (`ground.generic_prompts`)
    takes that name as its entity; any other box is marked with whether the name agrees with its entity
    (`label_agreement`, engine/language/agreement.py)."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str
    prompt: str = "describe"
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    context: float = Field(0.1, ge=0, le=1)  # the crop grows by this fraction of the box's size on each side
    image_max_side: int = Field(336, ge=16)  # crops are shrunk to fit this
    max_phrase_chars: int = Field(80, ge=1)
    # How a name and an entity are compared: WordNet (synonyms, and either one's category a kind of the
    # other's, needs the NLTK data of `granucap nltk-data`), or the words alone.
    agreement: Literal["wordnet", "words"] = "wordnet"
    drop_disagreeing: bool = False  # drop boxes whose name disagrees with their entity
    keep_unnamed: bool = False  # keep a generic prompt's box that got no valid name (its entity stays generic)
    dtype: str = "auto"
    device: str = "auto"
    openai: OpenAIOptions = OpenAIOptions()
    vllm: VllmOptions = VllmOptions()
    resources: Resources = Resources()


class FilterSpec(_Strict):
    min_score: float = Field(0.0, ge=0, le=1)
    nms_iou: float | None = Field(0.5, gt=0, le=1)  # per entity, across its phrase/category matches
    class_agnostic_nms_iou: float | None = Field(None, gt=0, le=1)
    max_boxes: int = Field(100, ge=1)
    min_area: float = Field(0.0, ge=0)  # pixels
    min_boxes: int = Field(1, ge=0)  # fewer boxes: the sample is rejected
    min_entities: int = Field(1, ge=0)  # fewer entities: the sample is rejected
    resources: Resources = Resources(batch_size=64)


class WriteSpec(_Strict):
    shard_size: int = Field(1000, ge=1)  # samples per work unit and output shard
    # Each unit's shard, index part and marker are written by a Ray task on the node that holds the unit's
    # rows, straight to the output (local folder or object store). CPUs per writing task, and how many may
    # run at once (None: as many as the cluster's CPUs allow).
    num_cpus: float = Field(0.25, gt=0)
    concurrency: int | None = Field(None, ge=1)


class StagesSpec(_Strict):
    decode: DecodeSpec = DecodeSpec()
    recaption: RecaptionSpec = RecaptionSpec(backend="passthrough")
    extract: ExtractSpec = ExtractSpec(backend="nltk")
    annotate: AnnotateSpec | None = None  # set: the fused annotator replaces recaption and extract
    ground: GroundSpec
    filter: FilterSpec = FilterSpec()
    describe: DescribeSpec | None = None  # set: name every kept box's crop with a VLM (after the filter)

    @model_validator(mode="after")
    def _describe_replayable(self) -> "StagesSpec":
        if self.describe is not None and self.ground.keep_candidates is not None:
            raise ValueError("describe cannot be combined with ground.keep_candidates: a replay of the thresholds "
                             "(eval --sweep, refilter) has no VLM to name the boxes with")
        return self


class RaySpec(_Strict):
    address: str | None = None  # None: start Ray embedded on this machine
    num_cpus: int | None = Field(None, ge=1)
    object_store_mb: int | None = Field(None, ge=64)
    # The units run as consecutive Ray Datasets of at most this many samples (whole units, at least one):
    # Ray Data keeps statistics for every block in the driver until its Dataset ends (ray-project/ray#66016;
    # their size: docs/performance.md); each Dataset starts its actors, and loads their models, anew.
    # None: one Dataset.
    max_samples_per_dataset: int | None = Field(1_000_000, ge=1)
    # Object store memory that blocks waiting between operators may hold (Ray Data's budget for the run): it
    # bounds how far reading and decoding run ahead of the model stages, so memory stops growing with the
    # input early (docs/performance.md, "Memory"). None: 8 decoded units per worker (UNITS_PER_WORKER in
    # engine/runner/sizing.py), a unit's `write.shard_size` samples at the mean size of the input's first samples
    # as decoded (sizing.measure_sample_bytes; DECODED_SAMPLE_KB when they cannot be read). Ray still lets each
    # operator run a task when the budget is spent, and never goes beyond its own default.
    data_memory_mb: int | None = Field(None, ge=16)
    # The memory allocator Ray's worker processes (the stages' tasks and actors) run with (engine/allocator.py):
    # auto = tcmalloc when installed (apt package libtcmalloc-minimal4; install.sh installs it), else the
    # system's; on a Ray cluster auto means the system's. tcmalloc / jemalloc: that one, or an error if missing.
    worker_allocator: Literal["auto", "system", "tcmalloc", "jemalloc"] = "auto"
    # A Ray Dataset that fails for a reason outside granucap's code (a node lost, an actor that died more
    # times than its restarts, an object that could not be reconstructed) is started again on the units that
    # have no marker yet, at most this many times in all; completed units are never redone.
    max_attempts: int = Field(3, ge=1)
    # The cluster at `address` adds nodes when work waits (Ray's autoscaler, KubeRay): a plan that asks more
    # than the cluster has when the run starts is then waited for, with a message, instead of refused.
    # Ray has no public way to ask whether a cluster autoscales, so it is said here (engine/runner/capacity.py).
    autoscaling: bool = False


class PipelineConfig(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    cache_dir: str | None = None  # where tiny models are built; default ~/.cache/granucap
    stages: StagesSpec
    write: WriteSpec = WriteSpec()
    ray: RaySpec = RaySpec()
    # Keyword arguments for the filesystem of each URI protocol in --input / --output (fsspec's
    # storage_options), e.g. {s3: {endpoint_url: "http://minio:9000"}}. Credentials are better left to the
    # environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, ...); given here, they are never written to the
    # manifest, printed or logged (engine/io/storage.py).
    storage_options: dict[str, dict[str, Any]] = {}

    def public_dump(self) -> dict[str, Any]:
        """The config as JSON for the manifest and the terminal: storage option values left out."""
        from engine.io.storage import redacted_options

        data = self.model_dump(mode="json")
        data["storage_options"] = redacted_options(self.storage_options)
        return data

    @model_validator(mode="before")
    @classmethod
    def _no_read_section(cls, data: Any) -> Any:
        if isinstance(data, dict) and "read" in data:
            raise ValueError(
                "the `read` section is gone: the input is read inside the decode stage's tasks; set "
                "stages.decode.resources (concurrency: tasks at once, num_cpus, batch_size: rows per block) instead"
            )
        return data

    @field_validator("storage_options")
    @classmethod
    def _protocols(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import re

        bad = [k for k in v if not re.fullmatch(r"[a-z][a-z0-9+.\-]*", k) or k in ("file", "local")]
        if bad:
            raise ValueError(
                f"keys are URI protocols with their filesystem's options (e.g. s3: {{endpoint_url: ...}}), got {bad}"
            )
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid pipeline config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {loc}: {e['msg']} (got {shown[:120]})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML so numbers/bools/null work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like a.b=value")
    path, _, raw = text.partition("=")
    keys = [k for k in path.strip().split(".")]
    if not path.strip() or any(not k for k in keys):
        raise ConfigError(f"override {text!r}: empty key in {path!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"pipeline file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return config_from_dict(data, overrides or [], origin=str(path))


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, *, origin: str = "<dict>"
) -> PipelineConfig:
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None
