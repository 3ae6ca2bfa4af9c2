"""The example plugin's modality expert, trained and composed on the tiny preset: does its head keep its
accuracy in a three-expert MoE, and how does it compare with the VQA answer's modality?

    nice -n 5 python benchmarks/modality_expert.py [--work /tmp/modality-bench] [--scale 1.0]

Chain (each stage `medplib train` runs in-process, shortened by `STEPS` x `--scale`): the embedded
dataset -> stage I -> II (vision_language) -> III (pixel_grounding) -> `--stage expert --expert
modality` -> stage IV `--experts vision_language,pixel_grounding,modality`. On the test split it scores

- the head: one `answer(..., capability="modality_classification")` per test image, the first
  `outputs["modality"]` against the image's modality (accuracy; how often `<MOD>` had to be forced);
- the VQA answer: the test split's modality questions answered in words (exact match), by the stage II
  expert, the modality expert's stage and the MoE;
- the MoE's routing: each expert's share of the question and answer tokens (those the routing
  loss supervises; the system prompt and the image come first and are the same for every request)
  per routed layer, for the `<MOD>` questions, the modality questions in words, the other VQA
  questions and the grounding requests, teacher-forced.

Writes benchmarks/results/modality_expert.{json,md}. One torch thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from modality_expert_report import RESULTS, markdown, results_file  # benchmarks/, beside this file

from medplib.core import plugins
from medplib.core.assistant import MedPLIB
from medplib.core.model import MedPLIBProcessor
from medplib.loading import load_model
from medplib.router.statistics import RoutingStatistics
from medplib.trainers.collate import Collator, ExampleStore
from medplib.trainers.data.builder import build_dataset
from medplib.trainers.eval.evaluate import run_evaluation
from medplib.trainers.eval.metrics import exact_match
from medplib.trainers.expert_training import plugin_examples
from medplib.trainers.losses import answer_side
from medplib.trainers.train import StageRun, run_stage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "medplib-expert-modality"
# Steps per stage: the tiny schedule's recipe, shortened so the chain runs in minutes on 2 shared cores;
# stage IV runs its recipe's own length (2 epochs), which its router needs to learn the routes.
STEPS = {"1": 40, "2": 120, "3": 60, "expert": 100, "4": None}
EXPERTS = ("vision_language", "pixel_grounding", "modality")
# Stage IV's recipe as it is; `--stage4-frozen embeddings,experts` kept the head's 0.952 but left the
# router unable to learn its routes (see the variants table), so it is no default.
STAGE4_FROZEN: tuple[str, ...] = ()
QUESTION = "Classify the imaging modality of this image."  # a wording of the expert's dataset


def register_example() -> None:
    """The example plugin, installed or (here) registered from the repository."""
    plugins.load_plugins()
    if plugins.pm.get_plugin("modality") is None:
        sys.path.insert(0, str(EXAMPLE))
        plugins.register_plugin(importlib.import_module("medplib_expert_modality"), "modality", "example")


def train_chain(
    work: Path, data: Path, scale: float, stage4_frozen: tuple[str, ...], seed: int = 0
) -> dict[str, dict]:
    chain = [
        ("1", "tiny", {}),
        ("2", "stage1", {}),
        ("3", "stage2", {}),
        ("expert", "stage3", {"expert": "modality"}),
        ("4", "expert", {"experts": EXPERTS, "frozen": stage4_frozen}),
    ]
    records = {}
    for stage, source, options in chain:
        out = work / ("expert" if stage == "expert" else f"stage{stage}")
        if (out / "stage.json").is_file():  # a rerun reuses finished stages
            records[stage] = json.loads((out / "stage.json").read_text())
            continue
        model = source if source == "tiny" else str(work / source)
        steps = None if STEPS[stage] is None else max(1, round(STEPS[stage] * scale))
        began = time.perf_counter()
        run = StageRun(
            stage=stage, model=model, data=str(data), out=str(out), steps=steps, seed=seed, **options
        )
        records[stage] = run_stage(run).record
        print(f"stage {stage}: {steps} steps, {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return records


def head_accuracy(assistant: MedPLIB, store: ExampleStore, question: str = QUESTION) -> dict:
    """The head's modality per image of `store` (its first output) against the image's modality."""
    images = {}
    for sample in store.loaded.samples:
        if sample.image and sample.modality:
            images.setdefault(sample.image, sample.modality)
    correct = forced = 0
    by_modality: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wrong = []
    for image, modality in images.items():
        result = assistant.answer(
            store.image(image), question, capability="modality_classification", max_new_tokens=8
        )
        said = result.outputs["modality"][0]["modality"]
        correct += said == modality
        forced += result.forced
        by_modality[modality][0] += said == modality
        by_modality[modality][1] += 1
        if said != modality:
            wrong.append(image)
    return {
        "images": len(images),
        "accuracy": round(correct / len(images), 4),
        "forced": round(forced / len(images), 4),
        "by_modality": {m: {"correct": c, "images": n} for m, (c, n) in sorted(by_modality.items())},
        "wrong": wrong,
    }


def head_wordings(assistant: MedPLIB, data: Path) -> dict:
    """The head on every wording of its dataset (`QUESTIONS`), on the test images and on the test and
    validation images together (no stage selects anything on the validation split): 21 test images
    alone move 4.8 points per image, too coarse for a 2-point goal."""
    from medplib_expert_modality.data import QUESTIONS

    stores = {split: ExampleStore.open(data, split=split) for split in ("test", "val")}
    scores = {}
    for question in QUESTIONS:
        per_split = {split: head_accuracy(assistant, store, question) for split, store in stores.items()}
        scores[question] = per_split
    test = [scores[q]["test"] for q in QUESTIONS]
    both = [(scores[q]["test"], scores[q]["val"]) for q in QUESTIONS]
    decisions = sum(t["images"] + v["images"] for t, v in both)
    correct = sum(t["accuracy"] * t["images"] + v["accuracy"] * v["images"] for t, v in both)
    return {
        "wordings": scores,
        "test_mean": round(sum(t["accuracy"] for t in test) / len(test), 4),
        "test_decisions": sum(t["images"] for t in test),
        "val_test_mean": round(correct / decisions, 4),
        "val_test_decisions": decisions,
    }


def answer_accuracy(assistant: MedPLIB, store: ExampleStore) -> dict:
    """Exact match of the worded answer to the test split's modality questions."""
    examples = [e for e in store.examples() if e.kind == "modality"]
    scores = []
    for example in examples:
        user = example.request.turns[-1].user  # text parts (a modality question marks no region)
        question = user if isinstance(user, str) else "".join(p for p in user if isinstance(p, str))
        result = assistant.answer(example.request.pixels, question, max_new_tokens=8)
        scores.append(exact_match(result.text.replace("<MOD>", ""), example.reference))
    return {"questions": len(examples), "exact_match": round(sum(scores) / len(scores), 4)}


