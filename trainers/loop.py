"""The one training loop every stage runs: AdamW, warm-up then linear decay, accumulation, clipping.

Per optimizer step the loop takes the next *global* batch of the epoch's seeded permutation, gives
each worker its share (`rank::world`) in micro-batches, backpropagates each micro-batch's loss
(normalised by the global batch, see `losses.py`), sums the gradients over workers, clips the global
norm and steps. The data position is a pure function of the step, so a checkpoint's step says where
the data resumes. Logits are computed only where an answer token is predicted, since the LM head
over every image and prompt position would cost a third of a tiny model's step for nothing.

On CUDA the forward runs under bf16 autocast (weights and optimizer stay fp32); on CPU in fp32.
Each step appends one JSON line to the metrics log: loss parts, learning rate, gradient norm,
throughput and, in stage IV, the routing shares per layer.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from medplib.router import MixtureOfExperts
from medplib.router.statistics import RoutingStatistics
from medplib.trainers.checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    partial_folder,
    save_checkpoint,
    write_rng,
)
from medplib.trainers.collate import Collator, Example
from medplib.trainers.encoder_cache import FrozenEncoderCache
from medplib.trainers.losses import (
    BatchLoss,
    add_load_balancing,
    answer_cross_entropy,
    combine_losses,
    pair_contrast,
    routing_loss,
    supervised_positions,
)
from medplib.trainers.prompt_contrast import prompt_terms
from medplib.trainers.sampling import PairKey, paired_order
from medplib.trainers.stage_folder import Prepared
from medplib.trainers.stages import StageSpec

LOG_FILE = "metrics.jsonl"


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


@dataclass
class LoopResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, this run's (resumed runs: from there)
    seconds: float = 0.0


def schedule_lengths(spec: StageSpec, num_examples: int, world: int) -> tuple[int, int, int]:
    """(global batch, steps per epoch, warm-up steps) of a stage over `num_examples`."""
    global_batch = spec.optim.batch_size * spec.optim.grad_accum * world
    per_epoch = math.ceil(num_examples / global_batch)
    warmup = max(1, round(spec.optim.warmup_fraction * per_epoch))
    return global_batch, per_epoch, warmup


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def step_samples(
    step: int,
    num_examples: int,
    global_batch: int,
    per_epoch: int,
    seed: int,
    pair_keys: Sequence[PairKey] | None = None,
    preferred_pairs: Sequence[tuple[str, str]] = (),
) -> np.ndarray:
    """Indices of the global batch of optimizer step `step`; with `pair_keys`, requests about one
    image come in pairs (`sampling.paired_order`)."""
    epoch, offset = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    order = (
        rng.permutation(num_examples) if pair_keys is None else paired_order(pair_keys, rng, preferred_pairs)
    )
    return order[offset * global_batch : (offset + 1) * global_batch]


def forward_losses(
    prepared: Prepared,
    batch: dict,
    spec: StageSpec,
    global_batch: int,
    cache: FrozenEncoderCache | None = None,
) -> tuple[BatchLoss, int]:
    """One micro-batch through the model: its loss (normalised by the global batch) and token count.

    The model's own pieces in the order `forward` runs them, with two differences: frozen encoders'
    outputs come from `cache`, and the LM head runs only where an answer token is predicted.
    """
    model = prepared.model
    targets = batch["mask_targets"]
    features = cache.clip_features(batch["pixel_values"]) if cache is not None else None
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["region_masks"], features)
    with (
        prepared.moe.padding(batch["attention_mask"])
        if prepared.moe is not None
        else contextlib.nullcontext()
    ):
        hidden, _ = model.run_language_model(embeds, batch["attention_mask"])
    rows, positions, labels = supervised_positions(batch["labels"])
    logits = model.language_model.lm_head(hidden[rows, positions])
    ce = answer_cross_entropy(logits, labels, rows, len(hidden))
    mask_logits: list[torch.Tensor | None] = [None] * len(hidden)
    terms = {}
    if any(t is not None for t in targets):
        seg_hidden = model.seg_hidden_states(batch["input_ids"], hidden, batch["attention_mask"])
        sam_pixels = batch["sam_pixel_values"]
        predictions = model.predict_masks(
            seg_hidden,
            sam_pixels,
            batch["sam_input_sizes"],
            batch["original_sizes"],
            image_embeddings=cache.sam_embeddings(sam_pixels) if cache is not None else None,
        )
        mask_logits = [p.logits if t is not None else None for p, t in zip(predictions, targets, strict=True)]
        terms = prompt_terms(model, seg_hidden, batch["pair_keys"], spec)
    routing = None
    if prepared.moe is not None and spec.routing_weight > 0:
        routing = routing_loss(
            list(prepared.moe.router_logits().values()),
            expert_targets(prepared.moe, batch["samples"]).to(hidden.device),
            answer_side(batch["input_ids"], batch["attention_mask"], model.config.im_end_token_id),
        )
    contrast = None
    if spec.contrast is not None and spec.contrast.weight > 0:
        contrast = pair_contrast(
            mask_logits, targets, batch["pair_keys"], spec.contrast.pairs, spec.contrast.margin
        )
    loss = combine_losses(
        ce,
        mask_logits,
        targets,
        spec.loss,
        global_batch,
        routing,
        spec.routing_weight,
        contrast,
        spec.contrast.weight if spec.contrast is not None else 0.0,
        terms,
    )
    if prepared.moe is not None and spec.router.load_balancing_weight > 0:
        loss = add_load_balancing(loss, prepared.moe.load_balancing_loss(), len(hidden), global_batch)
    return loss, int(batch["attention_mask"].sum())


def expert_targets(moe: MixtureOfExperts, samples: Sequence[tuple]) -> torch.Tensor:
    """Per sample, the first expert whose `trains_on` accepts it (-1 if none does)."""
    found = [
        next((k for k, spec in enumerate(moe.experts) if spec.trains_on.accepts(*sample)), -1)
        for sample in samples
    ]
    return torch.tensor(found)


def answer_side(input_ids: torch.Tensor, attention_mask: torch.Tensor, im_end_id: int) -> torch.Tensor:
    """(B, T) the real tokens after the image: the question and the answer. The system prompt and the
    image come first and do not depend on the question, so no router could tell tasks apart there."""
    after_image = (input_ids == im_end_id).long().cumsum(dim=1) > 0
    return after_image & (input_ids != im_end_id) & attention_mask.bool()


def _to_device(batch: dict, device: torch.device) -> dict:
    def move(value):
        if torch.is_tensor(value):
            return value.to(device)
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {key: move(value) for key, value in batch.items()}


class MetricsLog:
    """The JSONL metrics log; a resumed run first drops the lines after its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if json.loads(line).get("step", 0) <= resume_step
            ]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def _progress(total: int, initial: int, enabled: bool, title: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc=title, unit="step", dynamic_ncols=True
    )


