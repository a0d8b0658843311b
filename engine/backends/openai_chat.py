"""Chat backend over any OpenAI-compatible endpoint (OpenAI, `vllm serve`, SGLang, llama.cpp server).

Requests run concurrently in one thread pool of `max_concurrency` for the backend's life, shared by every
batch the stage actor holds at once (`max_concurrent_batches`), so requests stream across batch boundaries
with bounded concurrency; `generate`'s results come back in order. Retries live in engine/retry.py (the
client's own are switched off). Outcomes:

- retryable failures (408/429/5xx, timeouts, connection errors) are retried with backoff, Retry-After honoured;
- one request's failure after retries (exhausted retries, timeout, 400/413/422, a body that is not a chat
  completion) becomes that request's `ChatResult.error`, so only its sample is lost;
- 401/403/404 (bad key, no permission, wrong URL or model) and a server that still refuses connections after
  the retries raise `InfrastructureError`: every sample would fail alike, so the run stops instead of writing
  a corpus of failed rows, and a rerun resumes once the endpoint is fixed.

The API key is read from the environment variable `api_key_env` names and lives only in the client object:
every error message passes through `_redact`, and nothing here logs request headers.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from engine.backends.base import BackendSpec, ChatRequest, ChatResult, wait_all
from engine.config import OpenAIOptions
from engine.errors import InfrastructureError
from engine.retry import RetryPolicy, call_with_retries, is_retryable_status, parse_retry_after

log = logging.getLogger(__name__)

LOCAL_KEY = "EMPTY"  # what local servers (vllm serve, llama.cpp) accept when they run without --api-key
FATAL_STATUS = (401, 403, 404)  # the endpoint, not the request, is wrong: see the module docstring
# Keywords OpenAI's strict structured outputs refuse; the stage validates lengths and counts itself.
_OPENAI_UNSUPPORTED = ("minLength", "maxLength", "minItems", "maxItems")
_SCHEMA_NAME = re.compile(r"[^A-Za-z0-9_-]")


class MalformedResponse(ValueError):
    """The server answered 2xx with something that is not a chat completion."""


@dataclass(slots=True)
class UsageCounters:
    """What one backend object sent and got back; summed over all `generate` calls."""

    requests: int = 0  # chat requests asked for (one per ChatRequest)
    attempts: int = 0  # HTTP attempts, retries included
    retries: int = 0
    failures: int = 0  # requests that ended with an error
    prompt_tokens: int = 0
    completion_tokens: int = 0


def strict_openai_schema(schema: Any) -> Any:
    """`schema` without the keywords OpenAI's strict mode rejects (recursively, a new object)."""
    if isinstance(schema, dict):
        return {k: strict_openai_schema(v) for k, v in schema.items() if k not in _OPENAI_UNSUPPORTED}
    if isinstance(schema, list):
        return [strict_openai_schema(v) for v in schema]
    return schema


