"""Recaption: a vision-language model turns the noisy web caption into a detailed description (DetCLIPv3).

`passthrough` keeps the raw caption (the GLIP path). Empty outputs become per-sample rejections.
"""

from __future__ import annotations

import json

from engine.backends.base import (
    BackendSpec,
    ChatBackend,
    ChatRequest,
    chat_backend_options,
    make_chat_backend,
    usage_of,
)
from engine.config import RecaptionSpec
from engine.images import open_rgb
from engine.models.loading import model_label
from engine.prompts import load_prompt
from engine.records import Record
from engine.stages.base import Stage


class Recaption(Stage):
    name = "recaption"
    requires = ("image", "raw_caption")
    provides = ("caption",)

    def __init__(self, spec: RecaptionSpec, *, cache_dir: str | None = None) -> None:
        super().__init__(spec)
        self.cache_dir = cache_dir
        self.prompt = load_prompt(spec.prompt) if spec.backend != "passthrough" else None
        self.system = load_prompt("system") if spec.backend != "passthrough" else None
        self.backend: ChatBackend | None = None
        self._params = {"max_tokens": spec.max_tokens, "temperature": spec.temperature,
                        "image_max_side": spec.image_max_side}

    def setup(self) -> None:
        spec: RecaptionSpec = self.spec
        if spec.backend == "passthrough":
            return
        options = chat_backend_options(spec, self.cache_dir)
        self.backend = make_chat_backend(spec.backend, BackendSpec(model=spec.model, options=options))

    def process(self, records: list[Record]) -> None:
        spec: RecaptionSpec = self.spec
        if spec.backend == "passthrough":
            for record in records:
                record.caption = record.raw_caption
                record.stamp(self.name, "passthrough")
            return
        assert self.backend is not None and self.prompt is not None and self.system is not None
        requests = []
        for record in records:
            image = open_rgb(record.image)
            image.thumbnail((spec.image_max_side, spec.image_max_side))
            requests.append(
                ChatRequest(
                    messages=[
                        {"role": "system", "content": self.system.template},
                        {"role": "user", "content": self.prompt.render(caption=record.raw_caption or "")},
                    ],
                    image=image,
                    max_tokens=spec.max_tokens,
                    temperature=spec.temperature,
                )
            )
        results = self.backend.generate(requests)
        for record, result in zip(records, results, strict=True):
            record.stamp(
                self.name,
                spec.backend,
                model=model_label(spec.model),
                prompt_id=self.prompt.id,
                prompt_sha256=self.prompt.sha256,
                params=json.dumps(self._params | {"usage": usage_of([result])}, sort_keys=True),
            )
            if result.error:
                record.fail(self.name, "backend_error", result.error)
            elif not result.text.strip():
                record.reject(self.name, "empty_output", "the model returned an empty description")
            else:
                record.caption = result.text.strip()
