"""Whether a plan can run on a cluster, checked before anything starts.

The actor pools of the model stages hold their CPUs, GPUs and custom resources for the whole run. If they ask
for more than the cluster has, Ray Data waits forever for actors it cannot place and says nothing, so a plan
that cannot fit is refused with one line: each stage's need (concurrency × per actor) next to what the
cluster has, and overrides that make it fit.

Only totals are compared: an actor must also find its whole share on one node (and a fraction of a GPU within
one GPU), which a cluster of many small nodes can fail even when the totals fit. A cluster that grows on
demand cannot be judged by what it has now, and Ray has no public way to ask whether it will grow: with
`wait=True` (the pipeline's `ray.autoscaling`) the shortfall comes back as a message to show instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.config import PipelineConfig
from engine.errors import RunError
from engine.runner.stages import stage_names, uses_model

CPU, GPU = "CPU", "GPU"  # the names Ray gives them in `ray.cluster_resources()`
# Ray counts resources in units of 1/10,000: totals a rounding error above what the cluster has still fit.
_TOLERANCE = 1e-4


class CapacityError(RunError):
    """The plan asks for more CPUs, GPUs or custom resources than the cluster has; the message says which
    (a RunError, so the CLI shows it as one line and exits 1)."""


@dataclass(frozen=True)
class StageNeed:
    """One actor pool's claim: `concurrency` actors, each holding `per_actor` for the whole run."""

    stage: str
    concurrency: int
    per_actor: dict[str, float]  # Ray resource name (CPU, GPU, a custom name) -> amount

    def total(self, resource: str) -> float:
        return self.concurrency * self.per_actor.get(resource, 0.0)


def stage_needs(config: PipelineConfig) -> list[StageNeed]:
    """The actor pools a run starts, in stage order (also what `--dry-run` can show per stage)."""
    needs = []
    for name in stage_names(config):
        if not uses_model(name, config):
            continue
        res = getattr(config.stages, name).resources
        per_actor = {CPU: res.num_cpus, GPU: res.num_gpus, **res.custom}
        needs.append(StageNeed(name, res.concurrency, {k: v for k, v in per_actor.items() if v > 0}))
    return needs


def check_capacity(config: PipelineConfig, cluster: dict[str, float], *, wait: bool = False) -> str | None:
    """None when the plan fits `cluster` (as `ray.cluster_resources()` gives it). When it does not: raise
    `CapacityError`, or with `wait` (a cluster that adds nodes on demand) return the same line as a message
    saying the run waits for them."""
    needs = stage_needs(config)
    # at least one read + decode task and one write task must be able to run beside the actor pools
    beside = {CPU: config.stages.decode.resources.num_cpus + config.write.num_cpus}
    resources = [CPU, GPU] + sorted({r for n in needs for r in n.per_actor} - {CPU, GPU})
    short = [_shortfall(r, needs, beside.get(r, 0.0), cluster.get(r, 0.0), config) for r in resources]
    short = [s for s in short if s]
    if not short:
        return None
    line = "the plan does not fit the cluster: " + "; ".join(short)
    if wait:
        return f"{line}. Waiting for the autoscaler to add nodes (ray.autoscaling is set)"
    raise CapacityError(line)


def check_ray_cluster(config: PipelineConfig, *, wait: bool = False) -> str | None:
    """`check_capacity` against the Ray cluster this process is connected to."""
    import ray

    return check_capacity(config, ray.cluster_resources(), wait=wait)


def _shortfall(resource: str, needs: list[StageNeed], beside: float, have: float, config: PipelineConfig) -> str:
    """'' when the pools' `resource` plus `beside` fit in `have`, else what they need, what Ray has, and how to
    make it fit."""
    claims = [n for n in needs if n.total(resource) > 0]
    pools = sum(n.total(resource) for n in claims)
    if pools + beside <= have + _TOLERANCE:
        return ""
    plural = "" if pools == 1 else "s"
    unit = {CPU: f"CPU{plural}", GPU: f"GPU{plural}"}.get(resource, f"of custom resource {resource!r}")
    detail = ", ".join(f"{n.stage} {n.concurrency} × {n.per_actor[resource]:g}" for n in claims)
    # never empty: the teacher (ground) always runs as an actor pool with some CPU
    text = f"the actor pools need {pools:g} {unit} ({detail})"
    if resource == CPU:
        text += (f" plus {config.stages.decode.resources.num_cpus:g} for reading and decoding and "
                 f"{config.write.num_cpus:g} for writing")
    text += f", but Ray has {have:g}"
    return f"{text}: {_remedy(resource, claims, have - beside)}"


def _remedy(resource: str, claims: list[StageNeed], room: float) -> str:
    """The knobs for `resource`, with overrides that shrink every claim in proportion to fit in `room`."""
    knob = {CPU: "num_cpus", GPU: "num_gpus"}.get(resource, f"custom.{resource}")
    fit = _scaled(resource, claims, room)
    if fit:
        sets = " ".join(f"--set stages.{stage}.resources.{knob}={amount:g}" for stage, amount in fit)
        hint = f"lower stages.*.resources.{knob} or concurrency, e.g. {sets}"
        if resource == GPU:
            hint += " (fractions share a GPU; the models' memory must fit together)"
        return hint
    if resource == CPU:
        return "lower stages.*.resources.num_cpus / concurrency (fractions are fine, e.g. 0.25) or raise ray.num_cpus"
    if resource == GPU and room <= _TOLERANCE:
        sets = " ".join(f"--set stages.{n.stage}.resources.num_gpus=0" for n in claims)
        return f"run where Ray has GPUs, or on the CPU with {sets}"
    if room <= _TOLERANCE:
        return f"no node offers {resource!r}: start nodes with it or drop stages.*.resources.{knob}"
    return f"lower stages.*.resources.{knob} or concurrency, or add nodes"


def _scaled(resource: str, claims: list[StageNeed], room: float) -> list[tuple[str, float]]:
    """Per-actor amounts shrunk in proportion so that all pools fit in `room`, rounded down to hundredths;
    [] when some would round to nothing (zero would mean not asking for the resource at all)."""
    pools = sum(n.total(resource) for n in claims)
    if room <= _TOLERANCE or not pools:
        return []
    if resource == GPU and any(n.per_actor[GPU] > 1 for n in claims):
        return []  # an actor spanning GPUs (vLLM tensor parallel) needs them whole
    fit = [(n.stage, math.floor(n.per_actor[resource] * room / pools * 100) / 100) for n in claims]
    return [] if any(amount <= 0 for _, amount in fit) else fit
