"""How the runner maps stages onto Ray Data operators, sizes what they may hold and cuts the units into Datasets."""

import os
import warnings

import pytest

from engine.config import load_config
from engine.io.plan import plan_units
from engine.runner import build_dataset

pytestmark = pytest.mark.slow

GLIP = ["stages.recaption.backend=passthrough", "stages.extract.backend=nltk", "write.shard_size=4"]
TRACE_ENV = "GRANUCAP_TEST_STAGE_TRACE"


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A Ray session whose workers trace their stage calls; the trace file."""
    import ray

    def trace_stages() -> None:
        """The workers' setup hook (defined here, so that Ray ships it by value): every stage call in a worker
        appends `STAGE ACTOR_ID` (`-` in a task) to the file TRACE_ENV names."""
        import ray

        from engine.stages.base import Stage

        call = Stage.__call__

        def traced(self, records):
            line = f"{self.name} {ray.get_runtime_context().get_actor_id() or '-'}\n"
            fd = os.open(os.environ[TRACE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            return call(self, records)

        Stage.__call__ = traced

    trace = tmp_path_factory.mktemp("trace") / "stages.txt"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": trace_stages, "env_vars": {TRACE_ENV: str(trace)}})
    yield trace
    ray.shutdown()


def test_decode_runs_in_the_read_tasks_and_filter_in_the_ground_actors(ray_session, demo_input, model_cache,
                                                                       tiny_gdino, tmp_path):
    from engine import runner

    # Decode with the CPUs and pool size of the extract actors: Ray may fuse operators alike, and fused into
    # the extract actors the read tasks would read many units before anything moved on.
    config = load_config("pipelines/smoke.yaml", GLIP + [
        f"cache_dir={model_cache}",
        "stages.decode.resources.concurrency=1", "stages.decode.resources.num_cpus=0.25",
        "stages.extract.resources.concurrency=1", "stages.extract.resources.num_cpus=0.25"])
    ray_session.write_text("")
    manifest = runner.run(config, inputs=[str(demo_input)], output=tmp_path / "out")
    assert manifest["counts"]["read"] == 12 and manifest["units"] == {"planned": 4, "complete": 4}
    ran: dict[str, set[str]] = {}
    for line in ray_session.read_text().splitlines():
        stage, actor = line.split()
        ran.setdefault(stage, set()).add(actor)
    # decode and the passthrough recaption in tasks (the read tasks), every other stage in actors
    assert ran["decode"] == ran["recaption"] == {"-"}
    assert "-" not in ran["extract"] and "-" not in ran["ground"] and not ran["extract"] & ran["ground"]
    # filter inside the ground actors: no operator of its own between ground and write
    assert ran["filter"] == ran["ground"]


def test_read_tasks_yield_decoded_blocks_of_decode_batch_size(demo_input):
    from dataclasses import asdict

    import pyarrow as pa

    from engine.records import from_table
    from engine.runner.dataset import _read_units

    config = load_config("pipelines/smoke.yaml", GLIP + ["stages.decode.resources.batch_size=5"])
    units = plan_units([str(demo_input)], shard_size=12)
    assert units[0].size == 6  # one unit per tar of the demo input
    blocks = list(_read_units(pa.Table.from_pylist([asdict(units[0])]), names=("decode", "recaption"),
                              config_json=config.model_dump_json()))
    assert [b.num_rows for b in blocks] == [5, 1]
    records = [r for b in blocks for r in from_table(b)]
    assert [r.position for r in records] == list(range(6))
    ok = [r for r in records if r.ok]
    assert ok and all(r.width and r.height and max(r.width, r.height) <= 320 for r in ok)  # decoded, resized
    assert all(r.caption == r.raw_caption for r in ok)  # the passthrough recaption ran in the same task


def test_dataset_segments_are_consecutive_whole_units_within_the_limit():
    from engine.io.inputs import Unit
    from engine.runner import dataset_segments

    units = [Unit(index=i, kind="tar", path="x.tar", start=0, stop=size) for i, size in enumerate([4, 4, 9, 1, 2])]
    indices = lambda segments: [[u.index for u in s] for s in segments]  # noqa: E731
    assert indices(dataset_segments(units, 8)) == [[0, 1], [2], [3, 4]]  # unit 2 is larger than 8: alone
    assert indices(dataset_segments(units, 100)) == [[0, 1, 2, 3, 4]]
    assert indices(dataset_segments(units, None)) == [[0, 1, 2, 3, 4]]
    assert indices(dataset_segments(units, 1)) == [[0], [1], [2], [3], [4]]
    assert dataset_segments([], 8) == [] and dataset_segments([], None) == []


def test_data_memory_budget_is_eight_decoded_units_per_worker_unless_set():
    from engine.runner import DECODED_SAMPLE_KB, MIN_DATA_MEMORY_MB, data_memory_budget

    # glip.yaml: 4 read tasks, 2 nltk extract actors, 1 ground actor, units of 1000 samples
    glip = load_config("pipelines/glip.yaml", [])
    assert data_memory_budget(glip) == 7 * 8 * 1000 * DECODED_SAMPLE_KB * 2**10
    more = load_config("pipelines/glip.yaml", ["stages.ground.resources.concurrency=8", "write.shard_size=100"])
    assert data_memory_budget(more) == 14 * 8 * 100 * DECODED_SAMPLE_KB * 2**10
    # a passthrough recaption joins the read tasks and the filter joins ground: neither adds a worker
    assert data_memory_budget(load_config("pipelines/glip.yaml", ["stages.filter.resources.concurrency=9"])) == \
        data_memory_budget(glip)
    assert data_memory_budget(load_config("pipelines/smoke.yaml", GLIP)) == MIN_DATA_MEMORY_MB * 2**20  # tiny units
    assert data_memory_budget(load_config("pipelines/glip.yaml", ["ray.data_memory_mb=300"])) == 300 * 2**20


def test_a_measured_sample_size_replaces_the_guess_in_the_budget_and_the_setting_still_wins():
    from engine.runner import data_memory_budget

    glip = load_config("pipelines/glip.yaml", [])  # 7 workers, units of 1000
    assert data_memory_budget(glip, 50_000) == 7 * 8 * 1000 * 50_000
    assert data_memory_budget(glip, 20_000) < data_memory_budget(glip, 50_000)
    assert data_memory_budget(glip, 1_000) == 64 * 2**20  # 56 MB: the floor
    assert data_memory_budget(load_config("pipelines/glip.yaml", ["ray.data_memory_mb=300"]), 50_000) == 300 * 2**20


def test_input_sized_as_the_read_tasks_hand_it_on(demo_input):
    import pyarrow as pa
    from dataclasses import asdict

    from engine.runner import measure_sample_bytes, operators
    from engine.runner.dataset import _read_units

    config = load_config("pipelines/smoke.yaml", GLIP)
    units = plan_units([str(demo_input)], shard_size=4)
    assert [u.size for u in units] == [4, 2, 4, 2]
    # every block the read task function yields for the whole input (12 samples, fewer than the 32 sampled, so
    # the measurement reads on through all four units)
    blocks = list(_read_units(pa.Table.from_pylist([asdict(u) for u in units]), names=operators(config)[0],
                              config_json=config.model_dump_json()))
    passed = pa.concat_tables(blocks).filter(pa.compute.equal(pa.concat_tables(blocks)["status"], "ok"))
    assert 0 < passed.num_rows < 12  # the demo holds broken samples: they are left out of the mean
    measured = measure_sample_bytes(units, config)
    assert measured == pytest.approx(passed.nbytes / passed.num_rows, rel=0.02)
    # decode's output is what is measured, not the input's bytes: smaller images re-encoded, smaller samples
    small = measure_sample_bytes(units, load_config("pipelines/smoke.yaml", GLIP + ["stages.decode.max_side=32"]))
    assert small < measured / 4
    assert measure_sample_bytes(units, config, samples=3) > 0


def test_input_that_cannot_be_read_is_sized_from_its_rejected_rows_or_not_at_all(demo_input, tmp_path, monkeypatch,
                                                                                  caplog):
    import shutil

    from engine import runner
    from engine.runner import sizing

    for tar in demo_input.glob("*.tar"):
        shutil.copy(tar, tmp_path)
    units = plan_units([str(tmp_path)], shard_size=4)
    for tar in tmp_path.glob("*.tar"):
        tar.unlink()
    config = load_config("pipelines/smoke.yaml", GLIP)
    # the files went missing: every sample becomes a rejected row (the reader never loses one), and those are
    # what the blocks would hold: a few hundred bytes each, no image
    assert 0 < runner.measure_sample_bytes(units, config) < 1024
    # reading itself fails: no size, a warning, and the budget takes DECODED_SAMPLE_KB
    def broken(unit, options=None):
        raise OSError("the disk went away")
        yield

    monkeypatch.setattr(sizing, "read_unit", broken)
    with caplog.at_level("WARNING", logger="engine.runner"):
        assert runner.measure_sample_bytes(plan_units([str(demo_input)], shard_size=4), config) is None
    assert "could not size the input's decoded samples (OSError: the disk went away); taking 256 KB" in caplog.text
    assert runner.data_memory_budget(config, None) == runner.data_memory_budget(config, runner.DECODED_SAMPLE_KB * 2**10)
    assert runner.measure_sample_bytes([], config) is None


def test_build_dataset_holds_waiting_blocks_to_the_budget_of_the_measured_size(ray_session, demo_input):
    import ray.data

    from engine.runner import data_memory_budget

    config = load_config("pipelines/smoke.yaml", GLIP)
    units = plan_units([str(demo_input)], shard_size=4)
    budget = lambda: ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_dataset(units, config, sample_bytes=10**7, output="unused", claims=None)  # 3 workers x 8 x 4 x 10 MB
    assert budget() == data_memory_budget(config, 10**7) == 96 * 10**7
    # the retry settings Ray 2.60 takes only as remote args do not warn a user on every run
    assert not [w for w in caught if "ray_remote_args" in str(w.message)], [str(w.message) for w in caught]
    build_dataset(units, load_config("pipelines/smoke.yaml", GLIP + ["ray.data_memory_mb=48"]), sample_bytes=10**7,
                  output="unused", claims=None)
    assert budget() == 48 * 2**20


def test_a_run_split_into_several_datasets_writes_every_sample_once(ray_session, demo_input, model_cache, tmp_path,
                                                                     monkeypatch, caplog):
    import pyarrow.parquet as pq
    import ray.data

    from engine import runner
    from engine.runner import loop

    built, budgets, sizes = [], [], []
    real_build = runner.build_dataset

    def spy(units, config, sample_bytes=None, **kwargs):
        built.append([u.index for u in units])
        sizes.append(sample_bytes)
        dataset = real_build(units, config, sample_bytes, **kwargs)
        budgets.append(ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory)
        return dataset

    monkeypatch.setattr(loop, "build_dataset", spy)
    config = load_config("pipelines/smoke.yaml", GLIP + [f"cache_dir={model_cache}", "ray.max_samples_per_dataset=8"])
    with caplog.at_level("INFO", logger="engine.runner"):
        manifest = runner.run(config, inputs=[str(demo_input)], output=tmp_path)
    units = plan_units([str(demo_input)], shard_size=4)
    assert [u.size for u in units] == [4, 2, 4, 2]  # two tars of 6
    assert built == [[0, 1], [2, 3]]  # at most 8 samples each: two Datasets, the second after the first ended
    # the input was sized once, from its first samples still to do, and every Dataset runs under that budget
    measured = runner.measure_sample_bytes(units, config)
    assert sizes == [measured] * 2
    assert budgets == [runner.data_memory_budget(config, measured)] * 2  # what Ray Data executes them under
    assert (f"blocks waiting between operators: at most {budgets[0] // 2**20} MiB ({measured / 2**10:.1f} KB, "
            "the mean of the first 32") in caplog.text
    assert manifest["counts"]["read"] == 12 and manifest["units"] == {"planned": 4, "complete": 4}
    rows = pq.read_table(tmp_path / "index").to_pylist()
    assert sorted((r["unit"], r["position"]) for r in rows) == [(u.index, p) for u in units for p in range(u.size)]
    assert len({r["key"] for r in rows}) == 12
