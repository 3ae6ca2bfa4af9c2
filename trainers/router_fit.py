"""Stage IV's router fit: each routed layer's gate is fitted to the routing targets before training.

A fresh gate (weights N(0, 0.02)) routes tokens at random, and stage IV's routing loss, averaged
over a batch where grounding is one sample in five, moves it towards the majority expert faster than
towards the grounding one: after 344 tiny-schedule steps the tiny MoE still sent 95-100 % of the
grounding requests' question and answer tokens to the VQA expert (`benchmarks/stage4_routing.py`).
Yet at the start of stage IV those tokens are linearly separable by expert at the routed MLPs' input
(layer 1 of the tiny preset: 100 % on the test split). So the gate is fitted first, as a logistic
regression on those states:

1. up to `per_expert` training examples whose routing target is one expert run through the composed
   model with every token forced to that expert (`MixtureOfExperts.force_expert`), i.e. as the
   expert's own stage model sees them;
2. the input of each routed MLP is kept at the question and answer tokens (`loop.answer_side`: the
   tokens the routing loss scores);
3. each layer's gate is fitted to those states by full-batch AdamW on a cross-entropy that weighs
   every expert's tokens equally, starting from the gate's own weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from medplib.trainers.collate import Collator, Example


class RouterFit(BaseModel):
    """How stage IV fits its gates before it trains (`fit_routers`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_expert: int = Field(128, ge=1)  # training examples per expert
    steps: int = Field(300, ge=1)  # full-batch optimizer steps per layer
    lr: float = Field(1e-2, gt=0)


def fit_routers(
    moe,
    examples: Sequence[Example],
    collator: Collator,
    targets: Callable[[Sequence[Example]], torch.Tensor],
    tokens: Callable[[dict], torch.Tensor],
    forward: Callable[[dict], object],
    fit: RouterFit,
    batch_size: int = 8,
) -> dict[int, float]:
    """Fit every routed layer's gate of `moe` (module docstring); returns each layer's balanced
    accuracy on the states it was fitted to. `targets(examples)` is (B, K) the routing targets
    (`expert_training.routing_targets`), `tokens(batch)` (B, T) the tokens that count, and
    `forward(batch)` runs the model on a collated batch as training does."""
    model = moe.model
    device = next(model.parameters()).device
    chosen: dict[int, list[Example]] = {}
    for example in examples:
        row = targets([example])[0]
        if row.count_nonzero() == 1:  # one expert: its tokens are that expert's
            bucket = chosen.setdefault(int(row.argmax()), [])
            if len(bucket) < fit.per_expert:
                bucket.append(example)
    states: dict[int, list[torch.Tensor]] = {layer: [] for layer in moe.layers}
    labels: list[torch.Tensor] = []
    training = model.training
    model.eval()  # no LoRA dropout: the states the expert stages' models give
    try:
        for expert, items in sorted(chosen.items()):
            for start in range(0, len(items), batch_size):
                batch = collator(items[start : start + batch_size])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                keep = tokens(batch).reshape(-1)
                with moe.force_expert(expert):
                    captured = _capture_inputs(moe, forward, batch)
                for layer, hidden in captured.items():
                    states[layer].append(hidden[keep].float())
                labels.append(torch.full((int(keep.sum()),), expert, device=device))
    finally:
        model.train(training)
    y = torch.cat(labels)
    accuracy = {}
    for layer, mlp in moe.layers.items():
        accuracy[layer] = _fit_gate(mlp.router, torch.cat(states[layer]), y, len(moe.experts), fit)
    return accuracy


def _capture_inputs(moe, forward: Callable[[dict], object], batch: dict) -> dict[int, torch.Tensor]:
    """Each routed MLP's input (tokens, hidden) for `batch`."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        mlp.register_forward_pre_hook(
            lambda module, args, layer=layer: captured.__setitem__(
                layer, args[0].reshape(-1, args[0].shape[-1]).detach()
            )
        )
        for layer, mlp in moe.layers.items()
    ]
    try:
        with torch.no_grad(), moe.padding(batch["attention_mask"]):
            forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _fit_gate(
    router: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, classes: int, fit: RouterFit
) -> float:
    """Fit `router` (no bias) to states `x` and expert labels `y` with a class-balanced cross-entropy."""
    counts = torch.bincount(y, minlength=classes).float()
    weight = torch.where(counts > 0, counts.sum() / (classes * counts.clamp(min=1)), 0.0)
    w = router.weight.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([w], lr=fit.lr, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(fit.steps):
            loss = F.cross_entropy(x @ w.T, y, weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    router.weight.data.copy_(w.detach().to(router.weight.dtype))
    hits = ((x @ w.detach().T).argmax(1) == y).float()
    per_class = [hits[y == k].mean() for k in range(classes) if counts[k] > 0]
    return float(torch.stack(per_class).mean())
