"""Baselines on the LCLM's own decoder: full context (the raw text as ordinary tokens) and
KV-cache compression with presses from the `kvpress` package at the matched ratio
1 - 1/N (the share of the context's KV pairs removed when an LCLM compresses 1:N).

Each press is registered in PRESSES, beside two of our own with the same shape: Attention
Matching compaction (model.attention_matching) and KV-cache quantization at 4 and 2 bits
(model.quantized_cache: every position kept, fewer bits each; it brings its own cache); the prompt is a question prompt of the LCLM's
(`question_prompt` unless one is given, e.g. a profile's), split so that the document (with
any instruction before it) is the compressed context and the question stays uncompressed,
as in kvpress's own pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.prompts import question_prompt

QUESTION_MARK = "\x00QUESTION\x00"


def press_classes() -> dict[str, type]:
    """name -> press class taking compression_ratio (imported lazily: kvpress pulls in datasets and pandas)."""
    from kvpress import ExpectedAttentionPress, KnormPress, KVzipPress, SnapKVPress, StreamingLLMPress

    from model.attention_matching import AttentionMatchingPress

    return {"snapkv": SnapKVPress, "kvzip": KVzipPress, "expected_attention": ExpectedAttentionPress,
            "knorm": KnormPress, "streaming_llm": StreamingLLMPress, "attention_matching": AttentionMatchingPress}


QUANTIZED_BITS = {"quantized_4bit": 4, "quantized_2bit": 2}  # name -> bits: no ratio, every position kept
PRESSES = ("snapkv", "kvzip", "expected_attention", "knorm", "streaming_llm", "attention_matching",
           *QUANTIZED_BITS)


def matched_ratio(compression_ratio: int) -> float:
    """The share of KV pairs a press removes to match an LCLM at 1:N."""
    return 1.0 - 1.0 / compression_ratio


def make_press(name: str, compression_ratio: int, residual_length: int | None = None):
    """The press `name` at the matched ratio for 1:N; the quantized caches take no ratio, and keep
    their newest `residual_length` positions in float (None: model.quantized_cache's default)."""
    if name not in PRESSES:
        raise ValueError(f"press must be one of {PRESSES}, got {name!r}")
    if name in QUANTIZED_BITS:
        from model.quantized_cache import QuantizedKV

        if residual_length is None:
            return QuantizedKV(bits=QUANTIZED_BITS[name])
        return QuantizedKV(bits=QUANTIZED_BITS[name], residual_length=residual_length)
    if not isinstance(compression_ratio, int) or compression_ratio < 1:
        raise ValueError(f"the compression ratio N (1:N) must be a whole number of at least 1, got {compression_ratio!r}")
    press = press_classes()[name](compression_ratio=matched_ratio(compression_ratio))
    if name == "snapkv":
        press.window_size = min(press.window_size, 16)  # its observation window must fit short contexts
    return press


def new_cache(press, config):
    """The cache a press's context is prefilled into: its own (quantization) or a DynamicCache."""
    from transformers import DynamicCache

    return press.new_cache(config) if hasattr(press, "new_cache") else DynamicCache(config=config)


def kept_positions(press, context_tokens: int) -> int:
    """KV positions a press keeps of the context (kvpress's accounting unless the press says)."""
    if press is None:
        return context_tokens
    if hasattr(press, "kept_positions"):
        return press.kept_positions(context_tokens)
    return round(context_tokens * (1 - press.compression_ratio))


def stored_kv_bytes(press, cache) -> int | None:
    """Bytes the cache stores when a press stores entries other than as float (quantization), else None."""
    return press.stored_bytes(cache) if hasattr(press, "stored_bytes") else None


@dataclass
class BaselineAnswer:
    answer: str
    context_tokens: int
    positions: int  # KV positions the decoder keeps for the context after compression, plus the question


def split_prompt(text: str, question: str, prompt: Callable[[str, str], str] = question_prompt) -> tuple[str, str]:
    """(context, question part) of `prompt(text, question)`: their concatenation is that prompt."""
    marked = prompt(text + QUESTION_MARK, question)
    context, rest = marked.split(QUESTION_MARK)
    return context, rest


@torch.inference_mode()
def press_answer(decoder, tokenizer, text: str, question: str, press_name: str | None, compression_ratio: int = 1,
                 max_new_tokens: int = 32, prompt: Callable[[str, str], str] = question_prompt) -> BaselineAnswer:
    """Greedy answer of the decoder over the raw text, its context KV cache compressed by a
    press at 1 - 1/N (press_name None: no compression, i.e. full context)."""
    from kvpress import KVPressTextGenerationPipeline

    pipe = KVPressTextGenerationPipeline(model=decoder, tokenizer=tokenizer, device=decoder.device)
    context, rest = split_prompt(text, question, prompt)
    press = make_press(press_name, compression_ratio) if press_name else None
    cache = new_cache(press, decoder.config) if press is not None else None
    out = pipe(context, question=rest, press=press, max_new_tokens=max_new_tokens, cache=cache)
    context_tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    kept = kept_positions(press, context_tokens)
    question_tokens = len(tokenizer(rest, add_special_tokens=False)["input_ids"])
    return BaselineAnswer(out["answer"], context_tokens, kept + question_tokens)
