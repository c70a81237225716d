"""The measured methods, one small class each, registered in METHODS.

Every method answers the same question about the same document (random token ids), through
the app's own code where the app has it, and fills one `app.measure.Measurement` per request:

- full:         the decoder prefills the whole prompt with the document as ordinary tokens.
- lclm:         cold latents: encoder + adapter (`LCLM.compress`, timed as compress_ms), then
                `LCLM.prepare` + `prefill`, as `Studio.ask` does.
- lclm_cached:  latents from the cache: they are moved to the device (other_ms, as a cache hit
                in `Studio.compress`), compress_ms is 0 and TTFT is the decoder prefill only.
- full_followup: a follow-up question about the same document, as Studio.ask answers it with
                the prefix cache: the KV of the prompt up to the question is there (computed
                untimed), the decoder prefills only the question after it (`fork_cache`).
- lclm_followup: the same for the LCLM: the prefix holds the memory region of the latents.
- question_only: the question's tokens prefilled alone, with no document before them: the
                floor a follow-up question's prefill can approach.
- snapkv/kvzip/attention_matching: presses at the matched ratio 1 - 1/N (`model.baselines.make_press`),
                applied as kvpress's pipeline does: the context (instruction + document) is
                prefilled with the press (timed as compress_ms: it builds and compresses the KV
                cache), then the question is prefilled over the compressed cache (prefill_ms).
- quantized_4bit/quantized_2bit: the same path with a quantized cache (every position kept);
                KV bytes as stored (bits, scales, float residual) after the question.

TTFT parts follow app/measure.py: compress, prefill (prompt building and decoder forward),
first token (picking and detokenizing it); the chat template and the latent move are other_ms.
Generation ignores stop tokens so that every request decodes the same number of tokens.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from app.measure import Clock, Measurement, PeakMemory, kv_cache_bytes
from bench.speed.rigs import QUESTION, Rig
from model.generation import StreamingDetokenizer, decode, fork_cache, prefill
from model.lclm import LCLM
from model.prompts import question_prompt

KVZIP_REPLAY_TOKENS = 2048 + 32  # kvzip replays the context in chunks of 2048 tokens after a short prompt


@dataclass
class Case:
    """One document at one ratio."""

    tokens: int  # T, document length in tokens
    ratio: int | None  # N (None for full context)
    doc: list[int]  # [T] token ids
    latents: torch.Tensor | None = None  # [M, D] on the CPU: the latent cache for lclm_cached
    prefix: object = None  # DynamicCache of the prompt up to the question, for the follow-up methods


class Method:
    name = ""
    label = ""
    uses_ratio = True
    prefills_context = False  # True: the decoder prefills the whole document (full context, presses)

    def positions_needed(self, rig: Rig, tokens: int, ratio: int | None, new_tokens: int) -> int:
        """The largest decoder position this request reaches."""
        return len(rig.before) + tokens + len(rig.after) + new_tokens

    def prepare(self, rig: Rig, case: Case) -> None:
        """Untimed set-up before a request (e.g. filling the latent cache)."""

    def run(self, rig: Rig, case: Case, clock: Clock, m: Measurement, new_tokens: int) -> None:
        raise NotImplementedError


def stream(rig: Rig, tokenizer, state, clock: Clock, m: Measurement, new_tokens: int, prefill_done_ms: float) -> None:
    """Decode `new_tokens` tokens as Studio._generate does, recording the first token's time."""
    detok = StreamingDetokenizer(tokenizer)
    for token in decode(rig.decoder, state, new_tokens, stop_ids=set()):
        detok.push(token)
        if m.new_tokens == 0:
            m.ttft_ms = clock.ms()
            m.first_token_ms = m.ttft_ms - prefill_done_ms
        m.new_tokens += 1


class FullContext(Method):
    name, label, uses_ratio, prefills_context = "full", "full context", False, True

    def run(self, rig, case, clock, m, new_tokens):
        start = clock.ms()
        ids = torch.tensor([rig.before + case.doc + rig.after], device=rig.device)  # [1, P]
        embeds = rig.decoder.get_input_embeddings()(ids)  # [1, P, D]
        state = prefill(rig.decoder, embeds)
        done = clock.ms()
        m.prefill_ms, m.positions = done - start, state.positions
        stream(rig, rig.any_lclm.decoder_tokenizer, state, clock, m, new_tokens, done)


