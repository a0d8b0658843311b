"""How the runner maps stages onto Ray Data operators (the optimized physical plan Ray will execute)."""

import pytest

from engine.config import load_config
from engine.io.readers import plan_units
from engine.runner import build_dataset

pytestmark = pytest.mark.slow

GLIP = ["stages.recaption.backend=passthrough", "stages.extract.backend=nltk", "write.shard_size=4"]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def physical_plan(config, demo_input, capsys) -> list[str]:
    """The optimized physical plan's operators, upstream first."""
    build_dataset(plan_units([str(demo_input)], shard_size=4), config).explain()
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    ops = [line.strip(" +-") for line in plan.splitlines() if "Operator[" in line or "Buffer[" in line]
    return ops[::-1]


def test_read_stays_its_own_operator_when_decode_could_fuse_with_it(ray_session, demo_input, capsys):
    # Same task pool size and CPUs: Ray would fuse read into decode and apply decode's batch_size to units.
    config = load_config("pipelines/smoke.yaml", GLIP + [
        "read.concurrency=1", "read.num_cpus=0.25",
        "stages.decode.resources.concurrency=1", "stages.decode.resources.num_cpus=0.25"])
    ops = physical_plan(config, demo_input, capsys)
    assert ops[1] == "TaskPoolMapOperator[MapBatches(_read_units)]"
    assert "_read_units" not in "".join(ops[2:])


def test_filter_runs_inside_the_ground_actors(ray_session, demo_input, capsys):
    ops = physical_plan(load_config("pipelines/smoke.yaml", GLIP), demo_input, capsys)
    # read, decode(+recaption passthrough), extract (nltk actor), ground+filter: no task operator after ground
    assert ops[-1] == "ActorPoolMapOperator[MapBatches(_StageActor)]"
    assert [op.split("[")[0] for op in ops[1:]] == ["TaskPoolMapOperator", "TaskPoolMapOperator",
                                                    "ActorPoolMapOperator", "ActorPoolMapOperator"]
