"""Stage IV variants for the modality expert's head: which change keeps its accuracy through stage IV?

    nice -n 15 python benchmarks/modality_expert_variants.py --work /tmp/medplib-modality-bench A AW5 ...

Reuses the expert stage (and data) that `benchmarks/modality_expert.py` left in `--work`, retrains
only stage IV per variant into `--work/variants/NAME/stage4` (a variant already scored there is
reused) and scores the head on the test images as that benchmark does. A variant changes stage IV's
recipe: whether the plugin heads train (`expert_heads`), the head loss weight, and groups it leaves frozen.

- `T<w>`: heads trained, head weight w (`T1` was the recipe before this benchmark);
- `A<w>`: heads frozen, head weight w (`A0`: no head loss at all);
- a suffix `-group-group`: those parameter groups (`stages.PARAMETER_GROUPS`) also frozen in stage IV;
- a suffix `@N`: stage IV runs N steps (default: its recipe's length);
- a suffix `~anchor<w>`: the head anchor's weight (`StageSpec.head_anchor`; default: the recipe's);
- a suffix `~router<x>`: the routers train at x times the stage's learning rate (`StageSpec.lr_scales`);
- a suffix `~unscaled`: the top-1 gate passes the chosen expert unscaled (`RouterConfig.top1_output`).

A variant folder that already holds a trained `stage4` (e.g. the recipe's own run, linked there) is
scored without training it again. `--seed` picks the chain (`modality_expert.py --seed`).

Writes benchmarks/results/modality_expert_variants.json; `modality_expert.py` adds its table to the
markdown. One torch thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medplib.core.assistant import MedPLIB
from medplib.loading import load_model
from medplib.trainers.collate import ExampleStore
from medplib.trainers.stages import PARAMETER_GROUPS, StageSpec
from medplib.trainers.train import StageRun, run_stage

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "modality_expert_variants.json"


def benchmark():
    """benchmarks/modality_expert.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("modality_expert", HERE / "modality_expert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class VariantRun(StageRun):
    """Stage IV with its plugin heads trained or frozen, its own head loss weight and frozen groups."""

    heads_train: bool = True
    head_weight: float = 1.0
    head_anchor: float | None = None  # None: the recipe's
    router_lr_scale: float | None = None
    unscaled: bool = False

    def spec(self) -> StageSpec:
        spec = super().spec()  # less `frozen`
        trains = tuple(g for g in spec.trains if g != "expert_heads")
        trains += ("expert_heads",) if self.heads_train else ()
        loss = spec.loss.model_copy(update={"head": self.head_weight})
        update = {"trains": trains, "loss": loss}
        if self.head_anchor is not None:
            update["head_anchor"] = self.head_anchor
        if self.router_lr_scale is not None:
            update["lr_scales"] = {**spec.lr_scales, "router": self.router_lr_scale}
        if self.unscaled:
            update["router"] = spec.router.model_copy(update={"top1_output": "unscaled"})
        return spec.model_copy(update=update)


def parse(name: str) -> dict:
    number = r"\d+(?:\.\d+)?"
    pattern = (
        rf"([TA])({number})((?:-[a-z_]+)*)(?:@(\d+))?"
        rf"(?:~anchor({number}))?(?:~router({number}))?(~unscaled)?"
    )
    match = re.fullmatch(pattern, name)
    frozen = tuple(match[3].split("-")[1:]) if match else ()
    if match is None or not set(frozen) <= set(PARAMETER_GROUPS):
        raise SystemExit(
            f"variant {name!r}: use T<weight> or A<weight>, -<group> per frozen group, @<steps>,"
            " ~anchor<weight>, ~router<lr scale>, ~unscaled"
        )
    return {
        "heads_train": match[1] == "T",
        "head_weight": float(match[2]),
        "frozen": frozen,
        "steps": int(match[4]) if match[4] else None,
        "head_anchor": float(match[5]) if match[5] else None,
        "router_lr_scale": float(match[6]) if match[6] else None,
        "unscaled": bool(match[7]),
    }


def last_losses(stage4: Path, steps: int = 20) -> dict[str, float]:
    """The mean CE and routing loss of stage IV's last `steps` steps (did the MoE still learn?)."""
    logged = [json.loads(line) for line in (stage4 / "metrics.jsonl").read_text().splitlines()]
    return {k: round(sum(s[k] for s in logged[-steps:]) / steps, 4) for k in ("ce", "router")}


def run_variant(name: str, work: Path, module, seed: int = 0) -> dict:
    folder = work / "variants" / name
    if (folder / "variant.json").is_file():
        result = json.loads((folder / "variant.json").read_text())
        return result | {"last_losses": last_losses(folder / "stage4")}
    options = parse(name)
    began = time.perf_counter()
    if not (folder / "stage4" / "stage.json").is_file():
        run = VariantRun(
            stage="4",
            model=str(work / "expert"),
            data=str(work / "data"),
            out=str(folder / "stage4"),
            experts=module.EXPERTS,
            seed=seed,
            progress=False,
            **options,
        )
        run_stage(run)
    seconds = json.loads((folder / "stage4" / "stage.json").read_text())["seconds"]
    store = ExampleStore.open(work / "data", split="test")
    assistant = MedPLIB(load_model(folder / "stage4").model.eval(), name=name)
    head = module.head_accuracy(assistant, store)
    result = {"variant": name, "seed": seed, **options, "frozen": list(options["frozen"])}
    result |= {"train_seconds": round(seconds, 1), "head": head}
    result["head_wordings"] = module.head_wordings(assistant, work / "data")
    result["eval"] = module.headline_scores(folder / "stage4", work / "data", folder / "stage4-eval")
    result["last_losses"] = last_losses(folder / "stage4")
    print(f"variant {name}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    (folder / "variant.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medplib-modality-bench"))
    parser.add_argument("--seed", type=int, default=0, help="the chain's seed (its stage IV's too)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = benchmark()
    module.register_example()
    results = {}
    if RESULTS.is_file():
        results = {(r["variant"], r.get("seed", 0)): r for r in json.loads(RESULTS.read_text())}
    for name in args.variants:
        results[name, args.seed] = run_variant(name, args.work, module, args.seed)
        print(json.dumps(results[name, args.seed]))
    RESULTS.write_text(json.dumps(list(results.values()), indent=1))


if __name__ == "__main__":
    main()
