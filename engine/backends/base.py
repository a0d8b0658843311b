"""The two backend interfaces of DESIGN.md and the registry that picks an implementation by name.

Heavy libraries (torch, transformers, vllm) are imported inside the implementations, never here, so that
`import engine` works without them.
"""

from __future__ import annotations

import importlib
import logging
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from PIL import Image

from engine.errors import is_infrastructure_error

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ChatRequest:
    """One chat completion: messages in OpenAI form (role/content strings), an optional image, sampling."""

    messages: list[dict[str, str]]
    image: Image.Image | None = None  # attached to the last user message when the backend takes images
    max_tokens: int = 256
    temperature: float = 0.0
    json_schema: dict[str, Any] | None = None  # constrain / validate the output as this JSON schema
    seed: int | None = None


@dataclass(slots=True)
class ChatResult:
    text: str
    finish_reason: str | None = None  # "stop" | "length" | ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # per-request failure; the stage turns it into the sample's error


def usage_of(results: list[ChatResult]) -> dict[str, int]:
    """One sample's chat requests and tokens, stamped into its provenance params and summed into the manifest."""
    return {
        "requests": len(results),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "completion_tokens": sum(r.completion_tokens for r in results),
    }


class ChatBackend(Protocol):
    """Generates text for a batch of requests, results 1:1 and in order."""

    model_id: str

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]: ...


class StreamingChatBackend(ChatBackend, Protocol):
    """A chat backend that takes requests while others run (vllm, openai): `submit` returns at once, and the
    requests of every caller share one engine (or one bounded pool of connections), so several batches in
    flight in one actor keep it busy, and a sample's second prompt goes out as soon as its first is answered
    instead of after the whole batch's. The future's result is a `ChatResult` (a request's failure is its
    `error`); it raises only an infrastructure error (`WorkerLost` when the engine died). Thread-safe."""

    def submit(self, request: ChatRequest) -> Future[ChatResult]: ...

    @property
    def capacity(self) -> int:
        """Requests it runs at once (an engine's sequences, or connections); more wait their turn."""
        ...


def streams(backend: Any) -> bool:
    """Whether `backend` takes requests one at a time while others run (`StreamingChatBackend`)."""
    return callable(getattr(backend, "submit", None))


def wait_all(futures: list[Future[ChatResult]]) -> list[ChatResult]:
    """The futures' results in order (after all of them are done, so none is left running unseen when one
    raises)."""
    wait(futures)
    return [f.result() for f in futures]


@dataclass(slots=True)
class Detection:
    """One box from the teacher: pixel xyxy in the image given, score, and the prompt text it matched."""

    xyxy: tuple[float, float, float, float]
    score: float
    label: str  # the matched text span as the model reports it (a phrase of the prompt)
    prompt_index: int = 0  # which of the prompts of this image produced it


class GroundingBackend(Protocol):
    """Open-vocabulary detection: per image, a list of prompts (one forward each, merged) -> boxes."""

    model_id: str
    max_text_tokens: int

    def detect(self, images: list[Image.Image], prompts: list[list[str]]) -> list[list[Detection]]: ...

    def count_tokens(self, text: str) -> int: ...


@dataclass(slots=True)
class BackendSpec:
    """What a stage hands a backend factory: the model reference and backend options."""

    model: str | None
    options: dict[str, Any] = field(default_factory=dict)


# name -> "module:Class"; implementations are imported only when chosen.
CHAT_BACKENDS: dict[str, str] = {
    "transformers": "engine.backends.transformers_chat:TransformersChat",
    "openai": "engine.backends.openai_chat:OpenAIChat",
    "vllm": "engine.backends.vllm_chat:VllmChat",
}
GROUNDING_BACKENDS: dict[str, str] = {
    "transformers": "engine.backends.transformers_grounding:TransformersGrounding",
}


def run_isolating_failures(
    items: list[Any],
    run: Callable[[list[Any]], list[ChatResult]],
    *,
    what: str,
) -> list[ChatResult]:
    """`run(items)` for the whole batch; when it raises, each item alone, so that one bad request (a prompt
    over the context, an odd image) fails alone with its error. Infrastructure errors propagate."""
    try:
        return run(items)
    except Exception as exc:  # noqa: BLE001 - sorted below
        if is_infrastructure_error(exc):
            raise
        if len(items) == 1:
            log.debug("%s request failed: %s", what, exc, exc_info=True)
            return [ChatResult(text="", error=f"{type(exc).__name__}: {exc}")]
        log.warning("%s batch of %d failed (%s); retrying one by one", what, len(items), exc)
        return [run_isolating_failures([item], run, what=what)[0] for item in items]


def chat_backend_options(spec: Any, cache_dir: str | None) -> dict[str, Any]:
    """Options a chat stage hands its backend: device settings plus the section named after the backend."""
    options: dict[str, Any] = {"dtype": spec.dtype, "device": spec.device, "cache_dir": cache_dir}
    section = getattr(spec, spec.backend, None)
    if section is not None:
        options.update(section.model_dump())
    return options


def _load(table: dict[str, str], kind: str, name: str) -> type:
    if name not in table:
        raise ValueError(f"unknown {kind} backend {name!r}; known: {', '.join(sorted(table))}")
    module, _, cls = table[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_chat_backend(name: str, spec: BackendSpec) -> ChatBackend:
    return _load(CHAT_BACKENDS, "chat", name)(spec)


def make_grounding_backend(name: str, spec: BackendSpec) -> GroundingBackend:
    return _load(GROUNDING_BACKENDS, "grounding", name)(spec)
