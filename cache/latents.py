"""On-disk cache of document latents, backed by diskcache and stored as safetensors bytes.

Each entry is one safetensors blob holding a single tensor named "latents" ([num_latents, dim],
any float dtype) and two metadata strings: "meta" (the caller's JSON-encoded dict) and "sha256"
(the hash of the raw tensor bytes, checked on every read). Nothing is ever pickled: the
`BytesOnlyDisk` serialiser accepts only str keys and bytes values, and refuses to decode rows that
another writer stored in pickle mode. Any entry that cannot be read back intact (garbage, truncated,
tampered, its value file gone, pickled) is logged, deleted, and reported as a miss.

Eviction is diskcache's: least-recently-used, checked on every `put`. When a put leaves the cache at
or over its size limit, diskcache removes up to `cull_limit` (10) least-recently-used entries in the
same transaction, so the volume can pass the limit by about one entry before it falls back. With
10 entries or fewer, the one just written may be among those removed, so keep the limit well above
ten entries' size; an entry larger than the whole limit is not stored at all.

A `LatentCache` may be shared between threads (diskcache keeps one SQLite connection per thread) and
between processes using the same directory: diskcache writes a value file under a fresh name before
the row that points to it is committed, so a reader sees the old entry or the new one, never half of
one, and a writer killed mid-write leaves at most an unreferenced file.

The cache never stops the work it serves: a failed write (disk full, directory unwritable) or read
is logged and the entry is simply not stored or a miss, and a cache directory removed while the
process runs is recreated, empty, on the next use. A damaged database (SQLite finds it malformed or
not a database, at open or on a read) has its directory moved aside as `<dir>.damaged-<timestamp>`,
kept for inspection, and a fresh cache is started there; a directory that cannot be used at all
(not writable, a file in its place) turns the cache off for the process. Each says so in one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import diskcache
import safetensors.torch
import torch
from diskcache.core import DBNAME, MODE_BINARY, MODE_RAW, UNKNOWN

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the key layout or the stored format changes; old entries then simply miss."""

TENSOR_NAME = "latents"
DAMAGED_DATABASE = ("SQLITE_CORRUPT", "SQLITE_NOTADB")  # SQLite's codes for a file it cannot read as a database


class CorruptEntryError(Exception):
    """A stored row or value cannot be decoded safely. Deliberately not an OSError: diskcache
    swallows OSError from `Disk.fetch` as a plain miss, which would leave the bad row in place."""


class ValueFileGone(CorruptEntryError):
    """A row's value file is missing or unreadable: a stale row, or one that another process
    replaced (removing the old file) between our reading the row and the file."""


def is_damaged(error: BaseException) -> bool:
    """Whether SQLite failed because the database file itself is damaged (not locked, not full)."""
    return isinstance(error, sqlite3.DatabaseError) and getattr(error, "sqlite_errorname", "") in DAMAGED_DATABASE


def document_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 encoding of `text`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def latent_key(document_sha256: str, checkpoint_id: str, ratio: int, pooling: str) -> str:
    """Cache key for the latents of one document under one model configuration.

    Layout: "lclm-latents/v<FORMAT_VERSION>/<sha>/<checkpoint_id>/<ratio>/<pooling>", with the free-form
    parts percent-encoded so that a "/" inside a checkpoint id cannot make two keys collide.
    """
    sha = document_sha256.lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"not a sha256 hex digest: {document_sha256!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    if not checkpoint_id or not pooling:
        raise ValueError("checkpoint_id and pooling must be non-empty")
    return f"lclm-latents/v{FORMAT_VERSION}/{sha}/{quote(checkpoint_id, safe='')}/{ratio}/{quote(pooling, safe='')}"


