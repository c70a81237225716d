"""The measured methods: each is an answer method of the studio's registry (app/engine/methods.py) in
one scenario, run through `Studio.run` exactly as the studio answers, on a document of random
token ids (`DocumentIds.from_ids`):

- cold:     nothing cached: full context prefills the whole prompt; the LCLM runs the encoder +
            adapter (compress_ms) and then the decoder prefill; a press prefills the context
            under the press (compress_ms) and then the question over the pressed cache.
- cached:   the LCLM's latents come from the latent cache (an untimed first request filled it):
            compress_ms is 0 and the cache read is other_ms.
- followup: a second question about the same document: an untimed first request filled the
            prefix cache (and the latent cache), so the decoder prefills only the question.

One reference is not a studio method: `question_only`, the question's tokens prefilled alone
with no document before them, the floor a follow-up's prefill can approach; it runs through the
same shared prefill, decode and `Meter`. Generation ignores stop tokens (`stop_at_end` off) so
that every request decodes the same number of tokens. TTFT parts follow app/engine/measure.py.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from functools import cached_property

import torch

from app.engine.latent_store import DocumentIds
from app.engine.measure import Measurement, Meter
from app.engine.methods import METHODS as STUDIO_METHODS
from app.engine.methods import PRESS_METHODS, Request, prompt_parts, reply
from bench.speed.rigs import QUESTION, Rig
from model.generation import prefill

KVZIP_REPLAY_TOKENS = 2048 + 32  # kvzip replays the context in chunks of 2048 tokens after a short prompt


@dataclass
class Case:
    """One document at one ratio."""

    tokens: int  # T, document length in tokens
    ratio: int | None  # N (None for full context)
    doc: list[int]  # [T] token ids
    prepared: bool = False  # the untimed first request of a cached / follow-up scenario has run

    @cached_property
    def document(self) -> DocumentIds:
        return DocumentIds.from_ids(self.doc)


@dataclass(frozen=True)
class TimedMethod:
    name: str  # the benchmark's name for it (--methods)
    label: str
    studio_method: str  # a name in app.engine.methods.METHODS ("" for question_only)
    scenario: str = "cold"  # cold | cached | followup

    @property
    def uses_ratio(self) -> bool:
        return self.studio_method != "" and STUDIO_METHODS[self.studio_method].uses_ratio

    @property
    def prefills_context(self) -> bool:
        """The decoder prefills the whole document (full context, presses) in a cold request."""
        return self.scenario == "cold" and self.studio_method != "" and not STUDIO_METHODS[
            self.studio_method].reads_latents

    @property
    def reads_latents(self) -> bool:
        return self.studio_method != "" and STUDIO_METHODS[self.studio_method].reads_latents

    def positions_needed(self, rig: Rig, tokens: int, ratio: int | None, new_tokens: int) -> int:
        """The largest decoder position this request reaches."""
        if not self.studio_method:
            return len(rig.after) + new_tokens
        if self.reads_latents:
            return len(rig.before) + rig.lclms[ratio].count_latents(tokens) + 2 + len(rig.after) + new_tokens
        reached = len(rig.before) + tokens + len(rig.after) + new_tokens
        if self.studio_method == "kvzip":
            reached = max(reached, len(rig.before) + tokens + KVZIP_REPLAY_TOKENS)
        return reached

    def request(self, rig: Rig, case: Case, new_tokens: int) -> Request:
        cached = self.scenario != "cold"
        return Request(case.document, QUESTION, rig.variant(case.ratio), new_tokens, latent_cache=cached,
                       prefix_cache=self.scenario == "followup", stop_at_end=False)

    def prepare(self, rig: Rig, case: Case) -> None:
        """Untimed set-up before a request: the first request of a cached or follow-up scenario."""
        if self.scenario != "cold" and self.studio_method and not case.prepared:
            for _ in rig.studio.run(self.studio_method, self.request(rig, case, 1)):
                pass
            case.prepared = True

    def run(self, rig: Rig, case: Case, new_tokens: int) -> Measurement:
        if not self.studio_method:
            return question_only(rig, case, new_tokens)
        answer = None
        for event in rig.studio.run(self.studio_method, self.request(rig, case, new_tokens)):
            answer = event.answer or answer
        m = answer.measurement  # with the per-request facts the report shows
        if answer.latents:
            m.extra["latents"] = answer.latents
        if answer.press is not None and answer.press.kv_positions_held:
            m.extra["kv_positions_held"] = answer.press.kv_positions_held
        return m


def question_only(rig: Rig, case: Case, new_tokens: int) -> Measurement:
    """The question's tokens prefilled alone (no document), then the same decode."""
    variant = rig.variant(None)
    request = Request(case.document, QUESTION, variant, new_tokens, stop_at_end=False)
    model, decoder = variant.model, variant.text_decoder
    _, after = prompt_parts(model, variant.profile, QUESTION)
    with Meter(model.device, decoder.config, model.dtype) as meter:
        start = meter.clock.ms()
        ids = torch.tensor([after], device=model.device)  # [1, Q]
        state = prefill(decoder, decoder.get_input_embeddings()(ids))
        done = meter.clock.ms()
        meter.measurement.prefill_ms, meter.measurement.positions = done - start, state.positions
        meter.measurement.prefill_positions = state.positions
        for _ in reply(request, state, meter, done, decoder):
            pass
    return meter.measurement


TIMED_METHODS: dict[str, TimedMethod] = {m.name: m for m in (
    TimedMethod("full", "full context", "full"),
    TimedMethod("lclm", "LCLM (cold)", "lclm"),
    TimedMethod("lclm_cached", "LCLM (cached latents)", "lclm", "cached"),
    TimedMethod("full_followup", "full context, follow-up", "full", "followup"),
    TimedMethod("lclm_followup", "LCLM, follow-up", "lclm", "followup"),
    TimedMethod("question_only", "question only (no document)", ""),
    *(TimedMethod(name, STUDIO_METHODS[name].label, name) for name in PRESS_METHODS),
)}
# What a plain `python -m bench.speed` measures: every method above but the three kvpress presses
# that the paper does not compare against (they run when named with --methods).
DEFAULT_METHODS = [name for name in TIMED_METHODS if name not in ("expected_attention", "knorm", "streaming_llm")]


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


def measure(rig: Rig, method: TimedMethod, case: Case, new_tokens: int) -> Measurement:
    """One request, timed and measured as Studio.ask measures an answer."""
    method.prepare(rig, case)
    settle(rig.device)
    return method.run(rig, case, new_tokens)
