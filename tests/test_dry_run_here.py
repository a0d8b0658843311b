"""`granucap run --dry-run` says why the run would stop on this machine: backends not installed, GPUs or
CPUs it lacks; and exits 1 as the run would."""

from __future__ import annotations

import importlib.util

from engine.cli import main
from engine.report import local_gpus


def test_the_headline_pipeline_on_a_machine_without_its_gpu_or_vllm(tmp_path, demo_input, capsys):
    has_vllm = importlib.util.find_spec("vllm") is not None
    if has_vllm and local_gpus() >= 1:
        code = main(["run", "pipelines/granucap.yaml", "-i", str(demo_input), "-o", str(tmp_path / "o"),
                     "--dry-run", "--set", "ray.num_cpus=8"])
        assert code == 0 and "would stop" not in capsys.readouterr().out
        return
    code = main(["run", "pipelines/granucap.yaml", "-i", str(demo_input), "-o", str(tmp_path / "o"), "--dry-run",
                 "--set", "ray.num_cpus=8"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "dry run: nothing was started" in text
    assert ("recaption: the vllm backend needs vLLM" in text) == (not has_vllm)
    assert ("the actor pools need 1 GPU" in text) == (local_gpus() == 0)
    assert "CPUs (recaption" not in text  # with 8 CPUs the CPU side fits: only what is missing is named


def test_a_plan_that_fits_here_has_nothing_to_say(tmp_path, demo_input, capsys):
    code = main(["run", "pipelines/granucap.yaml", "-i", str(demo_input), "-o", str(tmp_path / "o"), "--dry-run",
                 "--set", "ray.num_cpus=8", "--set", "stages.recaption.backend=transformers",
                 "--set", "stages.extract.backend=transformers", "--set", "stages.recaption.resources.num_gpus=0",
                 "--set", "stages.extract.resources.num_gpus=0", "--set", "stages.ground.resources.num_gpus=0"])
    assert code == 0 and "would stop" not in capsys.readouterr().out


def test_too_few_cpus_for_the_plan_is_named(tmp_path, demo_input, capsys):
    code = main(["run", "pipelines/smoke.yaml", "-i", str(demo_input), "-o", str(tmp_path / "o"), "--dry-run",
                 "--set", "ray.num_cpus=1", "--set", "stages.ground.resources.num_cpus=2"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "would stop: this machine (1 CPUs, " in text and "ground 1 × 2" in text
