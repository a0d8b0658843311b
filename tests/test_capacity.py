"""Plans that cannot run are refused before anything starts (engine/runner/capacity.py): CPUs, GPUs and custom
resources of the actor pools against what the cluster has; and the headline pipeline fits one GPU."""

import re

import pytest

from engine.runner.capacity import CapacityError, check_capacity, check_ray_cluster, stage_needs
from engine.config import ConfigError, load_config

HEADLINE = "pipelines/granucap.yaml"
WHOLE_GPUS = [f"stages.{s}.resources.num_gpus=1" for s in ("recaption", "extract", "ground")]


def refusal(config, cluster) -> str:
    with pytest.raises(CapacityError) as err:
        check_capacity(config, cluster)
    message = str(err.value)
    assert "\n" not in message
    return message


def suggested(message: str) -> list[str]:
    """The `--set` overrides a refusal suggests."""
    return re.findall(r"--set (\S+)", message)


def test_the_headline_pipeline_fits_one_gpu():
    config = load_config(HEADLINE)
    assert check_capacity(config, {"CPU": 8, "GPU": 1}) is None
    # its vLLM shares leave room for the other stages when recaption and extract run on vLLM on that GPU
    assert config.stages.recaption.vllm.gpu_memory_utilization + config.stages.extract.vllm.gpu_memory_utilization < 1


def test_whole_gpus_per_stage_on_one_gpu_are_refused_naming_each_stage_and_a_fix_that_fits():
    config = load_config(HEADLINE, WHOLE_GPUS)
    message = refusal(config, {"CPU": 8, "GPU": 1})
    assert "need 3 GPUs (recaption 1 × 1, extract 1 × 1, ground 1 × 1), but Ray has 1" in message
    assert "CPU" not in message  # the CPUs fit: only the short resource is named
    fix = suggested(message)
    assert fix and all(".num_gpus=" in f for f in fix)
    assert check_capacity(load_config(HEADLINE, WHOLE_GPUS + fix), {"CPU": 8, "GPU": 1}) is None


def test_the_n_gpu_override_needs_n_gpus():
    config = load_config(HEADLINE, WHOLE_GPUS + ["stages.extract.resources.concurrency=2"])
    assert check_capacity(config, {"CPU": 8, "GPU": 4}) is None
    assert "extract 2 × 1" in refusal(config, {"CPU": 8, "GPU": 3})


def test_a_cpu_machine_is_told_to_move_the_stages_to_the_cpu():
    message = refusal(load_config(HEADLINE), {"CPU": 8})
    assert "need 1 GPU (recaption 1 × 0.4, extract 1 × 0.4, ground 1 × 0.2), but Ray has 0" in message
    fix = suggested(message)
    assert sorted(fix) == sorted(f"stages.{s}.resources.num_gpus=0" for s in ("recaption", "extract", "ground"))
    assert check_capacity(load_config(HEADLINE, fix), {"CPU": 8}) is None


def test_one_reading_and_one_writing_task_must_fit_beside_the_actor_pools():
    config = load_config(HEADLINE)  # 3 actors × 1 CPU, reading 1, writing 0.25
    assert check_capacity(config, {"CPU": 4.25, "GPU": 1}) is None
    message = refusal(config, {"CPU": 4, "GPU": 1})
    assert ("the actor pools need 3 CPUs (recaption 1 × 1, extract 1 × 1, ground 1 × 1) plus 1 for reading and "
            "decoding and 0.25 for writing") in message
    assert "Ray has 4" in message and "GPU" not in message
    assert check_capacity(load_config(HEADLINE, suggested(message)), {"CPU": 4, "GPU": 1}) is None


def test_no_cpus_left_for_the_pools_asks_for_more_cpus():
    config = load_config(HEADLINE, ["stages.decode.resources.num_cpus=2"])
    message = refusal(config, {"CPU": 2, "GPU": 1})
    assert "raise ray.num_cpus" in message and not suggested(message)


def test_custom_resources_are_checked_and_validated():
    config = load_config(HEADLINE, ["stages.ground.resources.custom.accel_a100=1",
                                    "stages.ground.resources.concurrency=2"])
    assert [n.per_actor.get("accel_a100") for n in stage_needs(config)] == [None, None, 1]
    message = refusal(config, {"CPU": 8, "GPU": 2, "accel_a100": 1})
    assert "GPU" not in message and "need 2 of custom resource 'accel_a100' (ground 2 × 1), but Ray has 1" in message
    assert "--set stages.ground.resources.custom.accel_a100=0.5" in message
    assert "no node offers 'accel_a100'" in refusal(config, {"CPU": 8, "GPU": 2})
    assert check_capacity(config, {"CPU": 8, "GPU": 2, "accel_a100": 2}) is None
    for bad in ("stages.ground.resources.custom.GPU=1", "stages.ground.resources.custom.accel=-1"):
        with pytest.raises(ConfigError, match="stages.ground.resources.custom"):
            load_config(HEADLINE, [bad])


def test_an_actor_spanning_gpus_gets_no_fractional_suggestion():
    config = load_config(HEADLINE, ["stages.extract.backend=vllm", "stages.extract.vllm.tensor_parallel_size=2",
                                    "stages.extract.resources.num_gpus=2"])
    message = refusal(config, {"CPU": 8, "GPU": 2})
    assert "extract 1 × 2" in message and not suggested(message)


def test_only_the_stages_that_run_as_actor_pools_count():
    fused = load_config("pipelines/granucap-fused.yaml")  # annotate replaces recaption + extract
    assert [n.stage for n in stage_needs(fused)] == ["annotate", "ground"]
    assert "(annotate 1 × 1, ground 1 × 1)" in refusal(fused, {"CPU": 8, "GPU": 1})
    glip = load_config("pipelines/glip.yaml")  # passthrough recaption runs in the reading tasks
    assert [n.stage for n in stage_needs(glip)] == ["extract", "ground"]


def test_waiting_for_an_autoscaler_returns_the_shortfall_instead_of_raising():
    config = load_config(HEADLINE, WHOLE_GPUS)
    message = check_capacity(config, {"CPU": 8, "GPU": 1}, wait=True)
    assert message and "need 3 GPUs" in message and "Waiting for the autoscaler" in message
    assert check_capacity(config, {"CPU": 8, "GPU": 3}, wait=True) is None


@pytest.fixture(scope="module")
def declared_cluster():
    """A real Ray session declaring one GPU and a custom resource (Ray counts declared resources; no device
    is needed to declare them)."""
    import ray

    ray.init(address="local", num_cpus=8, num_gpus=1, resources={"accel_a100": 1}, include_dashboard=False,
             log_to_driver=False)
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.mark.slow
def test_a_real_cluster_with_one_gpu_runs_the_headline_and_refuses_three_gpus(declared_cluster):
    assert declared_cluster["GPU"] == 1 and declared_cluster["accel_a100"] == 1
    assert check_capacity(load_config(HEADLINE), declared_cluster) is None
    message = refusal(load_config(HEADLINE, WHOLE_GPUS), declared_cluster)
    assert "recaption 1 × 1, extract 1 × 1, ground 1 × 1" in message and "Ray has 1" in message
    pinned = load_config(HEADLINE, ["stages.ground.resources.custom.accel_a100=1"])
    assert check_ray_cluster(pinned) is None
    with pytest.raises(CapacityError, match="ground 1 × 2"):
        check_ray_cluster(load_config(HEADLINE, ["stages.ground.resources.custom.accel_a100=2"]))
