"""The one bounded LRU map behind the studio's in-memory stores."""

import threading

from app.engine.lru import BoundedLRU


def test_count_bound_drops_the_least_recently_used():
    lru = BoundedLRU(max_items=2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)
    assert list(lru) == ["a", "c"] and lru.get("b") is None


def test_size_bound_keeps_the_newest_unless_refused():
    lru = BoundedLRU(max_size=10, size_of=len)
    lru.put("a", "xxxx")
    lru.put("b", "yyyyyyyyyyyy")  # alone over the bound: kept, the older dropped
    assert list(lru) == ["b"] and lru.size == 12
    strict = BoundedLRU(max_size=10, size_of=len, refuse_oversized=True)
    strict.put("a", "xxxx")
    assert strict.put("a", "y" * 11) is False and len(strict) == 0 and strict.size == 0  # the old one went too
    assert strict.put("b", "zz") and strict.size == 2


def test_setdefault_pop_and_clear():
    lru = BoundedLRU(max_items=3)
    made = lru.setdefault("k", list)
    assert lru.setdefault("k", list) is made
    assert lru.pop("k") is made and lru.pop("k", "gone") == "gone"
    lru.put("x", [1])
    lru.clear()
    assert len(lru) == 0 and lru.size == 0


def test_threads_keep_it_within_its_bound():
    lru = BoundedLRU(max_items=16)

    def work(offset):
        for i in range(500):
            lru.put((offset, i), i)
            lru.get((offset, i - 1))
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lru) == 16 and lru.size == 16
