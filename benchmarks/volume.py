"""Volume grounding benchmark on the MNI152 template (197 x 233 x 189 voxels, 1 mm), on this machine's CPU.

    .venv/bin/python benchmarks/volume.py [--model tiny | STAGE] [--threads 1] [--out DIR] [--views PNG]

Measures, grounding "the grey matter" (the embedded dataset's wording):

1. Seconds per volume along each axis with `MedPLIB.ground_volume` (batches of 8 slices).
2. On a slab of axial slices: slice-by-slice `MedPLIB.ground` calls (the 2-D API, one image per
   call, cache cleared first so each slice is as new as in the volume run) against `ground_volume`
   at batch sizes 1, 4, 8 and 16. Goal: batch 8 at least 2x faster than single calls.
3. Peak memory: each run in a fresh child process, its peak RSS above what the model and the volume
   took before grounding, for 16 slices and for all 189 axial slices; streaming (the default, the
   slices' cache entries dropped after each batch) against `keep_embeddings=True`. Goal: the
   streamed peak independent of the number of slices beyond one batch (and the output mask).
4. 3-D Dice of each axis's mask against the template's own grey-matter mask (probability > 0.5, as
   the dataset's 2-D masks), beside the mean 2-D Dice of the same slices (what `medplib eval` reports
   per image), over the whole volume and over the test-split blocks only (slices the model never saw).

Every run decodes as many tokens as the training data's grounding answer ("Sure, it is <SEG>." and
</s>): an untrained model never ends on its own. The last stdout line is the JSON written to
`OUT/volume.json`; `OUT/volume.md` holds the tables docs/volumes.md shows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medplib.core.assistant import MedPLIB
from medplib.core.io import load_volume, slice_volume
from medplib.core.io.registry_data import mni152_file
from medplib.core.io.volume import AXES
from medplib.core.model import tokenize_user_text
from medplib.core.volume_grounding import BATCH_STAGES, SlicePlan
from medplib.trainers.data.sources.mni152 import SPLIT
from medplib.trainers.data.templates import GROUNDING_ANSWER, STRUCTURES

TARGET = STRUCTURES["grey_matter"].segmented
SLAB = "78:110"  # 32 axial slices through the ventricles and cortex
BATCH_SIZES = (1, 4, 8, 16)


def load_assistant(location: str) -> MedPLIB:
    from medplib.core.per_image_cache import PerImageCache
    from medplib.trainers.eval.evaluate import load_for_evaluation

    loaded = load_for_evaluation(location, device="cpu")
    return MedPLIB(loaded.model, name=location, untrained=loaded.untrained, cache=PerImageCache())


def answer_tokens(assistant: MedPLIB) -> int:
    """Tokens of the training data's grounding answer, <SEG> and </s> included."""
    before, after = GROUNDING_ANSWER.split("{seg}")
    tokenizer = assistant.model.tokenizer
    return len(tokenize_user_text(tokenizer, " " + before)) + len(tokenize_user_text(tokenizer, after)) + 2


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def dice_report(mask: np.ndarray, truth: np.ndarray, axis: int, indices: list[int]) -> dict[str, Any]:
    """3-D Dice over `indices` of `axis`, and the mean 2-D Dice of those slices that show grey matter."""
    take = [slice(None)] * 3
    take[axis] = indices  # type: ignore[call-overload]
    predicted, expected = mask[tuple(take)], truth[tuple(take)]
    per_slice = [
        dice(np.take(predicted, k, axis=axis), np.take(expected, k, axis=axis))
        for k in range(len(indices))
        if np.take(expected, k, axis=axis).any()
    ]
    return {
        "slices": len(indices),
        "dice_3d": round(dice(predicted, expected), 4),
        "mean_dice_2d": round(float(np.mean(per_slice)), 4) if per_slice else None,
        "predicted_ml": round(float(predicted.sum()) / 1000, 2),  # 1 mm voxels
        "true_ml": round(float(expected.sum()) / 1000, 2),
    }


def test_indices(volume, axis: int) -> list[int]:
    """Slices in the dataset's test blocks (sagittal placed by distance from the midline, as built)."""
    if AXES[axis] != "sagittal":
        return [i for i in range(volume.shape[axis]) if SPLIT.split_of(i) == "test"]
    x = volume.affine[0, 0] * np.arange(volume.shape[0]) + volume.affine[0, 3]
    return [i for i in range(volume.shape[0]) if SPLIT.split_of(round(abs(float(x[i])))) == "test"]


