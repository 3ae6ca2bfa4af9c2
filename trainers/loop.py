"""The one training loop every stage runs: AdamW, warm-up then linear decay, accumulation, clipping.

Per optimizer step the loop takes the next *global* batch of the epoch's seeded permutation, gives
each worker its share (`rank::world`) in micro-batches, backpropagates each micro-batch's loss
(normalised by the global batch, see `losses.py`), sums the gradients over workers (torch DDP,
`data_parallel.py`), clips the global norm and steps. The data position is a pure function of the
step, so a checkpoint's step says where the data resumes. The loss is the model's own
(`model(**model_inputs(...)).loss`), with logits only where an answer token is predicted, since the
LM head over every image and prompt position would cost a third of a tiny model's step for nothing.

On CUDA the forward runs under bf16 autocast (weights and optimizer stay fp32); on CPU in fp32.
Each step appends one JSON line to the metrics log: loss parts, learning rate, gradient norm,
throughput and, in stage IV, the routing shares per layer. Under Ray Train (`options.session`) each
step is also reported to Ray, and checkpoints go to Ray and come back from it after a restart.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from medplib.core.model.losses import targeted_mask_logits
from medplib.router.statistics import RoutingStatistics
from medplib.trainers.checkpoint import (
    Position,
    Session,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    report_step,
)
from medplib.trainers.collate import LOSS_ONLY_KEYS, Collator, Example, to_device
from medplib.trainers.data_parallel import (
    MicroBatchLoss,
    broadcast_trained,
    data_parallel,
    fill_missing_gradients,
    syncing,
)
from medplib.trainers.encoder_cache import FrozenEncoderCache
from medplib.trainers.expert_training import anchor_states, head_input_states, head_losses, routing_targets
from medplib.trainers.head_refit import refit_heads, refit_targets
from medplib.trainers.losses import (
    BatchLoss,
    add_load_balancing,
    answer_side,
    combine_losses,
    decision_tokens,
    pair_contrast,
    routing_loss,
)
from medplib.trainers.metrics_log import LOG_FILE, MetricsLog, step_record
from medplib.trainers.prompt_contrast import prompt_terms
from medplib.trainers.router_fit import fit_routers
from medplib.trainers.sampling import PairKey, schedule_lengths, step_samples, total_steps
from medplib.trainers.stage_folder import StageModel
from medplib.trainers.stages import StageSpec
from medplib.trainers.step_draws import StepDraws


@dataclass(frozen=True)
class LoopOptions:
    """How to run a stage (not what it learns: that is the `StageSpec`)."""

    out: Path
    seed: int = 0
    steps: int | None = None  # total optimizer steps; default: the spec's epochs
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    rank: int = 0
    world: int = 1
    session: Session | None = None  # Ray Train: checkpoints go to it and resume from it
    # Stop after this many steps of the schedule, with a checkpoint there (`restarts.py`'s probes).
    stop_after: int | None = None
    # A checkpoint to begin from when neither the session nor `resume` gives one (a kept probe's).
    start_from: Path | None = None


@dataclass
class LoopResult:
    steps: int
    started_at: int = 0  # the step this run began from: > 0 when it resumed from a checkpoint
    losses: list[float] = field(default_factory=list)  # per step, this run's (resumed runs: from there)
    records: list[dict] = field(default_factory=list)  # per step, the metrics log's record
    seconds: float = 0.0
    head_refit: dict | None = None  # stage IV: per refitted head, its samples and loss before / after


def model_inputs(
    batch: dict, spec: StageSpec, global_batch: int, cache: FrozenEncoderCache | None = None
) -> dict:
    """The keyword arguments of `MedPLIBForCausalLM.forward` for a collated micro-batch: its tensors,
    the stage's loss weights over the global batch, the frozen encoders' cached outputs, and logits
    only where an answer token is predicted."""
    inputs = {key: value for key, value in batch.items() if key not in LOSS_ONLY_KEYS}
    grounding = any(t is not None for t in batch["mask_targets"])
    if cache is not None:
        inputs["image_features"] = cache.clip_features(batch["pixel_values"])
        if grounding:
            inputs["sam_image_embeddings"] = cache.sam_embeddings(batch["sam_pixel_values"])
    return inputs | {"loss_weights": spec.loss, "loss_samples": global_batch, "logits_to_keep": "supervised"}


def forward_losses(
    prepared: StageModel,
    batch: dict,
    spec: StageSpec,
    global_batch: int,
    cache: FrozenEncoderCache | None = None,
) -> tuple[BatchLoss, int]:
    """One micro-batch through the model's `forward`: the loss it trains (normalised by the global
    batch) plus the stage's router and contrast terms, and the token count."""
    model = prepared.model
    targets = batch["mask_targets"]
    with (
        prepared.moe.padding(batch["attention_mask"])
        if prepared.moe is not None
        else contextlib.nullcontext()
    ):
        out = model(**model_inputs(batch, spec, global_batch, cache))
    hidden = out.last_hidden_state
    terms = {}
    if out.seg_hidden_states is not None and any(t is not None for t in targets):
        terms = prompt_terms(model, out.seg_hidden_states, batch["pair_keys"], spec)
    routing = None
    if prepared.moe is not None and spec.routing_weight > 0:
        routing = routing_loss(
            list(prepared.moe.router_logits().values()),
            routing_targets(prepared.moe.experts, batch["examples"], model).to(hidden.device),
            answer_side(batch["input_ids"], batch["attention_mask"], model.config.im_end_token_id),
            decision_tokens(batch["labels"]),
            spec.routing_decision_weight,
            spec.routing_balanced,
        )
    contrast = None
    if spec.contrast is not None and spec.contrast.weight > 0:
        contrast = pair_contrast(
            targeted_mask_logits(out.pred_masks, targets),
            targets,
            batch["pair_keys"],
            spec.contrast.pairs,
            spec.contrast.margin,
        )
    loss = combine_losses(
        out.loss,
        out.loss_parts,
        global_batch,
        routing,
        spec.routing_weight,
        contrast,
        spec.contrast.weight if spec.contrast is not None else 0.0,
        terms,
    )
    loss = head_losses(
        loss, model, hidden, batch, spec.loss.head, global_batch, prepared.head_anchors, spec.head_anchor
    )
    if prepared.moe is not None and spec.router.load_balancing_weight > 0:
        loss = add_load_balancing(loss, prepared.moe.load_balancing_loss(), len(targets), global_batch)
    return loss, int(batch["attention_mask"].sum())


