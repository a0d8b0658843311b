"""Look at a run, or at a run before it starts.

- `summarize(run)`: counts from the parquet index (every sample, rejected and failed ones too): status,
  top reasons, boxes per image, score histogram, top categories and parent categories. Streams the index in
  batches; no image is read.
- `write_html(run, dest)`: a static page with matplotlib plots (Agg, PNG) and a gallery of the first
  ok samples with their boxes and labels drawn (PIL), filterable by category with a small inline script
  (`page.html#category=NAME` opens it filtered).
- `plan_summary(config, inputs, output)`: what `granucap run` would do (stages, backends, models,
  resources, units, units already complete) without starting Ray.

A run is a local folder or a URI of any fsspec filesystem (engine/io/storage.py); the page goes to a local
folder. Only complete units are counted (`engine.io.shard_reader.complete_unit_ids`), and the summary and the
page's header say how many of the planned units and samples those are (engine/io/completeness.py), so a
page of an unfinished run cannot pass for one of the whole run.
"""

from __future__ import annotations

import html
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from engine.export import run_name
from engine.io.shard_reader import open_run
from engine.export.common import iter_index_rows, iter_samples
from engine.io.completeness import describe, run_completeness
from engine.io.storage import Location

log = logging.getLogger(__name__)

SCORE_BINS = 10  # score histogram over [0, 1] in bins of 0.1
BOX_COLOUR = (255, 0, 255)  # magenta: used for nothing else on the page, so a screenshot can count it
TOP = 15


