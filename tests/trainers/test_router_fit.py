"""Stage IV's router fit: gates fitted to the routing targets before training, nothing else touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medplib.core.model import MedPLIBProcessor, build_medplib
from medplib.router.config import RouterConfig
from medplib.trainers.collate import Collator, ExampleStore
from medplib.trainers.expert_training import routing_targets
from medplib.trainers.loop import LoopOptions, fit_gates, forward_losses
from medplib.trainers.losses import answer_side
from medplib.trainers.router_fit import RouterFit, _fit_gate
from medplib.trainers.stage_folder import StageStart, prepare
from medplib.trainers.stages import stage_spec
from medplib.trainers.train import stage_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_gate_fit_weighs_a_rare_expert_as_much_as_a_common_one() -> None:
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=generator)
    x = torch.randn(400, 16, generator=generator) + 3.0  # a large shared component, as hidden states have
    y = (x @ direction > torch.quantile(x @ direction, 0.9)).long()  # one token in ten is expert 1's
    router = torch.nn.Linear(16, 2, bias=False)
    torch.nn.init.normal_(router.weight, std=0.02, generator=generator)
    accuracy = _fit_gate(router, x, y, 2, RouterFit(steps=300))
    predicted = router(x).argmax(1)
    assert accuracy > 0.9 and (predicted[y == 1] == 1).float().mean() > 0.85
    # An expert no token belongs to is weighed 0, not divided by 0.
    three = torch.nn.Linear(16, 3, bias=False)
    assert _fit_gate(three, x, y, 3, RouterFit(steps=50)) > 0.5 and torch.isfinite(three.weight).all()


def test_stage_four_fits_only_its_gates_and_routes_requests_to_their_experts(
    built_dataset: Path, tmp_path: Path
) -> None:
    spec = stage_spec("4").model_copy(
        update={
            "router": RouterConfig(top1_output="supervised"),
            "router_fit": RouterFit(per_expert=6, prefix_expert="vision_language"),
        }
    )
    torch.manual_seed(0)
    prepared = prepare(spec, StageStart("tiny", build_medplib("tiny")))
    model, moe = prepared.model, prepared.moe
    collator = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    examples = stage_examples(spec, ExampleStore.open(built_dataset, split="train").examples())
    chosen = [e for e in examples if e.task == "grounding"][:4] + [e for e in examples if e.task == "vqa"][:4]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def right_shares() -> tuple[float, float]:
        """At the last routed layer: the question and answer tokens routed to the request's expert,
        and the system prompt and image tokens routed to the VQA expert (the `prefix_expert`)."""
        batch = collator(chosen)
        model.eval()
        with torch.no_grad():
            forward_losses(prepared, batch, spec, len(chosen))
        tokens = answer_side(batch["input_ids"], batch["attention_mask"], model.config.im_end_token_id)
        target = routing_targets(moe.experts, chosen, model).argmax(1)[:, None].expand_as(tokens)
        last = moe.layers[max(moe.layers)].last_routing.experts[:, 0].view_as(tokens)
        prefix = batch["attention_mask"].bool() & ~tokens
        vqa = moe.expert_index("vision_language")
        return float((last == target)[tokens].float().mean()), float((last == vqa)[prefix].float().mean())

    fresh = right_shares()
    fit_gates(prepared, examples, spec, collator, LoopOptions(out=tmp_path, progress=False))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".mlp.router." in name for name in changed)
    requests, prefixes = right_shares()
    assert requests > max(0.75, fresh[0]) and prefixes > max(0.95, fresh[1])
