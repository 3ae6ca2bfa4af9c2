"""The image-embedding cache: content keys, LRU eviction by bytes, counters and thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medplib.core.errors import InvalidInputError
from medplib.core.per_image_cache import CacheKey, PerImageCache, image_digest, value_nbytes


def key(name: str, kind: str = "clip") -> CacheKey:
    return CacheKey(kind, name, "model-a")


def test_digest_names_the_content_not_the_array() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert image_digest(pixels) == image_digest(pixels.copy())
    assert image_digest(pixels) == image_digest(np.asfortranarray(pixels))  # layout does not matter
    changed = pixels.copy()
    changed[5, 5, 0] ^= 1
    assert image_digest(changed) != image_digest(pixels)
    assert image_digest(pixels.transpose(1, 0, 2)) != image_digest(pixels)
    assert image_digest(pixels.reshape(30, 20, 3)) != image_digest(pixels)  # same bytes, other shape


def test_get_put_and_counters() -> None:
    cache = PerImageCache(max_bytes=1000)
    assert cache.get(key("a")) is None
    value = torch.ones(10)  # 40 bytes
    cache.put(key("a"), value)
    assert cache.get(key("a")) is value
    assert key("a") in cache and key("a", kind="sam") not in cache
    assert CacheKey("clip", "a", "model-b") not in cache  # another model's entry is another entry
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses) == (1, 40, 1, 1)
    cache.put(key("a"), torch.ones(20))  # replacing re-counts the bytes
    assert cache.stats().bytes == 80


def test_least_recently_used_goes_first_and_the_bound_holds() -> None:
    cache = PerImageCache(max_bytes=100)
    for name in "abc":
        cache.put(key(name), torch.zeros(8))  # 32 bytes each: 96 in all
    cache.get(key("a"))  # a is now the most recent; b is the oldest
    cache.put(key("d"), torch.zeros(8))
    assert [name for name in "abcd" if key(name) in cache] == ["a", "c", "d"]
    stats = cache.stats()
    assert stats.bytes <= 100 and stats.evictions == 1 and len(cache) == 3


def test_a_value_larger_than_the_bound_is_not_kept() -> None:
    cache = PerImageCache(max_bytes=16)
    cache.put(key("small"), torch.zeros(2))
    cache.put(key("big"), torch.zeros(100))
    assert key("big") not in cache and key("small") in cache
    disabled = PerImageCache(max_bytes=0)
    disabled.put(key("a"), torch.zeros(1))
    assert len(disabled) == 0


def test_tuples_of_tensors_count_all_their_bytes_and_other_values_are_refused() -> None:
    assert value_nbytes((torch.zeros(4), [torch.zeros(2, dtype=torch.float64)])) == 16 + 16
    with pytest.raises(InvalidInputError, match="tensors"):
        value_nbytes("not a tensor")
    with pytest.raises(InvalidInputError):
        PerImageCache(max_bytes=-1)


def test_clear_drops_entries_and_keeps_counters() -> None:
    cache = PerImageCache()
    cache.put(key("a"), torch.zeros(4))
    cache.get(key("a"))
    cache.clear()
    assert len(cache) == 0 and cache.stats().bytes == 0 and cache.stats().hits == 1


def test_concurrent_use_keeps_the_books_straight() -> None:
    cache = PerImageCache(max_bytes=40 * 16)  # room for 16 of the 40 values

    def work(offset: int) -> None:
        for step in range(200):
            name = str((offset + step) % 40)
            if cache.get(key(name)) is None:
                cache.put(key(name), torch.full((10,), float(offset)))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats.bytes == 40 * stats.entries <= cache.max_bytes
    assert stats.hits + stats.misses == 8 * 200
