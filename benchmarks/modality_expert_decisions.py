"""Which of the modality head's decisions stage IV changes, and what moved them: per decision (every
wording of the expert's dataset on every test and validation image), the state that predicts `<MOD>`,
teacher-forced, for the expert stage (E) and a stage IV folder (M), and M with one cause taken away:

- `forced`: every token routed to the modality expert at weight 1 (no gate choice, no gate scale);
- `E embeddings`: the expert stage's token embeddings put back; `forced + E embeddings`: both;
- `E head`: the expert stage's head on M's states (stage IV trained the head, or left it).

    nice -n 5 python benchmarks/modality_expert_decisions.py --work /tmp/medplib-modality-bench --seed 2 \\
        stage4 variants/T1~anchor5/stage4

Reads the chain `benchmarks/modality_expert.py` left in `--work`; writes
benchmarks/results/modality_expert_decisions.{json,md} (entries per seed and folder, merged).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from pathlib import Path

import torch

from medplib.core.model import MedPLIBProcessor
from medplib.loading import load_model
from medplib.trainers.collate import Collator, ExampleStore
from medplib.trainers.data.loader import LoadedSamples
from medplib.trainers.data.mecovqa import Sample, dataset_root
from medplib.trainers.expert_training import trigger_positions

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "modality_expert_decisions.json"


def decisions(data: Path) -> list[dict]:
    """One MeCoVQA record per (image, wording) of the test and validation splits, as the expert's
    dataset words them (`<MOD> modality.`)."""
    from medplib_expert_modality.data import QUESTIONS, images_with_modality, modality_record

    records = []
    for split in ("test", "val"):
        for _, image, modality in images_with_modality(data / f"{split}.json"):
            for number, question in enumerate(QUESTIONS, start=1):
                record_id = f"{split}/{Path(image).stem}/w{number}"
                records.append(modality_record(record_id, image, modality, question, split))
    return records


def trigger_states(prepared, examples, forced: str | None = None) -> torch.Tensor:
    """(n, hidden) the last hidden state at each example's `<MOD>`-predicting position."""
    model = prepared.model.eval()
    collate = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    states = []
    for start in range(0, len(examples), 8):
        batch = collate(examples[start : start + 8])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "region_masks")}
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if prepared.moe is not None:
                stack.enter_context(prepared.moe.padding(batch["attention_mask"]))
                if forced:
                    stack.enter_context(prepared.moe.force_expert(forced))
            hidden = model(**inputs).last_hidden_state
        found = trigger_positions(model, batch["input_ids"], batch["attention_mask"])
        assert len(found) == len(batch["input_ids"]), "one <MOD> per decision"
        states += [hidden[row, position] for row, position, _ in found]
    return torch.stack(states)


def score(work: Path, folder: str) -> dict:
    from medplib_expert_modality.outputs import MODALITIES

    data = work / "data"
    records = decisions(data)
    samples = [Sample.model_validate(record) for record in records]
    store = ExampleStore(LoadedSamples(dataset_root(data), samples, []), expert_tokens=("<MOD>",))
    examples = store.examples()
    expert, moe = load_model(work / "expert"), load_model(work / folder)
    expert_head, moe_head = expert.model.expert_heads["modality"], moe.model.expert_heads["modality"]
    reference = trigger_states(expert, examples)
    runs = {"expert stage": (expert_head, reference), "stage IV": (moe_head, trigger_states(moe, examples))}
    runs["forced"] = (moe_head, trigger_states(moe, examples, "modality"))
    embeddings = moe.model.language_model.model.embed_tokens.weight
    kept = embeddings.data.clone()
    embeddings.data.copy_(expert.model.language_model.model.embed_tokens.weight.data)
    runs["E embeddings"] = (moe_head, trigger_states(moe, examples))
    runs["forced + E embeddings"] = (moe_head, trigger_states(moe, examples, "modality"))
    embeddings.data.copy_(kept)
    runs["E head"] = (expert_head, runs["stage IV"][1])

    truth = torch.tensor([MODALITIES.index(record["modality"]) for record in records])
    test = torch.tensor([record["id"].startswith("test/") for record in records])
    summary, p_true, right = {}, {}, {}
    for name, (head, states) in runs.items():
        with torch.no_grad():
            probabilities = head.eval()(states).float().softmax(-1)
        p_true[name] = probabilities[torch.arange(len(truth)), truth]
        right[name] = probabilities.argmax(-1) == truth
        distance = (states - reference).square().sum(-1) / reference.square().sum(-1)
        summary[name] = {
            "test": round(float(right[name][test].float().mean()), 4),
            "val_test": round(float(right[name].float().mean()), 4),
            "relative_squared_distance": round(float(distance.mean()), 4),
            "cosine": round(float(torch.cosine_similarity(states, reference, dim=-1).mean()), 4),
        }
    expert_right = right["expert stage"]
    changed = [
        {"decision": record["id"], **{name: round(float(p[i]), 3) for name, p in p_true.items()}}
        for i, record in enumerate(records)
        if bool(right["stage IV"][i]) != bool(expert_right[i])
    ]
    lowest = sorted(float(p) for p in p_true["expert stage"][expert_right])[:4]
    return {
        "runs": summary,
        "changed": changed,
        "expert_lowest_right": [round(p, 3) for p in lowest],
        "expert_right": int(expert_right.sum()),
    }


def markdown(entries: list[dict]) -> str:
    lines = [
        "# Which modality-head decisions stage IV changes (`benchmarks/modality_expert_decisions.py`)",
        "",
        "Per decision (3 wordings x 34 test and validation images), the state that predicts `<MOD>`,"
        " teacher-forced. Accuracy test (63) / val+test (102), and the state's mean relative squared"
        " distance and cosine to the expert stage's.",
        "",
        "| seed | stage IV folder | run | accuracy | distance, cosine |",
        "|---|---|---|---|---|",
    ]
    for entry in entries:
        for name, run in entry["runs"].items():
            cells = [str(entry["seed"]), f"`{entry['folder']}`", name]
            cells += [f"{run['test']:.3f} / {run['val_test']:.3f}"]
            cells += [f"{run['relative_squared_distance']:.4f}, {run['cosine']:.3f}"]
            lines.append(f"| {' | '.join(cells)} |")
    lines += ["", "Decisions stage IV changed, with each run's probability of the true modality:", ""]
    for entry in entries:
        lowest = ", ".join(f"{p:.3f}" for p in entry["expert_lowest_right"])
        lines.append(
            f"- seed {entry['seed']}, `{entry['folder']}` (the expert stage's {entry['expert_right']} right"
            f" decisions, least certain: {lowest}):"
        )
        for change in entry["changed"] or [{"decision": "none"}]:
            values = ", ".join(f"{k} {v:.3f}" for k, v in change.items() if k != "decision")
            lines.append(f"  - {change['decision']}" + (f": {values}" if values else ""))
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="stage IV folders in --work")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medplib-modality-bench"))
    parser.add_argument("--seed", type=int, default=0, help="the chain's seed (a label here)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("modality_expert", HERE / "modality_expert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.register_example()
    entries = {}
    if RESULTS.is_file():
        entries = {(e["seed"], e["folder"]): e for e in json.loads(RESULTS.read_text())}
    for folder in args.folders:
        entries[args.seed, folder] = {"seed": args.seed, "folder": folder, **score(args.work, folder)}
    ordered = [entries[key] for key in sorted(entries)]
    RESULTS.write_text(json.dumps(ordered, indent=1))
    RESULTS.with_suffix(".md").write_text(markdown(ordered))
    print(markdown(ordered))


if __name__ == "__main__":
    main()
