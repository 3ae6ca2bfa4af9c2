"""Images an agent's run refers to by a short id, so no base64 ever passes through the LLM's context.

    store = ImageStore()
    scan = store.put("chest.dcm", window="lung")  # 'img-1': the agent sees only this id
    store.resolve("img-1")                 # StoredImage(data='chest.dcm', options={'window': 'lung'})
    store.resolve("s3://bucket/scan.png")  # any other reference is a path or URI, read when used

The tools resolve every image reference through the store before the backend sees it; grounding puts
each mask it makes (`mask-1`, ...) and any overlay it renders back in, so a later call can use them.
The store lives in the application (it is held by the toolkit), never in a tool's model-visible schema.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medplib.core.errors import InvalidInputError
from medplib.core.image import MedicalImage
from medplib.core.io.paths import AllowedRoots

# What an id looks like: a lower-case prefix and a number. A reference of this shape that the store
# does not hold is an agent's mistake (a mistyped or stale id), not a file name: it is reported as one.
ID_PATTERN = re.compile(r"(?P<prefix>[a-z]+)-(?P<number>[0-9]+)")


@dataclass(frozen=True)
class StoredImage:
    """What a backend is handed for one image: encoded bytes, or a path/URI, plus `load_image` options."""

    data: bytes | str
    options: Mapping[str, Any] = field(default_factory=dict)


class ImageStore:
    """Thread-safe id -> image map of one agent run (or one application).

    `allowed_prefixes` limits the paths and URIs an agent may name itself (the tools are driven by an
    LLM, whose input may be hostile): None allows any, `("s3://scans/",)` only those under it, `()`
    none, so that only images the application put in the store can be read. They are roots, checked
    by `core.io.paths.AllowedRoots` (resolved, component by component, as fsspec will read them).
    """

    def __init__(self, *, allowed_prefixes: Sequence[str] | None = None) -> None:
        self.allowed_prefixes = None if allowed_prefixes is None else tuple(allowed_prefixes)
        self._readable = AllowedRoots(self.allowed_prefixes)
        self._images: dict[str, StoredImage] = {}
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()

    def put(self, image: Any, *, prefix: str = "img", **options: Any) -> str:
        """Store an image and return its new id (`img-1`, `img-2`, ...; `prefix` picks the first part).

        Bytes and paths/URIs are kept as given and decoded when a tool uses them, with `options`
        (`load_image`'s: frame, slice_index, axis, window, ...). Arrays, PIL images and MedicalImages
        are converted once, `options` applied, and kept as PNG, the form a remote backend can be sent.
        """
        if not re.fullmatch(r"[a-z]+", prefix):
            raise InvalidInputError(f"image id prefix {prefix!r} must be lower-case letters")
        stored = StoredImage(_encode(image, options), options if _is_reference(image) else {})
        with self._lock:
            number = self._counters.get(prefix, 0) + 1
            self._counters[prefix] = number
            image_id = f"{prefix}-{number}"
            self._images[image_id] = stored
        return image_id

    def get(self, image_id: str) -> StoredImage:
        with self._lock:
            stored = self._images.get(image_id)
            if stored is None:
                held = _listing(list(self._images))
                raise InvalidInputError(f"unknown image id {image_id!r}: the image store holds {held}")
            return stored

    def resolve(self, reference: str) -> StoredImage:
        """An id from this store, else a path or URI (if `allowed_prefixes` lets the agent name it)."""
        reference = reference.strip()
        if reference in self or ID_PATTERN.fullmatch(reference):
            return self.get(reference)
        try:
            return StoredImage(self._readable.check(reference, "image"))
        except InvalidInputError as exc:
            allowed = ", ".join(self.allowed_prefixes or ()) or "none: use an id from the image store"
            raise InvalidInputError(
                f"{reference!r} is not an id in the image store, and the paths and URIs a tool may read "
                f"are limited to: {allowed} ({exc})"
            ) from None

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._images)

    def __contains__(self, image_id: object) -> bool:
        with self._lock:
            return image_id in self._images

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)


def _listing(ids: list[str], most: int = 12) -> str:
    """The ids an agent can use instead, shortened: a long run may have stored hundreds of masks."""
    if len(ids) <= most:
        return ", ".join(ids) or "no images"
    return ", ".join([*ids[: most // 2], "...", *ids[-most // 2 :]]) + f" ({len(ids)} in all)"


def _is_reference(image: Any) -> bool:
    return isinstance(image, bytes | bytearray | memoryview | str | os.PathLike)


def _encode(image: Any, options: Mapping[str, Any]) -> bytes | str:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return os.fspath(image)
    from PIL import Image  # deferred: only arrays and pictures need it

    if not isinstance(image, np.ndarray | Image.Image | MedicalImage):
        raise InvalidInputError(
            f"cannot store {type(image).__name__}: give bytes, a path or URI, a numpy array, "
            "a PIL image or a MedicalImage"
        )
    from medplib.core.io import load_image
    from medplib.core.masks import encode_png

    try:
        return encode_png(load_image(image, **options).pixels)
    except TypeError as exc:  # an unknown option name
        raise InvalidInputError(f"invalid image options {sorted(options)}: {exc}") from None
