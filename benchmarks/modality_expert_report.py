"""The markdown of `benchmarks/modality_expert.py`'s results: its chain's table, every seed's chains
side by side and the stage IV variants (`modality_expert_variants.py`), from the JSON files in
benchmarks/results/. Rendering only: nothing here trains or scores.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = RESULTS / "modality_expert_variants.json"


def _head_cells(entry: dict) -> list[str]:
    head, wordings = entry.get("head"), entry.get("head_wordings")
    cells = ["—", "—", "—"]
    if head:
        cells[0] = f"{head['accuracy']:.3f} ({head['images']})"
    if wordings:
        cells[1] = f"{wordings['test_mean']:.3f} ({wordings['test_decisions']})"
        cells[2] = f"{wordings['val_test_mean']:.3f} ({wordings['val_test_decisions']})"
    return cells


def _eval_cells(scores: dict | None) -> list[str]:
    if not scores:
        return ["—", "—", "—"]
    return [f"{scores[k]:.3f}" if scores.get(k) is not None else "—" for k in EVAL_KEYS]


EVAL_KEYS = ("closed_accuracy", "region_recall", "mdice")


def markdown(payload: dict) -> str:
    scores = payload["scores"]
    expert, moe = scores["expert stage"], scores["stage IV"]
    lines = [
        "# The modality expert (examples/medplib-expert-modality): its head alone and in a 3-expert MoE",
        "",
        f"`python benchmarks/modality_expert.py --seed {payload.get('seed', 0)}`, tiny preset, steps per"
        f" stage {payload['steps']}, stage IV with {', '.join(payload.get('stage4_frozen', [])) or 'nothing'}"
        f" frozen, head anchor {payload.get('stage4_head_anchor', 0.0):g}"
        f", {_refit_words(payload.get('stage4_head_refit'))}"
        f" (training {sum(payload['stage_seconds'].values()):.0f} s), one torch thread on a shared 2-core"
        ' machine. The head: one `answer(..., capability="modality_classification")` per image; \'one'
        " wording' is the benchmark's question on the 21 test images (one image = 4.8 points), '3 wordings'"
        " every wording of the expert's dataset on the test images (63 decisions) and on the test and"
        " validation images (34 images, 102 decisions; no stage selects anything on the validation split).",
        "",
        "| model | head, one wording (test) | head, 3 wordings (test) | head, 3 wordings (val+test) |"
        " <MOD> forced | VQA modality answer, exact match |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in scores.items():
        forced = f"{entry['head']['forced']:.2f}" if entry.get("head") else "—"
        vqa = entry["vqa_modality_answer"]
        cells = [name, *_head_cells(entry), forced, f"{vqa['exact_match']:.3f} ({vqa['questions']})"]
        lines.append(f"| {' | '.join(cells)} |")
    gaps = [
        f"{100 * (moe[key][field] - expert[key][field]):+.1f}"
        for key, field in (
            ("head", "accuracy"),
            ("head_wordings", "test_mean"),
            ("head_wordings", "val_test_mean"),
        )
        if key in moe and key in expert
    ]
    counts = {m: entry["images"] for m, entry in expert["head"]["by_modality"].items()}
    majority = max(counts.values()) / sum(counts.values())
    lines += [
        "",
        f"Head accuracy after stage IV minus after its expert stage (one wording / 3 wordings test /"
        f" 3 wordings val+test): {' / '.join(gaps)} points (goal: within 2).",
        f"Test images by modality: {counts}; always answering the most common one scores {majority:.3f}.",
    ]
    if moe.get("eval"):
        closed, recall, mdice = _eval_cells(moe["eval"])
        lines.append(
            f"Stage IV's other skills (`medplib eval`, test split): closed VQA accuracy {closed},"
            f" region recall {recall}, grounding mDice {mdice}."
        )
    lines += [
        "",
        "Stage IV routing, share of the question and answer tokens per expert "
        f"({', '.join(moe['routing']['experts'])}), mean over routed layers:",
        "",
        "| requests | samples | shares |",
        "|---|---|---|",
    ]
    for group, entry in moe["routing"]["groups"].items():
        per_layer = list(entry["answer_side_share_by_layer"].values())
        mean = [sum(layer[k] for layer in per_layer) / len(per_layer) for k in range(len(per_layer[0]))]
        lines.append(f"| {group} | {entry['samples']} | {' / '.join(f'{v:.2f}' for v in mean)} |")
    lines += ["", "Per-layer shares and per-modality counts are in `modality_expert.json`.", ""]
    return "\n".join(lines + seeds_table() + variants_table())


def _refit_words(refit: dict | None) -> str:
    if not refit:
        return "no head refit"
    return f"head refit {refit['steps']} steps at lr {refit['lr']:g} (`StageSpec.head_refit`)"


def results_file(seed: int) -> Path:
    return RESULTS / ("modality_expert.json" if seed == 0 else f"modality_expert_seed{seed}.json")


def seeds_table() -> list[str]:
    """Every seed's chain the benchmark scored (`--seed`), side by side."""
    payloads = sorted(
        (
            json.loads(path.read_text())
            for path in RESULTS.glob("modality_expert*.json")
            if path.name == results_file(0).name or path.stem.startswith("modality_expert_seed")
        ),
        key=lambda payload: payload.get("seed", 0),
    )
    if len(payloads) < 2:
        return []
    lines = [
        "## Seeds",
        "",
        "| seed | expert stage head (one wording / 3 test / 3 val+test) | stage IV head (same) |"
        " stage IV closed / region recall / mDice | decisions stage IV lost (-) or gained (+), wording |",
        "|---|---|---|---|---|",
    ]
    for payload in payloads:
        expert, moe = payload["scores"]["expert stage"], payload["scores"]["stage IV"]
        cells = [str(payload.get("seed", 0)), " / ".join(_head_cells(expert)), " / ".join(_head_cells(moe))]
        cells.append(" / ".join(_eval_cells(moe.get("eval"))))
        cells.append(_changed_decisions(expert, moe))
        lines.append(f"| {' | '.join(cells)} |")
    return [*lines, ""]


