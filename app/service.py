"""The studio's requests, shared by the CLI and the UI: compress, ask (any method of
app/methods.py: full context, LCLM, LCLM + EXPAND, the presses) and reconstruct. Models
(app/models.py) and the caches are process-wide; a request carries only the document text and
its choices. Running out of memory is handled in app/memory.py.

Plain LCLM answers read the whole document's latents. EXPAND and reconstruction read the
document as chunks (model/chunking.py), each chunk's text compressed on its own and cached
under its own key, so a second question on the same document runs no encoder."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from app.kv_cache import PrefixCache
from app.lru import BoundedLRU
from app.measure import Clock, PeakMemory
from app.memory import guard_memory, guard_stream
from app.methods import UNTRAINED_NOTE, AskEvent, DocumentIds, Request, method, text_document
from app.models import LoadedVariant, ModelPool, ProgressFn
from app.settings import Settings
from cache import LatentCache, document_sha256, latent_key
from model.chunking import Chunk, chunk_text
from model.errors import UserError
from model.fidelity import token_accuracy
from model.generation import Sampling, decode, prefill, stop_token_ids
from model.lclm import LCLM, DocumentTokens
from model.precision import DtypeChoice
from model.prompts import PromptProfile, memory_region, reconstruction_prompt


@dataclass
class WindowLatents:
    latents: torch.Tensor  # [M, dec_hidden]
    compress_ms: float  # 0 when every window came from the cache
    cached: bool  # every window from the cache
    cached_windows: int  # windows whose latents came from the cache
    windows: int


def window_sha256(token_ids) -> str:
    """The key of one encoder window's latents: its token ids, whatever document holds it."""
    return hashlib.sha256(b"encoder window:" + torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes()
                          ).hexdigest()


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
    windows: int = 0  # encoder windows of the document
    cached_windows: int = 0  # of them, those whose latents came from the latent cache
    peak_mem_above_weights_bytes: int = 0  # peak during compression above what was held at its start
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
class ChunkReconstruction:
    index: int  # the chunk's number, from 1
    original: str
    reconstructed: str
    token_accuracy: float
    reference_tokens: int


