"""Per-group learning rates (`StageSpec.lr_scales`): which parameters get which rate, and a resume
that puts every parameter's AdamW state back into its own group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import get_linear_schedule_with_warmup

from medplib.core.errors import CheckpointError
from medplib.core.model import build_medplib
from medplib.trainers.checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    partial_folder,
    save_checkpoint,
    write_rng,
)
from medplib.trainers.loop import optimizer_groups
from medplib.trainers.stage_folder import StageStart, prepare
from medplib.trainers.stages import stage_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_scaled_group_trains_at_its_multiple_and_the_stage_rate_comes_first() -> None:
    spec = stage_spec("4", "tiny").model_copy(update={"lr_scales": {"router": 10.0, "lm_head": 0.5}})
    prepared = prepare(spec, StageStart("tiny", build_medplib("tiny")))
    named, groups = optimizer_groups(prepared.trainable_parameters(), spec)
    lr = spec.optim.lr
    assert [group["lr"] for group in groups] == pytest.approx([lr, 10 * lr, 0.5 * lr])
    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    for name, parameter in named:
        expected = 10 * lr if ".mlp.router." in name else 0.5 * lr if "lm_head" in name else lr
        assert rate[id(parameter)] == pytest.approx(expected), name
    # The parameters are listed group by group: the order checkpoints rely on.
    assert [id(p) for _, p in named] == [id(p) for group in groups for p in group["params"]]
    assert len(named) == len(prepared.trainable_parameters())


def test_without_scales_one_group_holds_every_parameter_in_its_order() -> None:
    spec = stage_spec("4", "tiny")
    prepared = prepare(spec, StageStart("tiny", build_medplib("tiny")))
    trainable = prepared.trainable_parameters()
    named, groups = optimizer_groups(trainable, spec)
    assert [n for n, _ in named] == [n for n, _ in trainable] and len(groups) == 1


def test_unknown_or_non_positive_scales_are_refused() -> None:
    spec = stage_spec("4", "tiny")
    with pytest.raises(ValidationError, match="unknown groups \\['routr'\\]"):
        spec.model_validate(spec.model_dump() | {"lr_scales": {"routr": 10.0}})
    with pytest.raises(ValidationError, match="must be positive"):
        spec.model_validate(spec.model_dump() | {"lr_scales": {"router": 0.0}})


def _two_group_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 4))
    named = [(f"slow.{n}", p) for n, p in model[0].named_parameters()]
    named += [(f"fast.{n}", p) for n, p in model[1].named_parameters()]
    groups = [
        {"params": [p for _, p in named[:2]], "lr": 0.1},
        {"params": [p for _, p in named[2:]], "lr": 1.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    return model, named, optimizer, get_linear_schedule_with_warmup(optimizer, 1, 10)


def test_a_resume_gives_each_parameter_its_own_state_and_rate(tmp_path: Path) -> None:
    model, named, optimizer, scheduler = _two_group_state(0)
    for _ in range(3):
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    write_rng(partial_folder(tmp_path, 3), rank=0)
    save_checkpoint(tmp_path, Position(3, 0, 3), named, optimizer, scheduler)
    _, restored, optimizer2, scheduler2 = _two_group_state(1)
    load_checkpoint(latest_checkpoint(tmp_path), restored, optimizer2, scheduler2)
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert scheduler2.get_last_lr()[1] == pytest.approx(10 * scheduler2.get_last_lr()[0])
    for (_, before), (_, after) in zip(named, restored, strict=True):
        assert torch.equal(before, after)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[before][key], optimizer2.state[after][key])
    # A stage with another number of rate groups cannot take this checkpoint.
    single = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    optimizer3 = torch.optim.AdamW([p for _, p in single], lr=0.1)
    with pytest.raises(CheckpointError, match="2 learning-rate groups, this stage 1"):
        load_checkpoint(
            latest_checkpoint(tmp_path),
            single,
            optimizer3,
            get_linear_schedule_with_warmup(optimizer3, 1, 10),
        )