def _changed_decisions(expert: dict, moe: dict) -> str:
    """The (wording, image) decisions of the 3-wording val+test measure that stage IV lost or gained."""
    if "head_wordings" not in expert or "head_wordings" not in moe:
        return "—"
    wrong = {}
    for name, entry in (("expert", expert), ("moe", moe)):
        wrong[name] = {
            (number, Path(image).stem)
            for number, per_split in enumerate(entry["head_wordings"]["wordings"].values(), start=1)
            for scores in per_split.values()
            for image in scores["wrong"]
        }
    lost, gained = sorted(wrong["moe"] - wrong["expert"]), sorted(wrong["expert"] - wrong["moe"])
    named = [f"{'-' if d in lost else '+'}{d[1]} (w{d[0]})" for d in sorted(lost + gained)]
    return ", ".join(named) or "none"


def variants_table() -> list[str]:
    """The stage IV variants `modality_expert_variants.py` scored, if it ran."""
    if not VARIANTS.is_file():
        return []
    lines = [
        "## Stage IV variants (`benchmarks/modality_expert_variants.py`)",
        "",
        "Stage IV retrained from the same expert stage (per seed's chain), one change each. `T`: plugin"
        " heads trained in IV (the recipe until they were frozen), `A`: frozen (the recipe); the number"
        " is the head loss weight; a suffix"
        " `-group` names groups also frozen; @N: N stage IV steps (recipe: 372); `~anchor<w>`: the head"
        " anchor's weight; `~router<x>`: the routers' learning rate times x; `~unscaled`: the top-1 gate"
        " passes the chosen expert unscaled (`RouterConfig.top1_output`); `~S-fitV`: helper stage4's"
        ' candidate stage IV (`RouterConfig(top1_output="supervised")`, `RouterFit(prefix_expert='
        '"vision_language")`; measured with branch stage4 at 7e7e781 merged, a suffix this branch\'s'
        " script does not parse). A routing loss left near 0.7 (with CE near 0.8) is a router that did"
        " not learn its routes. Rows without a seed are the"
        " previous session's chain (seed 0, the code of then; its expert stage scored 0.952 on one wording).",
        "",
        "| variant | seed | also frozen | head, one wording | 3 wordings (test) | 3 wordings (val+test) |"
        " closed / region recall / mDice | CE, routing loss (last 20 steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in json.loads(VARIANTS.read_text()):
        frozen = ", ".join(entry.get("frozen", [])) or "—"
        losses = f"{entry['last_losses']['ce']:.2f}, {entry['last_losses']['router']:.2f}"
        seed = str(entry["seed"]) if "seed" in entry else "—"
        cells = [entry["variant"], seed, frozen, *_head_cells(entry)]
        cells += [" / ".join(_eval_cells(entry.get("eval"))), losses]
        lines.append(f"| {' | '.join(cells)} |")
    return [*lines, ""]
