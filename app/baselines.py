"""Methods answered side by side with the LCLM, streaming: the full-context decoder and the
KV-cache compression presses of model.baselines (kvpress, an optional package), at the
matched ratio 1 - 1/N.

Each method is a small class in BASELINES; `unavailable()` says why one cannot run (for
example "kvpress not installed") and `ask()` streams `AskEvent`s like `Studio.ask`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from app.catalog import Variant
from app.measure import Clock, Measurement, PeakMemory, kv_cache_bytes
from app.kv_cache import PrefixEntry, PrefixKey
from app.service import AskEvent, Studio, guard_stream
from cache import document_sha256
from model.baselines import (PRESSES, QUANTIZED_BITS, QUESTION_MARK, kept_positions, make_press, new_cache,
                             stored_kv_bytes)
from model.errors import UserError
from model.generation import StreamingDetokenizer, fork_cache, stop_token_ids

KVPRESS_MISSING = "kvpress not installed (pip install kvpress)"
QUANTO_MISSING = "optimum-quanto not installed (pip install optimum-quanto --no-deps)"


class Baseline:
    name: str = ""

    def unavailable(self) -> str | None:
        """Why this method cannot run here, or None."""
        return None

    def ask(self, studio: Studio, text: str, question: str, variant: Variant,
            max_new_tokens: int | None, prompt_profile: str | None = None) -> Iterator[AskEvent]:
        """`prompt_profile`: the question's layout, as in `Studio.ask` (None: the checkpoint's default)."""
        raise NotImplementedError


class FullContext(Baseline):
    """The same decoder reading the raw text."""

    name = "full context"

    def ask(self, studio, text, question, variant, max_new_tokens, prompt_profile=None):
        return studio.ask(text, question, "full", variant.ratio, variant.pooling, variant.spec, max_new_tokens,
                          prompt_profile=prompt_profile)


@dataclass(frozen=True)
class KVPress(Baseline):
    """A kvpress press (model.baselines) over the decoder's KV cache of the raw text, at the
    matched ratio; the question stays uncompressed."""

    press: str  # a name in model.baselines.PRESSES, e.g. "snapkv"

    @property
    def name(self) -> str:
        return f"kvpress {self.press}"

    def unavailable(self) -> str | None:
        if not importlib.util.find_spec("kvpress"):
            return KVPRESS_MISSING
        if self.press in QUANTIZED_BITS and not importlib.util.find_spec("optimum.quanto"):
            return QUANTO_MISSING
        return None

    def ask(self, studio, text, question, variant, max_new_tokens, prompt_profile=None):
        reason = self.unavailable()
        if reason:
            raise UserError(reason)
        return guard_stream(kvpress_answer(studio, self.press, text, question, variant,
                                           max_new_tokens or studio.settings.max_new_tokens, prompt_profile))


def split_chat_prompt(model, text: str, question: str, profile) -> tuple[torch.Tensor, torch.Tensor]:
    """The chat prompt of a question over `text` (as the full-context answer reads it, in `profile`'s
    layout), cut after the document: ([1, C] context ids, compressed by the press; [1, Q] question ids, kept)."""
    context, rest = model.chat(profile.question(text + QUESTION_MARK, question)).split(QUESTION_MARK)
    tokenize = model.decoder_tokenizer
    context_ids = tokenize(context, add_special_tokens=False, return_tensors="pt")["input_ids"]
    rest_ids = tokenize(rest, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return context_ids.to(model.device), rest_ids.to(model.device)


@torch.inference_mode()
def kvpress_answer(studio: Studio, press_name: str, text: str, question: str, variant: Variant,
                   max_new_tokens: int, prompt_profile: str | None = None) -> Iterator[AskEvent]:
    """As kvpress's own pipeline (and bench/speed): the context is prefilled under the press
    (compress_ms), the question over the compressed cache at its uncompressed positions
    (prefill_ms), then greedy decoding; positions = KV pairs kept + the question. The compressed
    context does not depend on the question, so it is kept in the studio's prefix cache and a
    follow-up question about the same document starts from it (compress_ms 0)."""
    model = studio.model(variant.spec, variant.ratio, variant.pooling)
    profile = studio.prompt_profile(model, prompt_profile)
    document = studio.tokenize(model, text)
    decoder, device = model.decoder, model.device
    measurement = Measurement(device=str(device))
    clock = Clock(device)
    with PeakMemory(device) as memory:
        context_ids, question_ids = split_chat_prompt(model, text, question, profile)  # [1, C], [1, Q]
        context_len, question_len = context_ids.shape[1], question_ids.shape[1]
        if model.max_positions and context_len + question_len + max_new_tokens > model.max_positions:
            raise UserError(f"the prompt needs {context_len + question_len:,} decoder positions plus {max_new_tokens} "
                            f"new tokens; this decoder reads at most {model.max_positions:,}")
        press = make_press(press_name, variant.ratio, residual_length=studio.settings.kv_residual_length)
        start = clock.ms()
        key = PrefixKey(document_sha256(text), model.checkpoint_id, f"kvpress {press_name}", variant.ratio, None,
                        str(model.dtype).removeprefix("torch."), str(device), profile.name)
        # a press with a cache of its own (quantization) changes it in place: not kept for follow-ups
        reusable = studio.prefix_cache.enabled and not hasattr(press, "new_cache")
        entry = studio.prefix_cache.get(key) if reusable else None
        if entry is not None and torch.equal(entry.ids, context_ids[0].cpu()):
            cache = fork_cache(entry.cache)  # the compressed context of an earlier question
            measurement.prefix_reused_positions = cache.get_seq_length()
        else:
            cache = new_cache(press, decoder.config)
            with press(decoder):
                decoder.model(input_ids=context_ids, past_key_values=cache)
            measurement.prefill_positions = context_len
            if reusable:
                studio.prefix_cache.put(key, PrefixEntry(context_ids[0].cpu().clone(), cache))
                cache = fork_cache(cache)
        measurement.compress_ms = clock.ms() - start
        measurement.prefill_positions += question_len
        start = clock.ms()
        positions = torch.arange(context_len, context_len + question_len, device=device)[None]  # [1, Q]
        logits = decoder(input_ids=question_ids, past_key_values=cache, position_ids=positions,
                         logits_to_keep=1).logits[0, -1]  # [vocab]
        prefill_done = clock.ms()
        measurement.prefill_ms = prefill_done - start
        stored = stored_kv_bytes(press, cache)  # quantized: the context and question as stored (bits, scales, residual)
        detok = StreamingDetokenizer(model.decoder_tokenizer)
        stops = stop_token_ids(model.decoder_tokenizer, decoder)
        next_position = context_len + question_len
        for step in range(max_new_tokens):
            token = int(logits.argmax())
            if token in stops:
                break
            piece = detok.push(token)
            measurement.new_tokens += 1
            if measurement.ttft_ms == 0.0:
                measurement.ttft_ms = clock.ms()
                measurement.first_token_ms = measurement.ttft_ms - prefill_done
            if piece:
                yield AskEvent("token", text=piece)
            if step + 1 < max_new_tokens:
                ids = torch.tensor([[token]], device=device)
                logits = decoder(input_ids=ids, past_key_values=cache,
                                 position_ids=torch.tensor([[next_position + step]], device=device)).logits[0, -1]
        if measurement.ttft_ms == 0.0:  # stopped at once: TTFT is the end of the prefill
            measurement.ttft_ms = clock.ms()
    kept = kept_positions(press, context_len)  # kvpress's accounting, as in model.baselines
    measurement.positions = kept + question_len
    measurement.peak_mem_bytes = memory.peak
    measurement.peak_mem_above_weights_bytes = memory.above_baseline
    measurement.kv_cache_bytes = kv_cache_bytes(decoder.config, measurement.positions, model.dtype)
    if stored is not None:
        measurement.kv_cache_bytes = stored
    measurement.finish(clock.ms())
    yield AskEvent("done", result={
        "answer": detok.text.strip(), "mode": f"kvpress {press_name}", "question": question, "ratio": variant.ratio,
        "pooling": None, "checkpoint": model.checkpoint_id, "prompt_profile": profile.name, "tokens": len(document),
        "latents": 0, "cached": False,
        "trained": True, **measurement.to_dict(), "prefilled_positions": context_len + question_len,
        "press_ratio": round(press.compression_ratio, 4), **studio.dtype_choice().to_dict(),
    })


BASELINES: dict[str, Baseline] = {b.name: b for b in (FullContext(), *(KVPress(name) for name in PRESSES))}
KVPRESS_CHOICES = [name for name, b in BASELINES.items() if isinstance(b, KVPress)]