def measure_axes(
    assistant: MedPLIB, volume, truth: np.ndarray, tokens: int, views: Path | None
) -> dict[str, Any]:
    rows = {}
    for number, axis in enumerate(AXES):
        assistant.clear_cache()
        start = time.perf_counter()
        result = assistant.ground_volume(volume, TARGET, axis=axis, batch_size=8, max_new_tokens=tokens)
        seconds = time.perf_counter() - start
        mask = result.mask  # the template is RAS+ already: the input grid is the canonical one
        rows[axis] = {
            "slices": volume.shape[number],
            "seconds": round(seconds, 2),
            "ms_per_slice": round(1000 * seconds / volume.shape[number], 1),
            "forced": sum(s.seg_forced for s in result.slices),
            "volume_ml": result.volume_ml,
            "all": dice_report(mask, truth, number, list(range(volume.shape[number]))),
            "test_blocks": dice_report(mask, truth, number, test_indices(volume, number)),
        }
        print(f"{axis}: {rows[axis]}", flush=True)
        if views is not None and axis == "axial":
            from medplib.core.masks import orthogonal_views, save_png

            save_png(orthogonal_views(volume, result, height=300), views)
    return rows


def measure_batching(assistant: MedPLIB, volume, tokens: int, repeats: int) -> dict[str, Any]:
    """Single calls against batches on one slab, interleaved `repeats` times (the machine is shared:
    medians of rounds that each see the same load), with each run's milliseconds per stage."""
    plan = SlicePlan.make(volume, "axial", SLAB, None)
    seconds: dict[str, list[float]] = {}
    stages: dict[str, list[dict[str, float]]] = {}

    def record(name: str, elapsed: float, ms: dict[str, float]) -> None:
        seconds.setdefault(name, []).append(elapsed)
        stages.setdefault(name, []).append(ms)

    for _ in range(repeats):
        assistant.clear_cache()
        ms = dict.fromkeys(BATCH_STAGES, 0.0)
        start = time.perf_counter()
        for index in plan.indices:
            single = assistant.ground(plan.image(index), TARGET, max_new_tokens=tokens)
            for stage in BATCH_STAGES:
                ms[stage] += single.timings_ms[stage]
        record("single_calls", time.perf_counter() - start, ms)
        for size in BATCH_SIZES:
            assistant.clear_cache()
            start = time.perf_counter()
            result = assistant.ground_volume(
                volume, TARGET, slices=SLAB, batch_size=size, max_new_tokens=tokens
            )
            record(
                f"batch_{size}", time.perf_counter() - start, {k: result.timings_ms[k] for k in BATCH_STAGES}
            )
        print(f"round: { {name: round(times[-1], 2) for name, times in seconds.items()} }", flush=True)
    rows: dict[str, Any] = {"slices": len(plan.indices), "repeats": repeats}
    single_s = statistics.median(seconds["single_calls"])
    for name, times in seconds.items():
        rows[f"{name}_s"] = round(statistics.median(times), 2)
        rows[f"{name}_all_s"] = [round(t, 2) for t in times]
        rows[f"{name}_speedup"] = round(single_s / statistics.median(times), 2)
        rows[f"{name}_stages_ms"] = {
            k: round(statistics.median(m[k] for m in stages[name])) for k in BATCH_STAGES
        }
    return rows


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_child(
    location: str, threads: int, slices: str | None, keep: bool, tokens: int, queue: Any
) -> None:
    import threading

    torch.set_num_threads(threads)
    assistant = load_assistant(location)
    volume = load_volume(mni152_file("t1"))
    assistant.ground(slice_volume(volume, index=10), TARGET, max_new_tokens=tokens)  # warm up allocators
    assistant.clear_cache()
    start, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:  # ru_maxrss would report the model's loading peak, not the grounding's
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_mb())

    sampler = threading.Thread(target=sample)
    sampler.start()
    assistant.ground_volume(
        volume, TARGET, slices=slices, batch_size=8, keep_embeddings=keep, max_new_tokens=tokens
    )
    done.set()
    sampler.join()
    queue.put(
        {
            "peak_above_start_mb": round(max(peak[0], rss_mb()) - start, 1),
            "cache_mb": round(assistant.cache_stats().bytes / 2**20, 1),
        }
    )


