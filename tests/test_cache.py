"""Latent cache: round trips, keys, corruption and pickle refusal, permissions, and eviction."""

import logging
import os
import stat
import threading
from pathlib import Path

import diskcache
import diskcache.core
import pytest
import safetensors.torch
import torch

from cache import (
    FORMAT_VERSION,
    BytesOnlyDisk,
    CachedLatents,
    LatentCache,
    document_sha256,
    latent_key,
)

SHA = document_sha256("a document")
KEY = latent_key(SHA, "ckpt-a", 4, "mean")
META = {"tokens": 123, "checkpoint": "ckpt-a"}


@pytest.fixture
def cache(tmp_path):
    c = LatentCache(tmp_path / "latents")
    yield c
    c.close()


def raw_bytes_cache(c: LatentCache) -> diskcache.Cache:
    """A second, independent handle on the same directory through the bytes-only path."""
    return diskcache.Cache(str(c.directory), disk=BytesOnlyDisk)


def value_files(c: LatentCache) -> list[Path]:
    return sorted(Path(c.directory).rglob("*.val"))


# --- round trip and keys ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(cache, dtype):
    latents = torch.randn(7, 16).to(dtype)
    assert KEY not in cache
    cache.put(KEY, latents, META)
    assert KEY in cache
    hit = cache.get(KEY)
    assert isinstance(hit, CachedLatents)
    assert hit.latents.dtype == dtype and hit.latents.device.type == "cpu"
    assert torch.equal(hit.latents, latents)
    assert hit.meta == META


def test_round_trip_of_non_contiguous_tensor_with_grad(cache):
    latents = torch.randn(16, 5, requires_grad=True).t()  # [5, 16], a non-contiguous view
    cache.put(KEY, latents, {})
    hit = cache.get(KEY)
    assert torch.equal(hit.latents, latents.detach()) and not hit.latents.requires_grad


def test_put_replaces_and_delete_removes(cache):
    cache.put(KEY, torch.zeros(2, 3), {"v": 1})
    cache.put(KEY, torch.ones(2, 3), {"v": 2})
    hit = cache.get(KEY)
    assert torch.equal(hit.latents, torch.ones(2, 3)) and hit.meta == {"v": 2}
    assert cache.delete(KEY) is True
    assert cache.get(KEY) is None and KEY not in cache
    assert cache.delete(KEY) is False


def test_clear_and_volume(cache):
    empty = cache.volume()
    for i in range(3):
        cache.put(latent_key(document_sha256(str(i)), "c", 4, "mean"), torch.randn(300, 64), {})
    assert cache.volume() > empty + 3 * 300 * 64 * 4 - 1
    assert cache.clear() == 3
    assert len(cache) == 0 and cache.volume() <= empty + 4096


def test_put_refuses_bad_input(cache):
    with pytest.raises(ValueError):
        cache.put(KEY, torch.zeros(3), {})  # not 2-D
    with pytest.raises(ValueError):
        cache.put(KEY, torch.zeros(2, 2, dtype=torch.int64), {})  # not float
    with pytest.raises(TypeError):
        cache.put(KEY, torch.zeros(2, 2), {"x": object()})  # not JSON-serialisable
    assert KEY not in cache


def test_unknown_key_is_a_miss(cache):
    assert cache.get(KEY) is None
    assert KEY not in cache


def test_key_parts_all_matter():
    keys = {
        latent_key(SHA, "ckpt-a", 4, "mean"),
        latent_key(document_sha256("another document"), "ckpt-a", 4, "mean"),
        latent_key(SHA, "ckpt-b", 4, "mean"),
        latent_key(SHA, "ckpt-a", 8, "mean"),
        latent_key(SHA, "ckpt-a", 4, "last"),
        # a "/" inside a part cannot shift the others into a collision
        latent_key(SHA, "org/4", 8, "mean"),
        latent_key(SHA, "org", 4, "8/mean"),
    }
    assert len(keys) == 7


def test_format_version_is_in_the_key():
    assert FORMAT_VERSION == 1
    assert latent_key(SHA, "ckpt-a", 4, "mean") == f"lclm-latents/v1/{SHA}/ckpt-a/4/mean"


