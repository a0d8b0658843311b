"""The stage failure rules: one bad sample costs only itself, device OOM splits the batch, infra errors raise."""

import pytest
import torch

from engine.errors import InfrastructureError
from engine.records import Record
from engine.stages.base import Stage


def batch(n, huge=()):
    return [Record(key=f"k{i}", source="s", position=i, raw_caption="huge" if i in huge else "small")
            for i in range(n)]


class Tagger(Stage):
    """Labels captions in batches; runs out of device memory above `fits` samples, or on a 'huge' sample."""

    name = "tagger"

    def __init__(self, fits=2, poison=None):
        super().__init__(spec=None)
        self.fits, self.poison, self.calls = fits, poison, []

    def process(self, records):
        self.calls.append(len(records))
        for r in records:
            r.stamp(self.name, "test")  # stamped before the failure: a retry must not keep it
        if len(records) > self.fits or any(r.raw_caption == "huge" for r in records):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison is not None and any(r.key == self.poison for r in records):
            raise ValueError("cannot handle this caption")
        for r in records:
            r.caption = r.raw_caption.upper()


def test_oom_halves_the_batch_until_it_fits():
    stage = Tagger(fits=2)
    out = stage(batch(7))
    assert all(r.ok and r.caption == "SMALL" for r in out)
    assert stage.calls == [7, 3, 1, 2, 4, 2, 2]  # 7 -> 3 + 4 -> (1 + 2) + (2 + 2)
    assert all(len(r.provenance) == 1 for r in out)


def test_a_sample_that_never_fits_fails_alone_with_the_reason():
    out = Tagger(fits=8)(batch(6, huge={4}))
    assert [r.status for r in out] == ["ok"] * 4 + ["failed", "ok"]
    assert out[4].error == {"stage": "tagger", "kind": "out_of_memory",
                            "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert out[4].provenance == []


def test_an_exception_costs_only_its_sample():
    out = Tagger(fits=100, poison="k2")(batch(5))
    assert [r.status for r in out] == ["ok", "ok", "failed", "ok", "ok"]
    assert out[2].error["kind"] == "ValueError" and "cannot handle" in out[2].error["message"]
    assert [len(r.provenance) for r in out] == [1, 1, 0, 1, 1]


def test_infrastructure_errors_propagate():
    class Dead(Stage):
        name = "dead"

        def process(self, records):
            raise InfrastructureError("engine died")

    with pytest.raises(InfrastructureError):
        Dead(spec=None)(batch(3))


def test_not_ok_samples_pass_untouched():
    records = batch(3)
    records[1].reject("decode", "undecodable_image", "bad")
    stage = Tagger(fits=10)
    out = stage(records)
    assert stage.calls == [2]
    assert out[1].caption is None and out[1].error["stage"] == "decode"
