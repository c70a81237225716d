"""Measurements, defined once for the UI, the CLI and the benchmarks (docs/architecture.md):
every answer method is measured inside one `Meter`.

- TTFT: wall time from the request to the first generated token, with its parts:
  compress (encoder + adapter; 0 on a cache hit), prefill (prompt building and the decoder
  forward over all positions) and first token (picking and detokenizing it). What is left
  (tokenizing the document, the cache lookup) is `other_ms`.
- Peak memory: on CUDA `max_memory_allocated` after `reset_peak_memory_stats`, total and
  above the memory held when the request started (the weights); on CPU the process RSS,
  sampled by a thread during the request.
- KV-cache bytes: 2 x layers x kv_heads x head_dim x positions x bytes per element.
- Positions: tokens the decoder prefills. Of these, `prefix_reused_positions` have their KV
  from the prefix cache (app/engine/kv_cache.py: a follow-up question about the same document) and
  `prefill_positions` are computed by this request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch

MiB = 2**20  # bytes in a mebibyte: every MiB figure the studio shows


def kv_cache_bytes(decoder_config, positions: int, dtype: torch.dtype) -> int:
    config = (decoder_config.get_text_config(decoder=True) if hasattr(decoder_config, "get_text_config")
              else decoder_config)
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * positions * element


class Clock:
    """Milliseconds since creation; synchronizes CUDA before each reading."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def ms(self) -> float:
        return (self._now() - self.start) * 1000.0


class PeakMemory:
    """Context manager: peak bytes during the block, and peak above the bytes held at its start."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            process = psutil.Process()
            self.baseline = self.peak = process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, process: psutil.Process) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)

    @property
    def above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)


@dataclass
class Measurement:
    """One answer's numbers, as shown in the UI and printed by the CLI."""

    ttft_ms: float = 0.0
    compress_ms: float = 0.0
    prefill_ms: float = 0.0
    first_token_ms: float = 0.0
    other_ms: float = 0.0
    decode_ms: float = 0.0
    new_tokens: int = 0
    tokens_per_s: float = 0.0
    positions: int = 0
    prefill_positions: int = 0  # positions this request prefilled (not taken from the prefix cache)
    prefix_reused_positions: int = 0  # positions whose KV came from the prefix cache
    kv_cache_bytes: int = 0
    peak_mem_bytes: int = 0
    peak_mem_above_weights_bytes: int = 0
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def finish(self, total_ms: float) -> None:
        """Fill the derived fields once generation has ended at `total_ms`."""
        self.other_ms = max(0.0, self.ttft_ms - self.compress_ms - self.prefill_ms - self.first_token_ms)
        self.decode_ms = max(0.0, total_ms - self.ttft_ms)
        if self.new_tokens > 1 and self.decode_ms > 0:
            self.tokens_per_s = (self.new_tokens - 1) / (self.decode_ms / 1000.0)

    def to_dict(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in data.items()}


class Meter:
    """Context manager around one request: its `Measurement`, a `Clock` started at entry and the
    peak memory during the block. On a normal exit it fills the peaks, the KV-cache bytes (from the
    positions, unless the method set what its cache stores) and the derived fields."""

    def __init__(self, device: torch.device, decoder_config, dtype: torch.dtype):
        self.decoder_config, self.dtype = decoder_config, dtype
        self.measurement = Measurement(device=str(device))
        self.clock = Clock(device)
        self.memory = PeakMemory(device)

    def __enter__(self) -> "Meter":
        self.memory.__enter__()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.memory.__exit__(kind, error, traceback)
        if kind is not None:
            return
        m = self.measurement
        total_ms = self.clock.ms()
        m.peak_mem_bytes, m.peak_mem_above_weights_bytes = self.memory.peak, self.memory.above_baseline
        if not m.kv_cache_bytes:
            m.kv_cache_bytes = kv_cache_bytes(self.decoder_config, m.positions, self.dtype)
        m.finish(total_ms)
