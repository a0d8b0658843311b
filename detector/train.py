"""Student training: fine-tune a Grounding DINO on GranuCap shards, in one process or data-parallel across
Ray Train workers (TorchTrainer: gloo on CPU, NCCL on GPU). Every `checkpoint_every` steps the state goes to
`OUT/checkpoints/`; a rerun of the same command resumes from the newest one. The shards are a run at a local
path or a URI of any fsspec filesystem; OUT is a local folder.

    OUT/model.safetensors, config.json, processor files   the final student (loadable like any HF model)
    OUT/checkpoints/step-NNNNNNNN/                        resumable states (detector/checkpoint.py)
    OUT/train_log.jsonl                                   one line per step: loss parts, lr, grad norm, img/s
    OUT/train_config.json, OUT/train_summary.json         what ran, and how it went
    OUT/workers/rank-R.json                               per worker: samples seen, final weights checksum
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from detector.checkpoint import clean_partial, latest_checkpoint, optimizer_from_files, read_state, save_checkpoint
from detector.config import OptimSpec, TrainConfig
from detector.data import ConceptDictionary, Sample, augment, collate, iter_shard_samples
from engine.io.shard_reader import open_run
from engine.io.storage import Location

logger = logging.getLogger(__name__)


def lr_factor(step: int, *, steps: int, optim: OptimSpec) -> float:
    """Multiplier of the base lr at `step` (1-based): linear warmup, then cosine / step / constant."""
    if optim.warmup_steps and step <= optim.warmup_steps:
        return step / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "step":
        return optim.step_gamma ** sum(step > m * steps for m in optim.step_milestones)
    span = max(1, steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _batches(run: Location, *, config: TrainConfig, rank: int, world_size: int, seed: int) -> Iterator[list[Sample]]:
    """Endless batches of this worker's share of the shards, reshuffled each pass. Samples without boxes
    are skipped: the transformers loss needs at least one target per image."""
    epoch = 0
    while True:
        seen = 0
        batch: list[Sample] = []
        for sample in iter_shard_samples(run, shuffle_buffer=config.data.shuffle_buffer, seed=seed + epoch,
                                         rank=rank, world_size=world_size):
            if len(sample.boxes) == 0:
                continue
            seen += 1
            batch.append(sample)
            if len(batch) == config.data.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        if seen == 0:
            raise ValueError(f"worker {rank}/{world_size}: no samples with boxes in the complete shards of {run.uri}")
        epoch += 1


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    moved["labels"] = [{k: v.to(device) for k, v in target.items()} for target in batch["labels"]]
    return moved


def _param_groups(model: Any, optim: OptimSpec) -> list[dict[str, Any]]:
    from detector.model import backbone_parameters

    backbone = {id(p) for p in backbone_parameters(model)}
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone]
    back = [p for p in model.parameters() if p.requires_grad and id(p) in backbone]
    groups = [{"params": main, "base_lr": optim.lr}]
    if back:
        groups.append({"params": back, "base_lr": optim.backbone_lr or optim.lr})
    return groups


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step`: steps a killed run did after its last checkpoint are done again."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _checksum(model: Any) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters()))


def _train_loop(config_dict: dict[str, Any]) -> dict[str, Any]:
    """One worker's training loop (also the whole single-process run). Takes plain data: Ray ships it."""
    config = TrainConfig.model_validate(config_dict["config"])
    out = Path(config_dict["out"])
    storage_options = config_dict.get("storage_options", {})
    in_ray = config_dict.get("ray", False)
    rank, world_size = 0, 1
    if in_ray:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world_size = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
        storage_options = ray.get(storage_options)  # sent by reference: see _train_ray
    else:
        use_gpu = torch.cuda.is_available() if config.use_gpu is None else config.use_gpu
        device = torch.device("cuda" if use_gpu else "cpu")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    run = Location(config_dict["shards"], storage_options)

    from detector.model import load_student

    log_path = out / "train_log.jsonl"
    if rank == 0:
        clean_partial(out)
    latest = latest_checkpoint(out)
    spec = config.model
    start_step = 0
    if latest is not None:
        start_step = int(read_state(latest)["step"])
        spec = spec.model_copy(update={"init": str(latest), "from_config": False})
        logger.info("worker %d: resuming from %s (step %d)", rank, latest, start_step)
    if rank == 0:  # lines of steps after the checkpoint (or of a run killed before any) are redone
        _truncate_log(log_path, start_step)
    torch.manual_seed(config.seed + start_step)
    model, processor = load_student(spec)
    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, config.optim), lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    if latest is not None:
        optimizer_from_files(optimizer, latest, device)
    net = model
    if world_size > 1:
        import ray.train.torch

        # some heads get no gradient in a given step (frozen parts, two-stage proposals): DDP must allow it
        net = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    image_size = processor.image_processor.size
    scales = config.data.scales or [int(image_size.get("shortest_edge", 800))]
    max_size = config.data.max_size or int(image_size.get("longest_edge", 1333))
    if config.data.scales or config.data.max_size:
        # the saved processor then resizes evaluation images to the resolution the student trained at
        processor.image_processor.size = {"shortest_edge": max(scales), "longest_edge": max_size}
    max_text_len = config.data.max_text_len or int(getattr(model.config, "max_text_len", 256))
    dictionary = ConceptDictionary.from_run(run) if config.data.negatives > 0 else None
    rng = random.Random(config.seed * 1_000_003 + rank * 7919 + start_step)
    batches = _batches(run, config=config, rank=rank, world_size=world_size, seed=config.seed + start_step)
    autocast = device.type == "cuda" and config.amp
    if rank == 0:
        logger.info("training %s on %s: steps %d..%d, %d worker(s), batch %d each, device %s, amp %s",
                    spec.init, run.uri, start_step + 1, config.steps, world_size, config.data.batch_size, device,
                    autocast)

    losses: list[float] = []
    samples_seen = 0
    keys_seen: set[str] = set()  # reported per worker, so a test can see that the workers split the data
    started = time.perf_counter()
    log = open(log_path, "a", encoding="utf-8") if rank == 0 else None
    try:
        for step in range(start_step + 1, config.steps + 1):
            tick = time.perf_counter()
            factor = lr_factor(step, steps=config.steps, optim=config.optim)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            samples = [augment(s, rng=rng, scales=scales, max_size=max_size, flip_prob=config.data.flip_prob)
                       for s in next(batches)]
            batch = collate(samples, processor, max_text_len=max_text_len, rng=rng, dictionary=dictionary,
                            negatives=config.data.negatives, phrase_prob=config.data.phrase_prob, do_resize=False)
            batch = _to_device(batch, device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
                output = net(**batch)
            loss = output.loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step} (worker {rank})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float("nan")
            if config.optim.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), config.optim.max_grad_norm))
            optimizer.step()
            samples_seen += len(samples)
            if len(keys_seen) < 10_000:
                keys_seen.update(s.key for s in samples)
            losses.append(loss.item())
            seconds = time.perf_counter() - tick
            entry = {"step": step, "loss": losses[-1], "lr": optimizer.param_groups[0]["lr"],
                     "grad_norm": grad_norm, "images_per_s": round(len(samples) * world_size / seconds, 3),
                     **{k: round(float(v.detach()), 6) for k, v in output.loss_dict.items()}}
            if log is not None:
                log.write(json.dumps(entry) + "\n")
                log.flush()
            if step % config.log_every == 0 or step == config.steps:
                if rank == 0:
                    logger.info("step %d/%d loss %.4f lr %.3g %.2f img/s", step, config.steps, losses[-1],
                                entry["lr"], entry["images_per_s"])
                if in_ray:
                    ray.train.report({"step": step, "loss": losses[-1], "images_per_s": entry["images_per_s"]})
            if step % config.checkpoint_every == 0 or step == config.steps:
                if rank == 0:
                    save_checkpoint(out, step=step, model=model, processor=processor, optimizer=optimizer,
                                    state={"seed": config.seed, "world_size": world_size},
                                    keep=config.keep_checkpoints)
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - started
    worker = {"rank": rank, "world_size": world_size, "steps_run": len(losses), "samples": samples_seen,
              "keys": sorted(keys_seen), "checksum": _checksum(model), "device": str(device)}
    (out / "workers").mkdir(exist_ok=True)
    (out / "workers" / f"rank-{rank}.json").write_text(json.dumps(worker))
    summary = {
        "steps": config.steps, "resumed_from": start_step, "steps_run": len(losses), "workers": world_size,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "mean_loss_first_10": sum(losses[:10]) / len(losses[:10]) if losses else None,
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "seconds": round(seconds, 3),
        "images_per_s": round(samples_seen * world_size / seconds, 3) if seconds > 0 else None,
    }
    if rank == 0:
        model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        logger.info("trained steps %d..%d in %.1f s", start_step + 1, config.steps, seconds)
    return summary


