"""The training loop: it learns, its schedule and sharding, its checkpoints, the frozen-encoder cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from medplib.core.model import MedPLIBProcessor, build_medplib
from medplib.trainers.checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    partial_folder,
    save_checkpoint,
    write_rng,
)
from medplib.trainers.collate import LOSS_ONLY_KEYS, Collator, ExampleStore
from medplib.trainers.encoder_cache import FrozenEncoderCache
from medplib.trainers.loop import LoopOptions, forward_losses, train
from medplib.trainers.metrics_log import LOG_FILE, step_record
from medplib.trainers.sampling import step_samples
from medplib.trainers.stage_folder import StageStart, prepare
from medplib.trainers.stages import stage_spec
from medplib.trainers.train import stage_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def examples(built_dataset: Path):
    return ExampleStore.open(built_dataset, split="train").examples()


def test_every_step_takes_a_seeded_global_batch_and_workers_share_it_out() -> None:
    first = step_samples(0, 20, global_batch=8, per_epoch=3, seed=1)
    assert np.array_equal(first, step_samples(0, 20, global_batch=8, per_epoch=3, seed=1))
    epoch = np.concatenate([step_samples(s, 20, 8, 3, seed=1) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(20))  # an epoch sees each sample once
    assert not np.array_equal(step_samples(3, 20, 8, 3, seed=1), first)  # the next epoch reshuffles
    shares = [first[rank::2] for rank in range(2)]
    assert sorted(np.concatenate(shares).tolist()) == sorted(first.tolist())


def test_a_short_run_lowers_the_loss_and_logs_every_step(examples, tmp_path: Path) -> None:
    spec = stage_spec("4", "tiny")
    spec = spec.model_copy(update={"optim": spec.optim.model_copy(update={"lr": 2e-3, "batch_size": 4})})
    chosen = stage_examples(spec, examples)
    chosen = [e for e in chosen if e.task == "grounding"][:2] + [e for e in chosen if e.task == "vqa"][:2]
    torch.manual_seed(0)
    prepared = prepare(spec, StageStart("tiny", build_medplib("tiny")))
    collator = Collator(MedPLIBProcessor(prepared.model.config, prepared.model.tokenizer))
    result = train(prepared, chosen, spec, collator, LoopOptions(out=tmp_path, steps=12, progress=False))
    assert np.mean(result.losses[-3:]) < 0.7 * np.mean(result.losses[:3])
    records = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    # Warm-up from 0 to the peak (one step here), then linear decay towards 0 at step 12.
    rates = [r["lr"] for r in records]
    assert rates[0] == 0 and rates[1] == pytest.approx(2e-3)
    assert np.diff(rates[1:]) == pytest.approx(np.full(10, -2e-3 / 11))
    assert {"loss", "ce", "bce", "dice", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(
        records[-1]
    )
    routing = records[-1]["routing"]
    assert routing["experts"] == ["vision_language", "pixel_grounding"]
    assert all(sum(layer["all"]) == pytest.approx(1.0) for layer in routing["layers"].values())


def test_cached_frozen_encoders_give_the_same_losses(examples) -> None:
    torch.manual_seed(0)
    spec = stage_spec("4", "paper")  # CLIP and SAM's encoder frozen: both cached
    prepared = prepare(spec, StageStart("tiny", build_medplib("tiny")))
    collator = Collator(MedPLIBProcessor(prepared.model.config, prepared.model.tokenizer))
    chosen = [e for e in examples if e.task == "grounding"][:2] + [e for e in examples if e.task == "vqa"][:1]
    batch = collator(chosen)
    cache = FrozenEncoderCache(prepared.model, clip=True, sam=True)
    assert cache.fill({id(e.request.pixels): e.request.pixels for e in chosen}.values()) >= 1
    prepared.model.eval()  # no LoRA dropout: both passes compute the same function
    with torch.no_grad():
        plain, _ = forward_losses(prepared, batch, spec, 3)
        cached, _ = forward_losses(prepared, batch, spec, 3, cache)
    assert cached.total.item() == pytest.approx(plain.total.item(), rel=1e-4)
    assert cached.parts == pytest.approx(plain.parts, rel=1e-4)
    assert len(cache.clip.table) == len(cache.sam.table) == len({id(e.request.pixels) for e in chosen})


@pytest.mark.parametrize("stage", ["3", "4"])
def test_the_loops_loss_is_the_models_own(examples, stage: str) -> None:
    """`model(**batch).loss`, all positions' logits and no cache, is what the loop trains (no router or
    contrast term in the paper schedule): CE, BCE, Dice (and focal in III) over the batch."""
    torch.manual_seed(0)
    spec = stage_spec(stage, "paper")
    prepared = prepare(spec, StageStart("tiny", build_medplib("tiny")))
    collator = Collator(MedPLIBProcessor(prepared.model.config, prepared.model.tokenizer))
    chosen = [e for e in examples if e.task == "grounding"][:2] + [e for e in examples if e.task == "vqa"][:1]
    batch = collator(chosen)
    prepared.model.eval()  # no LoRA dropout: both passes compute the same function
    with torch.no_grad():
        trained, _ = forward_losses(prepared, batch, spec, len(chosen))
        inputs = {key: value for key, value in batch.items() if key not in LOSS_ONLY_KEYS}
        out = prepared.model(**inputs, loss_weights=spec.loss)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert trained.total.item() == pytest.approx(out.loss.item(), abs=1e-6)
    masks = {"bce", "dice"} | ({"focal"} if spec.loss.focal else set())
    assert set(out.loss_parts) == {"ce"} | masks and set(trained.parts) == set(out.loss_parts)
    assert trained.counts == {"ce": 3} | dict.fromkeys(masks, 2)


def _state(seed: int) -> tuple[list, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(3, 2)
    named = list(layer.named_parameters())
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, betas=(0.9, 0.95))
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, 10)
    return named, optimizer, scheduler


def test_checkpoint_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path: Path) -> None:
    named, optimizer, scheduler = _state(0)
    for _ in range(3):
        sum(p.sum() for _, p in named).backward()
        optimizer.step()
        scheduler.step()
    write_rng(partial_folder(tmp_path, 3), rank=0)
    save_checkpoint(tmp_path, Position(3, 1, 4), named, optimizer, scheduler)
    expected_draw = torch.rand(3)
    restored, optimizer2, scheduler2 = _state(1)
    torch.rand(5)  # move the generator on: the checkpoint must restore it
    position = load_checkpoint(latest_checkpoint(tmp_path), restored, optimizer2, scheduler2)
    assert position == Position(3, 1, 4)
    for (_, a), (_, b) in zip(named, restored, strict=True):
        assert torch.equal(a, b)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    state, state2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert all(torch.equal(state[0][k], state2[0][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert torch.equal(torch.rand(3), expected_draw)


def test_a_checkpoint_killed_mid_write_is_never_picked(tmp_path: Path) -> None:
    named, optimizer, scheduler = _state(0)
    write_rng(partial_folder(tmp_path, 2), rank=0)
    save_checkpoint(tmp_path, Position(2, 0, 16), named, optimizer, scheduler)
    # A run killed while writing step 4 leaves only its hidden partial folder behind.
    partial = partial_folder(tmp_path, 4)
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path).name == "step-000002"
    # Finishing later publishes it whole, and only the newest `keep` survive.
    for step in (4, 6):
        write_rng(partial_folder(tmp_path, step), rank=0)
        save_checkpoint(tmp_path, Position(step, 0, 8 * step), named, optimizer, scheduler, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006"]


def test_workers_with_different_loss_parts_send_one_log_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    # One worker's share has only VQA samples, the other's has masks: their all-reduced vectors must
    # line up (a mismatch aborts gloo), and the record is the global batch's.
    import medplib.trainers.metrics_log as metrics_log

    vqa = {"loss": [3.0, 0.0], "ce": [6.0, 2.0]}
    grounding = {"loss": [4.0, 0.0], "ce": [2.0, 1.0], "bce": [0.5, 1.0], "dice": [0.25, 1.0]}
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(metrics_log, "sum_over_workers", lambda values, world: sent.append(values) or values)
    step_record(vqa, 10, world=2)
    step_record(grounding, 5, world=2)
    assert sent[0].shape == sent[1].shape

    monkeypatch.setattr(metrics_log, "sum_over_workers", lambda values, world: sent[0] + sent[1])
    record = step_record(vqa, 10, world=2)
    assert record == pytest.approx({"loss": 7.0, "tokens": 15.0, "ce": 8.0 / 3, "bce": 0.5, "dice": 0.25})
