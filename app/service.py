"""The studio's services, shared by the CLI and the UI: compress, ask (full context, LCLM,
LCLM + EXPAND) and reconstruct. Models and the latent cache are process-wide; a request
carries only the document text and its choices.

Plain LCLM answers read the whole document's latents. EXPAND and reconstruction read the
document as chunks (model/chunking.py), each chunk's text compressed on its own and cached
under its own key, so a second question on the same document runs no encoder."""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
from safetensors.torch import load_file

from app.kv_cache import PrefixCache, PrefixEntry, PrefixKey, drop_all
from app.measure import Clock, Measurement, PeakMemory, kv_cache_bytes
from app.settings import MODES, POOLINGS, RATIOS, Settings
from cache import LatentCache, document_sha256, latent_key
from model.agent import ExpandAgent, Round
from model.chunking import Chunk, chunk_text
from model.errors import OUT_OF_MEMORY, OutOfMemory, UserError
from model.fidelity import token_accuracy
from model.baselines import QUESTION_MARK
from model.generation import (PrefillState, Sampling, StreamingDetokenizer, decode, fork_cache, prefill,
                              stop_token_ids)
from model.lclm import LCLM, DocumentTokens, PreparedPrompt
from model.loading import CheckpointParts, build_lclm, default_device, resolve
from model.precision import DtypeChoice, choose_dtype
from model.prompts import PROMPT_PROFILES, PromptProfile, default_prompt_profile, reconstruction_prompt

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
T = TypeVar("T")
UNTRAINED_NOTE = "untrained: this LCLM's adapter is freshly initialised, so its latents carry no learned meaning"


@dataclass
class CompressResult:
    tokens: int
    latents: int
    window: int
    ratio: int
    pooling: str
    compress_ms: float
    checkpoint: str
    cached: bool
    trained: bool
    chunks: int
    positions_saved: int
    precision: dict = field(default_factory=dict)  # DtypeChoice.to_dict(): dtype, why, the probe

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("precision"))
        return out


@dataclass
class Compressed:
    """A document's latents with the bookkeeping every service needs."""

    model: LCLM
    document: DocumentTokens
    latents: torch.Tensor  # [M, dec_hidden]
    result: CompressResult


@dataclass
class AskEvent:
    """One streamed piece of an answer: `kind` is "token", "round" or "done"."""

    kind: str
    text: str = ""
    round: dict | None = None
    result: dict | None = None


@dataclass
class ChunkReconstruction:
    index: int  # the chunk's number, from 1
    original: str
    reconstructed: str
    token_accuracy: float
    reference_tokens: int


