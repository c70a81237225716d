"""The decoder's KV cache of a prompt's prefix (chat header + document or memory regions, up to
the question), kept in process memory so that a follow-up question about the same document
prefills only its own tokens, as prefix caching does in vLLM (APC) and SGLang (RadixAttention).

Entries are keyed by everything the prefix's KV depends on (`PrefixKey`) and bounded by bytes,
least recently used dropped first. Nothing here is ever written to disk. Running out of memory
anywhere drops every entry first (`drop_all`, called by `app.engine.service.release_memory`)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil
import torch

from app.engine.lru import BoundedLRU
from app.engine.measure import MiB

if TYPE_CHECKING:
    from transformers import DynamicCache

DEFAULT_MAX_MB = 4096  # the default budget is an eighth of the machine's memory, at most this


def default_size_mb() -> int:
    """An eighth of this machine's memory, at most DEFAULT_MAX_MB."""
    return min(DEFAULT_MAX_MB, psutil.virtual_memory().total // 8 // MiB)


@dataclass(frozen=True)
class PrefixKey:
    """What a prefix's KV depends on. `prompt_profile` names the prompt texts (model.prompts) the
    prefix was rendered with: a different profile renders a different prefix."""

    document_sha256: str
    checkpoint: str
    method: str  # a name in app.engine.methods.METHODS: "full", "lclm", "snapkv", ...
    ratio: int | None  # the LCLM's 1:N, or a press's matched ratio; None for full context
    pooling: str | None
    dtype: str
    device: str
    prompt_profile: str = "default"


@dataclass
class PrefixEntry:
    ids: torch.Tensor  # [L] decoder ids of the prefix (memory placeholders where latents sit)
    cache: DynamicCache  # the decoder's KV of the prefix: positions held, per layer
    extra: dict = field(default_factory=dict)  # method-specific facts, e.g. a press's uncompressed length

    @property
    def nbytes(self) -> int:
        return cache_bytes(self.cache)


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


_LIVE: weakref.WeakSet = weakref.WeakSet()


class PrefixCache:
    """Prefix KV caches by `PrefixKey`, at most `max_bytes` in all (LRU); 0 keeps nothing."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: BoundedLRU[PrefixKey, PrefixEntry] = BoundedLRU(
            max_size=self.max_bytes, size_of=lambda entry: entry.nbytes, refuse_oversized=True)
        _LIVE.add(self)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes(self) -> int:
        return self._entries.size

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: PrefixKey) -> PrefixEntry | None:
        return self._entries.get(key)

    def put(self, key: PrefixKey, entry: PrefixEntry) -> bool:
        """Keep `entry` (dropping the least recently used beyond the budget); False where it alone
        is larger than the budget."""
        return self._entries.put(key, entry)

    def clear(self) -> None:
        self._entries.clear()


def drop_all() -> None:
    """Empty every prefix cache of this process (running out of memory frees these first)."""
    for store in list(_LIVE):
        store.clear()
