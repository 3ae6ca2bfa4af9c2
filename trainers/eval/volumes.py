"""`medplib eval` on volumes: each volume sample of the split grounded through its slab, scored in 3-D.

A volume sample names a volume, a structure and its true 3-D mask (`trainers/data/volumes.py`); the
model grounds the structure slice by slice along the sample's axis (`MedPLIB.ground_volume`, the
model's own `<SEG>` or a forced one, as the 2-D grounding scores) and the mask is scored against the
truth on the volume's grid: volume Dice, and the volume error in mL (predicted minus true). The
structures of one slab share their slices' image embeddings (each slab's cache is kept while its
structures run, then dropped).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medplib.trainers.data.volumes import VolumeSample, volume_samples
from medplib.trainers.eval.metrics import mask_scores

BATCH = 8


def evaluate_volumes(
    model: Any,
    data: Path,
    split: str,
    *,
    name: str,
    max_new_tokens: int,
    batch_size: int = BATCH,
    progress: Callable[[int, int], None] | None = None,
    choose: Callable[[list[VolumeSample]], list[VolumeSample]] | None = None,
) -> dict | None:
    """The split's volume metrics (None when it has no volume samples); `model` a MedPLIBForCausalLM,
    `choose` picks the samples scored (e.g. a spread subset for `--limit`)."""
    samples = volume_samples(data, split)
    samples = choose(samples) if choose is not None else samples
    if not samples:
        return None
    from medplib.core.assistant import MedPLIB

    assistant = MedPLIB(model, name=name)
    rows = []
    for volume, group in itertools.groupby(samples, key=lambda sample: sample.volume):
        for sample in group:
            result = assistant.ground_volume(
                data / volume,
                sample.text,
                axis=sample.axis,
                batch_size=batch_size,
                keep_embeddings=True,
                max_new_tokens=max_new_tokens,
            )
            truth = np.asarray(nib.load(data / sample.mask).dataobj) > 0
            voxel_ml = result.voxel_volume_mm3 / 1000
            true_ml = float(truth.sum()) * voxel_ml
            rows.append(
                {
                    "id": sample.id,
                    "structure": sample.structure,
                    "axis": sample.axis,
                    "slices": len(result.slices),
                    "dice": round(mask_scores(result.mask, truth).dice, 4),
                    "predicted_ml": round(result.volume_ml, 3),
                    "true_ml": round(true_ml, 3),
                    "error_ml": round(result.volume_ml - true_ml, 3),
                    "forced_slices": sum(s.seg_forced for s in result.slices),
                }
            )
            if progress is not None:
                progress(len(rows), len(samples))
        assistant.clear_cache()  # the next slab's slices are new images
    return {"count": len(rows), **_means(rows), "by_structure": _by_structure(rows), "samples": rows}


def _means(rows: list[dict]) -> dict[str, float]:
    return {
        "volume_dice": round(float(np.mean([r["dice"] for r in rows])), 4),
        "mean_abs_error_ml": round(float(np.mean([abs(r["error_ml"]) for r in rows])), 3),
        "mean_error_ml": round(float(np.mean([r["error_ml"] for r in rows])), 3),
    }


def _by_structure(rows: list[dict]) -> dict[str, dict]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["structure"], []).append(row)
    return {name: {"count": len(items), **_means(items)} for name, items in sorted(grouped.items())}


def volume_table(volumes: dict) -> list[str]:
    """Markdown lines of the volume metrics per structure, for report.md."""
    lines = [
        f"{volumes['count']} volume samples (test slabs, grounded slice by slice): mean volume Dice"
        f" {volumes['volume_dice']:.3f}, mean |volume error| {volumes['mean_abs_error_ml']:.2f} mL.",
        "",
        "| structure | n | volume Dice | mean volume error, mL | mean abs volume error, mL |",
        "|---|---|---|---|---|",
    ]
    return lines + [
        f"| {name} | {row['count']} | {row['volume_dice']:.3f} | {row['mean_error_ml']:+.2f} |"
        f" {row['mean_abs_error_ml']:.2f} |"
        for name, row in volumes["by_structure"].items()
    ]