def summarize(
    run: str | Path | Location, *, top: int = TOP, completeness: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Counts of one run from its index; `top` limits the reason and category lists. `completeness`
    (`run_completeness` of the run, computed here when not given) goes into the summary as it is."""
    run = open_run(run)
    completeness = run_completeness(run) if completeness is None else completeness
    manifest = run.read_json("manifest.json") if run.exists("manifest.json") else {}
    status: Counter = Counter()
    reasons: Counter = Counter()
    boxes_per_image: Counter = Counter()
    scores = [0] * SCORE_BINS
    categories: Counter = Counter()
    parents: Counter = Counter()
    matched: Counter = Counter()
    named: Counter = Counter()  # the describe stage's verdicts
    columns = ["status", "error", "entities", "boxes"]
    for row in iter_index_rows(run, columns):
        status[row["status"]] += 1
        if row["status"] != "ok":
            error = row["error"] or {}
            reasons[f"{row['status']}: {error.get('stage')}/{error.get('kind')}"] += 1
            continue
        entities = row["entities"] or []
        boxes = row["boxes"] or []
        boxes_per_image[len(boxes)] += 1
        for box in boxes:
            scores[min(int(box["score"] * SCORE_BINS), SCORE_BINS - 1)] += 1
            entity = entities[box["entity"]]
            categories[entity["category"]] += 1
            parents[entity.get("parent_category") or "(none)"] += 1
            matched[box.get("matched") or "?"] += 1
            if box.get("described") is not None:
                agreement = box.get("label_agreement")
                # None beside a name: a generic prompt's box that took the name as its label
                named["relabelled" if agreement is None else "agreed" if agreement else "disagreed"] += 1
    ok = status.get("ok", 0)
    n_boxes = sum(k * v for k, v in boxes_per_image.items())
    return {
        "run_dir": run.uri,
        "pipeline": manifest.get("pipeline"),
        "status": manifest.get("status"),
        "completeness": completeness,
        "dummy_models": bool(manifest.get("dummy_models")),
        "units": manifest.get("units", {}),
        "samples": sum(status.values()),
        "ok": ok,
        "rejected": status.get("rejected", 0),
        "failed": status.get("failed", 0),
        "reasons": reasons.most_common(top),
        "boxes": n_boxes,
        "boxes_per_image": {
            "mean": n_boxes / ok if ok else 0.0,
            "min": min(boxes_per_image) if boxes_per_image else 0,
            "max": max(boxes_per_image) if boxes_per_image else 0,
            "histogram": dict(sorted(boxes_per_image.items())),
        },
        "score_histogram": {f"{i / SCORE_BINS:.1f}-{(i + 1) / SCORE_BINS:.1f}": n for i, n in enumerate(scores)},
        "matched": dict(matched),
        "described": dict(named),
        "categories": len(categories),
        "top_categories": categories.most_common(top),
        "parent_categories": len(parents),
        "top_parent_categories": parents.most_common(top),
    }


def completeness_line(completeness: dict[str, Any], status: str | None = None) -> str:
    """The sentence that heads the page and the tables: how much of the plan the counts cover."""
    line = describe(completeness)
    if completeness["complete"] is False:
        line = f"Partial run: {line}; every count here covers those units only"
    elif completeness["complete"] is None:
        line = f"Completeness unknown: {line}"
    else:
        line = f"Complete run: {line}"
    return line + (f"; manifest.json says {status!r}" if status else "") + "."


# --- the HTML page ----------------------------------------------------------------------------------


def _plots(summary: dict[str, Any], folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []

    def bar(name: str, title: str, labels: list[str], values: list[int], *, horizontal: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
        if horizontal:
            ax.barh(labels[::-1], values[::-1], color="#4c72b0")
        else:
            ax.bar(labels, values, color="#4c72b0")
            ax.tick_params(axis="x", labelrotation=45)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png")
        plt.close(fig)
        made.append((f"plots/{name}.png", title))

    bar("status", "samples by status", ["ok", "rejected", "failed"],
        [summary["ok"], summary["rejected"], summary["failed"]])
    hist = summary["boxes_per_image"]["histogram"]
    bar("boxes_per_image", "boxes per image (ok samples)", [str(k) for k in hist], list(hist.values()))
    bar("scores", "teacher score histogram", list(summary["score_histogram"]), list(summary["score_histogram"].values()))
    if summary["top_categories"]:
        names, counts = zip(*summary["top_categories"])
        bar("categories", "top categories (boxes)", list(names), list(counts), horizontal=True)
    if summary["top_parent_categories"]:
        names, counts = zip(*summary["top_parent_categories"])
        bar("parents", "top parent categories (boxes)", list(names), list(counts), horizontal=True)
    return made


def draw_boxes(jpg: bytes, record: dict[str, Any]):
    """The image with its boxes and `category: phrase score` labels drawn in BOX_COLOUR."""
    import io

    from PIL import Image, ImageDraw

    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for box in record["boxes"]:
        entity = record["entities"][box["entity"]]
        x0, y0, x1, y1 = box["xyxy"]
        draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOUR, width=2)
        label = f"{entity['category']} {box['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0 + 2, y0 + 1), label)
        draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=BOX_COLOUR)
        draw.text((x0 + 2, y0 + 1), label, fill=(255, 255, 255))
    return image


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>granucap · {title}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
.plots img {{ margin: 4px; border: 1px solid #ddd; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.gallery figure {{ margin: 0; width: 260px; }} .gallery img {{ width: 260px; }}
figcaption {{ font-size: 11px; }}
</style></head>
<body>
<h1>granucap run: {title}</h1>
<p id="completeness"{partial_style}>{completeness}</p>
{note}
<table>{counts}</table>
<h2>Reasons (rejected / failed)</h2>
<table>{reasons}</table>
<h2>Plots</h2>
<div class="plots">{plots}</div>
{quality}
<h2>Gallery</h2>
<label>category <select id="category"><option value="">all ({n_gallery})</option>{options}</select></label>
<span id="shown"></span>
<div class="gallery">{figures}</div>
<script>
const select = document.getElementById("category");
function apply() {{
  let shown = 0;
  for (const fig of document.querySelectorAll(".gallery figure")) {{
    const ok = !select.value || fig.dataset.categories.split("|").includes(select.value);
    fig.style.display = ok ? "" : "none";
    shown += ok ? 1 : 0;
  }}
  document.getElementById("shown").textContent = shown + " shown";
}}
select.addEventListener("change", () => {{ location.hash = "category=" + encodeURIComponent(select.value); apply(); }});
const wanted = new URLSearchParams(location.hash.slice(1)).get("category");
if (wanted !== null) select.value = wanted;
if (wanted !== null && select.value !== wanted) {{  // a category not in the gallery: show nothing
  const opt = document.createElement("option"); opt.value = wanted; opt.textContent = wanted;
  select.appendChild(opt); select.value = wanted;
}}
apply();
</script>
</body></html>
"""


def label_quality(run: str | Path | Location, coco: str | Path) -> dict[str, Any]:
    """The run scored against labelled images (`engine.quality.score_run`) and, when it kept candidates, its
    precision/recall curve over box thresholds from its floor up (`sweep`); else `curve` is None and `note`
    says how to get one."""
    from engine.quality import run_stage_specs, score_run, sweep

    run = open_run(run)
    score = score_run(run.uri, coco, allow_partial=True)
    floor = run_stage_specs(run.uri)[0].keep_candidates
    if floor is None:
        return {"score": score, "curve": None,
                "note": "the run kept no candidates: run it with --set stages.ground.keep_candidates=0.05 to see "
                        "precision and recall at every threshold"}
    grid = [t for t in (round(0.05 * i, 2) for i in range(1, 20)) if t >= floor]
    return {"score": score, "curve": sweep(run.uri, coco, thresholds=grid or [floor]), "note": None}


def _quality_plot(quality: dict[str, Any], folder: Path) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=90)
    curve = quality["curve"]
    if curve is not None:
        table = curve["table"]
        ax.plot([r["recall"] for r in table], [r["precision"] for r in table], "o-", color="#4c72b0",
                label="box_threshold sweep")
        for r in table:
            ax.annotate(f"{r['threshold']:.2f}", (r["recall"], r["precision"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        best = curve["best_f1"]
        ax.plot([best["recall"]], [best["precision"]], "s", color="#dd8452", label=f"best F1 {best['f1']:.3f}")
    score = quality["score"]
    ax.plot([score["recall"]], [score["precision"]], "*", markersize=12, color="#c44e52", label="the run as written")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("precision / recall at IoU 0.5")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(folder / "precision_recall.png")
    plt.close(fig)
    return "plots/precision_recall.png", "precision / recall"


def _quality_html(quality: dict[str, Any], folder: Path) -> str:
    src, title = _quality_plot(quality, folder)
    score = quality["score"]
    cells = "".join(f"<th>{k}</th>" for k in ("AP", "AP50", "precision", "recall", "F1", "boxes", "GT boxes"))
    values = "".join(f"<td>{score[k]:.3f}</td>" for k in ("AP", "AP50", "precision", "recall", "f1"))
    values += f"<td>{score['boxes']}</td><td>{score['gt_boxes']}</td>"
    rows = ""
    if quality["curve"] is not None:
        rows = "".join(f"<tr><td>{r['threshold']:.2f}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td>"
                       f"<td>{r['f1']:.3f}</td><td>{r['boxes']}</td></tr>" for r in quality["curve"]["table"])
        rows = ("<table id=\"sweep\"><tr><th>box_threshold</th><th>precision</th><th>recall</th><th>F1</th>"
                f"<th>boxes</th></tr>{rows}</table>")
    note = f"<p>{html.escape(quality['note'])}</p>" if quality["note"] else ""
    return (f"<h2>Label quality against {html.escape(Path(str(score['gt'])).name)}</h2>"
            f"<table id=\"quality\"><tr>{cells}</tr><tr>{values}</tr></table>{note}"
            f'<div class="plots"><img src="{src}" alt="{title}" width="450"></div>{rows}')


def write_html(run: str | Path | Location, dest: str | Path, *, gallery: int = 24,
               summary: dict | None = None, quality: dict | None = None) -> Path:
    """Write DEST/index.html with plots/ and gallery/; with `quality` (`label_quality`), the scores and the
    precision/recall curve too. Returns the page's path."""
    run, dest = open_run(run), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary = summary or summarize(run)
    plots = _plots(summary, dest / "plots")
    figures, seen = [], Counter()
    (dest / "gallery").mkdir(exist_ok=True)
    for i, sample in enumerate(iter_samples(run)):
        if i >= gallery:
            break
        record = sample.record
        name = f"gallery/{i:04d}.png"  # PNG: the box colour stays exact
        draw_boxes(sample.jpg, record).save(dest / name)
        cats = sorted({record["entities"][b["entity"]]["category"] for b in record["boxes"]})
        seen.update(cats)
        caption = record.get("factual_caption") or record.get("caption") or ""
        figures.append(
            f'<figure data-categories="{html.escape("|".join(cats))}"><img src="{name}" alt="{html.escape(record["key"])}">'
            f"<figcaption><b>{html.escape(record['key'])}</b> · {len(record['boxes'])} boxes · "
            f"{html.escape(', '.join(cats))}<br>{html.escape(caption[:160])}</figcaption></figure>"
        )
    counts = "".join(
        f"<tr><th>{k}</th><td>{html.escape(str(summary[k]))}</td></tr>"
        for k in ("pipeline", "samples", "ok", "rejected", "failed", "boxes", "categories", "parent_categories")
    ) + f"<tr><th>boxes per image (mean)</th><td>{summary['boxes_per_image']['mean']:.2f}</td></tr>"
    reasons = "".join(f"<tr><td>{html.escape(r)}</td><td>{n}</td></tr>" for r, n in summary["reasons"]) or "<tr><td>none</td></tr>"
    completeness = summary.get("completeness") or run_completeness(run)
    page = _PAGE.format(
        title=html.escape(str(summary.get("pipeline") or run_name(run))),
        completeness=html.escape(completeness_line(completeness, summary.get("status"))),
        partial_style=' style="color: #b00; font-weight: bold"' if completeness["complete"] is False else "",
        note="<p><b>Dummy (random-weight) models: boxes are random by design.</b></p>" if summary["dummy_models"] else "",
        counts=counts,
        reasons=reasons,
        plots="".join(f'<img src="{src}" alt="{html.escape(t)}" width="450">' for src, t in plots),
        quality=_quality_html(quality, dest / "plots") if quality is not None else "",
        n_gallery=len(figures),
        options="".join(f'<option value="{html.escape(c)}">{html.escape(c)} ({n})</option>' for c, n in sorted(seen.items())),
        figures="\n".join(figures),
    )
    path = dest / "index.html"
    path.write_text(page, encoding="utf-8")
    log.info("wrote %s (%d plots, %d gallery images)", path, len(plots), len(figures))
    return path


# --- the plan of a run that has not started ------------------------------------------------------------


def plan_summary(
    config, inputs: list[str], output: str | Path, *, ray_address: str | None = None, allow_config_change: bool = False
) -> dict[str, Any]:
    """What `granucap run` would do, from the config and a cheap count of the inputs; starts nothing. Raises
    what `run` would raise at its start: output not writable (StorageError), held by a live run
    (OutputLocked), made with another config (ConfigChanged, unless `allow_config_change`)."""
    from engine.fingerprint import fingerprint_of, shaping
    from engine.io.lock import check_unlocked
    from engine.io.shard_reader import complete_units
    from engine.io.storage import Location
    from engine.runner import (
        RunError,
        check_config_identity,
        check_stage_inputs,
        data_memory_budget,
        dataset_segments,
        describe_models,
        measure_sample_bytes,
        operators,
        prepare_plan,
        stage_names,
        uses_model,
        worker_allocator,
    )

    check_stage_inputs(config)
    models = describe_models(config)
    stages = []
    host = {name: group[0] for group in operators(config) for name in group}

    def runs_as(name: str) -> str:
        pool = "actors" if uses_model(host[name], config) else "tasks"
        if host[name] != name:
            return f"in {host[name]}'s {pool}"
        return "actor pool" if pool == "actors" else "tasks that read the input"
    for name in stage_names(config):
        spec = getattr(config.stages, name)
        model = getattr(spec, "model", None)
        stages.append(
            {
                "stage": name,
                "backend": getattr(spec, "backend", "-"),
                "model": model,
                "dummy": models.get(name, {}).get("dummy_weights", False),
                "runs_as": runs_as(name),
                **spec.resources.model_dump(),
            }
        )
    out = Location(output, config.storage_options)
    out.check_writable(create=False)  # a dry run leaves no output folder behind
    check_unlocked(out)
    plan, same_plan = prepare_plan(config, inputs, out)  # files without metadata are counted in threads here
    units = plan.units
    done = complete_units(out) if same_plan else {}
    shape = shaping(config)
    check_config_identity(out, plan, fingerprint_of(shape), shape, done, allow_config_change)
    todo = [u for u in units if u.index not in done]
    address = ray_address or config.ray.address
    # as `run` sizes its default budget: the first samples still to do, read and decoded (a fraction of a second)
    sample_bytes = measure_sample_bytes(todo, config) if config.ray.data_memory_mb is None else None
    try:
        allocator = worker_allocator(config, address).why
    except RunError as exc:  # `run` would refuse to start
        allocator = f"error: {exc}"
    return {
        "pipeline": config.name,
        "output": out.uri,
        "stages": stages,
        "samples": sum(u.size for u in units),
        "units": len(units),
        "shard_size": config.write.shard_size,
        "complete": sorted(u.index for u in units if u.index in done) if same_plan is not False else [],
        "todo": len(todo),
        "data_memory_mb": round(data_memory_budget(config, sample_bytes) / 2**20),  # Ray Data's budget for waiting blocks
        "sample_kb": None if sample_bytes is None else round(sample_bytes / 2**10, 1),  # measured; None: not measured
        "ray_datasets": len(dataset_segments(todo, config.ray.max_samples_per_dataset)),  # Datasets `run` would start
        "same_plan_as_output": same_plan,  # None: no plan.json yet; False: `run` would refuse this output
        "fingerprint": fingerprint_of(shape),  # of the config: the complete units were made with it (or allowed)
        "ray_address": address,
        "worker_allocator": allocator,  # what Ray's workers would run with (engine/allocator.py)
        "inputs": sorted({u.path for u in units}),
        # why `run` would stop on this machine (embedded Ray): backends not installed, resources it lacks
        "would_stop": local_shortfalls(config, address),
    }


def local_gpus() -> int:
    """GPUs this machine's embedded Ray would see, as torch counts them (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_shortfalls(config, address: str | None) -> list[str]:
    """What stops `run` here: a stage whose backend is not installed, and, with embedded Ray, a plan that asks
    more CPUs or GPUs than this machine has (a cluster's resources are checked when the run connects)."""
    import importlib.util
    import os

    from engine.runner import stage_names
    from engine.runner.capacity import CPU, GPU, CapacityError, check_capacity

    problems = []
    for name in stage_names(config):
        if getattr(getattr(config.stages, name), "backend", None) == "vllm" and importlib.util.find_spec("vllm") is None:
            problems.append(f"{name}: the vllm backend needs vLLM, which is not installed here (on a GPU machine: "
                            f"pip install -e '.[vllm]'; without it: --set stages.{name}.backend=transformers)")
    if address is None:
        machine = {CPU: float(config.ray.num_cpus or max(os.cpu_count() or 1, 2)), GPU: float(local_gpus())}
        try:
            check_capacity(config, machine)
        except CapacityError as exc:
            problems.append(f"this machine ({machine[CPU]:g} CPUs, {machine[GPU]:g} GPUs): {exc}")
    return problems
