"""Baselines on the LCLM's own decoder: full context (the raw text as ordinary tokens) and
KV-cache compression with presses from the `kvpress` package at the matched ratio
1 - 1/N (the share of the context's KV pairs removed when an LCLM compresses 1:N).

Each press is registered in PRESSES; the prompt is a question prompt of the LCLM's
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
    """name -> kvpress press class (imported lazily: kvpress pulls in datasets and pandas)."""
    from kvpress import ExpectedAttentionPress, KnormPress, KVzipPress, SnapKVPress, StreamingLLMPress

    return {"snapkv": SnapKVPress, "kvzip": KVzipPress, "expected_attention": ExpectedAttentionPress,
            "knorm": KnormPress, "streaming_llm": StreamingLLMPress}


PRESSES = ("snapkv", "kvzip", "expected_attention", "knorm", "streaming_llm")


def matched_ratio(compression_ratio: int) -> float:
    """The share of KV pairs a press removes to match an LCLM at 1:N."""
    return 1.0 - 1.0 / compression_ratio


def make_press(name: str, compression_ratio: int):
    if name not in PRESSES:
        raise ValueError(f"press must be one of {PRESSES}, got {name!r}")
    press = press_classes()[name](compression_ratio=matched_ratio(compression_ratio))
    if name == "snapkv":
        press.window_size = min(press.window_size, 16)  # its observation window must fit short contexts
    return press


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
    out = pipe(context, question=rest, press=press, max_new_tokens=max_new_tokens)
    context_tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    kept = context_tokens if press is None else round(context_tokens * (1 - press.compression_ratio))
    question_tokens = len(tokenizer(rest, add_special_tokens=False)["input_ids"])
    return BaselineAnswer(out["answer"], context_tokens, kept + question_tokens)
