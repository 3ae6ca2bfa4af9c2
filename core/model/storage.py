"""Checkpoint folders and files on local disk or behind an fsspec URI (`memory://`, `s3://`, …).

transformers and safetensors read local paths, so a URI is mirrored into a temporary folder for the
duration of a load, and a save goes to a temporary folder first and is then copied to the URI.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medplib.core.errors import CheckpointError
from medplib.core.io.sources import is_uri


def _filesystem(uri: str):
    import fsspec  # deferred: fsspec pulls in a lot at import time

    try:
        return fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:  # unknown protocol, or its package is not installed
        raise CheckpointError(f"cannot open {uri}: {exc}") from None


@contextlib.contextmanager
def local_folder(location: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder holding the checkpoint folder at `location` (a path or a URI)."""
    name = os.fspath(location)
    if not is_uri(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint folder at {name}")
        yield path
        return
    fs, root = _filesystem(name)
    if not fs.isdir(root):
        raise CheckpointError(f"no checkpoint folder at {name}")
    with tempfile.TemporaryDirectory(prefix="medplib-ckpt-") as tmp:
        for remote in fs.find(root):
            target = Path(tmp, os.path.relpath(remote, root))
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        yield Path(tmp)


@contextlib.contextmanager
def writable_folder(location: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder to save into; for a URI, its content is copied there when the block ends."""
    name = os.fspath(location)
    if not is_uri(name):
        path = Path(name).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    fs, root = _filesystem(name)
    with tempfile.TemporaryDirectory(prefix="medplib-ckpt-") as tmp:
        yield Path(tmp)
        for local in sorted(Path(tmp).rglob("*")):
            if local.is_file():
                remote = f"{root.rstrip('/')}/{local.relative_to(tmp).as_posix()}"
                fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                fs.put_file(str(local), remote)


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """All bytes of one checkpoint file, from a path or a URI."""
    name = os.fspath(location)
    try:
        if is_uri(name):
            fs, path = _filesystem(name)
            return fs.cat_file(path)
        return Path(name).expanduser().read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"no checkpoint file at {name}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {name}: {exc}") from None
