"""Chat backend on HF transformers: text-only causal LMs and image-text-to-text models (LLaVA class).

Batching: requests are grouped by kind (with/without image) and sampling mode, then run in chunks of
`batch_size` with left padding. A chunk generates up to the largest `max_tokens` in it and each result is
cut to its own `max_tokens`; for greedy decoding this equals a separate run. Sampled requests with a seed run
alone under that seed, so their output does not depend on their batch. `json_schema` is not enforced here
(no constrained decoding in transformers); the extract stage validates the text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engine.backends.base import BackendSpec, ChatRequest, ChatResult, run_isolating_failures
from engine.models.loading import pick_device, pick_dtype, resolve_model

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Prepared:
    index: int
    request: ChatRequest
    prompt: str  # rendered chat template


class TransformersChat:
    """`ChatBackend` over `AutoModelForCausalLM` or `AutoModelForImageTextToText` (chosen from the config)."""

    def __init__(self, spec: BackendSpec) -> None:
        import torch
        from transformers import AutoConfig

        if not spec.model:
            raise ValueError("transformers chat backend needs a model")
        opts = dict(spec.options)
        self.model_id = spec.model
        self.batch_size = int(opts.get("batch_size", 8))
        self.device = pick_device(opts.get("device", "auto"))
        if opts.get("num_threads"):  # CPU: match the CPUs Ray gave this actor; oversubscription is ~100x slower
            torch.set_num_threads(int(opts["num_threads"]))
        self.dtype = pick_dtype(opts.get("dtype", "auto"), self.device)
        self.path = resolve_model(spec.model, opts.get("cache_dir"))
        config = AutoConfig.from_pretrained(self.path)
        self._is_vlm = getattr(config, "vision_config", None) is not None
        if self._is_vlm:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(self.path)
            self.tokenizer = self.processor.tokenizer
            model_cls = AutoModelForImageTextToText
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            model_cls = AutoModelForCausalLM
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model_cls.from_pretrained(self.path, dtype=self.dtype).to(self.device).eval()
        self._eos_ids = self._find_eos_ids()
        log.info("loaded %s (%s, vlm=%s) on %s/%s", self.model_id, type(self.model).__name__, self._is_vlm,
                 self.device, self.dtype)

    @property
    def is_vlm(self) -> bool:
        """Whether the model takes images."""
        return self._is_vlm

    def _find_eos_ids(self) -> set[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return set()
        return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}

    # -- prompt rendering -------------------------------------------------------------------------------

    def _render(self, request: ChatRequest) -> str:
        if request.image is None:
            if self._is_vlm:  # processor templates expect content parts
                msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                        for m in request.messages]
                return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        if not self._is_vlm:
            raise ValueError(f"model {self.model_id} takes no images")
        last_user = max((i for i, m in enumerate(request.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError("a request with an image needs a user message")
        msgs = []
        for i, m in enumerate(request.messages):
            parts: list[dict[str, Any]] = [{"type": "text", "text": m["content"]}]
            if i == last_user:
                parts.insert(0, {"type": "image"})
            msgs.append({"role": m["role"], "content": parts})
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    # -- generation -------------------------------------------------------------------------------------

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Results 1:1 and in order; a request that fails alone gets `error` set instead of raising."""
        results: list[ChatResult | None] = [None] * len(requests)
        groups: dict[tuple, list[_Prepared]] = {}
        for i, req in enumerate(requests):
            try:
                prepared = _Prepared(i, req, self._render(req))
            except Exception as exc:  # noqa: BLE001 - a bad request is that request's error
                results[i] = ChatResult(text="", error=f"{type(exc).__name__}: {exc}")
                continue
            sampled = req.temperature > 0
            key = (req.image is not None, sampled, req.temperature if sampled else 0.0,
                   req.seed if sampled else None, i if sampled and req.seed is not None else -1)
            groups.setdefault(key, []).append(prepared)
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                for p, result in zip(chunk, run_isolating_failures(chunk, self._run, what="chat")):
                    results[p.index] = result
        return [r if r is not None else ChatResult(text="", error="not generated") for r in results]

    def _run(self, chunk: list[_Prepared]) -> list[ChatResult]:
        import torch

        texts = [p.prompt for p in chunk]
        images = [p.request.image.convert("RGB") for p in chunk if p.request.image is not None]
        # The templates already hold bos; tokenizing again must not add another.
        if self._is_vlm:
            inputs = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt",
                                    add_special_tokens=False)
        else:
            inputs = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        first = chunk[0].request
        max_new = max(p.request.max_tokens for p in chunk)
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if first.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=first.temperature)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            if first.temperature > 0 and first.seed is not None:
                torch.manual_seed(first.seed)
            out = self.model.generate(**inputs, **gen_kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        prompt_counts = inputs["attention_mask"].sum(dim=1).tolist()
        new_tokens = out[:, prompt_len:].tolist()
        return [self._result(p.request, tokens, int(n)) for p, tokens, n in zip(chunk, new_tokens, prompt_counts)]

    def _rng_devices(self) -> list[int]:
        import torch

        if self.device.startswith("cuda") and torch.cuda.is_available():
            return [torch.device(self.device).index or 0]
        return []

    def _result(self, request: ChatRequest, tokens: list[int], prompt_tokens: int) -> ChatResult:
        tokens = tokens[: request.max_tokens]
        stop_at = next((k for k, t in enumerate(tokens) if t in self._eos_ids), None)
        if stop_at is not None:
            kept, finish, count = tokens[:stop_at], "stop", stop_at + 1
        else:
            kept, finish, count = tokens, "length", len(tokens)
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return ChatResult(text=text, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=count)
