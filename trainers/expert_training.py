"""What training does with experts' heads, tokens, datasets and routes, for every expert alike.

- `head_losses`: each trigger token in a batch's answers sends the hidden state that predicts it to
  its expert's head, which is scored against the sample's target (`ExpertHead.target`), weighted by
  the stage's `loss.head`. Image-conditioned heads (grounding) have their mask losses instead.
- `plugin_examples`: the datasets an expert's plugin registers (`medplib_register_datasets`) named
  after the expert (`<expert>` or `<expert>_<anything>`), read from the stage's data folder, their
  answers' trigger tokens kept as the expert's tokens.
- `anchor_states` / the anchor term of `head_losses` (stage IV, `StageSpec.head_anchor`): the state
  each generic head reads, as the composed model gives it before stage IV trains (routed wholly to
  the head's expert, which is its expert stage's model), is kept as a target, so the shared parts
  stage IV trains for its routes do not move the head's input away from what the head learned on.
- `routing_targets`: stage IV's routing target of each sample, a distribution over the composed
  experts: the experts whose trigger tokens its answer holds, else every expert whose `trains_on`
  accepts it, shared equally. So two experts that both accept a sample share it instead of the
  first one taking it all, and a sample that trains an expert's token goes to that expert.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from medplib.core.errors import InvalidInputError, PluginError, validation_message
from medplib.core.expert_spec import ExpertSpec
from medplib.core.model.conversation import ExpertToken
from medplib.core.plugins import get_datasets
from medplib.trainers.collate import Example, ExampleStore, to_device
from medplib.trainers.data.loader import LoadedSamples
from medplib.trainers.data.mecovqa import Sample, dataset_root
from medplib.trainers.losses import BatchLoss


def trigger_positions(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
    """(row, position, expert) of each position that predicts a trigger token of a generic head."""
    found = []
    for token_id, name in model.trigger_experts.items():
        if model.expert_heads[name].image_conditioned:
            continue
        hits = (input_ids[:, 1:] == token_id) & attention_mask[:, 1:].bool()
        found += [(int(r), int(p), name) for r, p in torch.nonzero(hits).tolist()]
    return sorted(found)


def anchor_states(states: Sequence[tuple[Example, str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per example id, its generic heads' trigger states stacked, from `head_input_states(...,
    forced=True)`: every token routed to the head's expert, which before stage IV trains is the
    expert stage's own model. Examples without such a trigger have no states and no entry."""
    anchors: dict[str, list[torch.Tensor]] = {}
    for example, _, state in states:
        anchors.setdefault(example.id, []).append(state)
    return {key: torch.stack(found) for key, found in anchors.items()}


def head_input_states(
    model: Any,
    examples: Sequence[Example],
    collator: Any,
    moe: Any = None,
    forced: bool = False,
    batch_size: int = 8,
) -> list[tuple[Example, str, torch.Tensor]]:
    """(example, expert, state) per trigger token of a generic head in the examples' answers, in
    position order per example: the hidden state that predicts the token, computed without dropout
    and without gradients. A composed model (`moe`) routes them as its gates do, or, `forced`, with
    every token routed to the head's own expert."""
    chosen = [e for e in examples if _answer_ids(e, model) & set(_generic_triggers(model))]
    found_states: list[tuple[Example, str, torch.Tensor]] = []
    training = model.training
    model.eval()  # no LoRA dropout: the states the model gives when it answers
    device = next(model.parameters()).device
    try:
        for start in range(0, len(chosen), batch_size):
            part = chosen[start : start + batch_size]
            batch = collator(part)
            keys = ("input_ids", "attention_mask", "pixel_values", "region_masks")
            inputs = to_device({key: batch[key] for key in keys}, device)
            found = trigger_positions(model, batch["input_ids"], batch["attention_mask"])
            hidden = {}
            for name in dict.fromkeys(name for _, _, name in found):
                with torch.no_grad(), _routing(moe, forced, name, inputs["attention_mask"]):
                    hidden[name] = model(**inputs).last_hidden_state
            found_states += [(part[row], name, hidden[name][row, position]) for row, position, name in found]
    finally:
        model.train(training)
    return found_states


def _routing(moe: Any, forced: bool, name: str, attention_mask: torch.Tensor) -> contextlib.ExitStack:
    """A composed model's routed layers told the padding, and, `forced`, every token sent to `name`."""
    stack = contextlib.ExitStack()
    if moe is not None:
        if forced:
            stack.enter_context(moe.force_expert(name))
        stack.enter_context(moe.padding(attention_mask))
    return stack


def _generic_triggers(model: Any) -> dict[int, str]:
    return {
        token_id: name
        for token_id, name in model.trigger_experts.items()
        if not model.expert_heads[name].image_conditioned
    }


