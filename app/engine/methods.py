"""The answer methods, one registry from the model to the page: full context, LCLM, LCLM +
EXPAND and every KV-cache press of model/presses.py are one kind of object (`Method`) with a
name, a label and what it prepares before the decoder reads the question.

Every method runs one `Request` (a document, a question, a `LoadedVariant` and its limits) the
same way: it prepares its context (latents, a pressed KV cache, ...; timed as compress_ms),
prefills the decoder (prefill_ms) and streams the reply through the one shared decode
(model.generation.decode, from the prompt's last position), all inside one `Meter`
(app/engine/measure.py). The studio's services, the CLI, bench.speed and bench.quality all answer
through METHODS, so every number they report comes from the path the studio runs.

The question prompt is cut around the document (`prompt_parts`): the same decoder ids come
before and after it for every method, so full context, the presses and the LCLM differ only
in what stands where the document goes: its ids, a pressed KV cache of them, or a memory
region of latents. Adding a press is one line in model/presses.py (docs/architecture.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import torch

from app.engine.answer import Answer, ExpandTrace, PressTrace
from app.engine.decoder_server import DecoderServers, Streamed
from app.engine.kv_cache import PrefixCache, PrefixEntry, PrefixKey
from app.engine.latent_store import DocumentIds, LatentStore
from app.engine.measure import Measurement, Meter
from app.engine.models import LoadedVariant, ProgressFn
from app.engine.settings import RATIOS, Settings
from model.agent import ExpandAgent, Layout, Round
from model.encoder import count_latents
from model.errors import UserError
from model.generation import (
    PrefillState,
    RepetitionGuard,
    Sampling,
    StreamingDetokenizer,
    decode,
    fork_cache,
    prefill,
    stop_token_ids,
)
from model.lclm import LCLM
from model.presses import PRESSES, PressSpec, kept_positions, make_press, new_cache, stored_kv_bytes
from model.prompts import PromptProfile

DOCUMENT_MARK = "\x00DOCUMENT\x00"  # where the document goes in a rendered prompt


@dataclass
class AskEvent:
    """One streamed piece of an answer: `kind` is "token", "round" or "done"; the "done" event
    carries the `Answer`."""

    kind: str
    text: str = ""
    round: dict | None = None
    answer: Answer | None = None

    @property
    def result(self) -> dict | None:
        """The answer as JSON (None before the "done" event)."""
        return self.answer.to_json() if self.answer is not None else None

    @property
    def measurement(self) -> Measurement | None:
        return self.answer.measurement if self.answer is not None else None


@dataclass
class Request:
    document: DocumentIds
    question: str
    variant: LoadedVariant
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    latent_cache: bool = True  # latents from / into the latent cache
    prefix_cache: bool = True  # the prompt prefix's KV from / into the prefix cache
    stop_at_end: bool = True  # False: decode exactly max_new_tokens (the benchmarks)
    stop_at_repeat: bool = False  # stop a reply at a sentence it already wrote (the studio's setting)
    progress: ProgressFn | None = None
    ratio: int | None = None  # N of a press's matched ratio 1 - 1/N; None: the variant's

    @property
    def ratio_n(self) -> int:
        """The N of 1:N this request runs at: a press's matched ratio, else the variant's."""
        return self.ratio or self.variant.ratio

    @property
    def model(self) -> LCLM:
        return self.variant.model


@dataclass(frozen=True)
class Resources:
    """What a method reads besides its request: the latents (cache and encoder), the prefix KV
    cache and the settings. A method never sees the studio that owns them."""

    store: LatentStore
    prefix_cache: PrefixCache
    settings: Settings
    decoders: DecoderServers | None = None  # set: full context, LCLM and EXPAND decode through vLLM servers


# ---- the shared pieces -----------------------------------------------------------------------
def prompt_parts(model: LCLM, profile: PromptProfile, question: str) -> tuple[list[int], list[int]]:
    """Decoder ids before and after the document in the chat-formatted question prompt."""
    before, after = model.chat(profile.question(DOCUMENT_MARK, question)).split(DOCUMENT_MARK)
    tokenize = model.decoder_tokenizer
    return (tokenize(before, add_special_tokens=False)["input_ids"],
            tokenize(after, add_special_tokens=False)["input_ids"])


def memory_region_ids(model: LCLM, latents: int) -> list[int]:
    """Decoder ids of one memory region: start tag, one placeholder per latent, end tag."""
    return [model.memory_start_id, *[model.memory_token_id] * latents, model.memory_end_id]


def check_positions(model: LCLM, positions: int, max_new_tokens: int,
                    hint: Callable[[], str] | None = None) -> None:
    """Refuse a prompt the decoder cannot read; `hint` (computed only then) says what would fit."""
    if model.max_positions and positions + max_new_tokens > model.max_positions:
        said = hint() if hint else ""
        raise UserError(f"the prompt needs {positions:,} decoder positions plus {max_new_tokens} new tokens; this "
                        f"decoder reads at most {model.max_positions:,}" + (f" ({said})" if said else ""))


def latent_room(model: LCLM, other_positions: int, max_new_tokens: int) -> int:
    """Latents a prompt of `other_positions` besides its memory region (and its two tags) can hold."""
    return model.max_positions - other_positions - max_new_tokens - 2


def text_too_long_hint(model: LCLM, document_tokens: int, other_positions: int, max_new_tokens: int) -> str:
    """For a document too long to read as text: the compression ratios whose latents would fit."""
    room = latent_room(model, other_positions, max_new_tokens)
    window = model.config.encoder_window_size
    fits = [r for r in RATIOS if count_latents(document_tokens, window, r) <= room]
    if not fits:
        return f"even at 1:{max(RATIOS)} its {document_tokens:,} tokens give too many latents; use a shorter document"
    r = fits[0]
    return (f"an LCLM reads it: at 1:{r} its {document_tokens:,} tokens become "
            f"{count_latents(document_tokens, window, r):,} latents (mode lclm or expand, --ratio {r})")


def latents_too_many_hint(model: LCLM, other_positions: int, max_new_tokens: int) -> str:
    """For a document whose latents do not fit: the largest document this ratio takes."""
    room = latent_room(model, other_positions, max_new_tokens)
    ratio, window = model.config.compression_ratio, model.config.encoder_window_size
    tokens = max(0, room) * ratio
    while tokens > 0 and count_latents(tokens, window, ratio) > room:
        tokens -= ratio
    higher = [r for r in RATIOS if r > ratio]
    return (f"at 1:{ratio} this decoder takes documents of up to about {tokens:,} tokens"
            + (f"; a higher ratio (1:{higher[-1]}) takes longer ones" if higher else "; use a shorter document"))


def prefix_key(request: Request, method: str, ratio: int | None, pooling: str | None,
               reader: str | None = None) -> PrefixKey:
    """The prefix cache's key: the document, which weights read it (`reader`, default the LCLM's
    checkpoint), the method and what changes its prefix, the dtype, device and prompt profile."""
    model = request.model
    return PrefixKey(request.document.key, reader or model.checkpoint_id, method, ratio, pooling,
                     str(model.dtype).removeprefix("torch."), str(model.device), request.variant.profile.name)


def prefill_reusing(resources: Resources, request: Request, key: PrefixKey, ids: list[int], embeds: torch.Tensor,
                    prefix: int, meter: Meter, decoder: torch.nn.Module) -> PrefillState:
    """`decoder`'s prefill of a prompt (ids [P], embeds [1, P, D]) whose first `prefix` positions
    (everything up to the question) depend on the document only. With prefix reuse on, their KV
    comes from the prefix cache when an entry holds exactly these ids, and is otherwise computed
    first and kept there; only the rest is prefilled after it."""
    m = meter.measurement
    if not (request.prefix_cache and resources.prefix_cache.enabled and 0 < prefix < len(ids)):
        m.prefill_positions += len(ids)
        return prefill(decoder, embeds)
    head = torch.tensor(ids[:prefix])  # [L]
    entry = resources.prefix_cache.get(key)
    if entry is not None and torch.equal(entry.ids, head):
        m.prefix_reused_positions += prefix
    else:
        entry = PrefixEntry(head, prefill(decoder, embeds[:, :prefix]).cache)  # KV of the L prefix positions
        resources.prefix_cache.put(key, entry)
        m.prefill_positions += prefix
    m.prefill_positions += len(ids) - prefix
    return prefill(decoder, embeds[:, prefix:], fork_cache(entry.cache))  # the rest: [1, P - L, D]


STOPS = ("end", "limit", "repeat")  # how a reply ended: end-of-turn, the token limit, a repeated sentence


@dataclass
class Replied:
    text: str
    tokens: int
    stopped: str  # one of STOPS
    first_token_at_ms: float  # the meter's clock at its first token (at its end when it has none)


def reply(request: Request, state: PrefillState, meter: Meter, prefill_done_ms: float, decoder: torch.nn.Module,
          max_new_tokens: int | None = None) -> Generator[AskEvent, None, Replied]:
    """Stream one reply of `decoder` from its prefilled prompt; returns its text and how it ended.
    The first reply of a request sets TTFT and its first-token part; every reply counts its tokens."""
    model, m = request.model, meter.measurement
    first_reply = m.ttft_ms == 0.0
    limit = max_new_tokens or request.max_new_tokens
    stops = stop_token_ids(model.decoder_tokenizer, decoder) if request.stop_at_end else set()
    detok = StreamingDetokenizer(model.decoder_tokenizer)
    guard = RepetitionGuard() if request.stop_at_repeat else None
    tokens, stopped, first_at = 0, "end", None
    for token in decode(decoder, state, limit, stops, request.sampling):
        piece = detok.push(token)
        if first_at is None:
            first_at = meter.clock.ms()
        if first_reply and m.ttft_ms == 0.0:
            m.ttft_ms = meter.clock.ms()
            m.first_token_ms = m.ttft_ms - prefill_done_ms
        m.new_tokens += 1
        tokens += 1
        if piece:
            yield AskEvent("token", text=piece)
        if guard is not None and piece and guard.repeated(detok.text):
            stopped = "repeat"
            break
    else:
        stopped = "limit" if tokens == limit else "end"
    tail = detok.flush()  # an incomplete last character, if the reply ended inside one
    if tail:
        yield AskEvent("token", text=tail)
    if first_reply and m.ttft_ms == 0.0:  # stopped at once: TTFT is the end of the prefill
        m.ttft_ms = meter.clock.ms()
    return Replied(detok.text, tokens, stopped, first_at if first_at is not None else meter.clock.ms())


def served_reply(resources: Resources, request: Request, meter: Meter, start_ms: float, embeds: torch.Tensor,
                 decoder: torch.nn.Module, decoder_id: str,
                 max_new_tokens: int | None = None) -> Generator[AskEvent, None, Replied]:
    """`reply` from a vLLM server (app/engine/decoder_server.py) that serves `decoder`, for the
    prompt embeddings `embeds` [1, P, D] built here: the server prefills and decodes. The
    prefill's time is measured at this end, as the time from `start_ms` to the first token."""
    model, m = request.model, meter.measurement
    served = resources.decoders.client(decoder, model.decoder_tokenizer, decoder_id)
    first_reply = m.ttft_ms == 0.0
    limit = max_new_tokens or request.max_new_tokens
    stops = sorted(stop_token_ids(model.decoder_tokenizer, decoder)) if request.stop_at_end else []
    guard = RepetitionGuard() if request.stop_at_repeat else None
    done, text, pieces, stopped, first_at = Streamed(), "", 0, "end", None
    m.prefill_positions += int(embeds.shape[1])
    stream = served.stream(embeds[0], limit, stops, request.sampling, done)
    for piece in stream:
        if first_at is None:
            first_at = meter.clock.ms()
            if first_reply:
                m.prefill_ms, m.ttft_ms, m.first_token_ms = first_at - start_ms, first_at, 0.0
        text, pieces = text + piece, pieces + 1
        yield AskEvent("token", text=piece)
        if guard is not None and guard.repeated(text):
            stopped = "repeat"
            stream.close()
            break
    else:
        stopped = "limit" if done.finish_reason == "length" else "end"
    # the reply's tokens, without the stop token that ended it (as this process counts them)
    tokens = len([t for t in done.token_ids if t not in stops]) if done.token_ids else done.tokens or pieces
    m.new_tokens += tokens
    if first_reply and m.ttft_ms == 0.0:  # no token at all: TTFT is the reply's end
        m.ttft_ms = meter.clock.ms()
        m.prefill_ms = m.ttft_ms - start_ms
    return Replied(text, tokens, stopped, first_at if first_at is not None else meter.clock.ms())


