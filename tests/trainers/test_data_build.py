"""`medplib data build` and `stats` on the real registry images: parts, modalities, splits, wordings."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medplib.cli import app
from medplib.core.errors import InvalidInputError
from medplib.trainers.data.builder import build_dataset
from medplib.trainers.data.loader import load_samples
from medplib.trainers.data.mecovqa import IMAGE_TOKEN, SEG_TOKEN, Sample, strip_references
from medplib.trainers.data.templates import KINDS

runner = CliRunner()


@pytest.fixture(scope="module")
def samples(built_dataset: Path) -> list[Sample]:
    loaded = load_samples(built_dataset, on_error="reject")
    return loaded.samples


def by_split(samples: list[Sample]) -> dict[str, list[Sample]]:
    grouped: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        grouped[sample.split].append(sample)
    return grouped


def test_three_parts_and_several_modalities_in_train_and_test(samples: list[Sample]) -> None:
    grouped = by_split(samples)
    assert set(grouped) == {"train", "val", "test"}
    for split in ("train", "test"):
        assert {s.part for s in grouped[split]} == {"C", "R", "G"}
    assert {s.modality for s in samples} >= {"MRI", "CT", "X-ray", "ultrasound", "fluorescence microscopy"}
    assert len({s.modality for s in grouped["test"]}) >= 2
    assert {s.answer_type for s in samples if s.part == "C"} == {"closed", "open"}
    assert 1000 <= len(samples) <= 2500  # trainable on 2 CPU cores in minutes


def test_samples_follow_the_format(samples: list[Sample]) -> None:
    for sample in samples:
        question, answer = (turn.value for turn in sample.conversations)
        assert question.startswith(f"{IMAGE_TOKEN}\n")
        assert (sample.part == "R") == bool(sample.region_paths)
        assert (sample.part == "G") == bool(sample.mask_paths) == (SEG_TOKEN in answer)
        assert strip_references(answer).strip()
    grounding = next(s for s in samples if s.part == "G")
    assert strip_references(grounding.conversations[1].value) == f"Sure, it is {SEG_TOKEN}."
    assert len({s.id for s in samples}) == len(samples)


def test_every_mask_matches_its_image(built_dataset: Path, samples: list[Sample]) -> None:
    sizes: dict[str, tuple[int, int]] = {}
    for sample in samples:
        with Image.open(built_dataset / sample.image) as image:
            size = sizes.setdefault(sample.image, image.size)
            assert image.mode == "RGB" and max(size) <= 256
        for path in sample.region_paths + sample.mask_paths:
            with Image.open(built_dataset / path) as mask:
                assert mask.size == size and mask.mode == "1"


def test_region_marks_lie_inside_what_they_are_asked_about(
    built_dataset: Path, samples: list[Sample]
) -> None:
    """A tissue region is wholly inside that tissue's grounding mask of the same image."""
    checked = 0
    for sample in samples:
        if sample.question_kind != "region_name" or sample.structure not in ("grey matter", "white matter"):
            continue
        tissue = sample.image.replace("images/", "masks/").replace(
            ".png", f"_{sample.structure.replace(' ', '_')}.png"
        )
        region = np.asarray(Image.open(built_dataset / sample.region_paths[0]))
        assert region.any() and not (region & ~np.asarray(Image.open(built_dataset / tissue))).any()
        checked += 1
    assert checked > 50
    assert {s.mark for s in samples if s.part == "R"} == {"point", "box", "shape"}


def gap(a: tuple[int, int], b: tuple[int, int]) -> int:
    """Positions strictly between two [start, stop) intervals (negative if they overlap)."""
    return max(a[0], b[0]) - min(a[1], b[1])


def test_splits_are_by_position_with_gaps(samples: list[Sample]) -> None:
    positions: dict[str, dict[str, set[tuple[int, int]]]] = defaultdict(lambda: defaultdict(set))
    image_split: dict[str, str] = {}
    for sample in samples:
        assert image_split.setdefault(sample.image, sample.split) == sample.split  # an image is in one split
        positions[sample.series][sample.split].add(sample.position)
    split_series = [series for series, splits in positions.items() if len(splits) > 1]
    assert {"mni152/axial", "mni152/coronal", "mni152/sagittal", "stardist/img2d"} <= set(split_series)
    for series in split_series:
        splits = positions[series]
        for held_out in ("val", "test"):
            for a in splits.get(held_out, ()):
                for b in splits["train"]:
                    assert gap(a, b) >= (4 if series.startswith("mni152") else 2), (series, a, b)
    # Single images (a source's only one) are for training only.
    assert all(set(splits) == {"train"} for series, splits in positions.items() if series not in split_series)


