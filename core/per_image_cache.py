"""A bounded, thread-safe LRU of per-image values (encoder outputs, prefix keys and values, decoded pixels),
keyed by the content hash of the canonical pixels.

What is cached (see `core/assistant.py`), per image and per loaded model:

- `clip`: the CLIP tower's patch features, *before* the projector. The region encoder samples these
  raw features, so the projected tokens alone could not serve a region question; the projector is two
  small linears over the patches, cheap to rerun.
- `sam`: SAM's image embedding, the input of the mask decoder.
- `prefix`: the LLM's keys and values of the template up to and including the image tokens. They are
  the same for every question about the image, so a follow-up question prefills only its own words.

The key names the image by a hash of its canonical RGB pixels (so the same scan read twice, from a
path or from bytes, hits), and the encoder by a string that the owner builds from the model instance
and the preprocessing (input size, feature layer, dtype, device), so entries of two models never mix.
The bound is in bytes (tensor storage); the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel

from medplib.core.errors import InvalidInputError

# 1 GiB holds thousands of small-preset images, or three medplib-7b images in bf16 (a 7B prefix's
# keys and values take about 300 MB; its CLIP features and SAM embedding about 1.5 MB).
DEFAULT_MAX_BYTES = 1 << 30


class CacheKey(NamedTuple):
    kind: str  # "clip", "sam" or "prefix"
    image: str  # `image_digest` of the canonical pixels
    encoder: str  # which model and preprocessing produced the value


class CacheStats(BaseModel):
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


def image_digest(pixels: np.ndarray) -> str:
    """A content hash of an image's pixels, shape and dtype included (a transposed image differs).

    SHA-256 (its first 128 bits): collision-resistant, so one user's image cannot be made to hit
    another's entries, and on CPUs with SHA instructions 3-4x faster than BLAKE2b (0.7 against
    2.6 ms for a 484 x 484 RGB image here), a cost every request pays, cache hit or not."""
    array = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{array.shape}|{array.dtype}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:32]


def value_nbytes(value: Any) -> int:
    """Bytes of a tensor (or anything with an int `nbytes`), or of those in a (nested) tuple or list."""
    if isinstance(value, tuple | list):
        return sum(value_nbytes(item) for item in value)
    if hasattr(value, "untyped_storage"):
        return value.numel() * value.element_size()
    if isinstance(getattr(value, "nbytes", None), int):  # numpy arrays, decoded `MedicalImage`s
        return value.nbytes
    raise InvalidInputError(f"the per-image cache stores tensors and arrays, not {type(value).__name__}")


class PerImageCache:
    """LRU of tensors bounded by `max_bytes`; a value larger than the whole bound is not kept."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise InvalidInputError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: CacheKey, value: Any) -> None:
        size = value_nbytes(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1

    def discard_images(self, digests: Iterable[str]) -> None:
        """Drop every entry (any kind, any encoder) of these images: a caller that streams many new
        images through once (the slices of a volume) keeps them from evicting everyone else's."""
        wanted = set(digests)
        with self._lock:
            for key in [key for key in self._entries if key.image in wanted]:
                self._bytes -= self._entries.pop(key)[1]

    def clear(self) -> None:
        """Drop every entry (e.g. after the model's weights changed); the counters stay."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )
