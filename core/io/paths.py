"""Which paths and URIs a caller may have read: one check for every place that reads what a user names.

    roots = AllowedRoots(["/data", "s3://scans/"])
    roots.check("/data/ct/1.dcm")            # '/data/ct/1.dcm' (symlinks resolved): what to open
    roots.check("/data/../etc/passwd")       # InvalidInputError: resolves outside every root
    roots.check("s3://scans-private/x.png")  # InvalidInputError: bucket 'scans-private' is not 'scans'

A reference is judged as fsspec will open it, not as it reads: its chain (`a::b`), protocol and path
come from fsspec's own parsing. Local paths are resolved (`..`, symlinks, `~`) before they are compared
with the roots, component by component (`/data2` is not under `/data`); a remote URI must have a root's
protocol and bucket or host, and no `.`/`..`/empty component, since no server is bound to resolve them
as a filesystem would. Percent-encoding is decoded once and both readings must pass, so `%2e%2e` cannot
climb out whether or not the backend decodes it. Anything else is refused: NUL and control characters,
chained URLs, Windows-style paths on a POSIX server. `None` roots allow any reference (a trusted
caller); `()` allows none.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PureWindowsPath
from urllib.parse import unquote

from medplib.core.errors import InvalidInputError

LOCAL_PROTOCOLS = ("file", "local")
CONTROL_CHARACTERS = "a path or URI may not contain NUL or other control characters, or invalid Unicode"
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:([\\/]|$)")


@dataclass(frozen=True)
class Location:
    """A reference as fsspec reads it: its protocol, its path's components (a local path resolved),
    and what to open (a local file's resolved path, so nothing is re-parsed or re-resolved later)."""

    protocol: str
    parts: tuple[str, ...]
    target: str = field(compare=False)

    def is_under(self, root: Location) -> bool:
        return self.protocol == root.protocol and self.parts[: len(root.parts)] == root.parts


def locate(reference: str) -> Location:
    """Where `reference` points, after fsspec's parsing; InvalidInputError if it cannot be judged."""
    problem = _text_problem(reference)
    if problem is not None:
        raise InvalidInputError(problem)
    from fsspec.core import split_protocol  # deferred: fsspec pulls in a lot at import time

    protocol, rest = split_protocol(reference)
    protocol = _canonical_protocol(protocol or "file")
    if protocol == "file":
        from fsspec.implementations.local import LocalFileSystem

        # read_source expands a leading '~' of a plain path, so the check does too
        resolved = os.path.realpath(LocalFileSystem._strip_protocol(os.path.expanduser(reference)))
        return Location("file", _local_parts(resolved), resolved)
    parts = tuple(rest.split("/"))
    if parts and parts[-1] == "":
        parts = parts[:-1]  # a trailing slash names the same folder
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidInputError(f"{reference!r} has an empty, '.' or '..' component")
    return Location(protocol, parts, reference)


class AllowedRoots:
    """The roots under which references may be read; `check` is the one gate before reading."""

    def __init__(self, roots: Sequence[str] | None) -> None:
        self.names = None if roots is None else tuple(roots)
        self.roots = None if roots is None else tuple(_root(name) for name in roots)

    def check(self, reference: str, what: str = "path") -> str:
        """What to open for `reference`: the resolved path of a local file, a remote URI as given.

        InvalidInputError (naming `what`) unless every reading of it lies under an allowed root.
        """
        if not isinstance(reference, str) or not reference:
            raise InvalidInputError(f"{what}: expected a path or URI, got {reference!r}")
        if _has_control_characters(reference):  # refused even when unrestricted: os calls raise on NUL
            raise InvalidInputError(f"{what}: {CONTROL_CHARACTERS}")
        if self.roots is None:
            return reference
        try:
            readings = [locate(reference)]
            decoded = unquote(reference, errors="strict")
            if decoded != reference:
                readings.append(locate(decoded))
        except (InvalidInputError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"{what}: {reference!r} is refused: {exc}") from None
        if all(any(reading.is_under(root) for root in self.roots) for reading in readings):
            return readings[0].target
        allowed = ", ".join(self.names or ()) or "none"
        raise InvalidInputError(f"{what}: {reference!r} is not under a path this reader may open ({allowed})")


def _root(name: str) -> Location:
    try:
        return locate(name)
    except InvalidInputError as exc:
        raise InvalidInputError(f"allowed root {name!r}: {exc}") from None


def _has_control_characters(text: str) -> bool:
    """NUL and other control characters, or a lone surrogate (text that is no valid Unicode)."""
    if any(ord(char) < 32 or char == "\x7f" for char in text):
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text_problem(reference: str) -> str | None:
    """Why the text alone rules `reference` out: what fsspec or the OS would not read as it looks."""
    if _has_control_characters(reference):
        return CONTROL_CHARACTERS
    if "::" in reference:
        return f"{reference!r} is a chained URL ('::'), which is not allowed here"
    if os.name != "nt" and ("\\" in reference or WINDOWS_DRIVE.match(reference)):
        return f"{reference!r} is a Windows-style path; this server's paths use '/'"
    return None


def _canonical_protocol(protocol: str) -> str:
    """One name per filesystem: `local` is `file`, `s3a` is `s3` (where its package is installed)."""
    protocol = protocol.lower()
    if protocol in LOCAL_PROTOCOLS:
        return "file"
    try:
        from fsspec import get_filesystem_class

        aliases = get_filesystem_class(protocol).protocol
    except (ImportError, ValueError):  # its package is missing, or fsspec knows no such protocol
        return protocol
    return aliases if isinstance(aliases, str) else aliases[0]


def _local_parts(resolved: str) -> tuple[str, ...]:
    path = os.path.normcase(resolved)  # Windows compares case-insensitively; POSIX leaves it as is
    if os.name == "nt":
        return tuple(PureWindowsPath(path).parts)
    return tuple(posixpath.normpath(path).split("/"))
