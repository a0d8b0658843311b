"""How many batches a stage actor holds at once (`batches_in_flight`): only the chat stages whose
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
    cfg = config(extract={"backend": "vllm", "model": "m", "vllm": {"max_concurrent_batches": None}})
    assert batches_in_flight(("extract",), cfg) is None  # as many as fill the engine, resolved by the actor
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


def through_extract(respond, *, samples: int, batch_size: int, in_flight: int | None, connections: int = 8):
    """`samples` records in one block (as a unit travels) through the extract operator `granucap run` builds,
    on the openai backend against a protocol server answering with `respond(body, n)`: (the output dataset,
    its rows)."""
    import ray
    import ray.data

    from engine.records import Record, from_table, to_table
    from engine.runner.dataset import map_stage_group
    from tests.test_openai_backend import ChatServer

    server = ChatServer()
    server.respond = respond
    cfg = config(extract={"backend": "openai", "model": "m", "factual_prompt": None,
                          "openai": {"base_url": server.url, "server": "vllm", "max_concurrency": connections,
                                     "max_concurrent_batches": in_flight, "timeout_s": 60},
                          "resources": {"batch_size": batch_size, "concurrency": 1, "num_cpus": 0.5}})
    records = [Record(key=f"k{i}", source="s", unit=0, position=i, raw_caption=f"photo {i}", caption=f"photo {i}")
               for i in range(samples)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_arrow(to_table(records))  # one block, as a unit is
        out = map_stage_group(ds, ("extract",), cfg, cfg.model_dump_json()).materialize()
        rows = [r for batch in out.iter_batches(batch_format="pyarrow", batch_size=None) for r in from_table(batch)]
    finally:
        ray.shutdown()
        server.close()
    return out, rows


def caption_of(body) -> str:
    from tests.test_openai_backend import user_text

    return user_text(body).split("<caption>")[1].split("</caption>")[0].strip()


def entities_reply(caption: str):
    from tests.test_openai_backend import Reply, completion

    entity = {"phrase": caption, "category": "photo", "parent_category": "object"}
    return Reply(body=completion(json.dumps({"entities": [entity]})))


def first_requests_at_once(n: int):
    """A server's `respond` whose first `n` requests (photos 0 to n-1) wait at a barrier of `n`, and the list
    that says, for each, whether the barrier opened (all `n` at the server at once) or timed out."""
    barrier = threading.Barrier(n)
    opened: list[bool] = []

    def respond(body, _):
        caption = caption_of(body)
        if int(caption.split()[1]) < n:
            try:
                barrier.wait(20)
                opened.append(True)
            except threading.BrokenBarrierError:
                opened.append(False)
        return entities_reply(caption)

    return respond, opened


@pytest.mark.slow
def test_one_unit_block_has_several_batches_in_flight_in_its_stage_actor():
    """A unit travels as one block; the extract operator must still hold several of its batches at once. The
    server holds the first batch's first request until a request of a later batch of the same block arrives:
    answered at all (not at the hold's timeout) only if the actor does not take the block's batches one after
    another. Rows stay one per sample, in order, with their own answers."""
    later_batch_sent = threading.Event()
    held = []

    def respond(body, n):
        caption = caption_of(body)
        if caption == "photo 0":
            held.append(later_batch_sent.wait(20))
        elif caption != "photo 1":  # photos 0 and 1 are the first batch
            later_batch_sent.set()
        return entities_reply(caption)

    out, rows = through_extract(respond, samples=8, batch_size=2, in_flight=4)
    assert held == [True]
    assert out.num_blocks() == 1  # the unit stays one block for its write task
    assert [r.key for r in rows] == [f"k{i}" for i in range(8)]
    assert [[e["phrase"] for e in r.entities] for r in rows] == [[f"photo {i}"] for i in range(8)]


@pytest.mark.slow
def test_a_unit_block_has_as_many_batches_in_flight_as_configured_beyond_ray_datas_four():
    """Ray Data by itself runs at most four batches of one block at once; `max_concurrent_batches: 6` must
    mean six. Batches of one request each: the first six requests wait at a barrier of six, which opens only
    if all six are at the server before any is answered. The other six follow, and every row comes back in
    order with its own answer."""
    respond, opened = first_requests_at_once(6)
    out, rows = through_extract(respond, samples=12, batch_size=1, in_flight=6)
    assert opened == [True] * 6
    assert out.num_blocks() == 1
    assert [[e["phrase"] for e in r.entities] for r in rows] == [[f"photo {i}"] for i in range(12)]


@pytest.mark.slow
def test_with_max_concurrent_batches_null_a_stage_actor_holds_enough_batches_to_fill_its_backend():
    """With `max_concurrent_batches: null`, the actor holds as many batches as keep every one of the backend's
    connections busy, whatever the batch size: at batch size 1 and 6 connections, the first six requests are
    at the server at once (a barrier of six opens), where the default four batches would leave two idle."""
    respond, opened = first_requests_at_once(6)
    _, rows = through_extract(respond, samples=10, batch_size=1, in_flight=None, connections=6)
    assert opened == [True] * 6
    assert [[e["phrase"] for e in r.entities] for r in rows] == [[f"photo {i}"] for i in range(10)]