class Studio:
    """Process-wide state: loaded models (sharing weights between variants) and the latent cache."""

    def __init__(self, settings: Settings | None = None, checkpoint: str | None = None):
        self.settings = settings or Settings.from_env()
        self.default_checkpoint = checkpoint
        self._models: dict[tuple, LCLM] = {}
        self._parts: dict[tuple, CheckpointParts] = {}
        self._lock = threading.RLock()
        self._cache: LatentCache | None = None
        self._chunks: OrderedDict[tuple, list[Chunk]] = OrderedDict()  # a few recent documents' chunks
        self._dtype: DtypeChoice | None = None
        self.prefix_cache = PrefixCache(self.settings.kv_cache_mb * 2**20)

    # ---- shared resources --------------------------------------------------------
    @property
    def cache(self) -> LatentCache:
        with self._lock:
            if self._cache is None:
                self._cache = LatentCache(self.settings.cache_dir, self.settings.cache_size_mb * 2**20)
            return self._cache

    def close(self) -> None:
        """Close the latent cache's database (it reopens on next use)."""
        with self._lock:
            if self._cache is not None:
                self._cache.close()

    def dtype_choice(self) -> DtypeChoice:
        """The dtype every model of this process runs in (settings.dtype on this device), and why."""
        with self._lock:
            if self._dtype is None:
                self._dtype = choose_dtype(self.settings.dtype, self.settings.device or default_device())
            return self._dtype

    def model(self, checkpoint: str | None = None, ratio: int | None = None, pooling: str | None = None,
              progress: ProgressFn | None = None) -> LCLM:
        """The LCLM for this checkpoint and variant, loaded once per process."""
        checkpoint = checkpoint if checkpoint is not None else self.default_checkpoint
        validate_choice(ratio, pooling)
        say = (lambda message: progress(message, 0, 0)) if progress else None
        with self._lock:
            parts = resolve(checkpoint, ratio=ratio, pooling=pooling, data_dir=self.settings.data_dir, progress=say)
            key = (parts.checkpoint_id, self.settings.device, self.dtype_choice().dtype)
            if key not in self._models:
                if say:
                    say(f"loading {parts.checkpoint_id}")
                self._models[key] = guard_memory(self._build, parts, message=(
                    f"out of memory while loading {parts.checkpoint_id}; free memory on the device, or use "
                    "--device cpu or a smaller model"))
                self._parts[key] = parts
            return self._models[key]

    def _build(self, parts: CheckpointParts) -> LCLM:
        """Load a variant; one whose encoder and decoder come from the same directories as a
        loaded model's (the embedded ratios and poolings) shares that model's weights."""
        for key, loaded_parts in self._parts.items():
            if (loaded_parts.encoder_dir, loaded_parts.decoder_dir, loaded_parts.config.encoder_mask_type) == (
                    parts.encoder_dir, parts.decoder_dir, parts.config.encoder_mask_type):
                return share_weights(self._models[key], parts)
        return build_lclm(parts, device=self.settings.device, dtype=self.dtype_choice().dtype,
                          data_dir=self.settings.data_dir)

    # ---- compress ----------------------------------------------------------------
    def tokenize(self, model: LCLM, text: str) -> DocumentTokens:
        if not text or not text.strip():
            raise UserError("the document is empty or only whitespace")
        document = model.tokenize_document(text)
        limit = self.settings.max_document_tokens
        if len(document) > limit:
            raise UserError(
                f"the document has {len(document):,} tokens; the limit is {limit:,} (set LCLM_STUDIO_MAX_TOKENS to change it)"
            )
        return document

    def compress(self, text: str, ratio: int | None = None, pooling: str | None = None,
                 checkpoint: str | None = None, use_cache: bool = True,
                 progress: ProgressFn | None = None) -> Compressed:
        model = self.model(checkpoint, ratio, pooling, progress)
        document = self.tokenize(model, text)
        config = model.config
        key = latent_key(document_sha256(text), f"{model.checkpoint_id}@{model.dtype}", config.compression_ratio,
                         config.pooling)
        hit = self.cache.get(key) if use_cache else None
        if hit is not None and hit.latents.shape[0] == model.count_latents(len(document)):
            latents, compress_ms, cached = hit.latents.to(model.device, model.dtype), 0.0, True
        else:
            clock = Clock(model.device)
            windows = progress and (lambda done, total: progress("encoding windows", done, total))
            latents = guard_memory(model.compress, document.ids, progress=windows)
            compress_ms, cached = clock.ms(), False
            if use_cache:
                self.cache.put(key, latents, {"tokens": len(document), "checkpoint": model.checkpoint_id})
        chunks = self.chunks(model, text)
        result = CompressResult(
            tokens=len(document), latents=int(latents.shape[0]), window=config.encoder_window_size,
            ratio=config.compression_ratio, pooling=config.pooling, compress_ms=round(compress_ms, 3),
            checkpoint=model.checkpoint_id, cached=cached, trained=config.trained, chunks=len(chunks),
            positions_saved=len(document) - int(latents.shape[0]), precision=self.dtype_choice().to_dict(),
        )
        return Compressed(model, document, latents, result)

    def chunks(self, model: LCLM, text: str) -> list[Chunk]:
        """The EXPAND chunks of `text`: at most `settings.chunk_tokens` decoder tokens each."""
        key = (document_sha256(text), model.checkpoint_id, self.settings.chunk_tokens)
        with self._lock:
            if key in self._chunks:
                self._chunks.move_to_end(key)
                return self._chunks[key]
        chunks = chunk_text(text, model.decoder_tokenizer, self.settings.chunk_tokens)
        with self._lock:
            self._chunks[key] = chunks
            while len(self._chunks) > 8:
                self._chunks.popitem(last=False)
        return chunks

    def chunk_latents(self, model: LCLM, chunks: Sequence[Chunk], use_cache: bool = True,
                      progress: ProgressFn | None = None) -> tuple[list[torch.Tensor], float, bool]:
        """Each chunk's text compressed on its own, exactly as `compress` would compress it
        (the cache key is that of a document holding only the chunk's text):
        ([M_i, dec_hidden] per chunk, compress ms (0 when every chunk was cached), all cached)."""
        config = model.config
        model_id = f"{model.checkpoint_id}@{model.dtype}"
        clock = Clock(model.device)
        latents, encoded = [], 0
        for done, chunk in enumerate(chunks):
            ids = model.encoder_tokenizer(chunk.text, add_special_tokens=False)["input_ids"]
            key = latent_key(document_sha256(chunk.text), model_id, config.compression_ratio, config.pooling)
            hit = self.cache.get(key) if use_cache else None
            if hit is not None and hit.latents.shape[0] == model.count_latents(len(ids)):
                region = hit.latents.to(model.device, model.dtype)  # [M_i, D]
            else:
                region = guard_memory(model.compress, ids)  # [M_i, D]
                encoded += 1
                if use_cache:
                    self.cache.put(key, region, {"tokens": len(ids), "checkpoint": model.checkpoint_id})
            latents.append(region)
            if progress:
                progress("encoding chunks", done + 1, len(chunks))
        return latents, (clock.ms() if encoded else 0.0), encoded == 0

    def prompt_profile(self, model: LCLM, name: str | None = None) -> PromptProfile:
        """The named profile, else the settings' one, else the checkpoint's default."""
        name = name or self.settings.prompt_profile or default_prompt_profile(model.checkpoint_id)
        if name not in PROMPT_PROFILES:
            raise UserError(f"prompt profile must be one of {', '.join(PROMPT_PROFILES)}, got {name!r}")
        return PROMPT_PROFILES[name]

    # ---- ask -----------------------------------------------------------------------
    def ask(self, text: str, question: str, mode: str = "lclm", ratio: int | None = None,
            pooling: str | None = None, checkpoint: str | None = None, max_new_tokens: int | None = None,
            use_cache: bool = True, sampling: Sampling = Sampling(),
            progress: ProgressFn | None = None, prompt_profile: str | None = None) -> Iterator[AskEvent]:
        """Stream an answer: "token" events, "round" events (EXPAND), then one "done" event.
        `max_new_tokens` is per EXPAND round in that mode (default `settings.expand_new_tokens`).
        Running out of memory ends the stream with `OutOfMemory`, the request's memory released."""
        return guard_stream(self._ask(text, question, mode, ratio, pooling, checkpoint, max_new_tokens, use_cache,
                                      sampling, progress, prompt_profile))

    def _ask(self, text: str, question: str, mode: str, ratio: int | None, pooling: str | None,
             checkpoint: str | None, max_new_tokens: int | None, use_cache: bool, sampling: Sampling,
             progress: ProgressFn | None, prompt_profile: str | None) -> Iterator[AskEvent]:
        if mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not question or not question.strip():
            raise UserError("the question is empty")
        max_new_tokens = max_new_tokens or (
            self.settings.expand_new_tokens if mode == "expand" else self.settings.max_new_tokens)
        if max_new_tokens < 1:
            raise UserError("max new tokens must be at least 1")
        model = self.model(checkpoint, ratio, pooling, progress)
        profile = self.prompt_profile(model, prompt_profile)
        extra: dict = {}
        measurement = Measurement(device=str(model.device))
        clock = Clock(model.device)
        with PeakMemory(model.device) as memory:
            if mode == "full":
                document = self.tokenize(model, text)
                info = {"tokens": len(document), "latents": 0, "compress_ms": 0.0, "cached": False, "trained": True}
                prompt = model.chat(profile.question(text, question))
                reuse = self._reuse(model, text, mode, text, question, profile) if use_cache else None
                answer, _ = yield from self._generate(model, prompt, [], max_new_tokens, sampling, clock, measurement,
                                                      reuse=reuse)
            elif mode == "expand":
                document = self.tokenize(model, text)
                chunks = self.chunks(model, text)
                latents, compress_ms, cached = self.chunk_latents(model, chunks, use_cache, progress)
                measurement.compress_ms = compress_ms
                info = {"tokens": len(document), "latents": sum(int(r.shape[0]) for r in latents),
                        "compress_ms": round(compress_ms, 3), "cached": cached, "trained": model.config.trained}
                answer, rounds = yield from self._expand(model, chunks, latents, question, profile, max_new_tokens,
                                                         sampling, clock, measurement)
                extra = {"chunk_tokens": self.settings.chunk_tokens, "chunks": [c.to_dict() for c in chunks],
                         "expanded": sorted({n for r in rounds for n in r["expanded"]}), "rounds": rounds}
            else:
                compressed = self.compress(text, ratio, pooling, checkpoint, use_cache, progress)
                measurement.compress_ms = compressed.result.compress_ms
                info = {k: getattr(compressed.result, k) for k in ("tokens", "latents", "compress_ms", "cached", "trained")}
                region = model.memory_region(info["latents"])
                prompt = model.chat(profile.question(region, question))
                reuse = self._reuse(model, text, mode, region, question, profile) if use_cache else None
                answer, _ = yield from self._generate(model, prompt, [compressed.latents], max_new_tokens,
                                                      sampling, clock, measurement, reuse=reuse)
        total_ms = clock.ms()
        measurement.peak_mem_bytes = memory.peak
        measurement.peak_mem_above_weights_bytes = memory.above_baseline
        measurement.kv_cache_bytes = kv_cache_bytes(model.decoder.config, measurement.positions, model.dtype)
        measurement.finish(total_ms)
        result = {
            "answer": answer.strip(), "mode": mode, "question": question,
            "ratio": model.config.compression_ratio if mode != "full" else None,
            "pooling": model.config.pooling if mode != "full" else None,
            "checkpoint": model.checkpoint_id, "prompt_profile": profile.name, **info, **measurement.to_dict(),
            **self.dtype_choice().to_dict(), **extra,
        }
        if not result["trained"]:
            result["note"] = UNTRAINED_NOTE
        yield AskEvent("done", result=result)

    def _reuse(self, model: LCLM, text: str, mode: str, context: str, question: str,
               profile: PromptProfile) -> tuple[PrefixKey, str] | None:
        """Where prefix reuse is on: the key of this question's prompt prefix and the prefix's text
        (the chat-formatted prompt up to the question, with `context` as the document)."""
        if not self.prefix_cache.enabled:
            return None
        config = model.config
        key = PrefixKey(document_sha256(text), model.checkpoint_id, mode,
                        config.compression_ratio if mode != "full" else None, config.pooling if mode != "full" else None,
                        str(model.dtype).removeprefix("torch."), str(model.device), profile.name)
        return key, model.chat(profile.question(context + QUESTION_MARK, question)).split(QUESTION_MARK)[0]

    def _prefill(self, model: LCLM, prepared: PreparedPrompt, reuse: tuple[PrefixKey, str] | None,
                 measurement: Measurement) -> PrefillState:
        """The decoder's prefill of `prepared`. With `reuse` (key, prefix text): the KV of the prompt's
        prefix comes from the prefix cache where an entry holds exactly these prefix ids, and is
        otherwise computed first and kept there; only the rest is prefilled after it."""
        ids = prepared.input_ids[0].cpu()  # [P]
        reused, entry, length = 0, None, 0
        if reuse is not None:
            key, prefix_text = reuse
            entry = self.prefix_cache.get(key)
            length = 0 if entry is None else int(entry.ids.shape[0])
            if entry is not None and length < ids.shape[0] and torch.equal(ids[:length], entry.ids):
                reused = length
            else:
                prefix_ids = model.decoder_tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
                length = common_prefix_length(ids.tolist(), prefix_ids, limit=ids.shape[0] - 1)
                entry = None
                if length:
                    head = prefill(model.decoder, prepared.inputs_embeds[:, :length])  # [1, L, D] -> KV of L positions
                    entry = PrefixEntry(ids[:length].clone(), head.cache)
                    self.prefix_cache.put(key, entry)
        if entry is None:
            state = prefill(model.decoder, prepared.inputs_embeds)
        else:  # the rest of the prompt after the prefix's L positions: [1, P - L, D]
            state = prefill(model.decoder, prepared.inputs_embeds[:, length:], fork_cache(entry.cache))
        measurement.prefix_reused_positions += reused
        measurement.prefill_positions += prepared.positions - reused
        return state

    def _generate(self, model: LCLM, prompt: str, regions: list[torch.Tensor], max_new_tokens: int,
                  sampling: Sampling, clock: Clock, measurement: Measurement,
                  prefix: str = "", reuse: tuple[PrefixKey, str] | None = None) -> Generator[AskEvent, None, tuple[str, int]]:
        """Prefill + streamed decode of one reply; returns (reply text, positions). The first
        reply of a request sets TTFT and its parts; every reply counts its tokens and positions.
        `reuse` (see `_reuse`) takes the prompt prefix's KV from the prefix cache."""
        first_reply = measurement.ttft_ms == 0.0
        start_ms = clock.ms()
        prepared = model.prepare(prompt + prefix, regions)
        if model.max_positions and prepared.positions + max_new_tokens > model.max_positions:
            raise UserError(
                f"the prompt needs {prepared.positions:,} decoder positions plus {max_new_tokens} new tokens; this decoder "
                f"reads at most {model.max_positions:,} (use a higher compression ratio or a shorter document)"
            )
        state = self._prefill(model, prepared, reuse, measurement)
        prefill_done_ms = clock.ms()
        measurement.positions = max(measurement.positions, prepared.positions)
        if first_reply:
            measurement.prefill_ms = prefill_done_ms - start_ms
        detok = StreamingDetokenizer(model.decoder_tokenizer)
        stops = stop_token_ids(model.decoder_tokenizer, model.decoder)
        for token in decode(model.decoder, state, max_new_tokens, stops, sampling):
            piece = detok.push(token)
            if first_reply and measurement.ttft_ms == 0.0:
                measurement.ttft_ms = clock.ms()
                measurement.first_token_ms = measurement.ttft_ms - prefill_done_ms
            measurement.new_tokens += 1
            if piece:
                yield AskEvent("token", text=piece)
        tail = detok.flush()  # an incomplete last character, if the reply ended inside one
        if tail:
            yield AskEvent("token", text=tail)
        if first_reply and measurement.ttft_ms == 0.0:  # stopped at once: TTFT is the end of the prefill
            measurement.ttft_ms = clock.ms()
        return detok.text, prepared.positions

    def _expand(self, model: LCLM, chunks: list[Chunk], chunk_latents: list[torch.Tensor], question: str,
                profile: PromptProfile, max_new_tokens: int, sampling: Sampling, clock: Clock,
                measurement: Measurement) -> Generator[AskEvent, None, tuple[str, list[dict]]]:
        """The EXPAND agent over the chunks' own latents ([M_i, D] each); (answer, rounds)."""
        def generate(prompt: str, regions: list[torch.Tensor], prefix: str):
            return (yield from self._generate(model, model.chat(prompt), regions, max_new_tokens, sampling, clock,
                                              measurement, prefix))

        runner = ExpandAgent(self.settings.max_expand_rounds, profile).run(
            question, chunk_latents, [c.text for c in chunks], generate)
        rounds: list[dict] = []
        while True:
            try:
                item = next(runner)
            except StopIteration as stop:
                return stop.value, rounds
            if isinstance(item, Round):
                rounds.append(item.to_dict())
                yield AskEvent("round", round=item.to_dict())
            else:
                yield item

    # ---- reconstruct -----------------------------------------------------------------
    def reconstruct(self, text: str, ratio: int | None = None, pooling: str | None = None,
                    checkpoint: str | None = None, use_cache: bool = True, max_chunks: int | None = None,
                    progress: ProgressFn | None = None) -> dict:
        """The decoder reproduces each chunk from its latents; token accuracy per chunk."""
        return guard_memory(self._reconstruct, text, ratio, pooling, checkpoint, use_cache, max_chunks, progress)

    def _reconstruct(self, text: str, ratio: int | None, pooling: str | None, checkpoint: str | None,
                     use_cache: bool, max_chunks: int | None, progress: ProgressFn | None) -> dict:
        model = self.model(checkpoint, ratio, pooling, progress)
        document = self.tokenize(model, text)
        all_chunks = self.chunks(model, text)
        chunks = all_chunks[: max_chunks or None]
        latents, compress_ms, cached = self.chunk_latents(model, chunks, use_cache, progress)
        stops = stop_token_ids(model.decoder_tokenizer, model.decoder)
        results: list[ChunkReconstruction] = []
        for done, (chunk, region) in enumerate(zip(chunks, latents)):  # region: [M_i, D], the chunk alone
            original = chunk.text
            reference = model.decoder_tokenizer(original, add_special_tokens=False)["input_ids"]
            prompt = model.chat(reconstruction_prompt(model.memory_region(int(region.shape[0]))))
            state = prefill(model.decoder, model.prepare(prompt, [region]).inputs_embeds)
            generated = list(decode(model.decoder, state, len(reference) + 8, stops))
            results.append(ChunkReconstruction(
                index=chunk.number, original=original,
                reconstructed=model.decoder_tokenizer.decode(generated, skip_special_tokens=True),
                token_accuracy=round(token_accuracy(reference, generated), 4), reference_tokens=len(reference),
            ))
            if progress:
                progress("reconstructing chunks", done + 1, len(chunks))
        matched = sum(r.token_accuracy * r.reference_tokens for r in results)
        total = sum(r.reference_tokens for r in results)
        config = model.config
        out = {"tokens": len(document), "latents": sum(int(r.shape[0]) for r in latents),
               "window": config.encoder_window_size, "ratio": config.compression_ratio, "pooling": config.pooling,
               "compress_ms": round(compress_ms, 3), "checkpoint": model.checkpoint_id, "cached": cached,
               "trained": config.trained, "chunk_tokens": self.settings.chunk_tokens, "total_chunks": len(all_chunks),
               "token_accuracy": round(matched / total, 4) if total else 0.0, "chunks": [asdict(r) for r in results]}
        if not config.trained:
            out["note"] = UNTRAINED_NOTE
        return out


