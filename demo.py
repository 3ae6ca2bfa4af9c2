"""`make demo`: the main job, end to end on real medical images that ship in registry packages.

1. The input and output path (`inspect_real_data`): real DICOM and NIfTI files of several modalities
   are read into the canonical form, real masks (the abdomen MR's lesion overlay, MNI152 grey
   matter) and region prompts of each kind become masks, masks travel as RLE JSON, overlays as PNG.
2. The model: the embedded MeCoVQA dataset is built (if missing), the tiny pipeline I -> IV trains
   on it (unless a finished run is there to reuse), its test-split metrics are printed, and the
   trained MoE answers a VQA question, a region question and a grounding request about test images
   it never saw, with overlays of its masks written as PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medplib.core.image import MedicalImage
from medplib.core.io import load_image, load_volume, slice_volume, volume_plane
from medplib.core.io.registry_data import DICOM_FILES, dicom_file, mni152_file
from medplib.core.masks import Mask, overlay, save_png
from medplib.core.regions import BoxPrompt, PointPrompt, PolygonPrompt, RegionPrompt, ScribblePrompt

if TYPE_CHECKING:
    from medplib.trainers.collate import Example


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


def inspect_real_data(out: Path) -> dict:
    """Read real files, make masks from overlays and prompts, write overlays and `results.json`."""
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


def ensure_dataset(folder: Path) -> Path:
    """The embedded dataset in `folder`, built first when it is not there."""
    from medplib.trainers.data.builder import build_dataset

    if not (folder / "train.json").is_file():
        print(f"\nbuilding the embedded MeCoVQA dataset in {folder} ...")
        build_dataset(folder, overwrite=True)
    return folder


def ensure_trained(data: Path, folder: Path) -> dict:
    """The tiny pipeline's report: reused from `folder` when a finished run is there, else trained with
    the committed run's config options (seed 0 of `benchmarks/results/pipeline.json`)."""
    from medplib.core.model.presets import TINY_RECIPE_OPTIONS
    from medplib.trainers.pipeline import run_pipeline

    report = folder / "report.json"
    if report.is_file() and (folder / "stage4" / "stage.json").is_file():
        print(f"\nreusing the trained pipeline in {folder} (delete it to train again)")
        return json.loads(report.read_text())
    print(f"\ntraining the tiny pipeline I -> IV into {folder} (about 15 minutes on 2 CPU cores) ...")
    return run_pipeline(data, folder, config_options=TINY_RECIPE_OPTIONS)


# (question kind, structure, label): a VQA question, a region question and grounding requests, each
# about the first axial test slice that has one. Left and right hemisphere are asked on one slice: a
# model that reads its request gives two different masks (`swap_iou` in the demo's output).
QUESTIONS = (
    ("modality", None, "VQA"),
    ("region_name", "white matter", "region"),
    ("segment", "grey matter", "grounding"),
    ("segment", "left hemisphere", "grounding"),
    ("segment", "right hemisphere", "grounding"),
)


def _question(example: Example) -> str:
    """The sample's own question text, its region written as the assistant's `{region}`."""
    parts = example.question_only().turns[-1].user
    return "".join(part if isinstance(part, str) else "{region}" for part in parts)


def ask_questions(stage_folder: Path, data: Path, out: Path) -> list[dict]:
    """Ask the model in `stage_folder` about test images it never saw, through the assistant API;
    the region and the predicted mask (beside the reference) are drawn into PNGs in `out`."""
    import medplib
    from medplib.core.regions import MaskPrompt
    from medplib.trainers.collate import ExampleStore
    from medplib.trainers.eval.metrics import mask_scores

    assistant = medplib.load(stage_folder)  # a stage folder loads as the model it trained
    store = ExampleStore.open(data, split="test")
    first: dict[tuple, Example] = {}
    for example in store.examples():
        if "axial" in example.image:
            first.setdefault((example.kind, example.structure), example)
    asked = []
    for kind, structure, label in QUESTIONS:
        example = first[(kind, structure)]
        image = str(store.loaded.path(example.image))
        if example.targets:
            result = assistant.ground(image, f"the {structure}")
            made = result.masks[0].mask.to_array() if result.masks else np.zeros_like(example.targets[0])
            entry = {
                "structure": structure,
                "dice": mask_scores(made, example.targets[0]).dice,
                "seg_forced": result.seg_forced,
                "mask": made,
            }
            drawn = [example.targets[0], made]  # reference first, the prediction drawn over it
        else:
            regions = list(example.request.regions)
            result = assistant.answer(
                image, _question(example), regions=[MaskPrompt.from_array(m) for m in regions]
            )
            entry, drawn = {"reference": example.reference}, regions
        question = _question(example) if not example.targets else f"segment the {structure}"
        asked.append(
            {"kind": label, "image": example.image, "question": question, "answer": result.text} | entry
        )
        if drawn:
            named = f"{label}_{structure.replace(' ', '_')}" if example.targets else label
            asked[-1]["overlay"] = f"{named}_{Path(image).stem}.png"
            save_png(overlay(example.request.pixels, drawn), out / asked[-1]["overlay"])
    masks = {(item["image"], item.get("structure")): item.pop("mask") for item in asked if "mask" in item}
    for item in asked:
        other = masks.get((item["image"], "right hemisphere"))
        if item.get("structure") == "left hemisphere" and other is not None:
            mine = masks[(item["image"], "left hemisphere")]
            union = np.logical_or(mine, other).sum()
            item["iou_with_right_hemisphere"] = (
                float(np.logical_and(mine, other).sum() / union) if union else 1.0
            )
    return asked


def _describe(item: dict) -> str:
    check = f"reference: {item['reference']}" if "reference" in item else f"Dice {item['dice']:.3f}"
    if "iou_with_right_hemisphere" in item:
        check += f", IoU with the right-hemisphere mask {item['iou_with_right_hemisphere']:.3f}"
    return f"[{item['kind']}] {item['image']}: {item['question']}\n  -> {item['answer']}   ({check})"


def run_demo(out: Path) -> dict:
    """The whole main job; a second run reuses the dataset and the trained pipeline under `out`."""
    from medplib.trainers.eval.pipeline_report import format_table

    inputs = inspect_real_data(out / "inputs")
    data = ensure_dataset(out / "dataset")
    report = ensure_trained(data, out / "pipeline")
    print("\n" + format_table(report))
    asked = ask_questions(out / "pipeline" / "stage4", data, out)
    print("\nthe trained MoE, on test images:")
    for item in asked:
        print(_describe(item))
    (out / "demo.json").write_text(json.dumps({"asked": asked, "report": report}, indent=1))
    return {"inputs": inputs, "report": report, "asked": asked}
