"""One bounded least-recently-used map for the studio's in-memory stores (documents, run
histories, chunk lists, reconstructions, prefix KV caches): bounded by a count of entries and/or
a total size (each entry's size from `size_of`), thread-safe."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedLRU(Generic[K, V]):
    """Entries in order of last use; `put` drops the least recently used while more than
    `max_items` entries or more than `max_size` in all are held. The entry just put is never
    dropped for the size bound unless `refuse_oversized` (then one larger than the whole bound
    is not kept and `put` returns False)."""

    def __init__(self, max_items: int | None = None, max_size: int | None = None,
                 size_of: Callable[[V], int] = lambda value: 1, refuse_oversized: bool = False):
        self.max_items, self.max_size = max_items, max_size
        self.size_of, self.refuse_oversized = size_of, refuse_oversized
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: K, default: V | None = None) -> V | None:
        """The entry (now the most recently used), or `default`."""
        with self._lock:
            if key not in self._entries:
                return default
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: K, value: V) -> bool:
        """Keep `value` under `key` as the most recently used, dropping the oldest beyond the bounds."""
        size = self.size_of(value)
        with self._lock:
            if key in self._entries:
                self._size -= self.size_of(self._entries.pop(key))
            if self.refuse_oversized and self.max_size is not None and size > self.max_size:
                return False
            self._entries[key] = value
            self._size += size
            while len(self._entries) > 1 and self._over():
                _, dropped = self._entries.popitem(last=False)
                self._size -= self.size_of(dropped)
            return True

    def setdefault(self, key: K, make: Callable[[], V]) -> V:
        """The entry under `key`, made with `make` and put where there is none."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = make()
        self.put(key, value)
        return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            if key not in self._entries:
                return default
            value = self._entries.pop(key)
            self._size -= self.size_of(value)
            return value

    def _over(self) -> bool:
        return ((self.max_items is not None and len(self._entries) > self.max_items)
                or (self.max_size is not None and self._size > self.max_size))

    @property
    def size(self) -> int:
        return self._size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size = 0

    def values(self) -> list[V]:
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._entries))
