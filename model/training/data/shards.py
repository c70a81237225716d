"""Tokenized shards on disk, the packed single-file form, and the in-memory corpus.

A shard directory holds `manifest.json` and `{split}-{index:05d}.safetensors` files, each
with two tensors: `tokens` (uint16 when the vocabulary fits, else uint32; documents
back to back) and `doc_offsets` (int64, documents + 1 boundaries). The packed form is one
safetensors file with every shard under `{split}/{index}/...` and the manifest as its
metadata, compressed with xz (stdlib lzma): `corpus.safetensors.xz`. No pickle anywhere.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load, load_file, save, save_file

SPLITS = ("train", "validation")
PACKED_SUFFIX = ".safetensors.xz"
MAX_PACKED_BYTES = 40 * 2**20


def vocab_hash(tokenizer) -> str:
    """Identity of a tokenizer's vocabulary, without the LCLM memory tokens (which are appended)."""
    from model.prompts import MEMORY_TOKENS

    vocab = sorted((t, i) for t, i in tokenizer.get_vocab().items() if t not in MEMORY_TOKENS)
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Accumulates tokenized documents of one split and writes a shard every `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int = 4_000_000):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.docs: list[np.ndarray] = []
        self.pending = 0
        self.files: list[str] = []
        self.tokens = 0
        self.documents = 0

    def add(self, ids: list[int]) -> None:
        if not ids:
            return
        self.docs.append(np.asarray(ids, dtype=self.dtype))
        self.pending += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        if self.pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        name = f"{self.split}-{len(self.files):05d}.safetensors"
        offsets = np.zeros(len(self.docs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(d) for d in self.docs])
        save_file({"tokens": np.concatenate(self.docs), "doc_offsets": offsets}, self.directory / name)
        self.files.append(name)
        self.docs, self.pending = [], 0


@dataclass
class Split:
    """One split in memory: all tokens back to back and document boundaries."""

    tokens: np.ndarray  # [T] uint16/uint32
    doc_offsets: np.ndarray  # [docs + 1] int64

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.shape[0] - 1)

    def document_of(self, position: int) -> tuple[int, int]:
        """[start, end) of the document holding token `position`."""
        doc = bisect.bisect_right(self.doc_offsets, position) - 1
        return int(self.doc_offsets[doc]), int(self.doc_offsets[doc + 1])

    def window(self, rng: np.random.Generator, length: int) -> list[int]:
        """Up to `length` tokens from one document, starting at a uniformly drawn position."""
        position = int(rng.integers(0, self.num_tokens))
        start, end = self.document_of(position)
        begin = max(start, min(position, end - length))
        return self.tokens[begin : min(begin + length, end)].astype(np.int64).tolist()

    def document(self, index: int) -> list[int]:
        return self.tokens[self.doc_offsets[index] : self.doc_offsets[index + 1]].astype(np.int64).tolist()


def _join(parts: list[dict[str, np.ndarray]]) -> Split:
    if not parts:
        return Split(np.zeros(0, dtype=np.uint16), np.zeros(1, dtype=np.int64))
    tokens = np.concatenate([p["tokens"] for p in parts])
    offsets, base = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        offsets.append(p["doc_offsets"][1:] + base)
        base += int(p["doc_offsets"][-1])
    return Split(tokens, np.concatenate(offsets))


@dataclass
class Corpus:
    manifest: dict
    splits: dict[str, Split]

    @property
    def vocab_hash(self) -> str:
        return self.manifest["vocab_hash"]

    def check_tokenizer(self, tokenizer) -> None:
        if vocab_hash(tokenizer) != self.vocab_hash:
            raise ValueError(
                f"the corpus was tokenized with {self.manifest.get('tokenizer')!r} (vocab {self.vocab_hash}); "
                "this run's decoder tokenizer differs: run `python -m model.training.data prepare --tokenizer ...` for it"
            )

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


def load_corpus(path: str | Path) -> Corpus:
    """A shard directory (with manifest.json) or a packed `*.safetensors.xz` file."""
    path = Path(path)
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        splits = {s: _join([load_file(path / f) for f in manifest["splits"][s]["files"]]) for s in SPLITS}
        return Corpus(manifest, splits)
    if path.name.endswith(PACKED_SUFFIX):
        data = lzma.decompress(path.read_bytes())
        header_len = int.from_bytes(data[:8], "little")
        manifest = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["manifest"])
        tensors = load(data)
        splits = {}
        for s in SPLITS:
            count = len(manifest["splits"][s]["files"])
            splits[s] = _join([{k: tensors[f"{s}/{i}/{k}"] for k in ("tokens", "doc_offsets")} for i in range(count)])
        return Corpus(manifest, splits)
    raise FileNotFoundError(f"{path} is neither a shard directory nor a packed {PACKED_SUFFIX} file")


def pack(directory: str | Path, out: str | Path, max_bytes: int = MAX_PACKED_BYTES, preset: int = 9) -> dict:
    """Every shard of `directory` in one xz-compressed safetensors file; fails when over `max_bytes`."""
    directory, out = Path(directory), Path(out)
    if not out.name.endswith(PACKED_SUFFIX):
        raise ValueError(f"the packed file name must end with {PACKED_SUFFIX}")
    manifest = json.loads((directory / "manifest.json").read_text())
    tensors = {}
    for s in SPLITS:
        for i, name in enumerate(manifest["splits"][s]["files"]):
            for key, value in load_file(directory / name).items():
                tensors[f"{s}/{i}/{key}"] = value
    raw = save(tensors, metadata={"manifest": json.dumps(manifest)})
    packed = lzma.compress(raw, preset=preset)
    if len(packed) > max_bytes:
        raise ValueError(
            f"the packed corpus is {len(packed) / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit; "
            "prepare it with a smaller --max-tokens"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(packed)
    return {"file": str(out), "bytes": len(packed), "raw_bytes": len(raw),
            "tokens": {s: manifest["splits"][s]["tokens"] for s in SPLITS}}