class Studio:
    """Process-wide state: the model pool, the latent cache and the prefix KV cache."""

    def __init__(self, settings: Settings | None = None, checkpoint: str | None = None):
        self.settings = settings or Settings.from_env()
        self.models = ModelPool(self.settings, checkpoint)
        self._lock = threading.RLock()
        self._cache: LatentCache | None = None
        self._chunks: BoundedLRU[tuple, list[Chunk]] = BoundedLRU(8)  # a few recent documents' chunks
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
        return self.models.dtype_choice()

    def model(self, checkpoint: str | None = None, ratio: int | None = None, pooling: str | None = None,
              progress: ProgressFn | None = None) -> LCLM:
        """The LCLM for this checkpoint and variant, loaded once per process."""
        return self.models.model(checkpoint, ratio, pooling, progress)

    def variant(self, checkpoint: str | None = None, ratio: int | None = None, pooling: str | None = None,
                prompt_profile: str | None = None, progress: ProgressFn | None = None) -> LoadedVariant:
        return self.models.variant(checkpoint, ratio, pooling, prompt_profile, progress)

    def prompt_profile(self, model: LCLM, name: str | None = None) -> PromptProfile:
        return self.models.prompt_profile(model, name)

    # ---- compress ----------------------------------------------------------------
    def tokenize(self, model: LCLM, text: str) -> DocumentTokens:
        if not text or not text.strip():
            raise UserError("the document is empty or only whitespace")
        document = model.tokenize_document(text)
        limit = self.settings.max_document_tokens
        if len(document) > limit:
            raise UserError(
                f"the document has {len(document):,} tokens; the limit is {limit:,} "
                "(set LCLM_STUDIO_MAX_TOKENS to change it)"
            )
        return document

    def compress(self, text: str, ratio: int | None = None, pooling: str | None = None,
                 checkpoint: str | None = None, use_cache: bool = True,
                 progress: ProgressFn | None = None) -> Compressed:
        model = self.model(checkpoint, ratio, pooling, progress)
        document = self.tokenize(model, text)
        config = model.config
        with PeakMemory(model.device) as memory:
            found = self.window_latents(model, text_document(model, text, document.ids), use_cache, progress)
        latents = found.latents
        chunks = self.chunks(model, text)
        result = CompressResult(
            tokens=len(document), latents=int(latents.shape[0]), window=config.encoder_window_size,
            ratio=config.compression_ratio, pooling=config.pooling, compress_ms=round(found.compress_ms, 3),
            checkpoint=model.checkpoint_id, cached=found.cached, trained=config.trained, chunks=len(chunks),
            positions_saved=len(document) - int(latents.shape[0]), windows=found.windows,
            cached_windows=found.cached_windows, peak_mem_above_weights_bytes=memory.above_baseline,
            precision=self.dtype_choice().to_dict(),
        )
        return Compressed(model, document, latents, result)

    def latents(self, model: LCLM, document: DocumentIds, use_cache: bool = True,
                progress: ProgressFn | None = None) -> tuple[torch.Tensor, float, bool]:
        """The whole document's latents: ([M, dec_hidden], compress ms, whether every window came
        from the latent cache). See `window_latents`."""
        found = self.window_latents(model, document, use_cache, progress)
        return found.latents, found.compress_ms, found.cached

    def window_latents(self, model: LCLM, document: DocumentIds, use_cache: bool = True,
                       progress: ProgressFn | None = None) -> "WindowLatents":
        """The document's latents, window group by window group (model.window_groups): each
        window's latents come from the latent cache (keyed by the window's own token ids) or are
        computed with its group and stored at once, so a second question, a restart or a
        compression cut short by Ctrl-C or a crash reuses every finished window. One group's
        activations are in memory at a time."""
        config = model.config
        model_id = f"{model.checkpoint_id}@{model.dtype}"
        groups = model.window_groups(document.encoder_ids)
        total = sum(len(g) for g in groups)
        parts: list[torch.Tensor] = []
        cached_windows, done = 0, 0
        clock = Clock(model.device)
        for group in groups:
            keys = [latent_key(window_sha256(w), model_id, config.compression_ratio, config.pooling) for w in group]
            hits = [self.cache.get(k) for k in keys] if use_cache else [None] * len(group)
            if all(h is not None and h.latents.shape[0] == model.count_latents(len(w)) for h, w in zip(hits, group)):
                parts += [h.latents.to(model.device, model.dtype) for h in hits]  # [ceil(L_w/N), D] each
                cached_windows += len(group)
            else:
                latents = guard_memory(model.compress_group, group)
                if use_cache:
                    for key, window_latents in zip(keys, latents):
                        self.cache.put(key, window_latents, {"tokens": len(window_latents),
                                                             "checkpoint": model.checkpoint_id})
                parts += latents
            done += len(group)
            if progress:
                progress("encoding windows", done, total)
        latents = torch.cat(parts, dim=0)  # [M, D]
        compress_ms = 0.0 if cached_windows == total else clock.ms()
        return WindowLatents(latents, compress_ms, cached_windows == total, cached_windows, total)

    def chunks(self, model: LCLM, text: str, chunk_tokens: int | None = None) -> list[Chunk]:
        """The chunks of `text`: at most `chunk_tokens` (default `settings.chunk_tokens`, EXPAND's)
        decoder tokens each."""
        chunk_tokens = chunk_tokens or self.settings.chunk_tokens
        key = (document_sha256(text), model.checkpoint_id, chunk_tokens)
        return self._chunks.setdefault(key, lambda: chunk_text(text, model.decoder_tokenizer, chunk_tokens))

    def chunk_latents(self, model: LCLM, chunks: Sequence[Chunk], use_cache: bool = True,
                      progress: ProgressFn | None = None) -> tuple[list[torch.Tensor], float, bool]:
        """Each chunk's text compressed on its own, exactly as `compress` would compress it
        (the cache key is that of a document holding only the chunk's text):
        ([M_i, dec_hidden] per chunk, compress ms (0 when every chunk was cached), all cached)."""
        clock = Clock(model.device)
        latents, encoded = [], 0
        for done, chunk in enumerate(chunks):
            ids = model.encoder_tokenizer(chunk.text, add_special_tokens=False)["input_ids"]
            region, _, cached = self.latents(model, text_document(model, chunk.text, ids), use_cache)  # [M_i, D]
            encoded += not cached
            latents.append(region)
            if progress:
                progress("encoding chunks", done + 1, len(chunks))
        return latents, (clock.ms() if encoded else 0.0), encoded == 0

    # ---- ask -----------------------------------------------------------------------
    def ask(self, text: str, question: str, mode: str = "lclm", ratio: int | None = None,
            pooling: str | None = None, checkpoint: str | None = None, max_new_tokens: int | None = None,
            use_cache: bool = True, sampling: Sampling = Sampling(),
            progress: ProgressFn | None = None, prompt_profile: str | None = None) -> Iterator[AskEvent]:
        """Stream an answer with the method `mode` (a name in app.methods.METHODS): "token" events,
        "round" events (EXPAND), then one "done" event. `max_new_tokens` is per EXPAND round in that
        mode (default `settings.expand_new_tokens`). Running out of memory ends the stream with
        `OutOfMemory`, the request's memory released."""
        chosen = method(mode)
        if not question or not question.strip():
            raise UserError("the question is empty")
        max_new_tokens = max_new_tokens or (
            self.settings.expand_new_tokens if mode == "expand" else self.settings.max_new_tokens)
        if max_new_tokens < 1:
            raise UserError("max new tokens must be at least 1")
        variant = self.variant(checkpoint, ratio, pooling, prompt_profile, progress)
        request = self.request(text, question, variant, max_new_tokens, sampling, use_cache, progress)
        return self.run(chosen.name, request)

    def request(self, text: str, question: str, variant: LoadedVariant, max_new_tokens: int,
                sampling: Sampling = Sampling(), use_cache: bool = True, progress: ProgressFn | None = None,
                ratio: int | None = None) -> Request:
        """A request about `text` (within the document limits); `use_cache` for both caches."""
        document = self.tokenize(variant.model, text)
        return Request(text_document(variant.model, text, document.ids), question, variant, max_new_tokens,
                       sampling, latent_cache=use_cache, prefix_cache=use_cache, progress=progress, ratio=ratio,
                       stop_at_repeat=self.settings.stop_at_repeat)

    def run(self, name: str, request: Request) -> Iterator[AskEvent]:
        """One request answered by the method `name`, as `ask` streams it."""
        return guard_stream(method(name).answer(self, request))

    # ---- reconstruct -----------------------------------------------------------------
    def reconstruct(self, text: str, ratio: int | None = None, pooling: str | None = None,
                    checkpoint: str | None = None, use_cache: bool = True, max_chunks: int | None = None,
                    progress: ProgressFn | None = None, chunk_tokens: int | None = None) -> dict:
        """The decoder reproduces each chunk from its latents; token accuracy per chunk. Chunks of
        `chunk_tokens` decoder tokens, by default the span length the variant was trained to
        reconstruct (`reconstruction_chunk_tokens`)."""
        return guard_memory(self._reconstruct, text, ratio, pooling, checkpoint, use_cache, max_chunks, progress,
                            chunk_tokens)

    def reconstruction_chunk_tokens(self, model: LCLM, requested: int | None = None) -> int:
        """The chunk length reconstruction uses: `requested` where given (at least 1), else the span
        length in the variant's model card (what it was trained on), else EXPAND's (`settings.chunk_tokens`)."""
        if requested is not None and requested < 1:
            raise UserError(f"the chunk length must be at least 1 token, got {requested}")
        return requested or self.models.trained_span(model) or self.settings.chunk_tokens

    def _reconstruct(self, text: str, ratio: int | None, pooling: str | None, checkpoint: str | None,
                     use_cache: bool, max_chunks: int | None, progress: ProgressFn | None,
                     chunk_tokens: int | None) -> dict:
        model = self.model(checkpoint, ratio, pooling, progress)
        chunk_tokens = self.reconstruction_chunk_tokens(model, chunk_tokens)
        document = self.tokenize(model, text)
        all_chunks = self.chunks(model, text, chunk_tokens)
        chunks = all_chunks[: max_chunks or None]
        latents, compress_ms, cached = self.chunk_latents(model, chunks, use_cache, progress)
        stops = stop_token_ids(model.decoder_tokenizer, model.decoder)
        results: list[ChunkReconstruction] = []
        for done, (chunk, region) in enumerate(zip(chunks, latents)):  # region: [M_i, D], the chunk alone
            original = chunk.text
            reference = model.decoder_tokenizer(original, add_special_tokens=False)["input_ids"]
            prompt = model.chat(reconstruction_prompt(memory_region(int(region.shape[0]))))
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
               "trained": config.trained, "chunk_tokens": chunk_tokens,
               "trained_span": self.models.trained_span(model), "total_chunks": len(all_chunks),
               "token_accuracy": round(matched / total, 4) if total else 0.0, "chunks": [asdict(r) for r in results]}
        if not config.trained:
            out["note"] = UNTRAINED_NOTE
        return out
