"""Quantised weights: quality on the trained tiny pipeline, weight bytes of the 7B preset, peak memory.

    .venv/bin/python benchmarks/quantization.py [--stage demo-output/pipeline/stage4 ...]
        [--data demo-output/data] [--out benchmarks/results]

1. Quality: trained stage folders of the tiny pipeline (`make demo` trains them; default stage IV)
   scored on the test split in fp32, int8 and int4 (`trainers.scoring.evaluate`: greedy answers,
   grounding by the model's own `<SEG>`); the share of answers identical to fp32's, and each mode's
   closed accuracy, region recall and mDice. A stage folder that does not exist is reported as such.
   On the same stages, every grounding request of the test split through `MedPLIB.ground` with
   `answer="generate"` and `answer="template"`: how often the decoded answer is the template, how
   often the two masks are identical, and each mode's median latency (what `answer="auto"` rests on).
2. Weight bytes of `medplib-7b` per component on the meta device (`medplib info`): bf16 and fp32
   as loaded, and with the quantised layers at int8 and int4.
3. Resident memory (peak, and after answering) of a process that loads the `small` preset in each
   mode and answers once.

The last stdout line is the JSON object also written to `OUT/quantization.json`; `OUT/quantization.md`
holds the tables `docs/performance.md` shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = ("fp32", "int8", "int4")
QUALITY_MODES = ("fp32", "int8", "int8 per token", "int4")  # per token: `quantize(..., per_token=True)`
RSS_PROBE = """
import resource, sys, torch
torch.set_num_threads(1)
from medplib.loading import load
from medplib.core.io import load_image
from medplib.core.io.registry_data import dicom_file
mode = sys.argv[1]
assistant = load("small", device="cpu", quantization=None if mode == "fp32" else mode)
assistant.answer(load_image(dicom_file("mr_abdomen_lesion")), "What modality is this?", max_new_tokens=16)
import gc; gc.collect()
rss = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS")][0]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss)
"""


def quality(stage4: Path, data: Path) -> dict:
    from medplib.core.model import MedPLIBProcessor
    from medplib.core.model.quantization import quantize
    from medplib.trainers.collate import Collator
    from medplib.trainers.eval.evaluate import load_for_evaluation, split_examples

    examples, _ = split_examples(data, "test")
    runs = {}
    for mode in QUALITY_MODES:
        model = load_for_evaluation(str(stage4), device="cpu").model
        if mode != "fp32":
            quantize(model, mode.split()[0], per_token=mode.endswith("per token"))
        from medplib.trainers.eval.scoring import evaluate

        started = time.perf_counter()
        metrics = evaluate(model, examples, Collator(MedPLIBProcessor(model.config, model.tokenizer)))
        runs[mode] = {"metrics": metrics, "seconds": round(time.perf_counter() - started, 1)}
    reference = {p["id"]: p for p in runs["fp32"]["metrics"]["predictions"]}
    out = {"samples": len(examples)}
    for mode, run in runs.items():
        metrics = run["metrics"]
        answers = [p for p in metrics["predictions"] if "dice" not in p]
        same = sum(p["prediction"] == reference[p["id"]]["prediction"] for p in answers)
        out[mode] = {
            "answers": len(answers),
            "answers_equal_to_fp32": round(same / len(answers), 4),
            "closed_accuracy": metrics["closed_accuracy"],
            "region_recall": metrics["region_recall"],
            "mdice": metrics["mdice"],
            "mdice_minus_fp32": round(metrics["mdice"] - runs["fp32"]["metrics"]["mdice"], 4),
            "seconds": run["seconds"],
        }
    return out


def grounding_answers(stage: Path, data: Path) -> dict:
    """Per grounding request of the test split: the decoded answer against the prefilled template."""
    import json
    import statistics

    from medplib.core.prompts import GROUNDING_ANSWER
    from medplib.loading import load

    assistant = load(str(stage), device="cpu")
    samples = [s for s in json.loads((data / "test.json").read_text()) if s.get("part") == "G"]
    template = GROUNDING_ANSWER.format(seg="<SEG>")
    same_text = same_mask = 0
    seconds: dict[str, list[float]] = {"generate": [], "template": []}
    for sample in samples:
        image = str(data / sample["image"])
        results = {}
        for mode in seconds:
            started = time.perf_counter()
            results[mode] = assistant.ground(image, sample["structure"], answer=mode)
            seconds[mode].append(time.perf_counter() - started)
        same_text += results["generate"].text == template
        masks = [[m.mask for m in results[mode].masks[:1]] for mode in seconds]
        same_mask += masks[0] == masks[1]
    return {
        "requests": len(samples),
        "decoded_answer_is_template": same_text,
        "same_mask": same_mask,
        "median_ms": {mode: round(1000 * statistics.median(s), 1) for mode, s in seconds.items()},
    }


def weight_bytes() -> dict:
    from medplib.loading import model_info

    out = {}
    for dtype, quantization in (
        ("float32", None),
        ("bfloat16", None),
        ("bfloat16", "int8"),
        ("bfloat16", "int4"),
    ):
        label = f"{dtype}" + (f" + {quantization}" if quantization else "")
        out[label] = model_info("medplib-7b", dtype=dtype, quantization=quantization).bytes
    return out


def peak_rss() -> dict:
    out = {}
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, mode], capture_output=True, text=True, check=True
        )
        peak, steady = done.stdout.strip().splitlines()[-1].split()
        out[mode] = {"peak": int(peak), "after_answering": int(steady)}
    return out


def markdown(report: dict) -> str:
    lines = []
    grounding = report.get("grounding_answers", {})
    if grounding:
        lines += [
            "Grounding requests of the test split, decoded answer vs prefilled template (fp32):",
            "",
            "| stage | requests | decoded answer is the template | same mask | ms generate | ms template |",
            "|---|---|---|---|---|---|",
        ]
        for stage, g in grounding.items():
            cells = [stage, g["requests"], g["decoded_answer_is_template"], g["same_mask"]]
            cells += [g["median_ms"]["generate"], g["median_ms"]["template"]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    for stage, q in report["quality"].items():
        if "skipped" in q:
            lines += [f"Quality, {stage}: {q['skipped']}", ""]
            continue
        lines += [
            f"Trained tiny pipeline, {stage}, test split ({q['samples']} samples), greedy, CPU:",
            "",
            "| mode | answers equal to fp32 | closed accuracy | region recall | mDice | mDice - fp32 | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode in QUALITY_MODES:
            m = q[mode]
            cells = [
                f"{100 * m['answers_equal_to_fp32']:.1f}% of {m['answers']}",
                f"{m['closed_accuracy']:.3f}",
                f"{m['region_recall']:.3f}",
                f"{m['mdice']:.3f}",
                f"{m['mdice_minus_fp32']:+.4f}",
                str(m["seconds"]),
            ]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    sizes = report["medplib_7b_weight_bytes"]
    labels = list(sizes)
    components = [c for c in sizes[labels[0]] if c != "total"] + ["total"]
    lines += ["`medplib-7b` weights per component (MB, counted on the meta device):", ""]
    lines += ["| component | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for component in components:
        cells = [f"{sizes[label][component] / 1e6:,.1f}" for label in labels]
        lines.append(f"| {component} | " + " | ".join(cells) + " |")
    rss = report["small_rss_bytes"]
    lines += [
        "",
        "Resident memory of a process that loads the `small` preset and answers once (MB, peak / after):",
    ]
    lines[-1] += " " + ", ".join(
        f"{mode} {size['peak'] / 1e6:,.0f} / {size['after_answering'] / 1e6:,.0f}"
        for mode, size in rss.items()
    )
    load = f"{report['load_average_start']} → {report['load_average_end']}"
    lines[0:0] = [f"Load average {load} (shared 2-core machine; the seconds columns are not comparable).", ""]
    lines.append("(the preset is built in fp32 and then quantised, so the peak holds its fp32 weights)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).parents[1]
    parser.add_argument(
        "--stage", type=Path, action="append", help="trained stage folder (repeatable; default: stage IV)"
    )
    parser.add_argument("--data", type=Path, default=root / "demo-output" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stages = args.stage or [root / "demo-output" / "pipeline" / "stage4"]
    found, grounding = {}, {}
    for stage in stages:
        if stage.is_dir():
            found[stage.name] = quality(stage, args.data)
            grounding[stage.name] = grounding_answers(stage, args.data)
        else:
            found[stage.name] = {"skipped": f"no trained stage at {stage}: run `make demo` first"}
    report = {
        "load_average_start": round(os.getloadavg()[0], 2),
        "quality": found,
        "grounding_answers": grounding,
        "medplib_7b_weight_bytes": weight_bytes(),
        "small_rss_bytes": peak_rss(),
        "torch": torch.__version__.split("+")[0],
    }
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "quantization.md").write_text(markdown(report))
    print(markdown(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