def image_data_url(image: Any, *, quality: int = 90) -> str:
    """A PIL image as a base64 JPEG data URL, the form every OpenAI-compatible VLM server accepts."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIChat:
    """`ChatBackend` over the `openai` client; options are `engine.config.OpenAIOptions`."""

    def __init__(self, spec: BackendSpec) -> None:
        try:
            import openai
        except ImportError as exc:  # fail when the stage is built, not deep inside a run
            raise ImportError("the openai chat backend needs the `openai` package: pip install openai") from exc
        if not spec.model:
            raise ValueError("openai chat backend needs a model")
        self._openai = openai
        self.model_id = spec.model
        fields = OpenAIOptions.model_fields
        self.options = OpenAIOptions.model_validate({k: v for k, v in spec.options.items() if k in fields})
        opts = self.options
        key = os.environ.get(opts.api_key_env, "")
        if not key:
            if not opts.base_url:
                raise ValueError(
                    f"openai backend: environment variable {opts.api_key_env} is not set "
                    "(set it, or point base_url at a local server that needs no key)"
                )
            key = LOCAL_KEY
        self._secret = key if key != LOCAL_KEY else None
        self.client = openai.OpenAI(api_key=key, base_url=opts.base_url, timeout=opts.timeout_s, max_retries=0)
        self.endpoint = str(self.client.base_url).rstrip("/")
        self.policy = RetryPolicy(max_attempts=opts.max_retries + 1, base_delay=opts.backoff_base_s,
                                  max_delay=opts.backoff_max_s)
        self.counters = UsageCounters()
        self._lock = threading.Lock()
        self._sleep = time.sleep  # tests swap this for a recorder
        # One pool for the backend's life, not one per call: its threads are the requests in flight.
        self._pool = ThreadPoolExecutor(max_workers=opts.max_concurrency, thread_name_prefix="openai-chat")
        log.info("openai chat backend: model %s at %s (server %s, concurrency %d, timeout %.1fs, retries %d)",
                 self.model_id, self.endpoint, opts.server, opts.max_concurrency, opts.timeout_s, opts.max_retries)

    # -- public -----------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Requests in flight at once (`max_concurrency`)."""
        return self.options.max_concurrency

    def submit(self, request: ChatRequest) -> Future[ChatResult]:
        """Send one request (from any thread): it waits for one of the backend's `max_concurrency`
        connections, shared by every batch this worker holds, so requests stream across batch boundaries."""
        return self._pool.submit(self._one, request)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Results 1:1 and in order; at most `max_concurrency` requests in flight, counting those of other
        batches in flight in this worker."""
        futures = [self.submit(r) for r in requests]
        try:
            return wait_all(futures)
        except InfrastructureError:
            for f in futures:
                f.cancel()
            raise

    def close(self) -> None:
        """Let the requests in flight finish and stop the connection threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def usage(self) -> dict[str, int]:
        with self._lock:
            return asdict(self.counters)

    # -- one request ------------------------------------------------------------------------------------

    def _one(self, request: ChatRequest) -> ChatResult:
        self._count(requests=1)
        try:
            payload = self._payload(request)
        except Exception as exc:  # noqa: BLE001 - a request that cannot be built is that request's error
            return self._failed(f"bad request: {type(exc).__name__}: {exc}")
        try:
            body = call_with_retries(
                lambda: self._post(payload),
                policy=self.policy,
                is_retryable=self._is_retryable,
                retry_after=self._retry_after,
                sleep=self._sleep,
                on_retry=lambda *_: self._count(retries=1),
                describe=self._describe,
                what=f"chat request to {self.endpoint}",
            )
            result = self._parse(body)
        except self._openai.APITimeoutError:
            return self._failed(f"timed out after {self.policy.max_attempts} attempt(s) of {self.options.timeout_s}s")
        except self._openai.APIConnectionError as exc:
            raise InfrastructureError(f"cannot reach {self.endpoint}: {self._describe(exc)}") from None
        except self._openai.APIStatusError as exc:
            if exc.status_code in FATAL_STATUS:
                raise InfrastructureError(f"{self.endpoint} refused the request: {self._describe(exc)}") from None
            return self._failed(self._describe(exc))
        except MalformedResponse as exc:
            return self._failed(f"malformed response: {self._redact(str(exc))}")
        except self._openai.OpenAIError as exc:
            return self._failed(self._describe(exc))
        self._count(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        return result

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        opts = self.options
        messages: list[dict[str, Any]] = [dict(m) for m in request.messages]
        if request.image is not None:
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is None:
                raise ValueError("a request with an image needs a user message")
            text = messages[last_user]["content"]
            messages[last_user]["content"] = [
                {"type": "image_url", "image_url": {"url": image_data_url(request.image)}},
                {"type": "text", "text": text},
            ]
        payload: dict[str, Any] = {"model": self.model_id, "messages": messages, "temperature": request.temperature}
        # OpenAI deprecated max_tokens for max_completion_tokens; vLLM / llama.cpp know max_tokens everywhere.
        payload["max_completion_tokens" if opts.server == "openai" else "max_tokens"] = request.max_tokens
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.json_schema is not None:
            schema = strict_openai_schema(request.json_schema) if opts.server == "openai" else request.json_schema
            name = _SCHEMA_NAME.sub("_", str(request.json_schema.get("title", "entities")))[:64]
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            }
            if opts.server == "vllm":  # vLLM's own constrained decoding, with the full schema (lengths too)
                payload["extra_body"] = {"structured_outputs": {"json": request.json_schema}}
        return payload

    def _post(self, payload: dict[str, Any]) -> Any:
        self._count(attempts=1)
        # The raw response: the client would hand back a non-JSON body as a bare string, and build a
        # ChatCompletion without validating it; parsing the JSON here turns both into a clear error.
        raw = self.client.chat.completions.with_raw_response.create(**payload)
        try:
            return json.loads(raw.http_response.text)
        except ValueError as exc:
            raise MalformedResponse(f"body is not JSON ({exc}): {raw.http_response.text[:200]!r}") from None

    def _parse(self, body: Any) -> ChatResult:
        if not isinstance(body, dict):
            raise MalformedResponse(f"expected a JSON object, got {type(body).__name__}")
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise MalformedResponse(f"no choices in the response (keys: {sorted(body)[:10]})")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise MalformedResponse("choices[0] has no message")
        content = message.get("content")
        if content is None and message.get("refusal"):
            raise MalformedResponse(f"the model refused: {str(message['refusal'])[:200]}")
        if not isinstance(content, (str, type(None))):
            raise MalformedResponse(f"message content is {type(content).__name__}, not text")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return ChatResult(
            text=content or "",
            finish_reason=choices[0].get("finish_reason"),
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
        )

    # -- retry decisions --------------------------------------------------------------------------------

    def _is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, self._openai.APIConnectionError):  # timeouts included
            return True
        return isinstance(exc, self._openai.APIStatusError) and is_retryable_status(exc.status_code)

    def _retry_after(self, exc: BaseException) -> float | None:
        response = getattr(exc, "response", None)
        if response is None:
            return None
        ms = response.headers.get("retry-after-ms")
        if ms is not None:
            seconds = parse_retry_after(ms)
            if seconds is not None:
                return seconds / 1000
        return parse_retry_after(response.headers.get("retry-after"))

    # -- bookkeeping ------------------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    def _failed(self, message: str) -> ChatResult:
        self._count(failures=1)
        return ChatResult(text="", error=self._redact(message))

    def _describe(self, exc: BaseException) -> str:
        """An error for logs and rows: status and the server's message, never the key."""
        status = getattr(exc, "status_code", None)
        text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        label = f"HTTP {status}" if status is not None else type(exc).__name__
        return self._redact(f"{label}: {text}"[:500])

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
