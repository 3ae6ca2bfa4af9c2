"""The validator of MeCoVQA datasets: every problem of every sample, each with a kind code.

`medplib data check` prints these issues and the loader uses the same checks to skip or reject bad
samples, so a dataset the checker passes is exactly one the loader reads whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

from medplib.core.errors import MedplibError, validation_message
from medplib.trainers.data.mecovqa import (
    IMAGE_TOKEN,
    MASK_PATTERN,
    REGION_PATTERN,
    SEG_TOKEN,
    Sample,
    dataset_root,
    read_json_list,
    resolve_under,
    sample_files,
)

IssueKind = Literal[
    "invalid_file",  # a file that is not a JSON list of samples
    "schema",  # a sample without the keys and types of the format
    "duplicate_id",
    "conversation",  # turns that do not alternate human/gpt, a misplaced <image>, <mask> or <region>
    "unsafe_path",  # an image or mask path that is absolute or leaves the dataset root
    "missing_image",
    "unreadable_image",
    "missing_mask",
    "unreadable_mask",
    "size_mismatch",  # a mask whose size is not its image's
    "seg_without_mask",
    "mask_without_seg",
    "empty_region",  # a region mask with no foreground pixel (an empty grounding mask is valid: absent)
]


class _Problem(NamedTuple):
    kind: IssueKind
    message: str


class Issue(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: str
    index: int | None = None  # position in the file's list; None for a whole-file problem
    sample_id: str | None = None
    kind: IssueKind
    message: str

    def line(self) -> str:
        """'train.json[12] id=G-7: missing_mask: masks/x.png does not exist'."""
        where = self.file if self.index is None else f"{self.file}[{self.index}]"
        who = f" id={self.sample_id}" if self.sample_id is not None else ""
        return f"{where}{who}: {self.kind}: {self.message}"


class CheckReport(BaseModel):
    files: list[str]
    samples: int
    issues: list[Issue]

    @property
    def bad_samples(self) -> int:
        return len({(issue.file, issue.index) for issue in self.issues})


class SampleChecker:
    """Checks samples against the files under one root; image sizes and masks are read once each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._sizes: dict[Path, tuple[int, int] | str] = {}  # (height, width) or why it is unreadable
        # (shape, has a foreground pixel) or why it is unreadable: never the masks themselves, which
        # for a released dataset would not fit in memory.
        self._masks: dict[Path, tuple[tuple[int, ...], bool] | str] = {}

    def check(self, raw: object, *, file: str, index: int) -> tuple[Sample | None, list[Issue]]:
        """The parsed sample (None if it does not parse) and its issues."""
        sample_id = str(raw["id"]) if isinstance(raw, dict) and "id" in raw else None

        def issue(kind: IssueKind, message: str) -> Issue:
            return Issue(file=file, index=index, sample_id=sample_id, kind=kind, message=message)

        try:
            sample = Sample.model_validate(raw)
        except ValidationError as exc:
            return None, [issue("schema", validation_message(exc))]
        issues = [issue(*problem) for problem in _conversation_problems(sample)]
        size = None
        if sample.image is not None:
            found = self._image_size(sample.image)
            if isinstance(found, _Problem):
                issues.append(issue(*found))
            else:
                size = found
        paths = [(p, True) for p in sample.region_paths] + [(p, False) for p in sample.mask_paths]
        for relative, is_region in paths:
            issues.extend(issue(*problem) for problem in self._mask_problems(relative, size, is_region))
        return sample, issues

    def _resolve(self, relative: str, what: str) -> Path | _Problem:
        try:
            return resolve_under(self.root, relative)
        except MedplibError as exc:  # absolute, '..', or a symlink that points out of the root
            return _Problem("unsafe_path", f"{what}: {exc}")

    def _image_size(self, relative: str) -> tuple[int, int] | _Problem:
        path = self._resolve(relative, "image")
        if isinstance(path, _Problem):
            return path
        if not path.is_file():
            return _Problem("missing_image", f"image {relative} does not exist")
        if path not in self._sizes:
            from medplib.core.io import load_image

            try:
                self._sizes[path] = load_image(path).size
            except MedplibError as exc:
                self._sizes[path] = str(exc)
        found = self._sizes[path]
        return (
            found if isinstance(found, tuple) else _Problem("unreadable_image", f"image {relative}: {found}")
        )

    def _mask_problems(
        self, relative: str, image_size: tuple[int, int] | None, is_region: bool
    ) -> list[_Problem]:
        what = "region" if is_region else "mask"
        path = self._resolve(relative, what)
        if isinstance(path, _Problem):
            return [path]
        if not path.is_file():
            return [_Problem("missing_mask", f"{what} {relative} does not exist")]
        if path not in self._masks:
            from medplib.core.masks import read_mask

            try:
                mask = read_mask(path)
                self._masks[path] = (mask.shape, bool(mask.any()))
            except MedplibError as exc:
                self._masks[path] = str(exc)
        found = self._masks[path]
        if isinstance(found, str):
            return [_Problem("unreadable_mask", f"{what} {relative}: {found}")]
        (shape, marked), problems = found, []
        if image_size is not None and shape != image_size:
            (mh, mw), (ih, iw) = shape, image_size
            message = f"{what} {relative} is {mw}x{mh} (WxH) but its image is {iw}x{ih}"
            problems.append(_Problem("size_mismatch", message))
        if is_region and not marked:
            problems.append(_Problem("empty_region", f"region {relative} marks no pixel"))
        return problems


