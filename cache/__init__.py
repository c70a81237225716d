"""Latent cache: safetensors-encoded document latents in a bytes-only diskcache store."""

from cache.latents import (
    FORMAT_VERSION,
    BytesOnlyDisk,
    CachedLatents,
    CorruptEntryError,
    LatentCache,
    document_sha256,
    latent_key,
)

__all__ = [
    "FORMAT_VERSION",
    "BytesOnlyDisk",
    "CachedLatents",
    "CorruptEntryError",
    "LatentCache",
    "document_sha256",
    "latent_key",
]
