"""Where a stage IV MoE routes each token: per layer, task and token kind, on the test split.

    python benchmarks/stage4_routing.py /work/runs/final/seed-0/stage4 [--per-task 40] [--json out.json]

Teacher-forced forwards (the answers included, as in training) of up to `--per-task` test requests of
each task. Every real token is one of: `prefix` (the system prompt before the image), `image` (the
image tokens and their delimiters), `question` (after the image, not supervised) and `answer` (the
supervised tokens). For each routed layer, task group (grounding; VQA = vqa and region_vqa) and token
kind it prints the share of tokens routed to each expert and the mean gate probability of the chosen
expert (the top-1 output scale under MedPLIB's gate). "Right" is the share of question and answer
tokens routed to the expert whose `trains_on` accepts the request (what stage IV's routing loss
teaches).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from medplib.core.model import MedPLIBProcessor
from medplib.loading import load_model
from medplib.trainers.collate import Collator, ExampleStore
from medplib.trainers.loop import model_inputs
from medplib.trainers.stages import stage_spec

KINDS = ("prefix", "image", "question", "answer")
GROUPS = {"grounding": "grounding", "vqa": "vqa", "region_vqa": "vqa"}


def token_kinds(batch: dict, config) -> torch.Tensor:
    """(B, T) the index into KINDS of each token; -1 at padding."""
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool()
    image_end = (ids == config.im_end_token_id).long().cumsum(1)
    after_image = (image_end > 0) & (ids != config.im_end_token_id)
    image_start = (ids == config.im_start_token_id).long().cumsum(1) > 0
    kinds = torch.where(image_start, 1, 0)
    kinds = torch.where(after_image, 2, kinds)
    kinds = torch.where(after_image & (batch["labels"] != -100), 3, kinds)
    return torch.where(real, kinds, -1)


def expert_of(experts, example) -> int:
    """The index of the first expert whose `trains_on` accepts `example`."""
    e = example
    return next(
        k for k, s in enumerate(experts) if s.trains_on.accepts(e.task, e.answer_type, e.modality, e.kind)
    )


def measure(folder: str, data: str, per_task: int) -> dict:
    torch.set_num_threads(1)
    loaded = load_model(folder)
    model, moe = loaded.model, loaded.moe
    if moe is None:
        raise SystemExit(f"{folder} holds no composed model")
    model.eval()
    collate = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    examples = ExampleStore.open(Path(data), split="test").examples()
    chosen = defaultdict(list)
    for example in examples:
        group = GROUPS.get(example.task)
        if group == "vqa" and example.held_out_wording:
            group = "vqa_new_wording"  # the test split's wordings no training sample uses
        if group and len(chosen[group]) < per_task:
            chosen[group].append(example)
    names = moe.expert_names
    spec = stage_spec("4")
    # counts[layer][group][kind] = (per-expert token counts, summed gate probability of the choice)
    counts: dict = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: [torch.zeros(len(names)), 0.0]))
    )
    right = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for group, items in chosen.items():
        for start in range(0, len(items), 8):
            part = items[start : start + 8]
            batch = collate(part)
            kinds = token_kinds(batch, model.config).reshape(-1)
            own = torch.tensor([expert_of(moe.experts, e) for e in part])
            target = own[:, None].expand_as(batch["input_ids"]).reshape(-1)
            with torch.no_grad(), moe.padding(batch["attention_mask"]):
                model(**model_inputs(batch, spec, len(part)))
            for layer, mlp in moe.layers.items():
                routing = mlp.last_routing
                expert = routing.experts[:, 0]
                prob = routing.logits.float().softmax(-1).gather(1, routing.experts[:, :1])[:, 0]
                for k, kind in enumerate(KINDS):
                    at = kinds == k
                    cell = counts[layer][group][kind]
                    cell[0] += torch.bincount(expert[at], minlength=len(names)).float()
                    cell[1] += float(prob[at].sum())
                text = kinds >= 2
                right[layer][group][0] += int((expert[text] == target[text]).sum())
                right[layer][group][1] += int(text.sum())
    result = {"experts": list(names), "examples": {g: len(v) for g, v in chosen.items()}, "layers": {}}
    for layer in sorted(counts):
        rows = {}
        for group in sorted(counts[layer]):
            for kind in KINDS:
                tokens, prob = counts[layer][group][kind]
                total = float(tokens.sum())
                if total:
                    rows[f"{group}/{kind}"] = {
                        "tokens": int(total),
                        "shares": [round(float(t) / total, 3) for t in tokens],
                        "gate_probability": round(prob / total, 3),
                    }
            hit, total = right[layer][group]
            rows[f"{group}/right"] = round(hit / max(total, 1), 3)
        result["layers"][str(layer)] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--data", default="/work/runs/data")
    parser.add_argument("--per-task", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.folder, args.data, args.per_task)
    experts = result["experts"]
    print(f"experts: {experts}; examples {result['examples']}")
    for layer, rows in result["layers"].items():
        cells = []
        for key, row in rows.items():
            if key.endswith("/right"):
                cells.append(f"{key}={row:.2f}")
            else:
                cells.append(f"{key}:{experts[0][:3]}={row['shares'][0]:.2f},p={row['gate_probability']:.2f}")
        print(f"layer {layer}: " + " | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
