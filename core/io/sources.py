"""Reading raw bytes from wherever a user points: a path, an fsspec URI, or bytes already in memory."""

from __future__ import annotations

import os
from pathlib import Path

from medplib.core.errors import ImageTooLargeError, InvalidInputError

Source = str | os.PathLike[str] | bytes | bytearray | memoryview


def describe_source(source: Source) -> str:
    """A short, human-readable name for a source, used in metadata and error messages."""
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>"
    return os.fspath(source)


def is_uri(text: str) -> bool:
    return "://" in text


def read_source(source: Source, *, max_bytes: int) -> bytes:
    """Return the bytes behind `source`, refusing anything larger than `max_bytes`.

    Paths and URIs are opened through fsspec, so `memory://`, `s3://` (with s3fs installed) and
    friends work wherever a path does.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"input is {len(data)} bytes, over the limit of {max_bytes}")
        return data
    name = os.fspath(source)
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"expected a path, URI or bytes, got {source!r}")
    import fsspec  # deferred: fsspec pulls in a lot at import time

    try:
        with fsspec.open(name if is_uri(name) else str(Path(name).expanduser()), "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise InvalidInputError(f"no such file: {name}") from None
    except IsADirectoryError:
        raise InvalidInputError(f"expected a file, got a directory: {name}") from None
    except (ValueError, ImportError) as exc:  # unknown protocol, or its package is not installed
        raise InvalidInputError(f"cannot open {name}: {exc}") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read {name}: {exc}") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name} is larger than the limit of {max_bytes} bytes")
    return data