class BytesOnlyDisk(diskcache.Disk):
    """A diskcache serialiser that never pickles or unpickles.

    Keys must be str and values bytes (stored inline or, from `disk_min_file_size` up, as a file).
    Rows that were stored in any other mode, e.g. by a plain `diskcache.Cache` holding a dict, raise
    `CorruptEntryError` instead of being decoded; so does a value file that is missing on disk.
    """

    def put(self, key: Any) -> tuple[str, bool]:
        """Convert `key` to its database form; only str keys are accepted."""
        if type(key) is not str:
            raise TypeError(f"BytesOnlyDisk keys must be str, not {type(key).__name__}")
        return super().put(key)

    def get(self, key: Any, raw: bool) -> str:
        """Convert a database key back; rows with pickled keys are refused."""
        if not raw or type(key) is not str:
            raise CorruptEntryError("refusing a cache row whose key is not a raw str")
        return key

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, str | None, Any]:
        """Convert `value` to database fields; only bytes values are accepted."""
        if type(value) is not bytes:
            raise TypeError(f"BytesOnlyDisk values must be bytes, not {type(value).__name__}")
        return super().store(value, False, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> bytes:
        """Return the stored bytes; pickle/text/non-bytes rows and missing files raise CorruptEntryError."""
        if read:
            raise CorruptEntryError("BytesOnlyDisk does not hand out file handles")
        if mode == MODE_RAW and type(value) in (bytes, sqlite3.Binary):
            return bytes(value)
        if mode == MODE_BINARY and filename is not None:
            try:
                return super().fetch(mode, filename, value, False)
            except OSError as error:
                raise ValueFileGone(f"value file unreadable: {error}") from None
        raise CorruptEntryError(f"refusing a cache row stored in mode {mode} ({type(value).__name__})")


@dataclass(frozen=True)
class CachedLatents:
    """A cache hit: the latents on CPU ([num_latents, dim]) and the metadata given to `put`."""

    latents: torch.Tensor
    meta: dict


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of a contiguous CPU tensor's raw bytes (works for bfloat16 too)."""
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def encode_entry(latents: torch.Tensor, meta: dict) -> bytes:
    """Serialise latents and metadata to safetensors bytes (no pickle involved)."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 2 or not latents.is_floating_point():
        raise ValueError("latents must be a 2-D float tensor [num_latents, dim]")
    if not isinstance(meta, dict):
        raise TypeError("meta must be a dict")
    tensor = latents.detach().to("cpu").contiguous()
    metadata = {"meta": json.dumps(meta), "sha256": _tensor_sha256(tensor)}
    return safetensors.torch.save({TENSOR_NAME: tensor}, metadata=metadata)


def decode_entry(blob: bytes) -> CachedLatents:
    """Parse and verify bytes written by `encode_entry`; any defect raises CorruptEntryError."""
    try:
        (header_len,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        tensors = safetensors.torch.load(blob)
        tensor = tensors[TENSOR_NAME]
        meta = json.loads(metadata["meta"])
        expected_sha = metadata["sha256"]
    except Exception as error:  # struct/json/safetensors/key errors alike
        raise CorruptEntryError(f"unreadable entry: {type(error).__name__}: {error}") from None
    if set(tensors) != {TENSOR_NAME} or tensor.dim() != 2 or not tensor.is_floating_point():
        raise CorruptEntryError("entry does not hold one 2-D float tensor named 'latents'")
    if not isinstance(meta, dict):
        raise CorruptEntryError("entry metadata is not a JSON object")
    if _tensor_sha256(tensor) != expected_sha:
        raise CorruptEntryError("tensor bytes do not match their sha256")
    return CachedLatents(latents=tensor, meta=meta)


class LatentCache:
    """A size-bounded, LRU-evicted, bytes-only store of latents keyed by `latent_key`. When its
    directory cannot be used, the cache is off: every read is a miss and every write is left out."""

    def __init__(self, directory: str | Path, size_limit_bytes: int = 2 * 1024**3) -> None:
        """Open (creating with mode 0o700 if needed) the cache at `directory`."""
        self.directory = Path(directory).expanduser()
        self.size_limit_bytes = int(size_limit_bytes)
        self._reopen_lock = threading.Lock()
        self._cache: diskcache.Cache | None = None
        self._cache = self._open()

    def _connect(self) -> diskcache.Cache:
        if not self.directory.is_dir():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask
        return diskcache.Cache(
            str(self.directory),
            disk=BytesOnlyDisk,
            eviction_policy="least-recently-used",
            size_limit=self.size_limit_bytes,
        )

    def _open(self) -> diskcache.Cache | None:
        """The diskcache handle; a damaged database is replaced by a fresh one, and a directory that
        cannot be used gives None (the cache off), each with one warning."""
        try:
            return self._connect()
        except (OSError, sqlite3.Error) as error:
            if is_damaged(error):
                return self._replace_damaged(error)
            log.warning("latent cache: cannot use %s (%s); working without a cache", self.directory, error)
            return None

    def _replace_damaged(self, error: sqlite3.Error) -> diskcache.Cache | None:
        """Move the damaged cache directory aside (kept for inspection) and open a fresh one."""
        if self._cache is not None:
            self._cache.close()
        aside = self.directory.with_name(f"{self.directory.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            try:
                self.directory.rename(aside)
            except FileNotFoundError:  # another process moved it aside first
                pass
            cache = self._connect()
        except (OSError, sqlite3.Error) as again:
            log.warning("latent cache: %s is damaged (%s) and could not be replaced (%s); working without a cache",
                        self.directory / DBNAME, error, again)
            return None
        log.warning("latent cache: %s is damaged (%s); moved it aside to %s and started a fresh cache",
                    self.directory / DBNAME, error, aside)
        return cache

    @property
    def _store(self) -> diskcache.Cache | None:
        """The diskcache handle (None when the cache is off); reopened on a fresh directory if the
        directory or its database was removed while open (SQLite would otherwise keep writing to the
        deleted file)."""
        if self._cache is not None and not (self.directory / DBNAME).is_file():
            with self._reopen_lock:
                if self._cache is not None and not (self.directory / DBNAME).is_file():
                    log.warning("latent cache: %s was removed; starting an empty cache there", self.directory)
                    self._cache.close()
                    self._cache = self._open()
        return self._cache

    def _recover(self, store: diskcache.Cache, error: sqlite3.Error) -> None:
        """`store` was found damaged on a read or write: replace it by a fresh cache, unless another
        thread has already done so."""
        with self._reopen_lock:
            if self._cache is store:
                self._cache = self._replace_damaged(error)

    def get(self, key: str) -> CachedLatents | None:
        """Return the entry for `key`, or None on a miss; a corrupt entry is deleted and is a miss,
        and so is an entry that cannot be read (the error is logged)."""
        store = self._store
        if store is None:
            return None
        try:
            try:
                return self._read(store, key)
            except ValueFileGone:
                return self._read(store, key)  # a replaced entry reads whole the second time; a stale row fails again
        except CorruptEntryError as error:
            log.warning("latent cache: dropping corrupt entry %s: %s", key, error)
            self.delete(key)
            return None
        except (OSError, sqlite3.Error) as error:
            if is_damaged(error):
                self._recover(store, error)
            else:
                log.warning("latent cache: could not read %s (%s); computing it again", key, error)
            return None

    @staticmethod
    def _read(store: diskcache.Cache, key: str) -> CachedLatents | None:
        blob = store.get(key, retry=True)
        return None if blob is None else decode_entry(blob)

    def put(self, key: str, latents: torch.Tensor, meta: dict) -> bool:
        """Store `latents` ([num_latents, dim], any float dtype, any device) with JSON-able `meta`.
        Returns whether it was stored: an entry over the size limit, or one the disk refuses
        (full, unwritable), is logged and left out; with the cache off nothing is stored."""
        blob = encode_entry(latents, meta)
        if len(blob) > self.size_limit_bytes:
            log.warning("latent cache: entry %s (%d bytes) exceeds the size limit; not stored", key, len(blob))
            return False
        store = self._store
        if store is None:
            return False
        try:
            store.set(key, blob, retry=True)
        except (OSError, sqlite3.Error) as error:
            if is_damaged(error):
                self._recover(store, error)
            else:
                log.warning("latent cache: could not store %s (%s); it will be computed again next time", key, error)
            return False
        return True

    def __contains__(self, key: str) -> bool:
        """Whether a row exists for `key` (its content is only verified by `get`)."""
        store = self._store
        return store is not None and key in store

    def delete(self, key: str) -> bool:
        """Remove `key`; returns whether it was present."""
        store = self._store
        return store is not None and bool(store.delete(key, retry=True))

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        store = self._store
        return 0 if store is None else store.clear(retry=True)

    def volume(self) -> int:
        """Estimated bytes on disk: the SQLite database plus the value files."""
        store = self._store
        return 0 if store is None else store.volume()

    def __len__(self) -> int:
        store = self._store
        return 0 if store is None else len(store)

    def close(self) -> None:
        """Close this thread's database connection (the cache reopens it on next use)."""
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> LatentCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
