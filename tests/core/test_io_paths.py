"""`AllowedRoots`: the one check before medplib reads a path or URI a user named.

Each refused case below was read by the prefix check it replaced (a sibling directory, a symlink out,
a chain suffix, percent-encoded dots, a bucket sharing a prefix); the allowed cases must still pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medplib.core.errors import InvalidInputError
from medplib.core.io.paths import AllowedRoots, locate


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """data/ (the root: a scan, a folder, a link inside, a link out), data2/ and outside/ beside it."""
    for folder in ("data/sub", "data2", "outside"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("data/scan.png", "data/sub/scan.png", "data2/scan.png", "outside/secret.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "data/out").symlink_to(tmp_path / "outside")
    (tmp_path / "data/in").symlink_to(tmp_path / "data/sub")
    return tmp_path


@pytest.fixture
def roots(tree: Path) -> AllowedRoots:
    return AllowedRoots([str(tree / "data"), "s3://scans/", "memory://ok"])


@pytest.mark.parametrize(
    "reference",
    [
        "{t}/data/../outside/secret.png",
        "{t}/data/sub/../../outside/secret.png",
        "{t}/data/out/secret.png",  # a symlink leaving the root
        "{t}/data2/scan.png",  # shares the root's text, not its components
        "{t}/data/out/secret.png::file://",  # a chain suffix: fsspec would read the link's target
        "simplecache::file://{t}/data/scan.png",
        "file://{t}/data2/scan.png",
        "file://{t}/data/out/secret.png",
        "local://{t}/outside/secret.png",
        "file:{t}/outside/secret.png",
        "{t}/data/%2e%2e/outside/secret.png",  # '..' percent-encoded
        "file://{t}/data/%2E%2E/outside/secret.png",
        "{t}/data%2f..%2foutside/secret.png",
        "/etc/passwd",
        "{t}/data/scan.png\x00.png",
        "{t}/data/%00",
        "{t}/data/caf\ud800.png",  # a lone surrogate: no file name a request can mean
        "C:\\data\\scan.png",  # Windows-style: not what it looks like on a POSIX server
        "{t}\\data\\..\\outside\\secret.png",
        "\\\\server\\share\\scan.png",
        "s3://scans-private/a.png",
        "s3://scans/../scans-private/a.png",
        "s3://scans/%2e%2e/scans-private/a.png",
        "s3://scans//a.png",
        "gs://scans/a.png",
        "memory://okay/a.png",
        "https://scans/a.png",
    ],
)
def test_what_leaves_the_roots_is_refused(roots: AllowedRoots, tree: Path, reference: str) -> None:
    with pytest.raises(InvalidInputError, match=r"^image\.uri: "):
        roots.check(reference.format(t=tree), "image.uri")


@pytest.mark.parametrize(
    ("reference", "opened"),
    [
        ("{t}/data/scan.png", "{t}/data/scan.png"),
        ("{t}/data/sub/../scan.png", "{t}/data/scan.png"),
        ("{t}/data/in/scan.png", "{t}/data/sub/scan.png"),  # a symlink that stays inside
        ("file://{t}/data/sub/scan.png", "{t}/data/sub/scan.png"),
        ("local://{t}/data/scan.png", "{t}/data/scan.png"),
        ("{t}/data/sub%20folder/x.png", "{t}/data/sub%20folder/x.png"),  # decoded once, both inside
        ("{t}/data/%252e%252e/x.png", "{t}/data/%252e%252e/x.png"),  # decoded once: '%2e%2e', literal
        ("s3://scans/a.png", "s3://scans/a.png"),
        ("s3://scans/ct/a%20b.png", "s3://scans/ct/a%20b.png"),
        ("memory://ok/a.png", "memory://ok/a.png"),
    ],
)
def test_what_stays_under_a_root_is_allowed(
    roots: AllowedRoots, tree: Path, reference: str, opened: str
) -> None:
    assert roots.check(reference.format(t=tree)) == opened.format(t=tree).replace("/", os.sep)


def test_a_relative_path_resolves_from_the_working_directory(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree)
    roots = AllowedRoots(["data"])
    assert roots.check("data/scan.png") == str(tree / "data/scan.png")
    with pytest.raises(InvalidInputError):
        roots.check("data/../data2/scan.png")


def test_no_roots_allow_anything_but_control_characters_and_empty_roots_nothing(tree: Path) -> None:
    anything = AllowedRoots(None)
    assert anything.check("zip://a.png::s3://b/c.zip") == "zip://a.png::s3://b/c.zip"
    with pytest.raises(InvalidInputError, match="control characters"):
        anything.check("/data/a\x00.png")
    with pytest.raises(InvalidInputError, match=r"\(none\)"):
        AllowedRoots(()).check(str(tree / "data/scan.png"))


def test_a_root_is_parsed_as_strictly_as_a_reference() -> None:
    with pytest.raises(InvalidInputError, match="allowed root"):
        AllowedRoots(["zip://x::file:///data"])
    assert locate("s3://scans/") == locate("s3://scans")
    assert locate("file:///data/") == locate("/data") == locate("local:///data")
