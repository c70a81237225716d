"""Streaming generation from prepared input embeddings, split into prefill and decode steps
so that callers can time each part (see app/engine/measure.py)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0 (the default, as in the authors' evaluation)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling settings: {self}")


# The authors' example decoding settings.
REFERENCE_SAMPLING = Sampling(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1)


@dataclass
class PrefillState:
    cache: DynamicCache
    logits: torch.Tensor  # [vocab] next-token logits after the prompt
    positions: int  # positions the prompt occupies: the next token's position. A press's cache holds fewer
    # entries than that (it dropped some), and the tokens after it keep their uncompressed positions.


def position_ids(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device)[None]  # [1, length]


@torch.inference_mode()
def prefill(decoder: nn.Module, inputs_embeds: torch.Tensor, cache: DynamicCache | None = None,
            start: int | None = None) -> PrefillState:
    """One forward over the prompt, or over the rest of it after `cache` (the KV of the prompt's
    first positions, which the new positions follow from `start`: by default the cache's length).
    inputs_embeds: [1, P, D]."""
    cache = cache if cache is not None else DynamicCache(config=decoder.config)
    start = cache.get_seq_length() if start is None else start
    length = inputs_embeds.shape[1]
    out = decoder(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True, logits_to_keep=1,
                  position_ids=position_ids(start, length, inputs_embeds.device))
    return PrefillState(cache=out.past_key_values, logits=out.logits[0, -1].float(), positions=start + length)


def fork_cache(cache: DynamicCache) -> DynamicCache:
    """A cache that starts as `cache` and then grows on its own, leaving `cache` as it was. Its
    layers share `cache`'s tensors: DynamicCache never writes them in place, it concatenates new
    positions into new tensors."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked


def _pick(logits: torch.Tensor, seen: list[int], sampling: Sampling, generator: torch.Generator) -> int:
    """logits: [vocab] -> next token id."""
    if sampling.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        picked = logits[idx]
        logits = logits.clone()
        logits[idx] = torch.where(picked > 0, picked / sampling.repetition_penalty,
                                  picked * sampling.repetition_penalty)
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def decode(
    decoder: nn.Module,
    state: PrefillState,
    max_new_tokens: int,
    stop_ids: set[int],
    sampling: Sampling = Sampling(),
) -> Iterator[int]:
    """Yields generated token ids one by one; the first comes from the prefill's logits. Each new
    token takes the position after the last (from `state.positions`), whatever the cache holds.
    Every answer method of the studio and the benchmarks decodes here."""
    generator = torch.Generator().manual_seed(sampling.seed)
    logits, cache, generated = state.logits, state.cache, []
    device = next(decoder.parameters()).device
    for step in range(max_new_tokens):
        token = _pick(logits, generated, sampling, generator)
        if token in stop_ids:
            return
        generated.append(token)
        yield token
        if step + 1 == max_new_tokens:
            return
        out = decoder(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True,
                      position_ids=position_ids(state.positions + step, 1, device))
        logits, cache = out.logits[0, -1].float(), out.past_key_values


def stop_token_ids(tokenizer, decoder: nn.Module) -> set[int]:
    """End-of-turn ids: the tokenizer's eos, the model's eos ids and `<|im_end|>` where present."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(decoder.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.add(im_end)
    return ids


SENTENCE_END = re.compile(r"[.!?\n]")


class RepetitionGuard:
    """Whether a reply has begun to loop: a sentence it completes (at least `min_chars` letters,
    compared without case and spacing) equal to one it completed before. Greedy decoding of a
    small decoder can repeat a sentence until its token limit; the studio stops there."""

    def __init__(self, min_chars: int = 12):
        self.min_chars = min_chars
        self.seen: set[str] = set()
        self.start = 0  # where the next sentence of the text starts

    def repeated(self, text: str) -> bool:
        """Feed the whole reply so far; True once its latest complete sentence is a repeat."""
        while (end := SENTENCE_END.search(text, self.start)) is not None:
            sentence = " ".join(text[self.start:end.end()].split()).lower()
            self.start = end.end()
            if len(sentence) < self.min_chars:
                continue
            if sentence in self.seen:
                return True
            self.seen.add(sentence)
        return False


class StreamingDetokenizer:
    """Turns a growing list of token ids into text increments without splitting characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def flush(self) -> str:
        """The text still held back at the end of a stream (an incomplete character, shown as U+FFFD)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.text = text[len(self.text) :], text
        return delta
