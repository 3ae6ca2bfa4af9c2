"""Stage IV's head refit: after the mixture trains, each generic expert head is fitted so that, on the
states the mixture gives it, it says what it said on its expert stage's states.

Stage IV does not train plugin heads (they keep their expert stage's weights), and its head anchor
keeps their input states near their expert stage's; yet the anchor is a soft term, and the drift it
leaves flips decisions the head took near its boundary (the tiny modality head lost two of 63 test
decisions on one seed of three, taken at p 0.55 and 0.52 by its expert stage). So, with
`StageSpec.head_refit`:

1. before stage IV trains (and before a resume loads trained weights), each of the expert's training
   samples (those whose answers hold a generic head's trigger token) runs through the composed model
   routed wholly to the head's expert (the expert stage's model), and the head's outputs on those
   states are kept as its targets (`refit_targets`);
2. after training, with the composed model frozen, the same samples run through the final mixture
   routed as its gates route them, which is how a served request reaches the head, and the head,
   from its own weights, takes `steps` full-batch AdamW steps on its `refit_loss` to those targets
   (`refit_heads`).

The targets are the head's own outputs, not the labels: fitted to the labels (cross-entropy) on the
same 108 samples, the head lost one or two of the 21 test images on that seed at every length tried
and, from 500 steps on, decisions the mixture had kept on the other two; fitted to its outputs
(`ExpertHead.refit_loss`, by default their mean squared difference) for 1000 steps or more, it took
every test and validation decision as its expert stage did on all three seeds
(benchmarks/results/head_refit.md, benchmarks/results/modality_expert.md).
Full batch, fixed steps, no dropout: a resumed stage IV refits exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from medplib.core.errors import MedplibError
from medplib.trainers.collate import Example
from medplib.trainers.expert_training import head_input_states

# Per generic head: (example id, the head's output) per trigger token, in `head_input_states` order.
RefitTargets = dict[str, list[tuple[str, torch.Tensor]]]


class HeadRefit(BaseModel):
    """How stage IV refits the generic expert heads after training (`refit_heads`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(2000, ge=1)  # full-batch optimizer steps per head
    lr: float = Field(1e-2, gt=0)


def refit_targets(model: Any, states: Sequence[tuple[Example, str, torch.Tensor]]) -> RefitTargets:
    """Each generic head's outputs on its training samples' states routed wholly to its expert
    (`head_input_states(..., forced=True)`)."""
    targets: RefitTargets = {}
    with torch.no_grad():
        for example, name, state in states:
            output = model.expert_heads[name](state.unsqueeze(0))[0]
            targets.setdefault(name, []).append((example.id, output.detach().float().cpu()))
    return targets


def refit_heads(
    model: Any,
    moe: Any,
    examples: Sequence[Example],
    collator: Any,
    targets: RefitTargets,
    fit: HeadRefit,
) -> dict[str, dict[str, float]]:
    """Fit every head of `targets` to them on the states the mixture `moe` gives the same examples
    (module docstring). Returns per head its samples and its refit loss before and after."""
    found: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for example, name, state in head_input_states(model, examples, collator, moe):
        found.setdefault(name, []).append((example.id, state))
    report = {}
    for name, wanted in targets.items():
        got = found.get(name, [])
        if [key for key, _ in got] != [key for key, _ in wanted]:
            raise MedplibError(
                f"head refit of {name!r}: the examples' trigger tokens changed since its targets were taken"
            )
        head = model.expert_heads[name]
        parameter = next(head.parameters())
        states = torch.stack([s for _, s in got]).to(device=parameter.device, dtype=parameter.dtype)
        outputs = torch.stack([t for _, t in wanted]).to(device=parameter.device, dtype=parameter.dtype)
        before = _refit_loss(head, states, outputs)
        _fit(head, states, outputs, fit)
        after = _refit_loss(head, states, outputs)
        report[name] = {"samples": len(got), "loss_before": round(before, 6), "loss_after": round(after, 6)}
    return report


def _fit(head: torch.nn.Module, states: torch.Tensor, outputs: torch.Tensor, fit: HeadRefit) -> None:
    parameters = list(head.parameters())
    flags = [p.requires_grad for p in parameters]
    training = head.training
    head.eval()  # no dropout a head may hold: a deterministic fit
    optimizer = torch.optim.AdamW(parameters, lr=fit.lr, weight_decay=0.0)
    try:
        for parameter in parameters:
            parameter.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(fit.steps):
                optimizer.zero_grad(set_to_none=True)
                head.refit_loss(head(states), outputs).float().mean().backward()
                optimizer.step()
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)
            parameter.grad = None
        head.train(training)


def _refit_loss(head: torch.nn.Module, states: torch.Tensor, outputs: torch.Tensor) -> float:
    with torch.no_grad():
        return float(head.refit_loss(head(states), outputs).float().mean())
