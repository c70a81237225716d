"""A process that writes one latent cache key again and again, for the cache fault tests:

    python -m tests.cache_writer DIRECTORY KEY WRITER STEPS [loop|stall]

It prints "ready", waits for a line on stdin, then stores `latents_of(WRITER, step)` under KEY
for each step, printing "wrote <step>" after each. With "stall" it writes half of the first
value file, prints "half" and waits (to be killed mid-write)."""

from __future__ import annotations

import os
import sys
import time

import torch

ROWS, COLS = 512, 128  # 256 KiB of float32: stored as a value file, as real documents' latents are


def latents_of(writer: int, step: int = 0) -> torch.Tensor:
    """The latents `writer` stores at `step`: [ROWS, COLS], different for every (writer, step)."""
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + writer * 1000.0 + step


def stall(self, full_path, iterator, mode, encoding=None):
    """diskcache.Disk._write that stops, for good, half-way through the value file."""
    os.makedirs(os.path.dirname(full_path), exist_ok=True)
    with open(full_path, mode) as out:
        data = b"".join(iterator)
        out.write(data[: len(data) // 2])
        out.flush()
        print("half", flush=True)
        time.sleep(600)


def main(directory: str, key: str, writer: str, steps: str, mode: str = "loop") -> None:
    import diskcache

    from cache import LatentCache

    if mode == "stall":
        diskcache.Disk._write = stall
    cache = LatentCache(directory)
    print("ready", flush=True)
    sys.stdin.readline()
    for step in range(int(steps)):
        cache.put(key, latents_of(int(writer), step), {"writer": int(writer), "step": step})
        print(f"wrote {step}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
