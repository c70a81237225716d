"""Latent cache faults: corrupt or truncated entries, the cache directory removed while running, a
full disk, two processes writing one key, and a writer killed mid-write. In every case nothing
crashes, a read is either a miss or latents whose content hash matches what was written, and the
entry is rebuilt by the next compress."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import diskcache
import pytest
import torch

from app.engine.service import Studio
from cache import LatentCache, document_sha256, latent_key
from cache.latents import BytesOnlyDisk
from tests.cache_writer import latents_of
from tests.test_cache import KEY, META, cache, raw_bytes_cache, value_files  # noqa: F401 (cache: fixture)
from tests.test_service import DOC, studio  # noqa: F401 - the Studio fixture on the tiny checkpoint

ROOT = Path(__file__).resolve().parent.parent
def content_sha256(latents: torch.Tensor) -> str:
    return hashlib.sha256(latents.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def warned(caplog, words: str) -> bool:
    return any(words in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def stale_hash(blob: bytes) -> bytes:
    """`blob` with one hex digit of its stored sha256 changed (same length, still parses)."""
    at = blob.index(b'"sha256":"') + len(b'"sha256":"')
    return blob[:at] + (b"1" if blob[at:at + 1] == b"0" else b"0") + blob[at + 1:]


# ---- corrupt and truncated entries through compress ------------------------------------------------
@pytest.mark.parametrize("damage", [
    lambda blob: blob[: len(blob) // 2],  # truncated
    lambda blob: blob[:-1] + bytes([blob[-1] ^ 0x40]),  # one bit of the tensor flipped, its sha256 stale
    lambda blob: stale_hash(blob),  # a whole, readable entry whose stored hash is wrong
    lambda blob: b"",
], ids=["truncated", "bit-flip", "bad-hash", "empty"])
@pytest.mark.slow
def test_a_damaged_entry_is_recomputed_and_rebuilt(studio, caplog, damage):  # noqa: F811
    first = studio.compress(DOC)
    key = next(studio.store.cache._store.iterkeys())
    with raw_bytes_cache(studio.store.cache) as raw:
        raw.set(key, damage(raw.get(key)))
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        again = studio.compress(DOC)
    assert again.result.cached is False and warned(caplog, "corrupt")
    assert content_sha256(again.latents) == content_sha256(first.latents)
    hit = studio.compress(DOC)
    assert hit.result.cached is True and content_sha256(hit.latents) == content_sha256(first.latents)


# ---- the directory removed while running -------------------------------------------------------------
@pytest.mark.slow
def entries_of(studio, text: str) -> int:
    """Latent-cache entries one document makes: one per distinct encoder window."""
    model = studio.model()
    ids = model.tokenize_document(text).ids
    return len({tuple(window) for group in model.window_groups(ids) for window in group})


def test_the_cache_directory_removed_while_running(studio, caplog):  # noqa: F811
    first = studio.compress(DOC)
    assert studio.compress(DOC).result.cached is True
    shutil.rmtree(studio.store.cache.directory)
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        again = studio.compress(DOC)
    assert again.result.cached is False and warned(caplog, "was removed")
    assert content_sha256(again.latents) == content_sha256(first.latents)
    cache = studio.store.cache
    assert cache.directory.is_dir() and len(cache) == entries_of(studio, DOC)  # recreated, rebuilt
    assert studio.compress(DOC).result.cached is True
    # a later process sees the rebuilt entry too: it was not written to the removed database
    with LatentCache(studio.store.cache.directory) as other:
        assert len(other) == entries_of(studio, DOC)


def test_value_files_written_after_the_directory_was_removed(cache):
    cache.put(KEY, latents_of(0), META)
    shutil.rmtree(cache.directory)
    assert cache.get(KEY) is None
    assert cache.put(KEY, latents_of(1), META) is True
    assert content_sha256(cache.get(KEY).latents) == content_sha256(latents_of(1)) and value_files(cache)


# ---- a full disk ----------------------------------------------------------------------------------------
def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def database_full(*args, **kwargs):
    raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize("target, failure", [
    ((BytesOnlyDisk, "store"), disk_full),  # writing the entry's bytes
    ((diskcache.Cache, "set"), database_full),  # SQLite committing the row
], ids=["value", "database"])
@pytest.mark.slow
def test_a_full_disk_still_answers_and_stores_nothing(studio, caplog, monkeypatch, target, failure):  # noqa: F811
    reference = studio.compress(DOC, use_cache=False)
    monkeypatch.setattr(*target, failure)
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        full = studio.compress(DOC)
    assert full.result.cached is False and torch.equal(full.latents, reference.latents)
    assert len(studio.store.cache) == 0 and warned(caplog, "could not store")
    monkeypatch.undo()  # space again: the next compress stores the entry
    assert studio.compress(DOC).result.cached is False and studio.compress(DOC).result.cached is True


def test_a_value_file_cut_short_by_a_full_disk_is_never_served(cache, caplog, monkeypatch):
    cache.put(KEY, latents_of(0), META)

    def half_then_full(self, full_path, iterator, mode, encoding=None):
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        with open(full_path, mode) as writer:
            data = b"".join(iterator)
            writer.write(data[: len(data) // 2])
        disk_full()

    monkeypatch.setattr(diskcache.Disk, "_write", half_then_full)
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        assert cache.put(KEY, latents_of(1), META) is False
    assert warned(caplog, "could not store")
    assert content_sha256(cache.get(KEY).latents) == content_sha256(latents_of(0))  # the old entry, intact


# ---- other processes ------------------------------------------------------------------------------------
def writer_process(directory: Path, writer: int, steps: int, mode: str = "loop") -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "tests.cache_writer", str(directory), KEY, str(writer),
                                str(steps), mode],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def go(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()


def assert_written_or_miss(directory: Path) -> dict | None:
    """A fresh reader of `directory` gets a miss or exactly the latents some writer stored under KEY."""
    with LatentCache(directory) as reader:
        hit = reader.get(KEY)
    if hit is None:
        return None
    expected = latents_of(hit.meta["writer"], hit.meta["step"])
    assert content_sha256(hit.latents) == content_sha256(expected)
    return hit.meta


@pytest.mark.slow
def test_two_processes_writing_one_key(tmp_path):
    directory = tmp_path / "shared"
    LatentCache(directory).close()
    writers = [writer_process(directory, writer, steps=25) for writer in (1, 2)]
    go(*writers)
    seen = []
    with LatentCache(directory) as reader:  # reading all along: only whole entries of one writer or the other
        while any(w.poll() is None for w in writers):
            hit = reader.get(KEY)
            if hit is not None:
                assert content_sha256(hit.latents) == content_sha256(latents_of(**hit.meta))
                seen.append(hit.meta["writer"])
    assert [w.wait(60) for w in writers] == [0, 0]
    final = assert_written_or_miss(directory)
    assert final is not None and final["step"] == 24  # the last write of whichever writer came last
    assert len(value_files_in(directory)) == 1  # the losers' files were removed, none left behind


def value_files_in(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.val"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stall", "loop"])
def test_a_writer_killed_mid_write(tmp_path, mode):
    """"stall": killed with half of a value file written; "loop": killed at some point while it
    rewrites the entry again and again. Afterwards a reader gets a whole entry or a miss, and the
    next write rebuilds the entry."""
    directory = tmp_path / "killed"
    with LatentCache(directory) as cache:
        cache.put(KEY, latents_of(0), {"writer": 0, "step": 0})
    for round_ in range(3 if mode == "loop" else 1):
        writer = writer_process(directory, 1 + round_, steps=1000, mode=mode)
        go(writer)
        wait_for = "half" if mode == "stall" else f"wrote {3 + 4 * round_}"
        while (line := writer.stdout.readline().strip()) != wait_for:
            assert line, "the writer ended early"
        writer.kill()  # SIGKILL: no cleanup of any kind
        writer.wait(30)
        meta = assert_written_or_miss(directory)
        if mode == "stall":
            assert meta == {"writer": 0, "step": 0}  # the entry before the killed write, intact
    with LatentCache(directory) as cache:
        assert cache.put(KEY, latents_of(9), {"writer": 9, "step": 0}) is True
        assert content_sha256(cache.get(KEY).latents) == content_sha256(latents_of(9))


def test_many_keys_hold_their_own_content(cache):
    keys = [latent_key(document_sha256(str(i)), "c", 4, "mean") for i in range(5)]
    for i, key in enumerate(keys):
        cache.put(key, latents_of(i), {"writer": i, "step": 0})
    for i, key in enumerate(keys):
        assert content_sha256(cache.get(key).latents) == content_sha256(latents_of(i))


# ---- a damaged or unusable cache database ----------------------------------------------------------
def overwrite(at: int):
    def damage(db: Path) -> None:
        with db.open("r+b") as f:
            f.seek(at)
            f.write(bytes(range(256)) * 32)  # 8 KiB of garbage
    return damage


DAMAGES = {
    "truncated": lambda db: db.write_bytes(db.read_bytes()[: db.stat().st_size // 2]),
    "overwritten-header": overwrite(0),
    "overwritten-pages": overwrite(8192),
}


def fill(studio) -> Path:  # noqa: F811
    """The cache database with a few entries, closed: the state a later process finds."""
    studio.compress(DOC)
    for i in range(8):
        studio.compress(f"{DOC} {i}")
    studio.store.cache.close()
    return studio.store.cache.directory / "cache.db"


def moved_aside(directory: Path) -> list[Path]:
    return sorted(directory.parent.glob(f"{directory.name}.damaged-*"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_a_damaged_database_is_moved_aside_and_a_fresh_cache_started(studio, caplog, damage):  # noqa: F811
    reference = studio.compress(DOC, use_cache=False)
    db = fill(studio)
    assert db.stat().st_size >= 16384
    DAMAGES[damage](db)
    damaged = db.read_bytes()
    later = Studio(studio.settings,
                   checkpoint=studio.models.default_checkpoint)  # the next run of the CLI or the studio
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        again = later.compress(DOC)
    assert again.result.cached is False and torch.equal(again.latents, reference.latents)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    (aside,) = moved_aside(db.parent)
    assert re.fullmatch(rf"latent cache: {re.escape(str(db))} is damaged \((file is not a database|database disk "
                        rf"image is malformed)\); moved it aside to {re.escape(str(aside))} and started a fresh cache",
                        warning), warning
    assert (aside / "cache.db").read_bytes() == damaged  # kept, as it was, for inspection
    assert later.compress(DOC).result.cached is True  # the fresh cache works
    assert len(later.store.cache) == entries_of(later, DOC)


@pytest.mark.slow
def test_a_zero_length_database_is_an_empty_cache(studio, caplog):  # noqa: F811
    db = fill(studio)
    db.write_bytes(b"")
    later = Studio(studio.settings, checkpoint=studio.models.default_checkpoint)
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        assert later.compress(DOC).result.cached is False
    assert not caplog.records and not moved_aside(db.parent)  # nothing to move aside: SQLite reads it as empty
    assert later.compress(DOC).result.cached is True


def test_a_database_found_damaged_while_running(studio, caplog, monkeypatch):  # noqa: F811
    studio.compress(DOC)
    real_get, reads = diskcache.Cache.get, []

    def damaged(*args, **kwargs):  # the first read finds the database damaged; the fresh one reads well
        reads.append(1)
        if len(reads) > 1:
            return real_get(*args, **kwargs)
        error = sqlite3.DatabaseError("database disk image is malformed")
        error.sqlite_errorname = "SQLITE_CORRUPT"
        raise error

    monkeypatch.setattr(diskcache.Cache, "get", damaged)
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        assert studio.compress(DOC).result.cached is False
    monkeypatch.undo()
    assert [warned(caplog, "is damaged")] == [True] and len(moved_aside(studio.store.cache.directory)) == 1
    assert studio.compress(DOC).result.cached is True  # stored in the fresh cache by the compress above


@pytest.fixture
def unwritable(tmp_path):
    """function(path): make the directory `path` unwritable, even for root (chattr +i), undone afterwards."""
    made = []

    def make(path: Path) -> None:
        path.chmod(0o500)
        made.append(path)
        if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("root, and chattr cannot make a directory immutable here")

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o700)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["home", "cache"])
def test_an_unwritable_cache_directory_means_work_goes_on_uncached(studio, caplog, unwritable, where):  # noqa: F811
    """"home": the data directory is read-only, so the cache cannot be created; "cache": the cache
    directory exists, with an entry, and is read-only."""
    reference = studio.compress(DOC, use_cache=False)
    if where == "cache":
        fill(studio)
    home = studio.settings.data_dir
    unwritable(home if where == "home" else studio.settings.cache_dir)
    later = Studio(studio.settings, checkpoint=studio.models.default_checkpoint)
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        results = [later.compress(DOC) for _ in range(2)]
    assert [r.result.cached for r in results] == [False, False]
    assert all(torch.equal(r.latents, reference.latents) for r in results)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"latent cache: cannot use {studio.settings.cache_dir} (")
    assert warnings[0].endswith("); working without a cache")


@pytest.mark.slow
def test_a_damaged_database_that_cannot_be_moved_aside(studio, caplog, unwritable):  # noqa: F811
    db = fill(studio)
    overwrite(0)(db)
    unwritable(studio.settings.data_dir)  # the cache directory cannot be renamed
    later = Studio(studio.settings, checkpoint=studio.models.default_checkpoint)
    with caplog.at_level(logging.WARNING, logger="cache.latents"):
        assert [later.compress(DOC).result.cached for _ in range(2)] == [False, False]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"latent cache: {db} is damaged (file is not a database) and could not be replaced (")
    assert warning.endswith("); working without a cache") and not moved_aside(db.parent)


# ---- the same through the CLI: one warning line, the answer as usual ----------------------------------
def cli_compress(capsys, doc: Path, checkpoint: Path) -> tuple[dict, list[str]]:
    from app.cli import main

    code = main(["compress", str(doc), "--checkpoint", str(checkpoint), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err
    return json.loads(out), [line for line in err.splitlines() if line.startswith("warning: ")]


@pytest.mark.slow
def test_the_cli_with_a_damaged_or_unusable_cache(capsys, tmp_path, tiny_checkpoint, unwritable):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    cache_dir = Path(os.environ["LCLM_STUDIO_HOME"]) / "latent-cache"
    first, warnings = cli_compress(capsys, doc, tiny_checkpoint)
    assert first["cached"] is False and warnings == []
    overwrite(0)(cache_dir / "cache.db")
    again, warnings = cli_compress(capsys, doc, tiny_checkpoint)
    (aside,) = moved_aside(cache_dir)
    assert again["cached"] is False and again["latents"] == first["latents"]
    assert warnings == [f"warning: latent cache: {cache_dir / 'cache.db'} is damaged (file is not a database); "
                        f"moved it aside to {aside} and started a fresh cache"]
    cached, warnings = cli_compress(capsys, doc, tiny_checkpoint)
    varying = ("peak_mem_above_weights_bytes", "cached_windows", "load_ms", "threads")  # readings; windows now cached
    assert warnings == [] and cached["cached_windows"] == cached["windows"]
    assert {k: v for k, v in cached.items() if k not in varying} == {
        **{k: v for k, v in again.items() if k not in varying}, "cached": True, "compress_ms": 0.0}
    unwritable(cache_dir)
    uncached, warnings = cli_compress(capsys, doc, tiny_checkpoint)
    assert uncached["cached"] is False and uncached["latents"] == first["latents"]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: latent cache: cannot use {cache_dir} (")
