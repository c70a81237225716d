"""The studio's requests, shared by the CLI and the UI: compress, ask (any method of
app/engine/methods.py: full context, LCLM, LCLM + EXPAND, the presses) and reconstruct. Models
(app/engine/models.py) and the caches are process-wide; a request carries only the document text and
its choices. Running out of memory is handled in app/engine/memory.py.

The latents come from app/engine/latent_store.py; a method (app/engine/methods.py) receives the request and
`Studio.resources` (latent store, prefix KV cache, settings), never the studio."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from app.engine.answer import UNTRAINED_NOTE
from app.engine.decoder_server import DecoderServers, Streamed
from app.engine.kv_cache import PrefixCache
from app.engine.latent_store import LatentStore, text_document
from app.engine.measure import PeakMemory
from app.engine.memory import guard_memory, guard_stream
from app.engine.methods import AskEvent, Request, Resources, method
from app.engine.models import LoadedVariant, ModelPool, ProgressFn
from app.engine.settings import Settings
from model.errors import UserError
from model.fidelity import reconstruct, reconstruction_embeds, token_accuracy
from model.generation import Sampling, stop_token_ids
from model.lclm import LCLM, DocumentTokens
from model.precision import DtypeChoice
from model.prompts import PromptProfile


@dataclass(frozen=True)
class AskRequest:
    """A question about a text as a person asks it (the CLI, the Ask tab, the benchmarks): the
    method (a name in app.engine.methods.METHODS), the variant by checkpoint, ratio and pooling (None:
    the defaults), the prompt profile, the reply's limit (per EXPAND round with EXPAND; None: the
    settings') and the caches. Checked when made, so a bad request fails before anything runs."""

    text: str
    question: str
    method: str = "lclm"
    ratio: int | None = None
    pooling: str | None = None
    checkpoint: str | None = None
    max_new_tokens: int | None = None
    use_cache: bool = True  # the latent cache and the prefix KV cache
    sampling: Sampling = field(default_factory=Sampling)
    prompt_profile: str | None = None

    def __post_init__(self):
        method(self.method)  # a known method, or a UserError naming them
        if not self.question or not self.question.strip():
            raise UserError("the question is empty")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError("max new tokens must be at least 1")


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
        if not self.trained:
            out["note"] = UNTRAINED_NOTE
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


def chunks_shown(reconstruction: dict) -> str | None:
    """Which chunks a reconstruction covers ("chunks 3-4 of 48", "chunk 48 of 48") where it is not
    all of the document's; None where it is."""
    chunks, total = reconstruction["chunks"], reconstruction["total_chunks"]
    if not chunks or len(chunks) >= total:
        return None
    first, last = chunks[0]["index"], chunks[-1]["index"]
    return f"{f'chunk {first}' if first == last else f'chunks {first}-{last}'} of {total}"


