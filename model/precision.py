"""Which float type a device computes fast: bfloat16 on CUDA, and on a CPU only where a short
in-process probe shows bf16 matrix multiplies beating float32 (Intel AMX / AVX512-BF16 run
them several times faster; CPUs with AVX2 only emulate bf16 and run it many times slower).

The probe multiplies [256, 576] x [576, 576] matrices in both types for about 0.1 s and
keeps the answer for the process."""

from __future__ import annotations

import functools
import time

import torch

PROBE_SHAPE = (256, 576, 576)  # (m, k, n): the width of the embedded model's projections
MIN_SPEEDUP = 1.2  # bf16 must beat float32 by this factor to be chosen


def matmul_rate(dtype: torch.dtype, repeats: int = 8) -> float:
    """Multiply-adds per second of the probe matmul on the CPU in `dtype` (best of `repeats`)."""
    m, k, n = PROBE_SHAPE
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up: kernel selection, first-touch of the buffers
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return m * k * n / max(best, 1e-9)


@functools.cache
def cpu_bf16_speedup() -> float:
    """bf16 matmul rate over float32's on this CPU (measured once per process)."""
    return matmul_rate(torch.bfloat16) / matmul_rate(torch.float32)


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where the device computes it fast, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16_speedup() >= MIN_SPEEDUP:
        return torch.bfloat16
    return torch.float32
