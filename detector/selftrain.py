"""GLIP-style self-training: the teacher labels the raw pairs, a student trains on those shards, and the
student becomes the teacher of the next round.

    OUT/round-0/data      granucap run with the pipeline's own teacher (stages.ground.model)
    OUT/round-0/student   student trained on round-0/data, starting from `train_config.model.init`
    OUT/round-1/data      the same pipeline with stages.ground.model = OUT/round-0/student
    ...

Both steps resume (the runner skips finished shards, the trainer restarts from its newest checkpoint), so
rerunning the same command after a crash continues where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from detector.config import TrainConfig
from engine.config import PipelineConfig

logger = logging.getLogger(__name__)


def self_train(pipeline: PipelineConfig, *, inputs: list[str], output: str | Path, rounds: int,
               train_config: TrainConfig, ray_address: str | None = None) -> list[dict[str, Any]]:
    """Run `rounds` teacher -> shards -> student rounds; returns per round the teacher, counts and summary."""
    from detector.train import train
    from engine.runner import run

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    output = Path(output)
    teacher = pipeline.stages.ground.model
    history = []
    for n in range(rounds):
        folder = output / f"round-{n}"
        stages = pipeline.stages.model_copy(
            update={"ground": pipeline.stages.ground.model_copy(update={"model": teacher})})
        config = pipeline.model_copy(update={"stages": stages})
        logger.info("self-training round %d: teacher %s", n, teacher)
        manifest = run(config, inputs=inputs, output=folder / "data", ray_address=ray_address)
        student = folder / "student"
        summary = train(shards=folder / "data", out=student, config=train_config)
        history.append({"round": n, "teacher": teacher, "counts": manifest["counts"], "student": str(student),
                        "train": summary})
        teacher = str(student.resolve())
    return history