class Studio:
    """Process-wide state: the model pool, the latent cache and the prefix KV cache."""

    def __init__(self, settings: Settings | None = None, checkpoint: str | None = None):
        self.settings = settings or Settings.from_env()
        self.models = ModelPool(self.settings, checkpoint)
        self.store = LatentStore(self.settings)
        self.prefix_cache = PrefixCache(self.settings.kv_cache_mb * 2**20)
        self.decoders = (DecoderServers(self.settings.data_dir, self.settings.decoder_urls)
                         if self.settings.decoder == "vllm" else None)  # None: the decoders run here

    # ---- shared resources --------------------------------------------------------
    @property
    def resources(self) -> Resources:
        """What the answer methods read besides their request."""
        return Resources(self.store, self.prefix_cache, self.settings, self.decoders)

    def close(self) -> None:
        """Close the latent cache's database (it reopens on next use) and stop the vLLM servers
        this studio started."""
        self.store.close()
        if self.decoders is not None:
            self.decoders.close()

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
            found = self.store.window_latents(model, text_document(model, text, document.ids), use_cache, progress)
        latents = found.latents
        chunks = self.store.chunks(model, text)
        result = CompressResult(
            tokens=len(document), latents=int(latents.shape[0]), window=config.encoder_window_size,
            ratio=config.compression_ratio, pooling=config.pooling, compress_ms=round(found.compress_ms, 3),
            checkpoint=model.checkpoint_id, cached=found.cached, trained=config.trained, chunks=len(chunks),
            positions_saved=len(document) - int(latents.shape[0]), windows=found.windows,
            cached_windows=found.cached_windows, peak_mem_above_weights_bytes=memory.above_baseline,
            precision=self.dtype_choice().to_dict(),
        )
        return Compressed(model, document, latents, result)

    # ---- ask -----------------------------------------------------------------------
    def ask(self, asked: AskRequest, progress: ProgressFn | None = None) -> Iterator[AskEvent]:
        """Stream the answer to `asked`: "token" events, "round" events (EXPAND), then one "done"
        event with the `Answer`. The variant is resolved and the document tokenized once, here.
        Running out of memory ends the stream with `OutOfMemory`, the request's memory released."""
        max_new_tokens = asked.max_new_tokens or (
            self.settings.expand_new_tokens if asked.method == "expand" else self.settings.max_new_tokens)
        variant = self.variant(asked.checkpoint, asked.ratio, asked.pooling, asked.prompt_profile, progress)
        request = self.request(asked.text, asked.question, variant, max_new_tokens, asked.sampling, asked.use_cache,
                               progress)
        return self.run(asked.method, request)

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
        return guard_stream(method(name).answer(self.resources, request))

    # ---- reconstruct -----------------------------------------------------------------
    def reconstruct(self, text: str, ratio: int | None = None, pooling: str | None = None,
                    checkpoint: str | None = None, use_cache: bool = True, max_chunks: int | None = None,
                    progress: ProgressFn | None = None, chunk_tokens: int | None = None, first_chunk: int = 1) -> dict:
        """The decoder reproduces each chunk from its latents; token accuracy per chunk. Chunks of
        `chunk_tokens` decoder tokens, by default the span length the variant was trained to
        reconstruct (`reconstruction_chunk_tokens`); `max_chunks` of them (None: to the end) from
        chunk number `first_chunk` (from 1), so a long document is read a page at a time."""
        return guard_memory(self._reconstruct, text, ratio, pooling, checkpoint, use_cache, max_chunks, progress,
                            chunk_tokens, first_chunk)

    def reconstruction_chunk_tokens(self, model: LCLM, requested: int | None = None) -> int:
        """The chunk length reconstruction uses: `requested` where given (at least 1), else the span
        length in the variant's model card (what it was trained on), else EXPAND's (`settings.chunk_tokens`)."""
        if requested is not None and requested < 1:
            raise UserError(f"the chunk length must be at least 1 token, got {requested}")
        return requested or self.models.trained_span(model) or self.settings.chunk_tokens

    def _reconstruct_chunk(self, model: LCLM, latents: torch.Tensor, max_new_tokens: int) -> list[int]:
        """The decoder's greedy token ids for one chunk's latents [M, D]: here, or from the vLLM
        server that serves the decoder."""
        if self.decoders is None:
            return reconstruct(model, latents, max_new_tokens)
        served = self.decoders.client(model.decoder, model.decoder_tokenizer, model.checkpoint_id)
        done = Streamed()
        stops = sorted(stop_token_ids(model.decoder_tokenizer, model.decoder))
        for _ in served.stream(reconstruction_embeds(model, latents)[0], max_new_tokens, stops, Sampling(), done):
            pass
        return [t for t in done.token_ids if t not in stops]

    def _reconstruct(self, text: str, ratio: int | None, pooling: str | None, checkpoint: str | None,
                     use_cache: bool, max_chunks: int | None, progress: ProgressFn | None,
                     chunk_tokens: int | None, first_chunk: int) -> dict:
        model = self.model(checkpoint, ratio, pooling, progress)
        chunk_tokens = self.reconstruction_chunk_tokens(model, chunk_tokens)
        document = self.tokenize(model, text)
        all_chunks = self.store.chunks(model, text, chunk_tokens)
        if not 1 <= first_chunk <= len(all_chunks):
            raise UserError(f"the document has {len(all_chunks):,} chunks of {chunk_tokens} tokens; "
                            f"there is no chunk {first_chunk}")
        chunks = all_chunks[first_chunk - 1 :][: max_chunks or None]
        latents, compress_ms, cached = self.store.chunk_latents(model, chunks, use_cache, progress)
        results: list[ChunkReconstruction] = []
        for done, (chunk, region) in enumerate(zip(chunks, latents)):  # region: [M_i, D], the chunk alone
            original = chunk.text
            reference = model.decoder_tokenizer(original, add_special_tokens=False)["input_ids"]
            generated = self._reconstruct_chunk(model, region, len(reference) + 8)
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
               "first_chunk": first_chunk,
               "token_accuracy": round(matched / total, 4) if total else 0.0, "chunks": [asdict(r) for r in results]}
        if not config.trained:
            out["note"] = UNTRAINED_NOTE
        return out
