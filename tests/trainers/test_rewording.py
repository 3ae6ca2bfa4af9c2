"""Rewording augmentation (`trainers/rewording.py`): a grounding request or presence question asked in an
extra training wording keeps its image, its regions and its answer; the extra wordings never borrow a
held-out test wording or its words; which samples a step rewords is a function of the seed and the step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medplib.trainers.collate import Collator, ExampleStore
from medplib.trainers.data.templates import KINDS, STRUCTURES
from medplib.trainers.rewording import EXTRA_WORDINGS, rewordable, reworded, step_wordings
from medplib.trainers.stages import TINY_REWORD, stage_spec
from medplib.trainers.train import StageRun, run_stage


@pytest.fixture(scope="module")
def examples(built_dataset: Path):
    return ExampleStore.open(built_dataset, split="train").examples()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_extra_wordings_borrow_no_held_out_wording_nor_a_word_only_the_held_out_ones_use() -> None:
    seen = set().union(*(_words(t) for kind in KINDS.values() for t in kind.train))
    held_only = set().union(*(_words(t) for kind in KINDS.values() for t in kind.test_only)) - seen
    assert {"highlight", "provide", "could", "would", "say"} <= held_only
    for kind, wordings in EXTRA_WORDINGS.items():
        assert len(set(wordings)) == len(wordings) >= 10
        for wording in wordings:
            assert wording not in KINDS[kind].templates
            assert not _words(wording) & held_only, wording
            # A wording names its structure once, in the form its kind's templates use.
            assert wording.count("{") == 1 and ("{segmented}" if kind == "segment" else "{asked}") in wording


def test_a_reworded_request_keeps_its_image_target_and_answer(examples) -> None:
    request = next(e for e in examples if e.kind == "segment" and e.structure == "grey matter")
    again = reworded(request, 3)
    assert again.request.turns[-1].user == [EXTRA_WORDINGS["segment"][3].format(segmented="the grey matter")]
    assert again.request.turns[-1].assistant == request.request.turns[-1].assistant
    assert again.request.pixels is request.request.pixels
    assert all(np.array_equal(a, b) for a, b in zip(again.targets, request.targets, strict=True))
    assert (again.image, again.reference, again.structure) == (
        request.image,
        request.reference,
        request.structure,
    )
    assert again.id != request.id
    question = next(e for e in examples if e.kind == "presence" and e.structure == "white matter")
    assert reworded(question, 0).request.turns[-1].user == ["Can you see white matter in this picture?"]
    assert reworded(question, 0).reference == question.reference


def test_only_grounding_requests_and_presence_questions_are_reworded(examples) -> None:
    other = next(e for e in examples if e.kind == "describe")
    assert not rewordable(other)
    with pytest.raises(ValueError, match="segment, presence"):
        reworded(other, 0)


def test_a_step_rewords_by_its_seed_and_step(examples) -> None:
    chosen = list(range(len(examples)))
    rewordables = {i for i in chosen if rewordable(examples[i])}
    assert step_wordings(examples, chosen, 0.0, 0, 5) == {}
    assert set(step_wordings(examples, chosen, 1.0, 0, 5)) == rewordables
    half = step_wordings(examples, chosen, 0.5, 0, 5)
    assert half == step_wordings(examples, chosen, 0.5, 0, 5)  # a resumed step rewords the same
    assert half != step_wordings(examples, chosen, 0.5, 0, 6)
    assert set(half) <= rewordables and 0.3 < len(half) / len(rewordables) < 0.7
    assert len(set(half.values())) > 5  # the wordings are spread, not one


def test_the_tiny_recipe_rewords_the_stages_that_train_on_either_kind() -> None:
    assert all(stage_spec(stage).reword == TINY_REWORD == 0.5 for stage in ("2", "3", "4", "joint"))
    assert stage_spec("1").reword == 0.0
    assert all(stage_spec(stage, "paper").reword == 0.0 for stage in ("2", "3", "4"))


def test_a_stage_trains_on_the_wordings_its_steps_drew(
    built_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    collate = Collator.__call__

    def spy(self, examples, *, train: bool = True):
        if train:
            asked.extend(e.request.turns[-1].user[0] for e in examples)
        return collate(self, examples, train=train)

    monkeypatch.setattr(Collator, "__call__", spy)
    run = StageRun(
        data=str(built_dataset),
        out=str(tmp_path / "stage3"),
        stage="3",
        model="tiny",
        steps=2,
        batch_size=4,
        progress=False,
        restarts={"candidates": 1},
    )
    run_stage(run)
    extra = {w.format(segmented=s.segmented) for w in EXTRA_WORDINGS["segment"] for s in STRUCTURES.values()}
    assert 0 < sum(question in extra for question in asked) < len(asked)
