"""Which stages a pipeline runs, how each is built, and how they group into Ray Data operators.

A model stage (and `nltk`, which loads its noun lexicon and tagger once) runs in an actor pool; the other
stages are CPU work that joins an operator next to it: decode and the CPU stages up to the first model stage
run in the tasks that read the units, and a CPU stage right after a model stage (filter after ground) runs
in that stage's actors. Every operator kept is another worker process with Ray Data loaded, alive next to the
others for the whole run.
"""

from __future__ import annotations

from engine.config import PipelineConfig
from engine.records import Record
from engine.errors import RunError
from engine.stages.base import Stage

STAGE_ORDER = ("decode", "recaption", "extract", "ground", "filter", "describe")
FUSED_ORDER = ("decode", "annotate", "ground", "filter", "describe")
MODEL_STAGES = ("recaption", "extract", "annotate", "ground", "describe")


def stage_names(config: PipelineConfig) -> tuple[str, ...]:
    """The stages a pipeline runs, in order: the fused annotator replaces recaption + extract; describe runs
    only when configured."""
    order = FUSED_ORDER if config.stages.annotate is not None else STAGE_ORDER
    return tuple(name for name in order if name != "describe" or config.stages.describe is not None)


def build_stage(name: str, config: PipelineConfig) -> Stage:
    """The stage object for `name`, constructed cheaply (models load in `setup`)."""
    spec = getattr(config.stages, name)
    cache_dir = config.cache_dir
    if name == "decode":
        from engine.stages.decode import Decode

        return Decode(spec)
    if name == "recaption":
        from engine.stages.recaption import Recaption

        return Recaption(spec, cache_dir=cache_dir)
    if name == "extract":
        from engine.stages.extract import Extract

        return Extract(spec, cache_dir=cache_dir)
    if name == "annotate":
        from engine.stages.annotate import Annotate

        return Annotate(spec, cache_dir=cache_dir)
    if name == "ground":
        from engine.stages.ground import Ground

        return Ground(spec, cache_dir=cache_dir)
    if name == "filter":
        from engine.stages.filter import Filter

        return Filter(spec)
    if name == "describe":
        from engine.stages.describe import Describe

        return Describe(spec, generic_prompts=config.stages.ground.generic_prompts,
                        min_boxes=config.stages.filter.min_boxes, cache_dir=cache_dir)
    raise ValueError(f"unknown stage {name!r}")


def check_stage_inputs(config: PipelineConfig) -> None:
    """Each stage's required fields are provided by the reader or an earlier stage."""
    available = {"key", "source", "unit", "position", "image", "raw_caption", "meta", "width", "height"}
    for name in stage_names(config):
        stage = build_stage(name, config)
        missing = [f for f in stage.requires if f not in available]
        if missing:
            raise RunError(f"stage {name!r} needs {missing}, which no earlier stage provides")
        available.update(stage.provides)


def run_stage_locally(records: list[Record], config: PipelineConfig) -> list[Record]:
    """All stages in one process, in order (tests, debugging, `--no-ray`)."""
    for name in stage_names(config):
        stage = build_stage(name, config)
        records = stage(records)
    return records


def uses_model(name: str, config: PipelineConfig) -> bool:
    """Whether a stage loads something heavy once (a model, or the noun lexicon + the tagger for `nltk`) and
    so runs in an actor pool, or is plain CPU work that runs as tasks. As tasks, every worker process that
    ever ran the nltk extractor would keep its own copy of them."""
    backend = getattr(getattr(config.stages, name), "backend", None)
    return name in MODEL_STAGES and backend != "passthrough"


def operators(config: PipelineConfig) -> list[tuple[str, ...]]:
    """The stages grouped into Ray Data operators, in order. The first group is decode with the CPU stages
    up to the first model stage: it runs in the read tasks with decode's `resources`. Each model stage takes
    the CPU stages right after it into its actors, so every later group starts with a model stage. A joined
    stage's own `resources` are unused."""
    groups: list[tuple[str, ...]] = []
    for name in stage_names(config):
        if groups and not uses_model(name, config) and (uses_model(groups[-1][0], config) or len(groups) == 1):
            groups[-1] += (name,)
        else:
            groups.append((name,))
    return groups


# Stages whose actors may run several batches at once (threads sharing one engine): they keep no state per
# batch outside the records, and their chat backend takes requests while others run.
CONCURRENT_STAGES = ("recaption", "extract")


def batches_in_flight(names: tuple[str, ...], config: PipelineConfig) -> int | None:
    """Batches one actor of the operator `names` holds at once: `max_concurrent_batches` of the model stage's
    backend options (vllm, openai) when no CPU stage is joined to it; 1 otherwise. None: as many as fill the
    actor's engine, which only the actor knows (`batches_to_fill`)."""
    if len(names) != 1 or names[0] not in CONCURRENT_STAGES:
        return 1
    spec = getattr(config.stages, names[0])
    options = getattr(spec, spec.backend, None)  # the section named after the backend, when it has one
    return getattr(options, "max_concurrent_batches", 1)


def batches_to_fill(capacity: int, batch_size: int) -> int:
    """Batches in flight that keep an engine running `capacity` requests at once full: its capacity in
    batches, and one more whose requests are queued to join as the current ones finish."""
    return -(-capacity // batch_size) + 1