def routing_shares(folder: Path, store: ExampleStore, data: Path) -> dict:
    """Text-token shares per expert and routed layer, teacher-forced, by the kind of request."""
    prepared = load_model(folder)
    model, moe = prepared.model.eval(), prepared.moe
    collate = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    (modality,) = [spec for spec in moe.experts if spec.name == "modality"]
    examples = store.examples()
    groups = {
        "<MOD> questions (its dataset)": plugin_examples([modality], data, split="test"),
        "modality questions in words": [e for e in examples if e.kind == "modality"],
        "other VQA": [e for e in examples if e.task in ("vqa", "region_vqa") and e.kind != "modality"],
        "grounding": [e for e in examples if e.task == "grounding"],
    }
    shares = {}
    for group, examples in groups.items():
        statistics = RoutingStatistics(moe.expert_names)
        for start in range(0, len(examples), 8):
            batch = collate(examples[start : start + 8])
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "region_masks")}
            # Counted as "text": the question and answer; as "image": everything before them.
            others = ~answer_side(batch["input_ids"], batch["attention_mask"], model.config.im_end_token_id)
            with torch.no_grad(), moe.track(others, statistics=statistics):
                model(**inputs)
        layers = statistics.as_dict()["layers"]
        shares[group] = {
            "samples": len(examples),
            "answer_side_share_by_layer": {layer: entry["shares"]["text"] for layer, entry in layers.items()},
        }
    return {"experts": [spec.name for spec in moe.experts], "groups": shares}


def evaluate(work: Path, data: Path) -> dict:
    store = ExampleStore.open(data, split="test")
    results = {}
    for name, folder in (("stage II", "stage2"), ("expert stage", "expert"), ("stage IV", "stage4")):
        prepared = load_model(work / folder)
        assistant = MedPLIB(prepared.model.eval(), name=f"{folder}")
        entry = {"vqa_modality_answer": answer_accuracy(assistant, store)}
        if "modality" in prepared.model.expert_heads:
            entry["head"] = head_accuracy(assistant, store)
            entry["head_wordings"] = head_wordings(assistant, data)
        results[name] = entry
    results["stage IV"]["routing"] = routing_shares(work / "stage4", store, data)
    results["stage IV"]["eval"] = headline_scores(work / "stage4", data, work / "stage4-eval")
    return results


def headline_scores(folder: Path, data: Path, out: Path) -> dict:
    """`medplib eval`'s headline numbers on the test split: stage IV's other skills."""
    metrics = run_evaluation(str(folder), data, out, gallery=0, progress=False)["metrics"]
    return {key: metrics.get(key) for key in ("closed_accuracy", "region_recall", "mdice")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medplib-modality-bench"))
    parser.add_argument("--scale", type=float, default=1.0, help="x the steps of every stage")
    parser.add_argument("--report", action="store_true", help="rewrite the markdown from the JSON only")
    parser.add_argument("--seed", type=int, default=0, help="every stage's seed (results per seed)")
    parser.add_argument(
        "--stage4-frozen",
        default=",".join(STAGE4_FROZEN),
        help="stage IV's groups left as they arrived (StageRun.frozen), comma-separated; '' for none",
    )
    args = parser.parse_args()
    if args.report:
        payload = json.loads(results_file(0).read_text())
        (RESULTS / "modality_expert.md").write_text(markdown(payload))
        return
    torch.set_num_threads(1)
    register_example()
    began = time.perf_counter()
    data = args.work / "data"
    if not (data / "train.json").is_file():
        build_dataset(data)
    frozen = tuple(group for group in args.stage4_frozen.split(",") if group)
    records = train_chain(args.work, data, args.scale, frozen, args.seed)
    payload = {
        "seed": args.seed,
        "stage4_frozen": list(frozen),
        "stage4_head_anchor": records["4"]["spec"].get("head_anchor", 0.0),
        "stage4_head_refit": records["4"]["spec"].get("head_refit"),  # None: no refit (older runs too)
        "stage4_head_refit_losses": records["4"].get("head_refit"),
        "steps": {stage: record["steps"] for stage, record in records.items()},
        "stage_seconds": {stage: record["seconds"] for stage, record in records.items()},
        "stage_iv_experts": records["4"].get("experts"),
        "scores": evaluate(args.work, data),
    }
    payload["seconds"] = round(time.perf_counter() - began, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file(args.seed).write_text(json.dumps(payload, indent=1))
    report = markdown(json.loads(results_file(0).read_text())) if results_file(0).is_file() else ""
    (RESULTS / "modality_expert.md").write_text(report or markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
