"""`granucap doctor`: a table of what is there and what is not, exit 0, no network."""

from __future__ import annotations

import json
from pathlib import Path

from engine.cli import main
from engine.doctor import model_status, pipeline_models
from engine.models.loading import MARKER, tiny_path


def test_doctor_lists_packages_gpu_nltk_and_the_pipelines_models(capsys):
    assert main(["doctor", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)
    by_name = {c["name"]: c for c in checks}
    assert {"packages", "gpu", "nltk data", "memory", "models"} <= {c["group"] for c in checks}
    assert by_name["tcmalloc"]["status"] in ("ok", "info") and "Ray's workers" in by_name["tcmalloc"]["detail"]
    assert by_name["pyarrow"]["status"] == "ok" and by_name["ray"]["status"] == "ok"
    assert by_name["torch.cuda"]["status"] in ("ok", "info")
    assert "smoke/ground" in by_name["tiny:grounding-dino"]["detail"].split("used by ")[1].split(", ")
    assert "granucap/recaption" in by_name["Qwen/Qwen2.5-VL-3B-Instruct"]["detail"]
    assert all(c["status"] in ("ok", "missing", "info") for c in checks)

    assert main(["doctor", "--pipeline", "pipelines/glip.yaml"]) == 0
    out = capsys.readouterr().out
    assert "granucap doctor" in out and "IDEA-Research/grounding-dino-tiny" in out and "tiny:llava" not in out


def test_model_status_reads_the_caches_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    status, detail = model_status("someorg/some-model", hf_cache=str(hub))
    assert status == "missing" and "HF_HUB_OFFLINE" in detail
    # the Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/REV/config.json}
    repo = hub / "models--someorg--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    assert model_status("someorg/some-model", hf_cache=str(hub))[0] == "ok"

    assert model_status(str(tmp_path))[0] == "ok"  # a local directory
    cache = str(tmp_path / "granucap-cache")
    assert model_status("tiny:llava", cache_dir=cache)[0] == "info"  # built on first use
    built = tiny_path("llava", cache)
    built.mkdir(parents=True)
    (built / MARKER).write_text("tiny:llava\n")
    assert model_status("tiny:llava", cache_dir=cache)[0] == "ok"


def test_pipeline_models_skips_a_broken_pipeline(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: {ground: {model: 3, nonsense: 1}}\n")
    models = pipeline_models([bad, Path("pipelines/smoke.yaml")])
    assert set(models) == {"tiny:llava", "tiny:llama-chat", "tiny:grounding-dino"}
