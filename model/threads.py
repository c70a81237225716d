"""How many threads torch should use: the cores that other processes leave free.

torch's CPU kernels run on one OpenMP thread per core by default. When another process keeps a
core busy, every parallel operator waits at its barrier for the thread that shares that core,
and a decode step, made of many small operators, slows far more than the lost core: on a 2-core
CPU with one core busy, decoding after a 6,600-position prefill ran at 0.47 tokens/s on 2
threads and 13.4 tokens/s on 1 (SmolLM2-135M, bfloat16), and the prefill took 14.9 s against
7.0 s. So the commands choose the thread count from the cores free when they start, and let the
user set it (`--threads`, LCLM_STUDIO_THREADS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

SAMPLE_S = 0.3  # how long the other processes' CPU use is watched
BUSY_CORE = 0.5  # a core's worth of other processes' use from which it counts as taken


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def to_dict(self) -> dict:
        return {"threads": self.threads, "threads_reason": self.reason}


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def others_busy_cores(sample_s: float = SAMPLE_S) -> float:
    """Cores' worth of CPU that processes other than this one used over `sample_s` seconds."""
    me = psutil.Process()
    me.cpu_percent(None)
    total = psutil.cpu_percent(interval=sample_s) / 100 * (os.cpu_count() or 1)  # every core's use, in cores
    own = me.cpu_percent(None) / 100
    return max(0.0, total - own)


def choose_threads(requested: int | None = None, busy: float | None = None) -> ThreadChoice:
    """`requested` threads where given (at least 1); else one per core that other processes leave
    free (at least one), from `busy` cores' worth of their use (measured when None)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be at least 1, got {requested}")
        return ThreadChoice(requested, "asked for")
    available = cores()
    busy = others_busy_cores() if busy is None else busy
    taken = int(busy + (1 - BUSY_CORE))  # rounds at BUSY_CORE: 0.5 of a core counts as one
    threads = max(1, available - taken)
    return ThreadChoice(threads, f"{threads} of {available} cores free (other processes used {busy:.1f})")


def apply_threads(requested: int | None = None) -> ThreadChoice:
    """Choose the thread count and set it for torch in this process. torch is left as it is when
    it already runs that many threads: setting the count again (to the same number) before the
    studio's worker threads run LAPACK left a float64 solve spinning forever on this machine."""
    choice = choose_threads(requested)
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    return choice
