"""Stage IV's router fit: each routed layer's gate is fitted to the routing targets before training.

A fresh gate (weights N(0, 0.02)) routes tokens at random, and stage IV's routing loss, averaged
over a batch where grounding is one sample in five, moves it towards the majority expert faster than
towards the grounding one: after 344 tiny-schedule steps the tiny MoE still sent 95-100 % of the
grounding requests' question and answer tokens to the VQA expert (`benchmarks/stage4_routing.py`).
Yet at the start of stage IV those tokens are linearly separable by expert at the routed MLPs' input
(layer 1 of the tiny preset: 100 % on the test split). So the gate is fitted first, as a logistic
regression on those states:

1. up to `per_expert` training examples whose routing target is one expert run through the composed
   model, layer by layer from the first: a layer's gate is fitted to its MLP's inputs as the gates
   of the layers before it, fitted already, route them (at inference those are its inputs);
2. the inputs are kept at the question and answer tokens (`losses.answer_side`: the tokens the
   routing loss scores), labelled with the sample's expert;
3. each gate is fitted to those states by full-batch AdamW on a cross-entropy that weighs every
   expert's tokens equally (`balanced`), starting from the gate's own weights.

The tokens before the question (system prompt and image) are the same whichever expert a request
needs, so no gate can route them by request; `prefix_expert` names the expert they are fitted to
(None, or an expert the mixture does not hold: they are left out of the fit and go wherever the
fitted gate sends them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medplib.trainers.collate import Collator, Example, to_device


class RouterFit(BaseModel):
    """How stage IV fits its gates before it trains (`fit_routers`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_expert: int = Field(128, ge=1)  # training examples per expert
    steps: int = Field(300, ge=1)  # full-batch optimizer steps per layer
    lr: float = Field(1e-2, gt=0)
    prefix_expert: str | None = None  # the expert the system prompt and image tokens go to
    # Weigh every expert's tokens equally; False: by their numbers, so that a token no gate can place
    # (an early question word at the first layer) goes to the expert most tokens belong to.
    balanced: bool = True
    # The first `shared_layers` routed layers send every token to `prefix_expert`: their inputs hold
    # too little of the request to tell the experts apart (the tiny preset's layer 0 places 73-80 %
    # of the question tokens), and a misrouted question token costs the other expert's answer.
    shared_layers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _shared_layers_need_a_prefix_expert(self) -> RouterFit:
        if self.shared_layers and self.prefix_expert is None:
            raise ValueError("shared_layers sends every token to prefix_expert; name one")
        return self


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
    # A mixture without the named expert (`--experts` leaving it out) fits no prefix.
    prefix = moe.expert_index(fit.prefix_expert) if fit.prefix_expert in moe.expert_names else None
    chosen: dict[int, list[Example]] = {}
    for example in examples:
        row = targets([example])[0]
        if row.count_nonzero() == 1:  # one expert: its tokens are that expert's
            bucket = chosen.setdefault(int(row.argmax()), [])
            if len(bucket) < fit.per_expert:
                bucket.append(example)
    training = model.training
    model.eval()  # no LoRA dropout
    accuracy = {}
    try:
        for position, (layer, mlp) in enumerate(sorted(moe.layers.items())):
            # Each fit sees the earlier layers' fitted routes.
            shared = prefix is not None and position < fit.shared_layers
            states, labels = [], []
            for expert, items in sorted(chosen.items()):
                for start in range(0, len(items), batch_size):
                    batch = collator(items[start : start + batch_size])
                    batch = to_device(batch, device)
                    scored = tokens(batch).reshape(-1)
                    label = torch.full(scored.shape, expert, device=device)
                    keep = scored
                    if prefix is not None:
                        before = batch["attention_mask"].reshape(-1).bool() & ~scored
                        label[before], keep = prefix, scored | before
                        if shared:
                            label[:] = prefix
                    states.append(_layer_input(moe, mlp, forward, batch)[keep].float())
                    labels.append(label[keep])
            accuracy[layer] = _fit_gate(
                mlp.router, torch.cat(states), torch.cat(labels), len(moe.experts), fit
            )
    finally:
        model.train(training)
    return accuracy


def _layer_input(moe, mlp: torch.nn.Module, forward: Callable[[dict], object], batch: dict) -> torch.Tensor:
    """The input (tokens, hidden) of the routed MLP `mlp` when the model runs on `batch`."""
    captured: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].reshape(-1, args[0].shape[-1]).detach())
    )
    try:
        with torch.no_grad(), moe.padding(batch["attention_mask"]):
            forward(batch)
    finally:
        handle.remove()
    return captured[0]


def _fit_gate(
    router: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, classes: int, fit: RouterFit
) -> float:
    """Fit `router` (no bias) to states `x` and expert labels `y` by cross-entropy (`RouterFit.balanced`)."""
    counts = torch.bincount(y, minlength=classes).float()
    weight = torch.where(counts > 0, counts.sum() / (classes * counts.clamp(min=1)), 0.0)
    if not fit.balanced:
        weight = (counts > 0).float()
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