def is_out_of_memory(err: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError, or another backend's RuntimeError saying so."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def common_prefix_length(a: list[int], b: list[int], limit: int) -> int:
    """How many leading ids `a` and `b` share, at most `limit`."""
    length = 0
    for x, y in zip(a[:limit], b):
        if x != y:
            break
        length += 1
    return length


def release_memory() -> None:
    """Drop the kept prefix KV caches, collect what a failed request left behind and hand cached
    CUDA blocks back to the driver."""
    drop_all()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def guard_memory(call: Callable[..., T], *args, message: str = OUT_OF_MEMORY, **kwargs) -> T:
    """`call(*args, **kwargs)`, with running out of memory turned into `OutOfMemory(message)` once
    the failed call's tensors are released."""
    try:
        return call(*args, **kwargs)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
    # Past the except block the error is gone, and with its traceback the failed call's frames
    # and every tensor they held; the new error carries no reference to them.
    release_memory()
    raise OutOfMemory(message)


def guard_stream(events: Iterator[T]) -> Generator[T, None, None]:
    """`events` passed on, with running out of memory turned into `OutOfMemory` as in `guard_memory`.
    Closing this stream closes `events` (and so frees its tensors) at once."""
    try:
        yield from events
        return
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
    events = None  # the failed, finished generator
    release_memory()
    raise OutOfMemory()


def share_weights(loaded: LCLM, parts: CheckpointParts) -> LCLM:
    """A new LCLM variant around `loaded`'s encoder and decoder, with its own config and adapter
    (initialised as `build_lclm` does, then loaded from the checkpoint where it has one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same fresh adapter as build_lclm's
        lclm = LCLM(parts.config, loaded.encoder.model, loaded.encoder_tokenizer, loaded.decoder,
                    loaded.decoder_tokenizer, checkpoint_id=parts.checkpoint_id)
    if parts.adapter_file is not None:
        lclm.adapter.load_state_dict(load_file(parts.adapter_file))
    return lclm.to(device=loaded.device, dtype=loaded.dtype).eval()


def validate_choice(ratio: int | None, pooling: str | None) -> None:
    if ratio is not None and ratio not in RATIOS:
        raise UserError(f"ratio must be one of {', '.join(map(str, RATIOS))}, got {ratio!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
