"""Stage IV variants on a finished stage III: which recipe keeps both experts' skills in the MoE?

    nice -n 15 python benchmarks/stage4_variants.py --source /work/runs/final/seed-0/stage3 \
        --seed 0 --work /work/runs/stage4 U-rows U-rows-fix

Each variant retrains stage IV from `--source` into `--work/seed-N/NAME` (a variant already scored
there is reused) and scores it on the test split as the pipeline does (`eval.json`: per-structure
Dice, swap IoU, closed accuracy, region recall). A variant is the tiny schedule's stage IV with:

- `default`: nothing changed (the recipe);
- `U`: the top-1 gate unscaled (`RouterConfig(top1_output="unscaled")`);
- `S`: the top-1 gate at 1.0 and trained by the routing loss alone (`top1_output="supervised"`);
- `-rows`: the embeddings and LM head frozen but for the `<SEG>` rows (`seg_token`); `-rowsE`: the
  embeddings alone, `-rowsH`: the LM head alone;
- `-attn`: the LLM's attention (shared by every expert) trains as well; `-noattn`: it does not;
- `-words`: the whole embeddings and LM head train, as in the recipe (undoes an earlier `-rows`);
- `-fix`: the experts' LoRA frozen too (`experts` not trained);
- `-noseg`: the `<SEG>` head and SAM's mask decoder frozen (`seg_head`, `mask_decoder` not trained);
- `-nortr`: the routers do not train (with `-fit`: they keep their fitted weights);
- `-onlyrouter`: the routers alone train;
- `-fit`: the gates are fitted to the routing targets before training (`StageSpec.router_fit`);
- `-fitV`, `-fitG`: the same, the system prompt and image tokens fitted to the VQA (V) or the
  grounding (G) expert (`RouterFit.prefix_expert`); a final `u`: fitted by the tokens' numbers,
  not class-balanced (`RouterFit.balanced=False`); a `1` after V/G: the first routed layer sends
  every token to that expert (`RouterFit.shared_layers=1`);
- `-exp<x>`: the experts' LoRA at x times the stage's learning rate (`lr_scales`);
- `-emb<x>`: the embeddings and LM head at x times the stage's learning rate;
- `-rtr<x>`: the routers at x times the stage's learning rate;
- `-rw<x>`: the routing loss at weight x (`StageSpec.routing_weight`; the tiny recipe's is 5);
- `-dw<x>`: the routing loss adds the last prompt token's cross-entropy at weight x
  (`StageSpec.routing_decision_weight`); `-bal`: samples weighed by their expert's inverse batch
  share (`StageSpec.routing_balanced`);
- `@N`: N steps instead of the recipe's.

Writes `--work/seed-N/summary.json` (the variants' metrics) and prints one line per variant. One
torch thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from medplib.router.config import RouterConfig
from medplib.trainers.pipeline import run_and_score
from medplib.trainers.router_fit import RouterFit
from medplib.trainers.stages import StageSpec
from medplib.trainers.train import StageRun

VARIANT = re.compile(
    r"^(default|U|S)((?:-(?:rows[EH]?|attn|fix|nortr|onlyrouter|fit[VG]?1?u?|exp[\d.]+|emb[\d.]+|rtr[\d.]+|rw[\d.]+|dw[\d.]+|bal|words|noattn|noseg))*)(?:@(\d+))?$"
)


def variant_spec(spec: StageSpec, name: str) -> StageSpec:
    """The tiny stage IV `spec` changed as the variant `name` says (module docstring)."""
    match = VARIANT.match(name)
    if match is None:
        raise SystemExit(f"unknown variant {name!r}; see the module docstring for the grammar")
    base, suffixes, _ = match.groups()
    trains, scales, router = list(spec.trains), dict(spec.lr_scales), spec.router
    routing_weight = spec.routing_weight
    decision_weight, balanced = spec.routing_decision_weight, spec.routing_balanced
    update_fit = spec.router_fit
    if base != "default":
        output = {"U": "unscaled", "S": "supervised"}[base]
        router = RouterConfig.model_validate(router.model_dump() | {"top1_output": output})
    for suffix in filter(None, suffixes.split("-")):
        if suffix in ("rows", "rowsE", "rowsH"):
            frozen = {"rows": ("embeddings", "lm_head"), "rowsE": ("embeddings",), "rowsH": ("lm_head",)}
            trains = [g for g in trains if g not in frozen[suffix]] + ["seg_token"]
        elif suffix.startswith("fit"):
            prefix = {"V": "vision_language", "G": "pixel_grounding"}.get(suffix[3:4])
            shared = int("1" in suffix)
            update_fit = RouterFit(
                prefix_expert=prefix, balanced=not suffix.endswith("u"), shared_layers=shared
            )
        elif suffix == "attn":
            trains = [*trains, "attention"]
        elif suffix == "noattn":
            trains = [g for g in trains if g != "attention"]
        elif suffix == "words":  # the paper's stage IV: the whole embeddings and LM head train
            trains = [g for g in trains if g != "seg_token"] + ["embeddings", "lm_head"]
        elif suffix == "noseg":  # the grounding head and SAM's decoder stay as stage III left them
            trains = [g for g in trains if g not in ("seg_head", "mask_decoder")]
        elif suffix == "nortr":
            trains = [g for g in trains if g != "router"]
        elif suffix == "onlyrouter":
            trains = ["router"]
        elif suffix == "fix":
            trains = [g for g in trains if g != "experts"]
        elif suffix.startswith("exp"):
            scales["experts"] = float(suffix[3:])
        elif suffix.startswith("rtr"):
            scales["router"] = float(suffix[3:])
        elif suffix.startswith("rw"):
            routing_weight = float(suffix[2:])
        elif suffix.startswith("dw"):
            decision_weight = float(suffix[2:])
        elif suffix == "bal":
            balanced = True
        elif suffix.startswith("emb"):
            scales |= {"embeddings": float(suffix[3:]), "lm_head": float(suffix[3:])}
    update = {
        "trains": tuple(trains),
        "lr_scales": scales,
        "router": router,
        "routing_weight": routing_weight,
        "routing_decision_weight": decision_weight,
        "routing_balanced": balanced,
        "router_fit": update_fit,
    }
    return spec.model_copy(update=update)


@dataclass(frozen=True)
class VariantRun(StageRun):
    variant: str = "default"

    def spec(self) -> StageSpec:
        return variant_spec(super().spec(), self.variant)


def steps_of(name: str) -> int | None:
    match = VARIANT.match(name)
    return int(match.group(3)) if match and match.group(3) else None


def summary_line(name: str, metrics: dict) -> str:
    dice = metrics["mdice_per_structure"]
    swap = metrics["swap_iou"]
    lr = swap["left hemisphere / right hemisphere"]["max_iou"]
    gw = swap["grey matter / white matter"]["max_iou"]
    per = " ".join(f"{k.split()[0]}={v:.3f}" for k, v in dice.items())
    return (
        f"{name:24s} {per} mDice={metrics['mdice']:.3f} swapLR={lr:.2f} swapGW={gw:.2f} "
        f"closed={metrics['closed_accuracy']:.3f} region={metrics['region_recall']:.3f}"
    )


def markdown_row(seed: int, name: str, metrics: dict) -> str:
    """One row of the per-seed table of `benchmarks/results/pipeline.md`."""
    dice = metrics["mdice_per_structure"]
    swap = metrics["swap_iou"]
    cells = [
        metrics["closed_accuracy"],
        metrics["region_recall"],
        metrics["mdice"],
        dice["cell nuclei"],
        dice["grey matter"],
        dice["white matter"],
        dice["left hemisphere"],
        dice["right hemisphere"],
    ]
    pairs = ["left hemisphere / right hemisphere", "grey matter / white matter"]
    swaps = [f"{swap[p]['mean_iou']:.2f} / {swap[p]['max_iou']:.2f}" for p in pairs]
    return f"| {seed} | {name} | " + " | ".join([*(f"{c:.3f}" for c in cells), *swaps]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="a finished stage III folder")
    parser.add_argument("--data", default="/work/runs/data")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print the seed's table rows and stop")
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    if args.markdown:
        summary = json.loads((args.work / f"seed-{args.seed}" / "summary.json").read_text())
        for name in args.variants:
            print(markdown_row(args.seed, name, summary[name]["metrics"]))
        return
    torch.set_num_threads(1)
    for name in args.variants:
        variant_spec(StageSpec.model_validate(_any_spec()), name)  # fail on a bad name before training
    folder = args.work / f"seed-{args.seed}"
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for name in args.variants:
        run = VariantRun(
            stage="4",
            model=args.source,
            data=args.data,
            out=str(folder / name),
            seed=args.seed,
            steps=steps_of(name),
            variant=name,
        )
        record = run_and_score(run, args.data, threads=1)
        summary[name] = {"metrics": record["metrics"], "seconds": record.get("seconds")}
        summary_path.write_text(json.dumps(summary, indent=1))
        print(summary_line(name, record["metrics"]), flush=True)


def _any_spec() -> dict:
    from medplib.trainers.stages import stage_spec

    return stage_spec("4").model_dump()


if __name__ == "__main__":
    main()
