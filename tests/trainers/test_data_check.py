"""`medplib data check` and the loader on a dataset made to hold every kind of bad sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medplib.cli import app
from medplib.core.errors import InvalidInputError
from medplib.core.masks import save_png
from medplib.trainers.data.check import check_dataset
from medplib.trainers.data.loader import load_samples
from medplib.trainers.data.mecovqa import path_problem, resolve_under
from medplib.trainers.data.stats import dataset_stats

runner = CliRunner()


def sample(sample_id: str, question: str, answer: str, image: str | None = "images/a.png") -> dict:
    data = {
        "id": sample_id,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    return data | ({"image": image} if image is not None else {})


GOOD = [
    sample("good-c", "<image>\nWhat modality is this?", "MRI") | {"answer_type": "closed"},
    sample("good-g", "<image>\nSegment the lesion.", "Sure, it is <SEG><mask>masks/good.png</mask>."),
    sample("good-r", "<image>\nWhat is in <region>masks/good.png</region>?", "lesion"),
]
# (sample, the kind of problem it must be flagged with)
BAD = [
    (sample("missing-image", "<image>\nWhat is this?", "MRI", image="images/gone.png"), "missing_image"),
    (
        sample("missing-mask", "<image>\nSegment it.", "It is <SEG><mask>masks/gone.png</mask>."),
        "missing_mask",
    ),
    (
        sample("wrong-size", "<image>\nWhat is in <region>masks/small.png</region>?", "lesion"),
        "size_mismatch",
    ),
    (sample("seg-alone", "<image>\nSegment the lesion.", "Sure, it is <SEG>."), "seg_without_mask"),
    (sample("mask-alone", "<image>\nSegment it.", "Here: <mask>masks/good.png</mask>"), "mask_without_seg"),
    (sample("climbs-out", "<image>\nWhat is in <region>../outside.png</region>?", "x"), "unsafe_path"),
    (sample("absolute", "<image>\nWhat is this?", "x", image="/etc/passwd"), "unsafe_path"),
    (sample("symlink", "<image>\nWhat is in <region>masks/link.png</region>?", "x"), "unsafe_path"),
    (
        sample("empty-region", "<image>\nWhat is in <region>masks/empty.png</region>?", "nothing"),
        "empty_region",
    ),
    (sample("no-image-token", "What is this?", "MRI"), "conversation"),
    (sample("broken-image", "<image>\nWhat is this?", "MRI", image="images/broken.png"), "unreadable_image"),
    ({"id": "no-turns", "image": "images/a.png"}, "schema"),
    (GOOD[0], "duplicate_id"),
]


@pytest.fixture
def bad_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    save_png(np.zeros((8, 10, 3), np.uint8), root / "images" / "a.png")
    good = np.zeros((8, 10), bool)
    good[2:5, 3:6] = True
    save_png(good, root / "masks" / "good.png")
    save_png(np.ones((4, 4), bool), root / "masks" / "small.png")
    save_png(np.zeros((8, 10), bool), root / "masks" / "empty.png")
    save_png(good, tmp_path / "outside.png")
    (root / "masks" / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "train.json").write_text(json.dumps(GOOD + [item for item, _ in BAD]))
    (root / "test.json").write_text(json.dumps(GOOD))
    return root


def test_check_flags_each_kind_of_bad_sample(bad_dataset: Path) -> None:
    report = check_dataset(bad_dataset)
    assert report.files == ["test.json", "train.json"] and report.samples == 2 * len(GOOD) + len(BAD)
    found = {(issue.file, issue.index): issue.kind for issue in report.issues}
    expected = {("train.json", len(GOOD) + i): kind for i, (_, kind) in enumerate(BAD)}
    assert found == expected
    assert report.bad_samples == len(BAD)


def test_check_command_reports_one_line_per_issue_and_fails(bad_dataset: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(bad_dataset)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == len(BAD) + 1
    assert "train.json[3] id=missing-image: missing_image: image images/gone.png does not exist" in lines
    assert lines[-1] == f"checked {2 * len(GOOD) + len(BAD)} samples in test.json, train.json: {len(BAD)} bad"
    report = json.loads(runner.invoke(app, ["data", "check", str(bad_dataset), "--json"]).output)
    assert {issue["kind"] for issue in report["issues"]} == {kind for _, kind in BAD}


def test_check_reads_a_released_file_with_its_image_root(bad_dataset: Path, tmp_path: Path) -> None:
    """MeCoVQA's released files are JSON lists kept apart from the images they name."""
    released = tmp_path / "MeCoVQA-G_test.json"
    shutil.copy(bad_dataset / "test.json", released)
    result = runner.invoke(app, ["data", "check", str(released), "--image-root", str(bad_dataset)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "check", str(released)])  # images are not next to the file
    assert result.exit_code == 1 and "missing_image" in result.output


def test_check_rejects_what_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text('{"not": "a list"}')
    result = runner.invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 1 and "invalid_file" in result.output
    result = runner.invoke(app, ["data", "check", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_stats_of_a_dataset_without_medplib_keys(bad_dataset: Path) -> None:
    stats = dataset_stats(bad_dataset / "test.json")
    assert stats["part"] == {"C": {"test": 1}, "G": {"test": 1}, "R": {"test": 1}}  # inferred from tags
    assert stats["modality"] == {"unknown": {"test": 3}} and stats["answers"] == {"MRI": {"test": 1}}
    assert dataset_stats(bad_dataset)["unparsed"] == 1  # the sample without conversations


def test_loader_skips_bad_samples(bad_dataset: Path) -> None:
    loaded = load_samples(bad_dataset, split="train", on_error="skip")
    assert [s.id for s in loaded.samples] == [s["id"] for s in GOOD]
    assert len({(i.file, i.index) for i in loaded.issues}) == len(BAD)
    assert loaded.path(loaded.samples[1].mask_paths[0]) == (bad_dataset / "masks" / "good.png").resolve()
    assert len(load_samples(bad_dataset, split="test", on_error="reject").samples) == len(GOOD)


def test_loader_rejects_bad_samples_when_asked(bad_dataset: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"problems in its samples: train.json\[3\] id=missing-image"):
        load_samples(bad_dataset, on_error="reject")
    with pytest.raises(InvalidInputError, match=r"no val\.json"):
        load_samples(bad_dataset, split="val")


@pytest.mark.parametrize(
    "path",
    [
        "../x.png",
        "masks/../../x.png",
        "masks/../x.png",
        "/etc/passwd",
        "C:\\x.png",
        "\\\\server\\x.png",
        "s3://b/x.png",
        "",
    ],
)
def test_paths_that_leave_the_root_are_refused(path: str, tmp_path: Path) -> None:
    assert path_problem(path) is not None
    with pytest.raises(InvalidInputError):
        resolve_under(tmp_path, path)


def test_paths_under_the_root_resolve(tmp_path: Path) -> None:
    assert path_problem("masks/x.png") is None
    assert resolve_under(tmp_path, "masks/x.png") == tmp_path.resolve() / "masks" / "x.png"


def test_a_symlink_cannot_take_a_path_out_of_the_root(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    (tmp_path / "data" / "out").symlink_to(tmp_path / "data2")
    with pytest.raises(InvalidInputError, match="outside the dataset root"):
        resolve_under(tmp_path / "data", "out/x.png")
