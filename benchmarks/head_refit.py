"""Stage IV's head refit measured on finished chains: which refit keeps the modality head's decisions?

    nice -n 5 python benchmarks/head_refit.py /work/runs/lead19/s0 /work/runs/lead19/s1 /work/runs/lead19/s2

Each chain is a folder `benchmarks/modality_expert.py` left (`data`, `expert`, `stage4`). Nothing is
trained or written there: every refit runs in memory on the chain's stage IV model, which stays frozen.
The head is scored as that benchmark scores it (one wording on the 21 test images, 3 wordings on them:
63 decisions, 3 wordings on the test and validation images: 102), from the state that predicts `<MOD>`
teacher-forced: the answer opens with `<MOD>`, so that state is the last prompt position's, the one
`answer(..., capability=...)` hands the head (on the chains of the committed results both give the
same accuracies). Compared, against the expert stage's head on its own states:

- `stage IV`: the head as stage IV left it (a chain trained without the refit);
- `labels <steps>`: the head fitted by cross-entropy to its training samples' labels, on the states
  the final mixture gives them (full-batch AdamW, lr 1e-2, from its own weights);
- `outputs <steps>`: the recipe's refit (`trainers.head_refit`): fitted to its own outputs on the
  expert stage's states of the same samples (`ExpertHead.refit_loss`), lr 1e-2.

Writes benchmarks/results/head_refit.{json,md}. One torch thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from medplib.core.model import MedPLIBProcessor
from medplib.core.plugins import require_experts
from medplib.loading import load_model
from medplib.trainers.collate import Collator, ExampleStore
from medplib.trainers.data.loader import LoadedSamples
from medplib.trainers.data.mecovqa import Sample, dataset_root
from medplib.trainers.expert_training import head_input_states, plugin_examples
from medplib.trainers.head_refit import HeadRefit, refit_heads, refit_targets

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STEPS = (200, 500, 1000, 2000, 5000)
LR = 1e-2


def benchmark():
    """benchmarks/modality_expert.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("modality_expert", HERE / "modality_expert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scored_examples(data: Path, expert_tokens) -> dict[tuple[str, int], list]:
    """Per (split, wording): one `<MOD>` request per test or validation image, as its dataset words it."""
    from medplib_expert_modality.data import QUESTIONS, images_with_modality, modality_record

    groups = {}
    for split in ("test", "val"):
        for number, question in enumerate(QUESTIONS):
            records = [
                modality_record(f"{split}/{number}/{sample['id']}", image, modality, question, split)
                for sample, image, modality in images_with_modality(data / f"{split}.json")
            ]
            samples = [Sample.model_validate(record) for record in records]
            store = ExampleStore(LoadedSamples(dataset_root(data), samples, []), expert_tokens=expert_tokens)
            groups[(split, number)] = store.examples()
    return groups


def states(model, moe, groups: dict) -> dict:
    collator = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    found = {key: head_input_states(model, examples, collator, moe) for key, examples in groups.items()}
    return {
        key: (torch.stack([s for _, _, s in items]), [e for e, _, _ in items]) for key, items in found.items()
    }


def decisions(head, scored: dict) -> dict:
    """Per (split, wording): the image -> whether the head named its modality, and its probability."""
    from medplib_expert_modality.outputs import MODALITIES

    out = {}
    with torch.no_grad():
        for key, (hidden, examples) in scored.items():
            probabilities = head(hidden).float().softmax(-1)
            out[key] = {
                e.image: (
                    bool(probabilities[i].argmax() == MODALITIES.index(e.modality)),
                    round(float(probabilities[i, MODALITIES.index(e.modality)]), 3),
                )
                for i, e in enumerate(examples)
            }
    return out


def measures(taken: dict, question_index: int) -> list[float]:
    def share(keys):
        cells = [right for key in keys for right, _ in taken[key].values()]
        return round(sum(cells) / len(cells), 4)

    test = [("test", n) for n in range(3)]
    return [share([("test", question_index)]), share(test), share(test + [("val", n) for n in range(3)])]


def fit_labels(head, hidden: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(hidden).float(), labels).backward()
            optimizer.step()


def chain(folder: Path, question_index: int) -> dict:
    from medplib_expert_modality.outputs import MODALITIES

    (spec,) = require_experts(["modality"])
    data = folder / "data"
    groups = scored_examples(data, spec.special_tokens)
    train = plugin_examples([spec], data)
    expert = load_model(folder / "expert").model.eval()
    reference = decisions(expert.expert_heads["modality"], states(expert, None, groups))
    loaded = load_model(folder / "stage4")
    model, moe = loaded.model.eval(), loaded.moe
    collator = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    head = model.expert_heads["modality"]
    scored = states(model, moe, groups)
    # The recipe's targets: the head's outputs on its samples' states with every token sent to its
    # expert; the final mixture's experts are stage IV's, so those come from the expert stage's model.
    targets = refit_targets(expert, head_input_states(expert, train, collator, forced=True))
    routed = head_input_states(model, train, collator, moe)
    hidden = torch.stack([s for _, _, s in routed])
    labels = torch.tensor([MODALITIES.index(e.modality) for e, _, _ in routed])
    original = copy.deepcopy(head.state_dict())
    rows = {"expert stage": reference, "stage IV": decisions(head, scored)}
    for steps in STEPS:
        head.load_state_dict(original)
        fit_labels(head, hidden, labels, steps)
        rows[f"labels {steps}"] = decisions(head, scored)
        head.load_state_dict(original)
        refit_heads(model, moe, train, collator, targets, HeadRefit(steps=steps, lr=LR))
        rows[f"outputs {steps}"] = decisions(head, scored)
    result = {"chain": str(folder), "rows": {}}
    for name, taken in rows.items():
        changed = [
            f"{'+' if taken[key][image][0] else '-'}{Path(image).stem} ({key[0]}, w{key[1] + 1}, "
            f"p {reference[key][image][1]:.3f} -> {taken[key][image][1]:.3f})"
            for key in taken
            for image in taken[key]
            if taken[key][image][0] != reference[key][image][0]
        ]
        result["rows"][name] = {"scores": measures(taken, question_index), "changed": changed}
    return result


def markdown(payload: dict) -> str:
    lines = [
        "# Stage IV's head refit, on finished chains (`benchmarks/head_refit.py`)",
        "",
        __doc__.split("\n\n", 2)[2].split("\n\nWrites")[0],
        "",
    ]
    for entry in payload["chains"]:
        reference = entry["rows"]["expert stage"]["scores"]
        lines += [
            f"## {entry['chain']}",
            "",
            "| head | one wording (21) | 3 wordings test (63) | 3 wordings val+test (102) | minus expert"
            " stage, points | decisions changed against the expert stage (split, wording, p of the right"
            " modality) |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in entry["rows"].items():
            gaps = " / ".join(f"{100 * (a - b):+.1f}" for a, b in zip(row["scores"], reference, strict=True))
            cells = [name, *(f"{v:.3f}" for v in row["scores"]), gaps, ", ".join(row["changed"]) or "none"]
            lines.append(f"| {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chains", nargs="+", type=Path, help="folders with data/, expert/, stage4/")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = benchmark()
    bench.register_example()
    from medplib_expert_modality.data import QUESTIONS

    question_index = QUESTIONS.index(bench.QUESTION)
    payload = {
        "steps": list(STEPS),
        "lr": LR,
        "chains": [chain(folder, question_index) for folder in args.chains],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "head_refit.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / "head_refit.md").write_text(markdown(payload))
    print(markdown(payload), file=sys.stdout)


if __name__ == "__main__":
    main()