def _train_ray(source: dict[str, Any], out: Path, config: TrainConfig) -> dict[str, Any]:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = torch.cuda.is_available() if config.use_gpu is None else config.use_gpu
    started_ray = False
    if not ray.is_initialized():
        if config.ray_address:
            ray.init(address=config.ray_address)
        else:  # enough CPUs for the workers plus Ray Train's controller
            ray.init(num_cpus=math.ceil(config.workers * config.cpus_per_worker) + 1,
                     include_dashboard=False, log_to_driver=False)
        started_ray = True
    try:
        # Ray Train writes its loop config under OUT/ray (params.json, trainer.pkl): storage options, which may
        # hold secrets, go through the object store instead
        options = ray.put(source["storage_options"])
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"config": config.model_dump(mode="json"), "shards": source["shards"],
                               "storage_options": options, "out": str(out.resolve()), "ray": True},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": config.cpus_per_worker}),
            # a restarted worker group resumes from OUT's newest checkpoint, like a rerun of the command
            run_config=RunConfig(name="train", storage_path=str((out / "ray").resolve()),
                                 failure_config=FailureConfig(max_failures=config.max_failures)),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
    finally:
        if started_ray:
            ray.shutdown()
    return json.loads((out / "train_summary.json").read_text())


def train(*, shards: str | Path | Location, out: str | Path, config: TrainConfig | None = None) -> dict[str, Any]:
    """Train the student on the run `shards` (a folder, a URI or a Location) into the local folder `out`;
    resumes from `out`'s newest checkpoint."""
    config = config or TrainConfig()
    run, out = open_run(shards), Path(out)
    if not run.isdir("shards"):
        raise FileNotFoundError(f"{run.uri} is not a granucap run directory (no shards/ folder)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=1))
    # plain data, as Ray ships it; a local run by its absolute path, for workers started elsewhere
    source = {"shards": run.uri if run.remote else str(run.local()), "storage_options": run.storage_options}
    if config.workers > 1:
        return _train_ray(source, out, config)
    return _train_loop({"config": config.model_dump(mode="json"), **source, "out": str(out)})


__all__ = ["train", "lr_factor"]