def measure_memory(location: str, threads: int, tokens: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    rows = {}
    for slices, count in (("86:102", 16), (None, 189)):
        for keep in (False, True):
            queue = context.Queue()
            child = context.Process(
                target=_memory_child, args=(location, threads, slices, keep, tokens, queue)
            )
            child.start()
            measured = queue.get()
            child.join()
            name = f"{count}_slices_{'kept' if keep else 'streamed'}"
            rows[name] = measured
            print(f"memory {name}: {measured}", flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    axes, batching, memory = report["axes"], report["batching"], report["memory"]
    lines = [
        "# Volume grounding on the MNI152 template",
        "",
        f"`benchmarks/volume.py` grounding {TARGET!r} through the 197 x 233 x 189 template with the"
        f" `{report['model']}` model ({report['model_kind']}) on {report['machine']}, {report['threads']}"
        f" torch thread(s), {report['answer_tokens']} tokens per answer.",
        "",
        "| axis | slices | seconds | ms / slice | forced | volume mL | 3-D Dice | mean 2-D Dice"
        " | 3-D Dice (test blocks) | mean 2-D Dice (test blocks) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for axis, row in axes.items():
        lines.append(
            f"| {axis} | {row['slices']} | {row['seconds']} | {row['ms_per_slice']} | {row['forced']} |"
            f" {row['volume_ml']} | {row['all']['dice_3d']} | {row['all']['mean_dice_2d']} |"
            f" {row['test_blocks']['dice_3d']} | {row['test_blocks']['mean_dice_2d']} |"
        )
    truth = [row["all"]["true_ml"] for row in axes.values()][:1]
    lines += ["", f"The template's grey matter (probability > 0.5) is {truth[0]} mL.", ""] if truth else [""]
    lines += [
        f"Batching, {batching['slices']} axial slices ({SLAB}), {batching['repeats']} interleaved rounds:",
        "",
        "| run | seconds (median) | each round | speedup over single calls |",
        "|---|---|---|---|",
        f"| {batching['slices']} single `ground` calls | {batching['single_calls_s']}"
        f" | {batching['single_calls_all_s']} | 1.0 |",
    ]
    lines += [
        f"| `ground_volume`, batch {size} | {batching[f'batch_{size}_s']} | {batching[f'batch_{size}_all_s']}"
        f" | {batching[f'batch_{size}_speedup']} |"
        for size in BATCH_SIZES
    ]
    runs = [("single calls", batching["single_calls_stages_ms"])]
    runs += [(f"batch {size}", batching[f"batch_{size}_stages_ms"]) for size in BATCH_SIZES]
    lines += [
        "",
        "Where the time goes (milliseconds per stage, summed over the slab):",
        "",
        "| run | " + " | ".join(BATCH_STAGES) + " |",
        "|---|" + "---|" * len(BATCH_STAGES),
        *(f"| {name} | " + " | ".join(str(ms[k]) for k in BATCH_STAGES) + " |" for name, ms in runs),
    ]
    lines += [
        "",
        "Peak memory above the loaded model and volume (fresh process per run):",
        "",
        "| run | peak RSS above start, MB | embedding cache after, MB |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name.replace('_', ' ')} | {row['peak_above_start_mb']} | {row['cache_mb']} |"
        for name, row in memory.items()
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="preset or stage folder (a trained stage III)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the batching runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--skip", nargs="*", default=(), choices=("axes", "batching", "memory"))
    parser.add_argument(
        "--views", type=Path, help="also write the axial result as three orthogonal views (PNG)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from medplib.trainers.eval.evaluate import load_for_evaluation

    kind = load_for_evaluation(args.model, device="cpu").kind
    assistant = load_assistant(args.model)
    tokens = answer_tokens(assistant)
    volume = load_volume(mni152_file("t1"))
    truth = load_volume(mni152_file("grey_matter")).data > 127
    report: dict[str, Any] = {
        "model": os.path.basename(os.path.normpath(args.model)),
        "model_kind": kind,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "threads": args.threads,
        "answer_tokens": tokens,
        "target": TARGET,
    }
    earlier_path = args.out / "volume.json"
    earlier = json.loads(earlier_path.read_text()) if earlier_path.is_file() else {}
    for section in args.skip:  # a partial rerun keeps the sections it skips
        report[section] = earlier.get(section, {})
    report["axes"] = (
        report["axes"] if "axes" in args.skip else measure_axes(assistant, volume, truth, tokens, args.views)
    )
    report["batching"] = (
        report["batching"]
        if "batching" in args.skip
        else measure_batching(assistant, volume, tokens, args.repeats)
    )
    report["memory"] = (
        report["memory"] if "memory" in args.skip else measure_memory(args.model, args.threads, tokens)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "volume.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "volume.md").write_text(markdown(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