def _conversation_problems(sample: Sample) -> list[_Problem]:
    """Turn order, the image token, and the pairing of `<SEG>` with masks in each answer."""
    problems: list[_Problem] = []
    speakers = [turn.speaker for turn in sample.conversations]
    expected = ["human", "gpt"] * (len(speakers) // 2 + 1)
    if speakers != expected[: len(speakers)] or speakers[-1] != "gpt":
        problems.append(
            _Problem("conversation", f"turns must alternate human, gpt, ... and end with gpt; got {speakers}")
        )
    image_tokens = [turn.value.count(IMAGE_TOKEN) for turn in sample.conversations]
    if sample.image is not None and (image_tokens[0] != 1 or sum(image_tokens) != 1):
        problems.append(_Problem("conversation", f"{IMAGE_TOKEN} must appear once, in the first human turn"))
    if sample.image is None and sum(image_tokens):
        problems.append(_Problem("conversation", f"{IMAGE_TOKEN} appears but the sample names no image"))
    for number, turn in enumerate(sample.conversations):
        if turn.speaker == "human" and (MASK_PATTERN.search(turn.value) or SEG_TOKEN in turn.value):
            problems.append(
                _Problem("conversation", f"turn {number}: <mask> and {SEG_TOKEN} belong in answers")
            )
        if turn.speaker == "gpt" and REGION_PATTERN.search(turn.value):
            problems.append(_Problem("conversation", f"turn {number}: <region> belongs in questions"))
        if turn.speaker != "gpt":
            continue
        segs, masks = turn.value.count(SEG_TOKEN), len(MASK_PATTERN.findall(turn.value))
        if segs > masks:
            problems.append(
                _Problem("seg_without_mask", f"turn {number}: {segs} {SEG_TOKEN} but {masks} <mask>")
            )
        elif masks > segs:
            problems.append(
                _Problem("mask_without_seg", f"turn {number}: {masks} <mask> but {segs} {SEG_TOKEN}")
            )
    return problems


def check_files(files: Iterable[Path], root: Path) -> tuple[list[tuple[Sample, list[Issue]]], list[Issue]]:
    """Every sample of `files` with its issues, and the issues of samples that do not parse or of
    whole files. Sample ids must be unique within a file."""
    checked: list[tuple[Sample, list[Issue]]] = []
    other: list[Issue] = []
    checker = SampleChecker(root)
    for path in files:
        try:
            items = read_json_list(path)
        except MedplibError as exc:
            other.append(Issue(file=path.name, kind="invalid_file", message=str(exc)))
            continue
        seen: set[str] = set()
        for index, raw in enumerate(items):
            sample, issues = checker.check(raw, file=path.name, index=index)
            if sample is None:
                other.extend(issues)
                continue
            if sample.id in seen:
                message = f"id {sample.id!r} is used by an earlier sample in this file"
                issues.append(
                    Issue(
                        file=path.name, index=index, sample_id=sample.id, kind="duplicate_id", message=message
                    )
                )
            seen.add(sample.id)
            checked.append((sample, issues))
    return checked, other


def all_issues(checked: list[tuple[Sample, list[Issue]]], other: list[Issue]) -> list[Issue]:
    """Every issue of `check_files`' results, by file and position in it."""
    issues = other + [issue for _, sample_issues in checked for issue in sample_issues]
    return sorted(issues, key=lambda i: (i.file, -1 if i.index is None else i.index))


def check_dataset(source: Path, image_root: Path | None = None) -> CheckReport:
    """Check a dataset folder (every JSON list in it) or one MeCoVQA JSON file."""
    files = sample_files(source)
    checked, other = check_files(files, dataset_root(source, image_root))
    samples = len(checked) + len({(i.file, i.index) for i in other if i.index is not None})
    return CheckReport(
        files=[path.name for path in files], samples=samples, issues=all_issues(checked, other)
    )
