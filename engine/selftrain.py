"""GLIP-style self-training: the teacher labels the raw pairs, a student trains on those shards, and the
student becomes the teacher of the next round.

    OUT/round-0/data      granucap run with the pipeline's own teacher (stages.ground.model)
    OUT/round-0/student   student trained on round-0/data, starting from `train_config.model.init`
    OUT/round-1/data      the same pipeline with stages.ground.model = OUT/round-0/student
    ...

OUT may be a URI (s3://..., as `granucap run --output`): the runs go there, and the students, which are
trained and then loaded as teachers from local disk, go to the local folder `students` (round-N/student).

Both steps resume (the runner skips finished shards, the trainer restarts from its newest checkpoint), so
rerunning the same command after a crash continues where it stopped.

This loop lives on the engine's side because it drives the runner; the detector only trains and scores
(detector/__init__.py says what it may import).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from detector.config import TrainConfig
from engine.config import PipelineConfig
from engine.io.storage import Location, is_remote, join

logger = logging.getLogger(__name__)


def self_train(pipeline: PipelineConfig, *, inputs: list[str], output: str | Path, rounds: int,
               train_config: TrainConfig, ray_address: str | None = None,
               students: str | Path | None = None) -> list[dict[str, Any]]:
    """Run `rounds` teacher -> shards -> student rounds; returns per round the teacher, counts and summary.
    `students` (a local folder, default `output`) holds round-N/student."""
    # imported when a loop runs: the trainer brings torch, the runner the whole pipeline
    from detector.train import train
    from engine.runner import run

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    output = os.fspath(output)
    if students is None:
        if is_remote(output):
            raise ValueError(f"the students need a local folder when the output is a URI ({output}): give one "
                             "(--students DIR)")
        students = output
    if is_remote(os.fspath(students)):
        raise ValueError(f"the students' folder must be local, got {students}")
    teacher = pipeline.stages.ground.model
    history = []
    for n in range(rounds):
        data = join(output, f"round-{n}", "data")
        stages = pipeline.stages.model_copy(
            update={"ground": pipeline.stages.ground.model_copy(update={"model": teacher})})
        config = pipeline.model_copy(update={"stages": stages})
        logger.info("self-training round %d: teacher %s", n, teacher)
        manifest = run(config, inputs=inputs, output=data, ray_address=ray_address)
        student = Path(students) / f"round-{n}" / "student"
        summary = train(shards=Location(data, config.storage_options), out=student, config=train_config)
        history.append({"round": n, "teacher": teacher, "counts": manifest["counts"], "student": str(student),
                        "train": summary})
        teacher = str(student.resolve())
    return history
