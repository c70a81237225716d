"""Which float type a device computes fast: bfloat16 on CUDA, and on a CPU only where it has
bf16 matrix units (Intel AMX or AVX512-BF16 run bf16 several times faster; CPUs with AVX2 only
emulate bf16 and run it many times slower).

The CPU's flags (/proc/cpuinfo) decide first: they do not change with the machine's load, where
a timing can (a probe taken while another process held a core once chose float32 on an AMX
machine). Where the flags are not known (no /proc/cpuinfo), a short in-process probe decides: it
multiplies [256, 576] x [576, 576] matrices in both types, alternating them so that a burst of
load hurts both alike, best of several rounds, and keeps the answer for the process.
`choose_dtype` turns a user's `auto|float32|bfloat16` into a dtype and says why, with the
probe's numbers where the probe decided."""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROBE_SHAPE = (256, 576, 576)  # (m, k, n): the width of the embedded model's projections
MIN_SPEEDUP = 1.2  # bf16 must beat float32 by this factor to be chosen
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_rate(dtype: torch.dtype, repeats: int = 8, shape: tuple[int, int, int] = PROBE_SHAPE) -> float:
    """Multiply-adds per second of an [m, k] x [k, n] matmul on the CPU in `dtype` (best of `repeats`)."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up: kernel selection, first-touch of the buffers
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return m * k * n / max(best, 1e-9)


@dataclass(frozen=True)
class MatmulProbe:
    """What the probe measured: multiply-adds per second in each type, on `threads` torch threads."""

    float32_rate: float
    bfloat16_rate: float
    threads: int

    @property
    def speedup(self) -> float:
        return self.bfloat16_rate / self.float32_rate

    def to_dict(self) -> dict:
        return {"float32_gflops": round(2 * self.float32_rate / 1e9, 1),
                "bfloat16_gflops": round(2 * self.bfloat16_rate / 1e9, 1),
                "bf16_speedup": round(self.speedup, 2), "min_speedup": MIN_SPEEDUP, "threads": self.threads,
                "shape": list(PROBE_SHAPE)}


@functools.cache
def cpu_matmul_probe(rounds: int = 4) -> MatmulProbe:
    """The probe, run once per process: float32 and bfloat16 in turn, the best rate of each."""
    float32_rate = bfloat16_rate = 0.0
    for _ in range(rounds):
        float32_rate = max(float32_rate, matmul_rate(torch.float32, repeats=3))
        bfloat16_rate = max(bfloat16_rate, matmul_rate(torch.bfloat16, repeats=3))
    return MatmulProbe(float32_rate=float32_rate, bfloat16_rate=bfloat16_rate, threads=torch.get_num_threads())


BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that multiply bfloat16 fast


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is none to read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_bf16_speedup() -> float:
    """bf16 matmul rate over float32's on this CPU (measured once per process)."""
    return cpu_matmul_probe().speedup


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where the device computes it fast, else float32."""
    return choose_dtype("auto", device).dtype


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run uses, what was asked for, and why."""

    requested: str  # one of DTYPE_CHOICES
    dtype: torch.dtype
    reason: str
    probe: MatmulProbe | None = None  # set where the CPU probe decided

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def to_dict(self) -> dict:
        out = {"dtype": self.name, "dtype_requested": self.requested, "dtype_reason": self.reason}
        if self.probe is not None:
            out["bf16_probe"] = self.probe.to_dict()
        return out


def choose_dtype(requested: str, device: str | torch.device) -> DtypeChoice:
    """`requested` (auto, float32 or bfloat16) on `device` as a dtype: auto is bfloat16 on CUDA,
    bfloat16 on a CPU whose flags name bf16 matrix units (or, where the flags are unknown, whose
    probe shows bf16 at least MIN_SPEEDUP times faster), else float32."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return DtypeChoice(requested, DTYPES[requested], "asked for")
    device = torch.device(device)
    if device.type == "cuda":
        return DtypeChoice(requested, torch.bfloat16, "CUDA computes bfloat16 fast")
    if device.type != "cpu":
        return DtypeChoice(requested, torch.float32, f"float32 on {device.type}")
    flags = cpu_flags()
    if flags is not None:
        units = [f for f in BF16_UNITS if f in flags]
        if units:
            return DtypeChoice(requested, torch.bfloat16, f"this CPU has bfloat16 matrix units ({', '.join(units)} "
                               "in its flags)")
        return DtypeChoice(requested, torch.float32, "this CPU has no bfloat16 matrix units (neither "
                           f"{' nor '.join(BF16_UNITS)} in its flags): it would emulate bfloat16, slowly")
    probe = cpu_matmul_probe()
    if probe.speedup >= MIN_SPEEDUP:
        return DtypeChoice(requested, torch.bfloat16, f"this CPU multiplies bfloat16 {probe.speedup:.1f}x faster "
                           "than float32 (probe)", probe)
    return DtypeChoice(requested, torch.float32, f"this CPU multiplies bfloat16 at {probe.speedup:.2f}x "
                       f"float32's rate (probe; bfloat16 needs {MIN_SPEEDUP}x)", probe)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one), e.g. for a result beside its dtype."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
