"""`prepare`: documents of the corpus sources -> cleaned, tokenized, split, sharded."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from model.training.data.corpus import Source, clean, split_of
from model.training.data.shards import SPLITS, ShardWriter, token_dtype, vocab_hash

MIN_DOC_CHARS = 200  # shorter documents (stubs, empty __init__.py) are skipped


def load_tokenizer(spec: str):
    """"embedded" (the embedded SmolLM2 base, converted on first use) or a local tokenizer directory."""
    from transformers import AutoTokenizer

    if spec == "embedded":
        from model.embedded import ensure_base

        return AutoTokenizer.from_pretrained(ensure_base() / "decoder")
    return AutoTokenizer.from_pretrained(spec)


def prepare(sources: Sequence[Source], tokenizer, out: str | Path, tokenizer_name: str = "",
            max_tokens_per_source: int = 6_000_000, validation_permille: int = 20,
            shard_tokens: int = 4_000_000, quiet: bool = False) -> dict:
    """Write shards and `manifest.json` to `out`; returns the manifest (token counts per split and source)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    dtype = token_dtype(len(tokenizer))
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    forbidden = [t for t in tokenizer.all_special_tokens if t] + list(getattr(tokenizer, "added_tokens_encoder", {}))
    started = time.perf_counter()
    per_source = []
    for source in sources:
        if not source.available():
            raise FileNotFoundError(f"corpus source {source.name} is not installed (see DEBIAN_PACKAGES in corpus.py)")
        counts = {"train": 0, "validation": 0}
        documents = 0
        bar = tqdm(total=max_tokens_per_source, desc=source.name, unit="tok", unit_scale=True, disable=quiet)
        for doc in source.documents():
            text = clean(doc.text, forbidden)
            if len(text) < MIN_DOC_CHARS:
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids[: max_tokens_per_source - sum(counts.values())]
            split = split_of(doc, validation_permille)
            writers[split].add(ids)
            counts[split] += len(ids)
            documents += 1
            bar.update(len(ids))
            if sum(counts.values()) >= max_tokens_per_source:
                break
        bar.close()
        per_source.append({"name": source.name, "licence": source.licence, "documents": documents, "tokens": counts})
    for writer in writers.values():
        writer.flush()
    manifest = {
        "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
        "vocab_hash": vocab_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "dtype": dtype.name,
        "validation_permille": validation_permille,
        "max_tokens_per_source": max_tokens_per_source,
        "sources": per_source,
        "splits": {s: {"files": w.files, "tokens": w.tokens, "documents": w.documents} for s, w in writers.items()},
        "total_tokens": sum(w.tokens for w in writers.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
