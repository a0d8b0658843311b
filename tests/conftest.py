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


# --- object storage and clusters: real components on this machine ---------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {"AWS_ACCESS_KEY_ID": "granucap-test-key", "AWS_SECRET_ACCESS_KEY": "granucap-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server on 127.0.0.1 (moto's standalone server, as s3fs's own tests use): its endpoint URL.
    The server keeps everything in memory and ends with the session."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(server).exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """This test's environment points boto at the S3 server with credentials; returns a new empty bucket's
    URI (s3://NAME)."""
    import uuid

    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    bucket = f"granucap-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"


def s3_fs():
    """A fresh s3fs filesystem on the test's environment (no listing cache kept between calls)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
