"""KV-cache presses: the baselines that keep the raw text but compress the decoder's KV cache
of it, at the matched ratio 1 - 1/N (the share of the context's KV pairs removed when an LCLM
compresses 1:N).

Every press is one `PressSpec` in PRESSES: presses from the `kvpress` package, Attention
Matching compaction (model.attention_matching) and KV-cache quantization at 4 and 2 bits
(model.quantized_cache: every position kept, fewer bits each; it brings its own cache).
Adding a press is one file with its class (or none, for a kvpress press) and one line in
PRESSES: the studio's choices, the CLI, both benchmarks and the tests enumerate this table
(docs/architecture.md).

A press object is used the kvpress way: `with press(decoder):` around the prefill of the
context; `new_cache(press, config)` is the cache to prefill (the press's own where it has
one); `kept_positions` and `stored_kv_bytes` say what is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def matched_ratio(compression_ratio: int) -> float:
    """The share of KV pairs a press removes to match an LCLM at 1:N."""
    return 1.0 - 1.0 / compression_ratio


@dataclass(frozen=True)
class PressSpec:
    name: str  # registry key, CLI --press value
    label: str  # how reports, plots and the studio name it
    build: Callable[[int, int | None], object]  # (N of 1:N, residual length or None) -> a press object
    uses_ratio: bool = True  # False: the same press at every N (quantization keeps every position)


def kvpress_press(class_name: str, **attributes) -> Callable[[int, int | None], object]:
    """A builder of kvpress's `class_name` at the matched ratio (kvpress is imported lazily: it
    pulls in datasets and pandas), with `attributes` set on it."""
    def build(ratio: int, residual_length: int | None = None):
        import kvpress

        press = getattr(kvpress, class_name)(compression_ratio=matched_ratio(ratio))
        for name, value in attributes.items():
            setattr(press, name, value)
        return press

    return build


def snapkv(ratio: int, residual_length: int | None = None):
    press = kvpress_press("SnapKVPress")(ratio)
    press.window_size = min(press.window_size, 16)  # its observation window must fit short contexts
    return press


def attention_matching(ratio: int, residual_length: int | None = None):
    from model.attention_matching import AttentionMatchingPress

    return AttentionMatchingPress(compression_ratio=matched_ratio(ratio))


def quantized(bits: int) -> Callable[[int, int | None], object]:
    def build(ratio: int, residual_length: int | None = None):
        from model.quantized_cache import QuantizedKV

        return QuantizedKV(bits=bits) if residual_length is None else QuantizedKV(bits=bits,
                                                                                 residual_length=residual_length)

    return build


PRESSES: dict[str, PressSpec] = {p.name: p for p in (
    PressSpec("snapkv", "SnapKV", snapkv),
    PressSpec("kvzip", "KVzip", kvpress_press("KVzipPress")),
    PressSpec("expected_attention", "ExpectedAttention", kvpress_press("ExpectedAttentionPress")),
    PressSpec("knorm", "Knorm", kvpress_press("KnormPress")),
    PressSpec("streaming_llm", "StreamingLLM", kvpress_press("StreamingLLMPress")),
    PressSpec("attention_matching", "Attention Matching", attention_matching),
    PressSpec("quantized_4bit", "KV 4-bit", quantized(4), uses_ratio=False),
    PressSpec("quantized_2bit", "KV 2-bit", quantized(2), uses_ratio=False),
)}


def make_press(name: str, compression_ratio: int, residual_length: int | None = None):
    """The press `name` at the matched ratio for 1:N; the quantized caches take no ratio, and keep
    their newest `residual_length` positions in float (None: model.quantized_cache's default)."""
    if name not in PRESSES:
        raise ValueError(f"press must be one of {', '.join(PRESSES)}, got {name!r}")
    spec = PRESSES[name]
    if spec.uses_ratio and (not isinstance(compression_ratio, int) or compression_ratio < 1):
        raise ValueError(f"the compression ratio N (1:N) must be a whole number of at least 1, "
                         f"got {compression_ratio!r}")
    return spec.build(compression_ratio, residual_length)


def new_cache(press, config):
    """The cache a press's context is prefilled into: its own (quantization) or a DynamicCache."""
    from transformers import DynamicCache

    return press.new_cache(config) if hasattr(press, "new_cache") else DynamicCache(config=config)


def kept_positions(press, context_tokens: int) -> int:
    """KV positions a press keeps of the context (kvpress's accounting unless the press says)."""
    if hasattr(press, "kept_positions"):
        return press.kept_positions(context_tokens)
    return round(context_tokens * (1 - press.compression_ratio))


def stored_kv_bytes(press, cache) -> int | None:
    """Bytes the cache stores when a press stores entries other than as float (quantization), else None."""
    return press.stored_bytes(cache) if hasattr(press, "stored_bytes") else None