def _sum_over_workers(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _sync_gradients(parameters: Sequence[torch.nn.Parameter], world: int) -> None:
    """Sum gradients over workers in one flat all-reduce; a parameter no micro-batch reached counts 0."""
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        flat = torch.cat([p.grad.flatten() for p in parameters])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in parameters:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def train(
    prepared: Prepared, examples: Sequence[Example], spec: StageSpec, collator: Collator, options: LoopOptions
) -> LoopResult:
    """Train `prepared` on `examples` as `spec` says; checkpoints and log under `options.out`."""
    model = prepared.model.train()
    device = next(model.parameters()).device
    named = prepared.trainable_parameters()
    parameters = [p for _, p in named]
    opt = spec.optim
    optimizer = torch.optim.AdamW(
        parameters, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps
    )
    global_batch, per_epoch, warmup = schedule_lengths(spec, len(examples), options.world)
    total = options.steps or max(1, round(opt.epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
    if options.world > 1:  # every worker builds the same model; broadcasting makes sure of it
        for p in parameters:
            dist.broadcast(p.data, src=0)
    torch.manual_seed(options.seed * 7919 + options.rank + 1)  # each worker's own dropout stream
    checkpoints = options.out / "checkpoints"
    start = 0
    found = latest_checkpoint(checkpoints) if options.resume else None
    if found is not None:
        start = load_checkpoint(found, named, optimizer, scheduler, options.rank).step
    log = MetricsLog(options.out / LOG_FILE, options.rank == 0, start if options.resume else None)
    grounds = any(e.targets for e in examples)  # SAM runs only for samples with a mask
    cache = FrozenEncoderCache(model, clip=spec.caches_clip, sam=spec.caches_sam and grounds)
    if cache.clip is not None or cache.sam is not None:
        cache.fill({id(e.request.pixels): e.request.pixels for e in examples}.values())
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    pair_keys = [_pair_key(e) for e in examples] if spec.same_image_pairs else None
    preferred = spec.contrast.pairs if spec.contrast is not None else ()
    result = LoopResult(steps=total)
    began = time.perf_counter()
    bar = _progress(total, start, options.progress and options.rank == 0, spec.title)
    with bar:
        for step in range(start, total):
            tick = time.perf_counter()
            chosen = step_samples(
                step, len(examples), global_batch, per_epoch, options.seed, pair_keys, preferred
            )
            mine = chosen[options.rank :: options.world]
            micro = [mine[i : i + opt.batch_size] for i in range(0, len(mine), opt.batch_size)]
            # Per part (sum, count), summed over workers so the log shows the global batch's values.
            tally: dict[str, list[float]] = {}
            tokens = 0
            statistics = RoutingStatistics(prepared.moe.expert_names) if prepared.moe is not None else None
            for indices in micro:
                batch = _to_device(collator([examples[i] for i in indices]), device)
                with autocast:
                    loss, count = _tracked_forward(prepared, batch, spec, len(chosen), statistics, cache)
                loss.total.backward()
                tokens += count
                tally.setdefault("loss", [0.0, 0.0])[0] += float(loss.total.detach())
                for name, value in loss.parts.items():
                    entry = tally.setdefault(name, [0.0, 0.0])
                    entry[0] += value * loss.counts[name]
                    entry[1] += loss.counts[name]
            _sync_gradients(parameters, options.world)
            norm = torch.nn.utils.clip_grad_norm_(parameters, opt.grad_clip or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = _step_record(tally, tokens, options.world)
            record |= {"stage": spec.key, "step": step + 1, "epoch": (step + 1) / per_epoch, "lr": lr}
            record |= {"grad_norm": float(norm), "samples_per_s": len(chosen) / (time.perf_counter() - tick)}
            record["tokens_per_s"] = record.pop("tokens") / (time.perf_counter() - tick)
            if statistics is not None:
                shares = statistics.as_dict()
                layers = {layer: entry["shares"] for layer, entry in shares["layers"].items()}
                record["routing"] = {"experts": shares["experts"], "layers": layers}
            log.write(record)
            result.losses.append(record["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
            done = step + 1
            if options.checkpoint_every and done % options.checkpoint_every == 0 and done < total:
                _checkpoint(checkpoints, done, per_epoch, global_batch, named, optimizer, scheduler, options)
    result.seconds = time.perf_counter() - began
    return result


def _pair_key(example: Example) -> PairKey:
    return (example.image, example.structure or "") if example.targets else None


def _tracked_forward(
    prepared: Prepared,
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


def _step_record(tally: dict[str, list[float]], tokens: int, world: int) -> dict:
    names = list(tally)
    values = torch.tensor([v for name in names for v in tally[name]] + [tokens], dtype=torch.float64)
    values = _sum_over_workers(values, world).tolist()
    record: dict[str, float] = {"loss": values[0], "tokens": values[-1]}
    for i, name in enumerate(names[1:], start=1):
        total, count = values[2 * i], values[2 * i + 1]
        if count:
            record[name] = total / count
    return record


def _checkpoint(
    root: Path,
    done: int,
    per_epoch: int,
    global_batch: int,
    named: list,
    optimizer: torch.optim.Optimizer,
    scheduler,
    options: LoopOptions,
) -> None:
    epoch, offset = divmod(done, per_epoch)
    position = Position(step=done, epoch=epoch, index=offset * global_batch)
    write_rng(partial_folder(root, done), options.rank)
    if options.world > 1:
        dist.barrier()  # every worker's generator state is in the folder before it is published
    if options.rank == 0:
        save_checkpoint(root, position, named, optimizer, scheduler, keep=options.keep_checkpoints)
    if options.world > 1:
        dist.barrier()
