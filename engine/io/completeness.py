"""Is a run complete? Decided from its plan and its units' markers, never from manifest.json.

A run's plan (OUT/plan.json, engine/io/plan.py) lists every unit it will write; a unit is complete exactly
when its marker exists (`engine.io.shard_reader.complete_unit_ids`). A run is complete when every planned unit
is. manifest.json says what the last `granucap run` thought of itself, and a run that was killed, is still
going, or lost a marker says nothing reliable there, so it is shown, never trusted.

A run without a plan (written before plans were saved, or a folder of shards only) cannot tell what is
missing: it is "unknown", counted from its markers, and not refused.

`require_complete` is what `granucap export` and `granucap inspect` call: an incomplete run is refused with
`IncompleteRunError` (one line: what is complete, and the flag that allows it) unless partial output is
allowed, and then the counts travel in their output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.io.plan import load_plan
from engine.io.shard_reader import complete_unit_ids, complete_units, open_run
from engine.io.storage import Location

ALLOW_PARTIAL_FLAG = "--allow-partial"


class IncompleteRunError(RuntimeError):
    """The run has planned units without a marker and partial output was not allowed."""


def run_completeness(run: str | Path | Location) -> dict[str, Any]:
    """Planned and complete units and samples of a run.

    Returns `{"complete": True | False | None, "plan": "plan.json" | "none" | "unreadable: ...",
    "units": {"planned", "complete"}, "samples": {"planned", "complete"}, "manifest_status"}`; `complete`
    is None, and the planned counts are None, when the run has no readable plan. With a plan, samples are
    counted as the plan sized its units, so the complete count is comparable with the planned one; without
    one they are the markers' counts of samples read.
    """
    location = open_run(run)
    try:
        plan = load_plan(location)
        plan_state = "plan.json" if plan is not None else "none"
    except ValueError as exc:  # an older plan format: the run exists, its plan is not one we can read
        plan, plan_state = None, f"unreadable: {exc}"
    marked = set(complete_unit_ids(location))
    try:
        manifest_status = location.read_json("manifest.json").get("status")
    except (FileNotFoundError, ValueError, AttributeError):
        manifest_status = None
    if plan is None:
        read = [stats.get("read") for stats in complete_units(location).values()]
        samples = sum(read) if all(isinstance(n, int) for n in read) else None
        return {
            "complete": None,
            "plan": plan_state,
            "units": {"planned": None, "complete": len(marked)},
            "samples": {"planned": None, "complete": samples},
            "manifest_status": manifest_status,
        }
    done = [u for u in plan.units if u.index in marked]
    return {
        "complete": len(done) == len(plan.units),
        "plan": plan_state,
        "units": {"planned": len(plan.units), "complete": len(done)},
        "samples": {"planned": plan.samples, "complete": sum(u.size for u in done)},
        "manifest_status": manifest_status,
    }


def describe(completeness: dict[str, Any]) -> str:
    """One line for people: "3 of 4 planned units (12 of 16 samples) complete", or what is known without a
    plan."""
    units, samples = completeness["units"], completeness["samples"]
    if completeness["complete"] is None:
        counted = "" if samples["complete"] is None else f" ({samples['complete']} samples)"
        why = "no plan.json" if completeness["plan"] == "none" else f"plan.json {completeness['plan']}"
        return f"{units['complete']} units{counted} complete, of an unknown number planned ({why})"
    return (f"{units['complete']} of {units['planned']} planned units "
            f"({samples['complete']} of {samples['planned']} samples) complete")


def require_complete(run: str | Path | Location, *, allow_partial: bool, action: str) -> dict[str, Any]:
    """`run_completeness(run)`, or IncompleteRunError when the plan has units without a marker and
    `allow_partial` is false; `action` names what was refused ("export", "inspect")."""
    location = open_run(run)
    completeness = run_completeness(location)
    if completeness["complete"] is False and not allow_partial:
        raise IncompleteRunError(
            f"{location.uri} is an incomplete run: {describe(completeness)}; pass {ALLOW_PARTIAL_FLAG} to "
            f"{action} the complete units only"
        )
    return completeness


__all__ = ["ALLOW_PARTIAL_FLAG", "IncompleteRunError", "describe", "require_complete", "run_completeness"]
