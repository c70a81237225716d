"""The latents a request reads, from the latent cache (cache/, on disk) or the encoder: a whole
document's, window group by window group, and each EXPAND or reconstruction chunk's, compressed
on its own. The methods (app/engine/methods.py) and the studio's services (app/engine/service.py) both read
latents here; this module knows neither of them.

Plain LCLM answers read the whole document's latents, each encoder window cached under its own
token ids, so a second question, a restart or a compression cut short reuses every finished
window. EXPAND and reconstruction read the document as chunks (model/chunking.py), each
chunk's text compressed on its own and cached, so a second question on the same document runs
no encoder."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from app.engine.lru import BoundedLRU
from app.engine.measure import Clock
from app.engine.memory import guard_memory
from app.engine.models import ProgressFn
from app.engine.settings import Settings
from cache import LatentCache, document_sha256, latent_key
from model.chunking import Chunk, chunk_text
from model.lclm import LCLM


class DocumentIds:
    """A document as the methods read it: encoder ids (compressed by the LCLM), decoder ids
    (read as text by full context and the presses) and a key for the caches. A benchmark's
    document of random ids has no text (`text` None) and one list of ids for both."""

    def __init__(self, key: str, encoder_ids: list[int], text: str | None = None, decoder_tokenizer=None,
                 decoder_ids: list[int] | None = None):
        self.key, self.encoder_ids, self.text = key, encoder_ids, text
        self._decoder_tokenizer = decoder_tokenizer
        if decoder_ids is not None:
            self.__dict__["decoder_ids"] = decoder_ids

    @classmethod
    def from_ids(cls, ids: list[int], decoder_ids: list[int] | None = None) -> "DocumentIds":
        """A document of token ids: `ids` for both tokenizers (the benchmarks' random documents,
        from ids both tokenizers share) unless the decoder's are given."""
        decoder_ids = list(ids) if decoder_ids is None else list(decoder_ids)
        data = torch.tensor(list(ids) + [-1] + decoder_ids, dtype=torch.int64).numpy().tobytes()
        return cls(hashlib.sha256(b"token ids:" + data).hexdigest(), list(ids), decoder_ids=decoder_ids)

    @cached_property
    def decoder_ids(self) -> list[int]:
        return self._decoder_tokenizer(self.text, add_special_tokens=False, verbose=False)["input_ids"]  # any length

    def __len__(self) -> int:
        return len(self.encoder_ids)


def text_document(model: LCLM, text: str, encoder_ids: list[int]) -> DocumentIds:
    """A document from its text and its encoder ids (decoder ids tokenized when first read)."""
    shared = model.decoder_tokenizer is model.encoder_tokenizer
    return DocumentIds(document_sha256(text), encoder_ids, text, model.decoder_tokenizer,
                       decoder_ids=list(encoder_ids) if shared else None)


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


class LatentStore:
    """The latent cache (opened on first use) and a few recent documents' chunks."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.RLock()
        self._cache: LatentCache | None = None
        self._chunks: BoundedLRU[tuple, list[Chunk]] = BoundedLRU(8)

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