def template_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)) + r"\Z")


def test_held_out_wordings_appear_only_in_test(samples: list[Sample]) -> None:
    used_held_out = 0
    for sample in samples:
        kind, number = sample.template.split("/")
        held_out = int(number) >= len(KINDS[kind].train)
        assert not held_out or sample.split == "test", sample.id
        used_held_out += held_out
        question = sample.conversations[0].value.removeprefix(f"{IMAGE_TOKEN}\n")
        assert template_pattern(KINDS[kind].templates[int(number)]).match(question), sample.id
        if sample.split != "test":  # and no training question happens to read like a held-out one
            assert not any(template_pattern(t).match(question) for t in KINDS[kind].test_only), sample.id
    # A third of the test questions, however many wordings the training split has (HELD_OUT_SHARE).
    test_questions = sum(sample.split == "test" for sample in samples)
    assert 0.25 < used_held_out / test_questions < 0.42


def test_sagittal_slices_are_asked_nothing_whose_answer_is_a_side(samples: list[Sample]) -> None:
    # The template is symmetric: a sagittal slice and its mirror image are the same picture.
    sagittal = [s for s in samples if s.id.startswith("mni152_sagittal")]
    assert sagittal
    for sample in sagittal:
        assert sample.question_kind != "region_side", sample.id
        assert "hemisphere" not in sample.conversations[0].value, sample.id


def test_build_is_byte_identical(built_dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_dataset(again)

    def digests(root: Path) -> dict[str, str]:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    first, second = digests(built_dataset), digests(again)
    assert len(first) > 500
    assert first == second


def test_dataset_card(built_dataset: Path) -> None:
    metadata = json.loads((built_dataset / "metadata.json").read_text())
    assert metadata["builder_version"] >= 1 and metadata["options"] == {"seed": 0, "mni_step": 4}
    assert {s["package"] for s in metadata["sources"]} >= {
        "nilearn",
        "pydicom-data",
        "stardist",
        "scikit-image",
    }
    assert all(s["licence"] for s in metadata["sources"])
    assert metadata["held_out_templates"]["segment"]
    card = (built_dataset / "README.md").read_text()
    assert "G grounding" in card and "BSD-3" in card


def test_stats_command(built_dataset: Path) -> None:
    result = runner.invoke(app, ["data", "stats", str(built_dataset)])
    assert result.exit_code == 0, result.output
    for text in ("C complex VQA", "R region VQA", "G grounding", "fluorescence microscopy", "closed answers"):
        assert text in result.output
    assert re.search(r"^part +train +val +test +total$", result.output, re.M)
    result = runner.invoke(app, ["data", "stats", str(built_dataset), "--json"])
    stats = json.loads(result.output)
    assert stats["splits"] == ["train", "val", "test"]
    assert sum(sum(row.values()) for row in stats["part"].values()) == stats["samples"]
    assert stats["answers"]["yes"]["train"] > 0 and stats["unparsed"] == 0


def test_check_passes_the_built_dataset(built_dataset: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(built_dataset)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("all good")


def test_build_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["data", "build", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output
    result = runner.invoke(app, ["data", "build", str(tmp_path), "--overwrite"])
    assert result.exit_code == 2 and "not a dataset written by" in result.output
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_only_a_dataset_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medplib.trainers.data import builder
    from medplib.trainers.data.sources.photos import photo_images

    monkeypatch.setattr(builder, "source_images", lambda mni_step: photo_images())  # two images: fast
    out = tmp_path / "dataset"
    build_dataset(out)
    (out / "notes.txt").write_text("stale")
    with pytest.raises(InvalidInputError, match="not empty"):
        build_dataset(out)
    build_dataset(out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "train.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]  # no partial folder left behind
