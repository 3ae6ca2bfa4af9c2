"""`make demo`: the end-to-end run on real medical images that ship in registry packages.

Today it exercises the input and output path the model stands on: real DICOM and NIfTI files of
several modalities are read into the canonical form, real masks (the abdomen MR's lesion overlay,
MNI152 grey matter) and region prompts of each kind become masks, masks travel as RLE JSON, and the
overlays are written as PNG files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medplib.core.image import MedicalImage
from medplib.core.io import load_image, load_volume, slice_volume, volume_plane
from medplib.core.masks import Mask, overlay, save_png
from medplib.core.regions import BoxPrompt, PointPrompt, PolygonPrompt, RegionPrompt, ScribblePrompt
from medplib.trainers.registry_data import DICOM_FILES, dicom_file, mni152_file


def inspect_table(images: dict[str, MedicalImage]) -> str:
    header = f"{'image':<20} {'format':<6} {'modality':<14} {'size':>11}  {'spacing (mm)':<14} values"
    lines = [header, "-" * len(header)]
    for name, image in images.items():
        meta = image.meta
        modality = " ".join(p for p in (meta.modality, meta.body_part) if p) or "-"
        spacing = f"{meta.spacing[0]:.3g}x{meta.spacing[1]:.3g}" if meta.spacing else "-"
        low, high = meta.value_range
        lines.append(
            f"{name:<20} {meta.format:<6} {modality:<14} {meta.width:>5}x{meta.height:<5}  {spacing:<14} "
            f"{meta.original_dtype} {low:g}..{high:g}"
        )
    return "\n".join(lines)


def lesion_overlay_mask() -> np.ndarray:
    """The abdomen MR's overlay plane 0x6000, a real hand-drawn ring around a liver lesion."""
    import pydicom

    dataset = pydicom.dcmread(dicom_file("mr_abdomen_lesion"))
    return dataset.overlay_array(0x6000).astype(bool)


def chest_prompts(height: int, width: int) -> list[RegionPrompt]:
    """One prompt of each kind on the chest radiograph, in original pixel coordinates."""
    return [
        BoxPrompt(box=(0.18 * width, 0.25 * height, 0.45 * width, 0.7 * height)),
        PointPrompt(points=[(0.7 * width, 0.45 * height)], labels=[1], radius=0.04 * width),
        PolygonPrompt(
            points=[(0.55 * width, 0.3 * height), (0.8 * width, 0.35 * height), (0.62 * width, 0.6 * height)]
        ),
        ScribblePrompt(
            points=[(0.3 * width, 0.8 * height), (0.5 * width, 0.75 * height), (0.7 * width, 0.8 * height)],
            width=0.01 * width,
        ),
    ]


def run_demo(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    images = {key: load_image(dicom_file(key)) for key in DICOM_FILES}
    t1 = load_volume(mni152_file("t1"))
    grey = load_volume(mni152_file("grey_matter"))
    for axis in ("axial", "coronal", "sagittal"):
        images[f"mni152_t1_{axis}"] = slice_volume(t1, axis=axis)
    print(inspect_table(images))

    results: dict[str, dict] = {}
    lesion = Mask.from_array(lesion_overlay_mask())
    mr = images["mr_abdomen_lesion"]
    save_png(overlay(mr.pixels, [lesion]), out / "mr_abdomen_lesion_overlay.png")
    results["mr_abdomen_lesion"] = {"overlay_0x6000": lesion.model_dump(mode="json")}

    # nilearn stores the probability maps as uint8, p = value / 255
    grey_mask = Mask.from_array(volume_plane(grey, axis="axial") / 255 > 0.5)
    save_png(overlay(images["mni152_t1_axial"].pixels, [grey_mask]), out / "mni152_axial_grey_matter.png")
    results["mni152_t1_axial"] = {"grey_matter_p>0.5": grey_mask.model_dump(mode="json")}

    chest = images["cr_chest"]
    height, width = chest.size
    prompts = chest_prompts(height, width)
    masks = [Mask.from_array(prompt.to_mask(height, width)) for prompt in prompts]
    save_png(overlay(chest.pixels, masks), out / "cr_chest_regions.png")
    results["cr_chest"] = {
        prompt.kind: mask.model_dump(mode="json") for prompt, mask in zip(prompts, masks, strict=True)
    }

    print("\nmasks (COCO RLE):")
    for image_name, entries in results.items():
        for label, rle in entries.items():
            mask = Mask.model_validate(rle)
            raw = mask.size[0] * mask.size[1]
            print(
                f"  {image_name:<20} {label:<18} area {mask.area:>7} px  bbox {mask.bbox}  "
                f"RLE {len(mask.counts):>5} chars for {raw} pixels"
            )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}/")
    return results
