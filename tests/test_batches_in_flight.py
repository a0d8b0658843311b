"""How many Ray Data batches a stage actor holds at once (`batches_in_flight`): only the chat stages whose
backend takes requests while others run, from their backend section; and the setting is operational (a rerun
after changing it resumes the same run)."""

from __future__ import annotations

import json
import threading

import pytest

from engine.config import config_from_dict
from engine.fingerprint import fingerprint
from engine.runner.stages import batches_in_flight, operators


def config(**stages):
    return config_from_dict({"name": "t", "stages": {"ground": {"model": "tiny:grounding-dino"}, **stages}})


def test_vllm_and_openai_chat_stages_hold_their_setting_other_stages_one():
    cfg = config(recaption={"backend": "vllm", "model": "tiny:llava"},
                 extract={"backend": "openai", "model": "m", "openai": {"max_concurrent_batches": 6}})
    groups = operators(cfg)
    assert groups[1:] == [("recaption",), ("extract",), ("ground", "filter")]
    assert [batches_in_flight(g, cfg) for g in groups[1:]] == [4, 6, 1]
    cfg = config(recaption={"backend": "vllm", "model": "tiny:llava", "vllm": {"max_concurrent_batches": 1}},
                 extract={"backend": "transformers", "model": "tiny:llama-chat"})
    assert [batches_in_flight(g, cfg) for g in operators(cfg)[1:]] == [1, 1, 1]
    # a CPU stage joined to the model stage runs one batch at a time: the operator holds one
    assert batches_in_flight(("extract", "filter"), config(extract={"backend": "vllm", "model": "m"})) == 1


def test_batches_in_flight_do_not_change_the_fingerprint():
    base = {"backend": "vllm", "model": "tiny:llama-chat-bpe"}
    a = config(extract=base)
    b = config(extract={**base, "vllm": {"max_concurrent_batches": 16}})
    c = config(extract={**base, "max_tokens": 7})
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


@pytest.mark.slow
def test_one_unit_block_has_several_batches_in_flight_in_its_stage_actor(tmp_path):
    """A unit travels as one block; the extract operator must still hold several of its batches at once. The
    server holds the first batch's first request until a request of a later batch of the same block arrives:
    answered at all (not at the hold's timeout) only if the actor does not take the block's batches one after
    another. Rows stay one per sample, in order, with their own answers."""
    import ray
    import ray.data

    from engine.records import Record, from_table, to_table
    from engine.runner.dataset import map_stage_group
    from tests.test_openai_backend import ChatServer, Reply, completion, user_text

    later_batch_sent = threading.Event()
    held = []

    def respond(body, n):
        caption = user_text(body).split("<caption>")[1].split("</caption>")[0].strip()
        if caption == "photo 0":
            held.append(later_batch_sent.wait(20))
        elif caption != "photo 1":  # photos 0 and 1 are the first batch
            later_batch_sent.set()
        entity = {"phrase": caption, "category": "photo", "parent_category": "object"}
        return Reply(body=completion(json.dumps({"entities": [entity]})))

    server = ChatServer()
    server.respond = respond
    cfg = config(extract={"backend": "openai", "model": "m", "factual_prompt": None,
                          "openai": {"base_url": server.url, "server": "vllm", "max_concurrency": 8,
                                     "max_concurrent_batches": 4, "timeout_s": 60},
                          "resources": {"batch_size": 2, "concurrency": 1, "num_cpus": 0.5}})
    records = [Record(key=f"k{i}", source="s", unit=0, position=i, raw_caption=f"photo {i}", caption=f"photo {i}")
               for i in range(8)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_arrow(to_table(records))  # one block, as a unit is
        out = map_stage_group(ds, ("extract",), cfg, cfg.model_dump_json()).materialize()
        rows = [r for batch in out.iter_batches(batch_format="pyarrow", batch_size=None) for r in from_table(batch)]
    finally:
        ray.shutdown()
        server.close()
    assert held == [True]
    assert out.num_blocks() == 1  # the unit stays one block for its write task
    assert [r.key for r in rows] == [f"k{i}" for i in range(8)]
    assert [[e["phrase"] for e in r.entities] for r in rows] == [[f"photo {i}"] for i in range(8)]
