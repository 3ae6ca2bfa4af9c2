"""`medplib data build`: the embedded MeCoVQA dataset, from real images and masks in registry packages.

The output folder holds `train.json`, `val.json`, `test.json` (samples), `images/` (PNG, the canonical
RGB rendering), `masks/` (1-bit PNG, regions and grounding targets), `volumes/` (3-D test samples,
`trainers/data/volumes.py`), `metadata.json` and `README.md` (the dataset card). The build is
deterministic: the same seed and options on the same installed packages give byte-identical files
(every image draws from its own generator seeded by the build seed and its name, files are written
in a fixed order with fixed PNG and JSON settings, and nothing records a time or a path of this
machine). It is written to a sibling folder first and moved into place at the end, so an interrupted
build leaves no half dataset.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medplib.core.errors import InvalidInputError
from medplib.core.masks import save_png
from medplib.trainers.data.mecovqa import METADATA_FILE, Sample
from medplib.trainers.data.questions import image_samples
from medplib.trainers.data.sources.common import SourceImage
from medplib.trainers.data.stats import format_stats, sample_stats
from medplib.trainers.data.templates import KINDS
from medplib.trainers.data.volumes import write_mni152_test_volumes

BUILDER_VERSION = 2  # bump whenever the same options would give different files
DEFAULT_MNI_STEP = 4

SOURCES = (  # (package, what, licence): the dataset card's credits
    ("nilearn", "MNI152 2009a symmetric T1 template with grey- and white-matter probability maps",
     "BSD-3 (template: © McConnell Brain Imaging Centre, free use with credit)"),
    ("pydicom", "CT_small.dcm, MR_small.dcm", "MIT"),
    ("pydicom-data", "chest and tibia CR, shoulder MR, ultrasound, abdomen MR with a lesion overlay,"
     " multi-frame MR", "MIT"),
    ("stardist", "img2d.tif fluorescence microscopy with mask2d.tif (125 nuclei)", "BSD-3"),
    ("scikit-image", "retina.jpg fundus photograph (CC0), ihc.png immunohistochemistry", "BSD-3"),
)  # fmt: skip


def source_images(mni_step: int) -> Iterator[SourceImage]:
    """Every image of every source, in a fixed order."""
    from medplib.trainers.data.sources.dicom import dicom_images
    from medplib.trainers.data.sources.microscopy import microscopy_images
    from medplib.trainers.data.sources.mni152 import mni152_images
    from medplib.trainers.data.sources.photos import photo_images

    yield from mni152_images(mni_step)
    yield from dicom_images()
    yield from microscopy_images()
    yield from photo_images()


def build_dataset(
    out: Path, *, seed: int = 0, mni_step: int = DEFAULT_MNI_STEP, overwrite: bool = False
) -> dict:
    """Write the dataset to `out` and return its statistics (as `medplib data stats` prints them)."""
    if mni_step < 1:
        raise InvalidInputError(f"the MNI152 slice step must be at least 1, got {mni_step}")
    out = out.resolve()  # so that '.' has a name and a parent for the sibling folder
    replace = _may_replace(out, overwrite)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    (partial / "masks").mkdir()
    by_split: dict[str, list[Sample]] = {}
    for image in source_images(mni_step):
        # Each image's own generator: adding or dropping an image leaves the others' samples alone.
        rng = np.random.default_rng([seed, zlib.crc32(image.key.encode())])
        made = image_samples(image, rng)
        save_png(image.pixels, partial / "images" / f"{image.key}.png")
        for path, mask in made.masks.items():
            save_png(mask, partial / path)
        by_split.setdefault(image.split, []).extend(made.samples)
    for split, samples in by_split.items():
        _write_json(partial / f"{split}.json", [sample.dump() for sample in samples])
    write_mni152_test_volumes(partial)  # volumes/: 3-D samples for `medplib eval`, apart from the 2-D
    stats = sample_stats(by_split)
    _write_json(partial / METADATA_FILE, _metadata(seed, mni_step, stats))
    (partial / "README.md").write_text(_card(seed, mni_step, stats), encoding="utf-8")
    # Only now, with the new dataset complete, does the old one go.
    if replace:
        shutil.rmtree(out)
    elif out.exists():
        out.rmdir()  # empty: _may_replace made sure
    partial.rename(out)
    return stats


def _may_replace(out: Path, overwrite: bool) -> bool:
    """Whether `out` holds a dataset to replace; refuse a non-empty `out` unless `overwrite` and it is
    a dataset this builder wrote."""
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise InvalidInputError(f"{out} is not empty; choose a new folder or pass --overwrite")
    try:
        builder = json.loads((out / METADATA_FILE).read_text(encoding="utf-8")).get("builder")
    except (OSError, ValueError, AttributeError):
        builder = None
    if builder != __name__:
        # Never delete a folder we did not write, whatever the flag says.
        raise InvalidInputError(f"{out} is not a dataset written by medplib data build; not overwriting it")
    return True


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _metadata(seed: int, mni_step: int, stats: dict) -> dict:
    return {
        "builder": __name__,
        "builder_version": BUILDER_VERSION,
        "format": "MeCoVQA (LLaVA-style JSON); paths relative to this folder",
        "options": {"seed": seed, "mni_step": mni_step},
        "sources": [
            {"package": package, "version": _version(package), "files": what, "licence": licence}
            for package, what, licence in SOURCES
        ],
        "held_out_templates": {name: list(kind.test_only) for name, kind in KINDS.items()},
        "stats": stats,
    }


def _card(seed: int, mni_step: int, stats: dict) -> str:
    credits = "\n".join(
        f"| {package} {_version(package)} | {what} | {licence} |" for package, what, licence in SOURCES
    )
    return f"""# medplib embedded MeCoVQA dataset

Built by `medplib data build` (builder version {BUILDER_VERSION}, seed {seed}, MNI152 slice step {mni_step})
from real images and masks that ship in registry packages. Three parts, as in MeCoVQA: C (complex VQA:
closed and open questions), R (region VQA: a marked point, box or shape, saved as a mask), G (grounding:
`<SEG>` and its mask). Each split is one JSON list (`train.json`, `val.json`, `test.json`); image and mask
paths are relative to this folder. `metadata.json` holds the same counts, the options, the package
versions and the question wordings held out for the test split.

## Derived masks
- MNI152: grey and white matter are the template's probability maps at p > 0.5; the brain is the
  skull-stripped T1's non-zero voxels; the hemispheres are the brain at world x < 0 (left) and x > 0.
- Abdomen MR: the lesion is the overlay ring (plane 0x6000) in the left half of the image, filled.
- stardist: the nuclei are the instance labels of mask2d.tif; images are 128 px tiles.

## Volumes
`volumes/test.json` lists 3-D samples for `medplib eval`: the MNI152 template's test-split slabs (each run
of consecutive axial or coronal test slices, as its own NIfTI volume) with a NIfTI mask per structure
(grey and white matter, each hemisphere), derived as the 2-D masks are; `volumes/` holds the files.

## Splits
By position with gaps, so that no test slice or tile has a training neighbour: MNI152 slices in 12 mm
blocks (train, train, val, train, train, test) with 2 mm either side of a change dropped, sagittal slices
placed by their distance from the midline (the template is symmetric); microscopy tiles by rows (train
up to row 320, test from row 384); the multi-frame MR by frame (0-3 train, 6-9 test). Every other
image is a source's only one and is in the training split.

## Sources
| package | files | licence |
|---|---|---|
{credits}

## Counts
```text
{format_stats(stats)}
```
"""
