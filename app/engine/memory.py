"""Running out of memory, handled once for every request: the failed request's tensors are
released and the error becomes `OutOfMemory` (a `UserError` the CLI and the page show)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

import torch

from app.engine.kv_cache import drop_all
from model.errors import OUT_OF_MEMORY, OutOfMemory

T = TypeVar("T")


def is_out_of_memory(err: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError, or another backend's RuntimeError saying so."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def release_memory() -> None:
    """Drop the kept prefix KV caches, collect what a failed request left behind and hand cached
    CUDA blocks back to the driver."""
    drop_all()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def guard_memory(call: Callable[..., T], *args, message: str = OUT_OF_MEMORY, **kwargs) -> T:
    """`call(*args, **kwargs)`, with running out of memory turned into `OutOfMemory(message)` once
    the failed call's tensors are released."""
    try:
        return call(*args, **kwargs)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
    # Past the except block the error is gone, and with its traceback the failed call's frames
    # and every tensor they held; the new error carries no reference to them.
    release_memory()
    raise OutOfMemory(message)


def guard_stream(events: Iterator[T]) -> Generator[T, None, None]:
    """`events` passed on, with running out of memory turned into `OutOfMemory` as in `guard_memory`.
    Closing this stream closes `events` (and so frees its tensors) at once."""
    try:
        yield from events
        return
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
    events = None  # the failed, finished generator
    release_memory()
    raise OutOfMemory()