def fit_gates(
    prepared: StageModel,
    examples: Sequence[Example],
    spec: StageSpec,
    collator: Collator,
    options: LoopOptions,
) -> None:
    """Stage IV's router fit (`router_fit.fit_routers`) on the stage's examples; logged to stderr."""
    model, moe = prepared.model, prepared.moe
    accuracy = fit_routers(
        moe,
        examples,
        collator,
        lambda chosen: routing_targets(moe.experts, chosen, model),
        lambda batch: answer_side(batch["input_ids"], batch["attention_mask"], model.config.im_end_token_id),
        lambda batch: model(**model_inputs(batch, spec, len(batch["examples"]))),
        spec.router_fit,
    )
    if options.progress and options.rank == 0:
        shown = ", ".join(f"layer {layer} {value:.3f}" for layer, value in accuracy.items())
        print(f"router fit (balanced accuracy on its states): {shown}", file=sys.stderr)


def _progress(total: int, initial: int, enabled: bool, title: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc=title, unit="step", dynamic_ncols=True
    )


def optimizer_groups(
    named: list[tuple[str, torch.nn.Parameter]], spec: StageSpec
) -> tuple[list[tuple[str, torch.nn.Parameter]], list[dict]]:
    """The trainable parameters ordered group by group, and AdamW's groups, one per learning rate
    (`spec.lr_scales`). Checkpoints list parameters in this order, which is how a resume finds each
    parameter's group again."""
    by_scale: dict[float, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, parameter in named:
        by_scale.setdefault(spec.lr_scale(name), []).append((name, parameter))
    scales = sorted(by_scale, key=lambda scale: scale != 1.0)  # the stage's own lr first: it is logged
    ordered = [item for scale in scales for item in by_scale[scale]]
    groups = [{"params": [p for _, p in by_scale[scale]], "lr": spec.optim.lr * scale} for scale in scales]
    return ordered, groups


def train(
    prepared: StageModel,
    examples: Sequence[Example],
    spec: StageSpec,
    collator: Collator,
    options: LoopOptions,
) -> LoopResult:
    """Train `prepared` on `examples` as `spec` says; checkpoints and log under `options.out`."""
    model = prepared.model.train()
    device = next(model.parameters()).device
    if prepared.moe is not None and (spec.head_anchor > 0 or spec.head_refit is not None):
        # Before a resume loads trained weights: the expert stages' head states, computed once for both.
        expert_states = head_input_states(model, examples, collator, prepared.moe, forced=True)
        if spec.head_anchor > 0:
            prepared.head_anchors = anchor_states(expert_states)
        if spec.head_refit is not None:
            prepared.refit_targets = refit_targets(model, expert_states)
    if prepared.moe is not None and spec.router_fit is not None:  # a resume then loads the trained gates
        fit_gates(prepared, examples, spec, collator, options)
    named, groups = optimizer_groups(prepared.trainable_parameters(), spec)
    parameters = [p for _, p in named]
    opt = spec.optim
    optimizer = torch.optim.AdamW(
        groups, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps
    )
    global_batch, per_epoch, warmup = schedule_lengths(spec, len(examples), options.world)
    total = total_steps(spec, len(examples), options.world, options.steps)
    stop = min(total, options.stop_after or total)
    # From 0 up to the peak over `warmup` steps, then down to 0 at `total`; its state resumes exactly.
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    broadcast_trained(parameters, options.world)  # every worker builds the same model; this makes sure
    torch.manual_seed(options.seed * 7919 + options.rank + 1)  # each worker's own dropout stream
    checkpoints = options.out / "checkpoints"
    start = 0
    with (
        options.session.restored()
        if options.session is not None
        else contextlib.nullcontext(latest_checkpoint(checkpoints) if options.resume else None)
    ) as found:
        found = found or options.start_from
        if found is not None:
            start = load_checkpoint(found, named, optimizer, scheduler, options.rank).step
    log = MetricsLog(options.out / LOG_FILE, options.rank == 0, start)
    grounds = any(e.targets for e in examples)  # SAM runs only for samples with a mask
    cache = FrozenEncoderCache(model, clip=spec.caches_clip, sam=spec.caches_sam and grounds)
    if cache.clip is not None or cache.sam is not None:
        cache.fill({id(e.request.pixels): e.request.pixels for e in examples}.values())
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    runner = data_parallel(
        MicroBatchLoss(model, lambda batch, *args: _tracked_forward(prepared, batch, spec, *args, cache)),
        options.world,
    )
    pair_keys = [_pair_key(e) for e in examples] if spec.same_image_pairs else None
    preferred = spec.contrast.pairs if spec.contrast is not None else ()
    result = LoopResult(steps=total, started_at=start)
    began = time.perf_counter()
    bar = _progress(total, start, options.progress and options.rank == 0, spec.title)
    with bar:
        for step in range(start, stop):
            tick = time.perf_counter()
            chosen = step_samples(
                step, len(examples), global_batch, per_epoch, options.seed, pair_keys, preferred
            )
            draws = StepDraws.of(spec, examples, chosen, options.seed, step)
            mine = chosen[options.rank :: options.world]
            micro = [mine[i : i + opt.batch_size] for i in range(0, len(mine), opt.batch_size)]
            # A worker whose share of an epoch's short last batch is empty still joins DDP's all-reduce:
            # with one sample at weight 0.
            weight = 1.0 if micro else 0.0
            micro = micro or [chosen[:1]]
            # Per part (sum, count), summed over workers so the log shows the global batch's values.
            tally: dict[str, list[float]] = {}
            tokens = 0
            statistics = RoutingStatistics(prepared.moe.expert_names) if prepared.moe is not None else None
            for number, indices in enumerate(micro, start=1):
                batch = to_device(collator([draws.sample(examples, i) for i in indices]), device)
                with syncing(runner, number == len(micro)):  # gradients are summed once per step
                    with autocast:
                        loss, count = runner(batch, len(chosen), statistics if weight else None)
                    (loss.total * weight).backward()
                if not weight:
                    continue
                tokens += count
                tally.setdefault("loss", [0.0, 0.0])[0] += float(loss.total.detach())
                for name, value in loss.parts.items():
                    entry = tally.setdefault(name, [0.0, 0.0])
                    entry[0] += value * loss.counts[name]
                    entry[1] += loss.counts[name]
            fill_missing_gradients(parameters)
            norm = torch.nn.utils.clip_grad_norm_(parameters, opt.grad_clip or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = step_record(tally, tokens, options.world)
            record |= {"stage": spec.key, "step": step + 1, "epoch": (step + 1) / per_epoch, "lr": lr}
            record |= {"grad_norm": float(norm), "samples_per_s": len(chosen) / (time.perf_counter() - tick)}
            record["tokens_per_s"] = record.pop("tokens") / (time.perf_counter() - tick)
            if statistics is not None:
                shares = statistics.as_dict()
                layers = {layer: entry["shares"] for layer, entry in shares["layers"].items()}
                record["routing"] = {"experts": shares["experts"], "layers": layers}
            log.write(record)
            result.losses.append(record["loss"])
            result.records.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
            done = step + 1
            every = bool(options.checkpoint_every) and done % options.checkpoint_every == 0
            due = (every or done == stop) and done < total
            epoch, offset = divmod(done, per_epoch)
            position = Position(step=done, epoch=epoch, index=offset * global_batch) if due else None
            if options.session is not None:
                report_step(options.session, record, position, named, optimizer, scheduler, options.rank)
            elif position is not None:
                checkpoint_step(
                    checkpoints, position, named, optimizer, scheduler,
                    options.rank, options.world, options.keep_checkpoints,
                )  # fmt: skip
    if prepared.moe is not None and spec.head_refit is not None and stop == total:
        result.head_refit = refit_heads(
            model, prepared.moe, examples, collator, prepared.refit_targets or {}, spec.head_refit
        )
        if options.progress and options.rank == 0:
            print(f"head refit (loss before -> after): {result.head_refit}", file=sys.stderr)
    result.seconds = time.perf_counter() - began
    return result


def _pair_key(example: Example) -> PairKey:
    return (example.image, example.structure or "") if example.targets else None


def _tracked_forward(
    prepared: StageModel,
    batch: dict,
    spec: StageSpec,
    global_batch: int,
    statistics: RoutingStatistics | None,
    cache: FrozenEncoderCache,
) -> tuple[BatchLoss, int]:
    """`forward_losses`, with routing statistics told which tokens are image tokens in this batch."""
    if statistics is None:
        return forward_losses(prepared, batch, spec, global_batch, cache)
    image_mask = batch["input_ids"] == prepared.model.config.image_token_id
    handles = [
        mlp.register_forward_hook(
            lambda module, args, output, layer=layer: statistics.update(
                layer, module.last_routing.experts, image_mask, module.last_routing.real
            )
        )
        for layer, mlp in prepared.moe.layers.items()
    ]
    try:
        return forward_losses(prepared, batch, spec, global_batch, cache)
    finally:
        for handle in handles:
            handle.remove()
