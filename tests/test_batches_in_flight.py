"""How many Ray Data batches a stage actor holds at once (`batches_in_flight`): only the chat stages whose
backend takes requests while others run, from their backend section; and the setting is operational (a rerun
after changing it resumes the same run)."""

from __future__ import annotations

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
