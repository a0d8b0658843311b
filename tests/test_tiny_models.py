"""Tiny random-weight models: real classes, Auto-loadable, deterministic; resolve_model caches and locks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.models import loading, tiny
from engine.models.loading import is_dummy, pick_device, pick_dtype, resolve_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


# `model_cache` (tests/conftest.py): one session-wide cache, so the backend tests reuse these builds.


def _tensor(directory: str | Path, name: str):
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.slow
def test_grounding_dino_loads_with_auto_classes(model_cache):
    from PIL import Image
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    path = resolve_model("tiny:grounding-dino", model_cache)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
    assert type(model).__name__ == "GroundingDinoForObjectDetection"
    tok = processor.tokenizer
    # the ids Grounding DINO hard-codes for its phrase masks
    assert (tok.cls_token_id, tok.sep_token_id, tok.convert_tokens_to_ids(".")) == (101, 102, 1012)
    image = Image.new("RGB", (200, 150), (120, 80, 40))
    inputs = processor(images=[image], text=["a cat. a dog."], return_tensors="pt")
    assert max(inputs["pixel_values"].shape[-2:]) <= 320  # small processor size keeps CPU fast
    with torch.inference_mode():
        out = model(**inputs)
    assert out.logits.shape[:2] == (1, 20)
    res = processor.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[(150, 200)]
    )
    assert len(res[0]["scores"]) == 20


@pytest.mark.slow
def test_owlv2_loads_with_auto_classes(model_cache):
    from PIL import Image
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    path = resolve_model("tiny:owlv2", model_cache)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
    assert type(model).__name__ == "Owlv2ForObjectDetection"
    inputs = processor(images=[Image.new("RGB", (80, 60))], text=[["a cat", "a dog"]], return_tensors="pt")
    ids = inputs["input_ids"]
    assert ids.shape == (2, 16)  # padded to model_max_length = text max_position_embeddings
    # OWL pools the text at argmax(input_ids): that must be the eos token
    assert (ids.argmax(-1) == (ids == processor.tokenizer.eos_token_id).int().argmax(-1)).all()
    with torch.inference_mode():
        out = model(**inputs)
    res = processor.post_process_grounded_object_detection(
        out, threshold=0.0, target_sizes=[(80, 80)], text_labels=[["a cat", "a dog"]]
    )
    assert set(res[0]["text_labels"]) <= {"a cat", "a dog"}


@pytest.mark.slow
def test_llama_chat_template_and_generation(model_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("tiny:llama-chat", model_cache)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # vLLM CPU needs head_dim 32+
    assert tok.padding_side == "left" and tok.pad_token is not None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a cat."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|system|>" in text and "<|user|>" in text and text.endswith("<|assistant|>\n")
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert not no_gen.rstrip().endswith("<|assistant|>")
    enc = tok([text], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 6
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_llava_generates_on_image(model_cache):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model("tiny:llava", model_cache)
    processor = AutoProcessor.from_pretrained(path)
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    model.eval()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    # saved in the layout vLLM expects; transformers maps it back without missing weights
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        vision = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<image>" in prompt
    inputs = processor(images=[Image.new("RGB", (64, 48), (10, 200, 30))], text=[prompt], return_tensors="pt",
                       add_special_tokens=False)
    # 32 px / 8 px patches = 16 image tokens (the CLS feature is dropped by the "default" strategy)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_build_is_deterministic(tmp_path, model_cache):
    first = tiny.build_tiny("owlv2", tmp_path / "a")
    second = tiny.build_tiny("owlv2", tmp_path / "b")
    name = "class_head.dense0.weight"
    assert torch.equal(_tensor(first, name), _tensor(second, name))
    # and the same as the one the other tests use
    cached = resolve_model("tiny:owlv2", model_cache)
    assert torch.equal(_tensor(first, name), _tensor(cached, name))


def test_unknown_tiny_name(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model"):
        resolve_model("tiny:nope", str(tmp_path))
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny.build_tiny("nope", tmp_path)


def test_non_tiny_refs_pass_through(tmp_path):
    assert resolve_model("IDEA-Research/grounding-dino-tiny", str(tmp_path)) == "IDEA-Research/grounding-dino-tiny"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert not (tmp_path / "models").exists()
    assert is_dummy("tiny:owlv2") and not is_dummy("google/owlv2-base-patch16") and not is_dummy(None)


@pytest.fixture
def fake_builder(monkeypatch):
    """A fast stand-in builder that counts its calls."""
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        (directory / "config.json").write_text("{}")

    monkeypatch.setitem(tiny.BUILDERS, "fake", build)
    return calls


def test_resolve_builds_once_and_reuses(tmp_path, fake_builder):
    first = resolve_model("tiny:fake", str(tmp_path))
    assert Path(first) == tmp_path / "models" / "tiny-fake-v1"
    assert (Path(first) / loading.MARKER).is_file() and (Path(first) / "config.json").is_file()
    mtime = (Path(first) / loading.MARKER).stat().st_mtime_ns
    assert resolve_model("tiny:fake", str(tmp_path)) == first
    assert len(fake_builder) == 1
    assert (Path(first) / loading.MARKER).stat().st_mtime_ns == mtime
    # no temp folders left behind
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")) == [
        "tiny-fake-v1"
    ]


def test_resolve_uses_env_cache(tmp_path, fake_builder, monkeypatch):
    monkeypatch.setenv("GRANUCAP_CACHE", str(tmp_path / "env-cache"))
    assert resolve_model("tiny:fake") == str(tmp_path / "env-cache" / "models" / "tiny-fake-v1")


def lock_waiters(path: Path) -> int:
    """Lock requests blocked on the file `path`, as the kernel lists them (`->` lines of /proc/locks)."""
    inode = str(path.stat().st_ino)
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line.split() and line.split()[-3].rsplit(":", 1)[-1] == inode)


def test_concurrent_resolves_build_once(tmp_path, fake_builder, monkeypatch):
    # The build holds until the three other callers wait for it on the cache's lock: all four overlap.
    lock = tmp_path / "models" / ".tiny-fake-v1.lock"

    def build(directory: Path) -> None:
        fake_builder.append(directory)
        deadline = time.monotonic() + 60
        while lock_waiters(lock) < 3:
            assert time.monotonic() < deadline, "the other callers did not wait for the build"
            time.sleep(0.01)
        (directory / "config.json").write_text("{}")

    monkeypatch.setitem(tiny.BUILDERS, "fake", build)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("tiny:fake", str(tmp_path))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_builder) == 1
    assert len(set(results)) == 1 and len(results) == 4


def test_incomplete_leftover_is_rebuilt(tmp_path, fake_builder):
    target = tmp_path / "models" / "tiny-fake-v1"
    target.mkdir(parents=True)
    (target / "half-written.bin").write_text("x")  # no marker: a crashed build
    assert resolve_model("tiny:fake", str(tmp_path)) == str(target)
    assert len(fake_builder) == 1
    assert not (target / "half-written.bin").exists()


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(directory: Path) -> None:
        (directory / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setitem(tiny.BUILDERS, "broken", broken)
    with pytest.raises(RuntimeError, match="boom"):
        resolve_model("tiny:broken", str(tmp_path))
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_device_and_dtype():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("auto", "cuda:0") == torch.bfloat16
    assert pick_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError):
        pick_dtype("float99", "cpu")


def test_modules_import_without_torch():
    code = (
        "import sys, engine.models.loading, engine.models.tiny, engine.backends.transformers_chat, "
        "engine.backends.transformers_grounding; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