def test_document_sha256_hashes_utf8():
    assert document_sha256("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert document_sha256("é") != document_sha256("e")


@pytest.mark.parametrize("args", [("nothex", "c", 4, "mean"), (SHA, "c", 0, "mean"), (SHA, "c", True, "mean"),
                                  (SHA, "", 4, "mean"), (SHA, "c", 4, "")])
def test_latent_key_validates(args):
    with pytest.raises(ValueError):
        latent_key(*args)


# --- corruption ----------------------------------------------------------------------------


def assert_dropped(cache, caplog):
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        assert cache.get(KEY) is None
    assert KEY not in cache
    assert any("corrupt" in r.getMessage() for r in caplog.records)


def test_garbage_bytes_are_a_miss_and_deleted(cache, caplog):
    cache.put(KEY, torch.randn(4, 8), META)
    with raw_bytes_cache(cache) as raw:
        raw.set(KEY, b"garbage")
    assert_dropped(cache, caplog)


def test_truncated_safetensors_is_a_miss(cache, caplog):
    cache.put(KEY, torch.randn(4, 8), META)
    with raw_bytes_cache(cache) as raw:
        blob = raw.get(KEY)
        raw.set(KEY, blob[: len(blob) - 10])
    assert_dropped(cache, caplog)


def test_tampered_tensor_with_stale_sha256_is_a_miss(cache, caplog):
    cache.put(KEY, torch.zeros(4, 8), META)
    with raw_bytes_cache(cache) as raw:
        blob = bytearray(raw.get(KEY))
        blob[-1] ^= 0x01  # last byte of the tensor data; header and sha256 untouched
        raw.set(KEY, bytes(blob))
    assert_dropped(cache, caplog)


@pytest.mark.parametrize("blob_for", [
    lambda: b"",
    lambda: (2**40).to_bytes(8, "little") + b"{}",  # header length past the end
    lambda: safetensors.torch.save({"other": torch.zeros(2, 2)}, metadata={"meta": "{}"}),
    lambda: safetensors.torch.save({"latents": torch.zeros(2, 2)}, metadata={"meta": "{nope"}),
    lambda: safetensors.torch.save({"latents": torch.zeros(2, 2)}),  # no metadata at all
])
def test_malformed_entries_are_misses(cache, caplog, blob_for):
    with raw_bytes_cache(cache) as raw:
        raw.set(KEY, blob_for())
    assert_dropped(cache, caplog)


@pytest.fixture
def large_entry(cache):
    latents = torch.randn(256, 64)  # 64 KiB > disk_min_file_size (32 KiB): stored as a file
    assert latents.numel() * 4 > diskcache.core.DEFAULT_SETTINGS["disk_min_file_size"]
    cache.put(KEY, latents, META)
    (path,) = value_files(cache)
    assert torch.equal(cache.get(KEY).latents, latents)
    return path


def test_truncated_value_file_is_a_miss(cache, caplog, large_entry):
    data = large_entry.read_bytes()
    large_entry.write_bytes(data[: len(data) // 2])
    assert_dropped(cache, caplog)
    assert value_files(cache) == []


def test_deleted_value_file_is_a_miss(cache, caplog, large_entry):
    large_entry.unlink()
    assert_dropped(cache, caplog)


# --- never unpickle ------------------------------------------------------------------------


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle must never be loaded")

    monkeypatch.setattr(diskcache.core.pickle, "load", refuse)
    monkeypatch.setattr(diskcache.core.pickle, "loads", refuse)


@pytest.mark.parametrize("value", [{"latents": [1, 2, 3]}, {"big": b"x" * 100_000}], ids=["inline", "file"])
def test_pickled_row_is_refused_not_unpickled(cache, caplog, no_unpickling, value):
    with diskcache.Cache(str(cache.directory)) as plain:  # default Disk: pickles the dict
        plain.set(KEY, value)
        rows = plain._sql("SELECT mode FROM Cache").fetchall()
    assert rows == [(diskcache.core.MODE_PICKLE,)]
    assert_dropped(cache, caplog)


def test_text_row_is_refused(cache, caplog):
    with diskcache.Cache(str(cache.directory)) as plain:
        plain.set(KEY, "a str value")
    assert_dropped(cache, caplog)


@pytest.mark.parametrize("value", ["text", {"a": 1}, bytearray(b"x"), 5, 1.5, None])
def test_bytes_only_disk_refuses_non_bytes_values(tmp_path, value):
    with diskcache.Cache(str(tmp_path / "raw"), disk=BytesOnlyDisk) as raw:
        with pytest.raises(TypeError):
            raw.set("k", value)
        assert "k" not in raw


@pytest.mark.parametrize("key", [b"bytes", 5, ("tuple",), 1.5])
def test_bytes_only_disk_refuses_non_str_keys(tmp_path, key):
    with diskcache.Cache(str(tmp_path / "raw"), disk=BytesOnlyDisk) as raw:
        with pytest.raises(TypeError):
            raw.set(key, b"value")
        assert len(raw) == 0


# --- directory, eviction, threads ----------------------------------------------------------


def test_directory_is_owner_only(tmp_path):
    directory = tmp_path / "nested" / "latents"
    with LatentCache(directory):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_size_limit_keeps_volume_bounded_and_evicts_least_recently_used(tmp_path):
    # Entries of ~33 KB (value files); 11 fit under the limit. diskcache culls *after* inserting:
    # when a set brings the volume to the limit, it removes up to cull_limit (10) entries in
    # least-recently-used order in the same transaction.
    limit = 400_000
    with LatentCache(tmp_path / "c", size_limit_bytes=limit) as c:
        keys = [latent_key(document_sha256(str(i)), "c", 4, "mean") for i in range(40)]
        for i in range(11):
            c.put(keys[i], torch.randn(64, 128), {"i": i})
        assert len(c) == 11 and c.volume() < limit
        assert c.get(keys[0]).meta == {"i": 0}  # keys[0] is now the most recently used
        c.put(keys[11], torch.randn(64, 128), {"i": 11})  # crosses the limit: 10 LRU entries go
        assert set(k for k in keys[:12] if k in c) == {keys[0], keys[11]}

        for i in range(12, 40):
            c.put(keys[i], torch.randn(64, 128), {"i": i})
            assert c.volume() < limit
            assert keys[i] in c  # the entry just written survives its own cull
        assert len(c) < 40 - 12


def test_entry_larger_than_the_limit_is_not_stored(tmp_path):
    with LatentCache(tmp_path / "c", size_limit_bytes=10_000) as c:
        c.put(KEY, torch.randn(64, 64), {})
        assert KEY not in c and value_files(c) == []


def test_threads_share_one_cache(cache):
    errors = []

    def work(n):
        try:
            for i in range(10):
                key = latent_key(document_sha256(f"{n}-{i}"), "c", 4, "mean")
                latents = torch.full((3, 4), float(n * 100 + i))
                cache.put(key, latents, {"n": n, "i": i})
                hit = cache.get(key)
                assert torch.equal(hit.latents, latents) and hit.meta == {"n": n, "i": i}
        except BaseException as error:  # noqa: BLE001 - reported to the main thread
            errors.append(error)
        finally:
            cache.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cache) == 60