def head_losses(
    loss: BatchLoss,
    model: Any,
    hidden: torch.Tensor,
    batch: dict,
    weight: float,
    global_batch: int,
    anchors: dict[str, torch.Tensor] | None = None,
    anchor_weight: float = 0.0,
) -> BatchLoss:
    """`loss` plus every generic head's loss on its trigger tokens (logged as 'head'), each sample's
    mean over its triggers of each head, summed over samples and divided by the global batch; and,
    with `anchors`, each trigger state's squared distance to its anchor relative to the anchor's
    squared norm (logged as 'anchor'), weighted by `anchor_weight`, on the same scale."""
    examples = batch["examples"]
    found = trigger_positions(model, batch["input_ids"], batch["attention_mask"])
    if anchors and anchor_weight > 0:
        loss = _anchor_loss(loss, hidden, examples, found, anchors, anchor_weight, global_batch)
    if weight <= 0:
        return loss
    per_expert: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for row, position, name in found:
        target = model.expert_heads[name].target(examples[row])
        if target is not None:
            per_expert.setdefault(name, []).append((row, hidden[row, position], target))
    if not per_expert:
        return loss
    per_sample = hidden.new_zeros(len(hidden), dtype=torch.float32)
    used = torch.zeros(len(hidden), dtype=torch.bool, device=hidden.device)
    for name, items in per_expert.items():
        head = model.expert_heads[name]
        rows = torch.tensor([row for row, _, _ in items], device=hidden.device)
        states = torch.stack([state for _, state, _ in items])
        targets = torch.stack([target for _, _, target in items]).to(hidden.device)
        values = head.loss(head(states), targets)
        sums = values.float().new_zeros(len(hidden)).index_add(0, rows, values.float())
        per_sample = per_sample + sums / torch.bincount(rows, minlength=len(hidden)).clamp(min=1)
        used |= torch.bincount(rows, minlength=len(hidden)) > 0
    total = loss.total + weight * per_sample.sum() / global_batch
    parts = {**loss.parts, "head": float(per_sample[used].detach().mean())}
    return BatchLoss(total, parts, {**loss.counts, "head": int(used.sum())})


def _anchor_loss(
    loss: BatchLoss,
    hidden: torch.Tensor,
    examples: Sequence[Example],
    found: list[tuple[int, int, str]],
    anchors: dict[str, torch.Tensor],
    weight: float,
    global_batch: int,
) -> BatchLoss:
    rows: dict[int, list[int]] = {}
    for row, position, _ in found:  # in position order per row, as `anchor_states` stored them
        rows.setdefault(row, []).append(position)
    terms = []
    for row, positions in rows.items():
        anchor = anchors.get(examples[row].id)
        if anchor is None or len(anchor) != len(positions):
            continue
        states = hidden[row, positions].float()
        anchor = anchor.to(states.device).float()
        terms.append(((states - anchor).square().sum(-1) / anchor.square().sum(-1)).mean())
    if not terms:
        return loss
    per_sample = torch.stack(terms)
    total = loss.total + weight * per_sample.sum() / global_batch
    parts = {**loss.parts, "anchor": float(per_sample.detach().mean())}
    return BatchLoss(total, parts, {**loss.counts, "anchor": len(terms)})


def routing_targets(experts: Sequence[ExpertSpec], examples: Sequence[Example], model: Any) -> torch.Tensor:
    """(B, K) each sample's share of each composed expert (rows of zeros: no expert accepts it)."""
    token_expert = {token_id: name for token_id, name in model.trigger_experts.items()}
    names = [spec.name for spec in experts]
    targets = torch.zeros(len(examples), len(experts))
    for row, example in enumerate(examples):
        said = {token_expert[i] for i in _answer_ids(example, model) if i in token_expert}
        chosen = [k for k, name in enumerate(names) if name in said]
        if not chosen:
            chosen = [
                k
                for k, spec in enumerate(experts)
                if spec.trains_on.accepts(example.task, example.answer_type, example.modality, example.kind)
            ]
        if chosen:
            targets[row, chosen] = 1 / len(chosen)
    return targets


def _answer_ids(example: Example, model: Any) -> set[int]:
    """The trigger-token ids the sample's answers hold (`<SEG>`, an expert's token), placed by id."""
    ids = set()
    for turn in example.request.turns:
        parts = [] if turn.assistant is None or isinstance(turn.assistant, str) else turn.assistant
        for part in parts:
            token = part.text if isinstance(part, ExpertToken) else getattr(part, "value", None)
            if token in model.config.expert_token_ids:
                ids.add(model.config.expert_token_ids[token])
    return ids


def plugin_examples(experts: Sequence[ExpertSpec], data: Path, split: str = "train") -> list[Example]:
    """The examples of the datasets registered for `experts` (by name), read from the folder `data`."""
    datasets = get_datasets()
    examples: list[Example] = []
    for spec in experts:
        for name, builder in datasets.items():
            if name != spec.name and not name.startswith(f"{spec.name}_"):
                continue
            try:
                samples = [Sample.model_validate(record) for record in builder(data, split)]
            except ValidationError as exc:
                problem = validation_message(exc)
                raise PluginError(f"dataset {name!r}: a record is not MeCoVQA: {problem}") from None
            except Exception as exc:  # the plugin's own code: name it, whatever it raised
                raise PluginError(f"dataset {name!r} failed to build from {data}: {exc!r}") from None
            store = ExampleStore(
                LoadedSamples(dataset_root(data), samples, []), expert_tokens=spec.special_tokens
            )
            try:
                examples += store.examples()
            except (OSError, InvalidInputError) as exc:
                raise PluginError(f"dataset {name!r}: {exc}") from None
    return examples