def served_note(resources: Resources) -> list[str]:
    """What an answer decoded by a vLLM server must say about its readouts."""
    return (["decoded by a vLLM server: its prefill time is the time to the first token, and the memory readouts "
             "are this process's (the server's KV cache is its own)"] if resources.decoders is not None else [])


def reply_warnings(replied: Replied) -> list[str]:
    """What a reader must be told about one reply: an empty one, one cut at a repeat."""
    warnings = []
    if not replied.text.strip():
        warnings.append(f"the answer is empty: the decoder ended its reply after {replied.tokens} token(s)")
    if replied.stopped == "repeat":
        warnings.append("stopped at a repeated sentence: greedy decoding had begun to loop")
    return warnings


MIN_EXPANDED = 4  # chunks a round must have room to read in full before chunks share a label
EXPANDED_HEADER_TOKENS = 16  # what an expanded chunk adds besides its text (its header, blank lines)
LATER_ROUNDS_MARGIN = 128  # positions a later or the final round's rules take beyond the first's


def expand_layout(model: LCLM, profile: PromptProfile, question: str, chunk_latents: list[torch.Tensor],
                  chunk_tokens: int, max_new_tokens: int, rounds: int) -> Layout:
    """How EXPAND shows a document in the decoder's positions: each chunk under its own label
    where that leaves room to read MIN_EXPANDED chunks in full (or all, where fewer); else the
    fewest consecutive chunks per label that do (a binary search: fewer labels, fewer positions).
    Then as many chunks may be read in full as the room left holds. A document whose latents
    leave no such room even as one section is refused, with what to change."""
    if not model.max_positions:
        return Layout()
    per_chunk = chunk_tokens + EXPANDED_HEADER_TOKENS
    wanted = min(MIN_EXPANDED, len(chunk_latents))

    @functools.cache  # the search and the answer read some layouts twice; each is a long tokenization
    def free(per_section: int) -> int:
        """Positions left for chunks read in full when `per_section` chunks share each label."""
        _, contexts = Layout(per_section).show(chunk_latents)
        prompt = model.chat(profile.expand_round(contexts, {}, question, rounds)) + profile.first_reply_prefix
        positions = len(model.decoder_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return model.max_positions - max_new_tokens - positions - LATER_ROUNDS_MARGIN

    labelled = free(1)
    if labelled >= wanted * per_chunk:  # the usual case: every chunk under its own label
        return Layout(1, labelled // per_chunk)
    low, high = 2, len(chunk_latents)
    if free(high) < wanted * per_chunk:
        latents = sum(int(r.shape[0]) for r in chunk_latents)
        raise UserError(f"EXPAND cannot show this document's {len(chunk_latents):,} chunks ({latents:,} latents) "
                        f"and read {wanted} of them in full within the decoder's {model.max_positions:,} positions "
                        "even as one section; use a higher compression ratio or a shorter document")
    while low < high:  # the fewest chunks per label that leave the room
        middle = (low + high) // 2
        if free(middle) >= wanted * per_chunk:
            high = middle
        else:
            low = middle + 1
    return Layout(low, free(low) // per_chunk)


def layout_warnings(layout: Layout, chunks: int) -> list[str]:
    """What a reader must be told about how a long document was shown to EXPAND."""
    if layout.per_section == 1:
        return []
    return [f"the document's {chunks:,} chunks are shown in sections of {layout.per_section} under one label each "
            f"(the decoder's positions cannot label every chunk); at most {layout.max_expanded} chunks can be read "
            "in full"]


def expand_warnings(rounds: list[dict]) -> list[str]:
    """EXPAND rounds a reader must be told about: a directive that read no chunk, and an answer
    that only the forced final round gave."""
    warnings = []
    for r in rounds:
        if r["action"] == "expand" and not r["expanded"]:
            why = "; ".join(r["ignored"]) or "no chunk number in its reply"
            warnings.append(f"round {r['number']} asked to expand but named no chunk that could be read ({why})")
    if rounds and rounds[-1]["action"] == "forced":
        warnings.append(f"no round answered: the answer is the reply to the forced final round {rounds[-1]['number']}")
    return warnings


# ---- the methods ------------------------------------------------------------------------------
class Method:
    """One way to answer a question about a document. `run` prepares, prefills and streams,
    filling the meter's measurement, and returns the result's method-specific fields."""

    name = ""  # registry key: the studio's and the CLI's choice, the benchmarks' method
    label = ""  # how the page and the reports name it
    prepares = ""  # what it builds before the decoder reads the question
    reads_latents = False  # an LCLM method: the result names its ratio and pooling
    reads_text = False  # reads the document's text with the variant's text decoder
    uses_ratio = True  # the compression ratio changes what it does

    def run_name(self, variant_label: str) -> str:
        """How the page, the history and the benchmarks name this method's answer from a latent
        variant ("LCLM 1:4 concat"); a method that reads no latents is named by its label."""
        return f"{self.label} {variant_label}" if self.reads_latents else self.label

    @torch.inference_mode()
    def answer(self, resources: Resources, request: Request) -> Iterator[AskEvent]:
        model, variant = request.model, request.variant
        if self.reads_text:
            variant.text_decoder  # a first use loads it: before the clocks and the memory readout start
        with Meter(model.device, model.decoder.config, model.dtype) as meter:
            fields = yield from self.run(resources, request, meter)
        answer = Answer(
            text=fields.pop("text").strip(), method=self.name, label=self.label, question=request.question,
            ratio=request.ratio_n if self.uses_ratio else None,
            pooling=variant.pooling if self.reads_latents else None, checkpoint=model.checkpoint_id,
            prompt_profile=variant.profile.name, tokens=len(request.document), measurement=meter.measurement,
            precision=variant.precision.to_dict(), **fields)
        yield AskEvent("done", answer=answer)

    @staticmethod
    def finished(replied: Replied, round_warnings: list[str] = (), **fields) -> dict:
        """The method-specific fields of an `Answer` whose text is `replied`'s; its warnings say
        what a reader must know about it (EXPAND's rounds first)."""
        return {"text": replied.text, "stopped": replied.stopped,
                "warnings": [*round_warnings, *reply_warnings(replied)], **fields}

    def run(self, resources: Resources, request: Request, meter: Meter) -> Generator[AskEvent, None, dict]:
        raise NotImplementedError


class FullContext(Method):
    """The uncompressed baseline: the document's ids where the document goes, read by the text
    decoder (a decoder LoRA's base model: app/engine/models.py)."""

    name, label, prepares, uses_ratio = "full", "full context", "nothing: the decoder reads the document's ids", False
    reads_text = True

    def run(self, resources, request, meter):
        model, document, m = request.model, request.document, meter.measurement
        decoder = request.variant.text_decoder
        before, after = prompt_parts(model, request.variant.profile, request.question)
        ids = before + document.decoder_ids + after  # [P]
        check_positions(model, len(ids), request.max_new_tokens, lambda: text_too_long_hint(
            model, len(document.encoder_ids), len(before) + len(after), request.max_new_tokens))
        start = meter.clock.ms()
        embeds = decoder.get_input_embeddings()(torch.tensor([ids], device=model.device))  # [1, P, D]
        m.positions = len(ids)
        if resources.decoders is not None:
            replied = yield from served_reply(resources, request, meter, start, embeds, decoder,
                                              request.variant.text_reader_id)
            return self.finished(replied, served_note(resources), base_decoder=request.variant.reads_text_with_base)
        key = prefix_key(request, self.name, None, None, request.variant.text_reader_id)
        state = prefill_reusing(resources, request, key, ids, embeds, len(before) + len(document.decoder_ids), meter,
                                decoder)
        done = meter.clock.ms()
        m.prefill_ms = done - start
        replied = yield from reply(request, state, meter, done, decoder)
        return self.finished(replied, base_decoder=request.variant.reads_text_with_base)


class LatentContext(Method):
    """The LCLM: the document's latents in one memory region where the document goes."""

    name, label, prepares, reads_latents = "lclm", "LCLM", "latents (encoder + adapter, or the latent cache)", True

    def run(self, resources, request, meter):
        model, m = request.model, meter.measurement
        latents, compress_ms, cached = resources.store.latents(model, request.document, request.latent_cache,
                                                      request.progress)  # [M, D]
        m.compress_ms = compress_ms
        before, after = prompt_parts(model, request.variant.profile, request.question)
        region = memory_region_ids(model, int(latents.shape[0]))
        ids = before + region + after  # [P]
        check_positions(model, len(ids), request.max_new_tokens,
                        lambda: latents_too_many_hint(model, len(before) + len(after), request.max_new_tokens))
        start = meter.clock.ms()
        embeds = model.prepare_ids(ids, [latents]).inputs_embeds  # [1, P, D]
        m.positions = len(ids)
        if resources.decoders is not None:
            replied = yield from served_reply(resources, request, meter, start, embeds, model.decoder,
                                              model.checkpoint_id)
            return self.finished(replied, served_note(resources), latents=int(latents.shape[0]), cached=cached,
                                 trained=model.config.trained)
        key = prefix_key(request, self.name, model.config.compression_ratio, model.config.pooling)
        state = prefill_reusing(resources, request, key, ids, embeds, len(before) + len(region), meter, model.decoder)
        done = meter.clock.ms()
        m.prefill_ms = done - start
        replied = yield from reply(request, state, meter, done, model.decoder)
        return self.finished(replied, latents=int(latents.shape[0]), cached=cached, trained=model.config.trained)


class Expand(Method):
    """The EXPAND agent (model/agent.py): each chunk's latents in its own memory region, the
    chunks it asks for as plain text in the next round."""

    name, label, reads_latents = "expand", "LCLM + EXPAND", True
    prepares = "each chunk's latents (encoded alone, cached per chunk)"

    def run_name(self, variant_label: str) -> str:
        return f"LCLM {variant_label} + EXPAND"

    def run(self, resources, request, meter):
        model, m, text = request.model, meter.measurement, request.document.text
        if text is None:
            raise UserError("EXPAND reads the document's text in chunks; this document has only token ids")
        store = resources.store
        chunks = store.chunks(model, text)
        latents, compress_ms, cached = store.chunk_latents(model, chunks, request.latent_cache, request.progress)
        m.compress_ms = compress_ms

        def generate(prompt: str, regions: list[torch.Tensor], prefix: str) -> Generator[AskEvent, None, tuple]:
            first_reply = m.ttft_ms == 0.0
            start = meter.clock.ms()
            prepared = model.prepare(model.chat(prompt) + prefix, regions)
            check_positions(model, prepared.positions, request.max_new_tokens,
                            lambda: "use a higher compression ratio or a shorter document")
            m.positions = max(m.positions, prepared.positions)
            if resources.decoders is not None:
                replied = yield from served_reply(resources, request, meter, start, prepared.inputs_embeds,
                                                  model.decoder, model.checkpoint_id)
                replies.append(replied)
                return replied.text, prepared.positions
            state = prefill(model.decoder, prepared.inputs_embeds)
            done = meter.clock.ms()
            m.prefill_positions += prepared.positions
            if first_reply:
                m.prefill_ms = done - start
            replied = yield from reply(request, state, meter, done, model.decoder)
            replies.append(replied)
            return replied.text, prepared.positions

        replies: list[Replied] = []  # one per round
        rounds_allowed = resources.settings.max_expand_rounds
        layout = expand_layout(model, request.variant.profile, request.question, latents,
                               resources.settings.chunk_tokens, request.max_new_tokens, rounds_allowed - 1)
        runner = ExpandAgent(rounds_allowed, request.variant.profile).run(
            request.question, latents, [c.text for c in chunks], generate, layout)
        rounds: list[dict] = []
        while True:
            try:
                item = next(runner)
            except StopIteration as stop:
                answer = stop.value
                break
            if isinstance(item, Round):
                rounds.append(item.to_dict())
                yield AskEvent("round", round=item.to_dict())
            else:
                yield item
        last = replies[-1]  # the round whose reply holds the answer
        trace = ExpandTrace(answer_ttft_ms=round(last.first_token_at_ms, 3),
                            chunk_tokens=resources.settings.chunk_tokens, chunks=[c.to_dict() for c in chunks],
                            rounds=rounds, expanded=sorted({n for r in rounds for n in r["expanded"]}))
        return self.finished(Replied(answer, last.tokens, last.stopped, last.first_token_at_ms),
                             layout_warnings(layout, len(chunks)) + expand_warnings(rounds) + served_note(resources),
                             latents=sum(int(r.shape[0]) for r in latents), cached=cached,
                             trained=model.config.trained, expand=trace)


@dataclass(frozen=True)
class Pressed(Method):
    """A press (model/presses.py) over the decoder's KV cache of the document, at the matched
    ratio 1 - 1/N, as kvpress's own pipeline applies it, read by the text decoder as full context
    is (app/engine/models.py): the context (everything before the
    question) is prefilled under the press (compress_ms), then the question over the pressed
    cache at its uncompressed positions (prefill_ms). Positions = KV pairs kept + the question.
    The pressed context does not depend on the question, so it is kept in the prefix cache and
    a follow-up question starts from it (compress_ms 0)."""

    press: PressSpec
    reads_text = True

    @property
    def name(self) -> str:
        return self.press.name

    @property
    def label(self) -> str:
        return self.press.label

    @property
    def uses_ratio(self) -> bool:
        return self.press.uses_ratio

    @property
    def prepares(self) -> str:
        return "a KV cache of the document, " + ("pressed at the matched ratio" if self.press.uses_ratio
                                                  else "quantized (every position kept)")

    def run(self, resources, request, meter):
        model, m = request.model, meter.measurement
        decoder, device = request.variant.text_decoder, model.device
        before, after = prompt_parts(model, request.variant.profile, request.question)
        context_ids = before + request.document.decoder_ids  # [C]: pressed
        context_len, question_len = len(context_ids), len(after)
        check_positions(model, context_len + question_len, request.max_new_tokens, lambda: text_too_long_hint(
            model, len(request.document.encoder_ids), len(before) + question_len, request.max_new_tokens))
        press = make_press(self.name, request.ratio_n, residual_length=resources.settings.kv_residual_length)
        start = meter.clock.ms()
        key = prefix_key(request, self.name, request.ratio_n, None, request.variant.text_reader_id)
        # a press with a cache of its own (quantization) changes it in place: not kept for follow-ups
        reusable = request.prefix_cache and resources.prefix_cache.enabled and not hasattr(press, "new_cache")
        entry = resources.prefix_cache.get(key) if reusable else None
        head = torch.tensor(context_ids)  # [C]
        if entry is not None and torch.equal(entry.ids, head):
            cache = fork_cache(entry.cache)  # the pressed context of an earlier question
            m.prefix_reused_positions = cache.get_seq_length()  # the entries it kept
        else:
            cache = new_cache(press, decoder.config)
            with press(decoder):
                decoder.model(input_ids=head[None].to(device), past_key_values=cache)
            m.prefill_positions = context_len
            if reusable:
                resources.prefix_cache.put(key, PrefixEntry(head, cache))
                cache = fork_cache(cache)
        m.compress_ms = meter.clock.ms() - start
        m.prefill_positions += question_len
        start = meter.clock.ms()
        question = decoder.get_input_embeddings()(torch.tensor([after], device=device))  # [1, Q, D]
        state = prefill(decoder, question, cache, start=context_len)  # at the uncompressed positions
        done = meter.clock.ms()
        m.prefill_ms = done - start
        held = state.cache.get_seq_length()  # entries the cache holds (kvpress's KVzip masks evicted keys, keeps them)
        m.positions = kept_positions(press, context_len) + question_len  # kvpress's accounting
        stored = stored_kv_bytes(press, cache)  # quantized: the context and question as stored
        if stored is not None:
            m.kv_cache_bytes = stored
        replied = yield from reply(request, state, meter, done, decoder)
        removed_fraction = press.compression_ratio  # kvpress's name for the share of KV pairs removed: 1 - 1/N
        trace = PressTrace(prefilled_positions=context_len + question_len,
                           press_ratio=round(removed_fraction, 4), kv_positions_held=held)
        in_process = (["a KV-cache press has no vLLM path: answered in this process with transformers"]
                      if resources.decoders is not None else [])
        return self.finished(replied, in_process, press=trace, base_decoder=request.variant.reads_text_with_base)


METHODS: dict[str, Method] = {m.name: m for m in (FullContext(), LatentContext(), Expand(),
                                                  *(Pressed(spec) for spec in PRESSES.values()))}
PRESS_METHODS = [name for name, m in METHODS.items() if isinstance(m, Pressed)]
LATENT_METHODS = [name for name, m in METHODS.items() if m.reads_latents]  # the Ask tab's "answer from latents" choice


def method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"mode must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]
