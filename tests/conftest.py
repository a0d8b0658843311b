"""Shared fixtures: one cache of tiny models per test session, offline hub, small demo inputs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core box, spinning OpenMP threads make tiny forwards ~30x slower."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    """A cache dir shared by every test that builds tiny models (each is built once per session)."""
    path = tmp_path_factory.mktemp("granucap-cache")
    return str(path)


@pytest.fixture(scope="session")
def tiny_gdino(model_cache) -> str:
    """Directory of the tiny random-weight Grounding DINO (built once per session)."""
    from engine.models.loading import resolve_model

    return resolve_model("tiny:grounding-dino", cache_dir=model_cache)


@pytest.fixture(scope="session")
def gdino_processor(tiny_gdino):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_gdino)


@pytest.fixture(scope="session")
def demo_input(tmp_path_factory):
    from engine.demo import write_demo_input

    dest = tmp_path_factory.mktemp("demo-in")
    write_demo_input(dest, samples=12, per_tar=6, seed=0)
    return dest