class LCLMCold(Method):
    name, label = "lclm", "LCLM (cold)"

    def positions_needed(self, rig, tokens, ratio, new_tokens):
        latents = rig.lclms[ratio].count_latents(tokens)
        return len(rig.before) + latents + 2 + len(rig.after) + new_tokens

    def run(self, rig, case, clock, m, new_tokens):
        lclm = rig.lclms[case.ratio]
        start = clock.ms()
        latents = lclm.compress(case.doc)  # [M, dec_hidden]
        m.compress_ms = clock.ms() - start
        answer_from_latents(rig, lclm, latents, clock, m, new_tokens)


class LCLMCached(LCLMCold):
    name, label = "lclm_cached", "LCLM (cached latents)"

    def prepare(self, rig, case):
        if case.latents is None:
            case.latents = rig.lclms[case.ratio].compress(case.doc).cpu()  # [M, D]: what the latent cache holds

    def run(self, rig, case, clock, m, new_tokens):
        lclm = rig.lclms[case.ratio]
        latents = case.latents.to(device=lclm.device, dtype=lclm.dtype)  # a cache hit, as in Studio.compress
        answer_from_latents(rig, lclm, latents, clock, m, new_tokens)


class FollowUp(Method):
    """A follow-up question: the prompt prefix's KV is kept (computed in `prepare`, untimed); the
    decoder prefills the question's tokens after it, as Studio.ask does on a prefix-cache hit."""

    def prefix_embeds(self, rig: Rig, case: Case) -> torch.Tensor:
        """[1, L, D] embeddings of the prompt up to the question."""
        raise NotImplementedError

    def prepare(self, rig, case):
        if case.prefix is None:
            case.prefix = prefill(rig.decoder, self.prefix_embeds(rig, case)).cache

    def run(self, rig, case, clock, m, new_tokens):
        start = clock.ms()
        ids = torch.tensor([rig.after], device=rig.device)  # [1, Q]
        state = prefill(rig.decoder, rig.decoder.get_input_embeddings()(ids), fork_cache(case.prefix))
        done = clock.ms()
        m.prefill_ms, m.positions = done - start, state.positions
        m.prefix_reused_positions, m.prefill_positions = state.positions - ids.shape[1], ids.shape[1]
        stream(rig, rig.any_lclm.decoder_tokenizer, state, clock, m, new_tokens, done)


class FullFollowUp(FollowUp):
    name, label, uses_ratio = "full_followup", "full context, follow-up", False

    def prefix_embeds(self, rig, case):
        ids = torch.tensor([rig.before + case.doc], device=rig.device)  # [1, L]
        return rig.decoder.get_input_embeddings()(ids)


class LCLMFollowUp(FollowUp):
    name, label = "lclm_followup", "LCLM, follow-up"

    def positions_needed(self, rig, tokens, ratio, new_tokens):
        return LCLMCold.positions_needed(self, rig, tokens, ratio, new_tokens)

    def prefix_embeds(self, rig, case):
        lclm = rig.lclms[case.ratio]
        latents = lclm.compress(case.doc)  # [M, D]
        prompt = lclm.chat(question_prompt(lclm.memory_region(int(latents.shape[0])), QUESTION))
        prepared = lclm.prepare(prompt, [latents])  # [1, P, D]
        return prepared.inputs_embeds[:, : prepared.positions - len(rig.after)]  # up to the question: [1, L, D]


class QuestionOnly(Method):
    name, label, uses_ratio = "question_only", "question only (no document)", False

    def positions_needed(self, rig, tokens, ratio, new_tokens):
        return len(rig.after) + new_tokens

    def run(self, rig, case, clock, m, new_tokens):
        start = clock.ms()
        ids = torch.tensor([rig.after], device=rig.device)  # [1, Q]
        state = prefill(rig.decoder, rig.decoder.get_input_embeddings()(ids))
        done = clock.ms()
        m.prefill_ms, m.positions = done - start, state.positions
        stream(rig, rig.any_lclm.decoder_tokenizer, state, clock, m, new_tokens, done)


def answer_from_latents(rig: Rig, lclm: LCLM, latents: torch.Tensor, clock: Clock, m: Measurement,
                        new_tokens: int) -> None:
    prompt = lclm.chat(question_prompt(lclm.memory_region(int(latents.shape[0])), QUESTION))
    start = clock.ms()
    prepared = lclm.prepare(prompt, [latents])
    state = prefill(lclm.decoder, prepared.inputs_embeds)
    done = clock.ms()
    m.prefill_ms, m.positions = done - start, prepared.positions
    m.extra["latents"] = int(latents.shape[0])
    stream(rig, lclm.decoder_tokenizer, state, clock, m, new_tokens, done)


class Press(Method):
    """A kvpress press at the matched ratio, applied the way KVPressTextGenerationPipeline does."""

    prefills_context = True

    def run(self, rig, case, clock, m, new_tokens):
        from model.baselines import kept_positions, make_press, new_cache, stored_kv_bytes

        decoder = rig.decoder
        press = make_press(self.name, case.ratio)
        start = clock.ms()
        context = torch.tensor([rig.before + case.doc], device=rig.device)  # [1, C]
        cache = new_cache(press, decoder.config)
        with press(decoder):
            decoder.model(input_ids=context, past_key_values=cache)
        m.compress_ms = clock.ms() - start
        start = clock.ms()
        length, asked = context.shape[1], len(rig.after)
        question = torch.tensor([rig.after], device=rig.device)  # [1, Q]
        positions = torch.arange(length, length + asked, device=rig.device)[None]  # [1, Q], after the full context
        logits = decoder(input_ids=question, past_key_values=cache, position_ids=positions, logits_to_keep=1).logits
        done = clock.ms()
        m.prefill_ms = done - start
        kept = kept_positions(press, length)  # kvpress's accounting, as in model.baselines
        m.positions = kept + asked
        m.extra["kv_positions_held"] = cache.get_seq_length()
        stored = stored_kv_bytes(press, cache)
        if stored is not None:
            m.extra["kv_stored_bytes"] = stored
        detok = StreamingDetokenizer(rig.any_lclm.decoder_tokenizer)
        position = length + asked
        for step in range(new_tokens):  # greedy, with the uncompressed positions, as kvpress's pipeline
            token = int(logits[0, -1].argmax())
            detok.push(token)
            if step == 0:
                m.ttft_ms = clock.ms()
                m.first_token_ms = m.ttft_ms - done
            m.new_tokens += 1
            if step + 1 < new_tokens:
                ids = torch.tensor([[token]], device=rig.device)
                logits = decoder(input_ids=ids, past_key_values=cache, position_ids=torch.tensor([[position]], device=rig.device)).logits
                position += 1


class SnapKV(Press):
    name, label = "snapkv", "SnapKV (kvpress)"


class KVzip(Press):
    name, label = "kvzip", "KVzip (kvpress)"

    def positions_needed(self, rig, tokens, ratio, new_tokens):
        return max(super().positions_needed(rig, tokens, ratio, new_tokens),
                   len(rig.before) + tokens + KVZIP_REPLAY_TOKENS)


class AttentionMatching(Press):
    name, label = "attention_matching", "Attention Matching"


class Quantized4(Press):
    name, label, uses_ratio = "quantized_4bit", "KV quantized 4-bit", False


class Quantized2(Press):
    name, label, uses_ratio = "quantized_2bit", "KV quantized 2-bit", False


METHODS: dict[str, Method] = {cls.name: cls() for cls in (FullContext, LCLMCold, LCLMCached, FullFollowUp, LCLMFollowUp,
                                                            QuestionOnly, SnapKV, KVzip, AttentionMatching, Quantized4,
                                                            Quantized2)}


# ---- one request ------------------------------------------------------------------------
def settle(device: torch.device) -> None:
    """Free what earlier requests left, so that each starts from the weights alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        release_freed_memory()


def release_freed_memory() -> None:
    """glibc keeps freed heap pages in the process; hand them back so that RSS (the CPU peak-memory
    measure) starts each request from live memory only."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quiet_kvpress() -> None:
    logging.getLogger("kvpress").setLevel(logging.ERROR)


@torch.inference_mode()
def measure(rig: Rig, method: Method, case: Case, new_tokens: int) -> Measurement:
    """One request, timed and measured as Studio.ask measures an answer."""
    method.prepare(rig, case)
    settle(rig.device)
    m = Measurement(device=str(rig.device))
    clock = Clock(rig.device)
    with PeakMemory(rig.device) as memory:
        method.run(rig, case, clock, m, new_tokens)
    total_ms = clock.ms()
    m.peak_mem_bytes = memory.peak
    m.peak_mem_above_weights_bytes = memory.above_baseline
    m.kv_cache_bytes = m.extra.get("kv_stored_bytes") or kv_cache_bytes(rig.decoder.config, m.positions, rig.dtype)
    m.finish(total_ms)
    return m
