"""From MeCoVQA samples to requests: markup becomes control tokens, spaces stay in the text pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medplib.core.model import ControlToken, MedPLIBProcessor, build_medplib
from medplib.trainers.collate import Collator, ExampleStore, caption_examples, split_markup, to_device


def test_markup_becomes_control_tokens_and_spaces_stay_inside_the_text() -> None:
    parts, paths = split_markup("<image>\nWhich structure is marked by <region>masks/a.png</region>?")
    assert parts == ["Which structure is marked by ", ControlToken.REGION, "?"]
    assert paths == ["masks/a.png"]
    parts, paths = split_markup("Sure, it is <SEG><mask>masks/b.png</mask>.")
    assert parts == ["Sure, it is ", ControlToken.SEG, "."]
    assert paths == ["masks/b.png"]
    parts, paths = split_markup("Compare <region>r/1.png</region> with <region>r/2.png</region>")
    assert parts == ["Compare ", ControlToken.REGION, " with ", ControlToken.REGION] and paths == [
        "r/1.png",
        "r/2.png",
    ]


@pytest.fixture(scope="module")
def store(built_dataset: Path) -> ExampleStore:
    return ExampleStore.open(built_dataset, split="train")


def test_examples_of_each_part(store: ExampleStore) -> None:
    examples = store.examples()
    by_task = {task: [e for e in examples if e.task == task] for task in ("vqa", "region_vqa", "grounding")}
    assert all(by_task.values())
    region = by_task["region_vqa"][0]
    assert len(region.request.regions) == 1 and region.request.regions[0].dtype == bool
    assert region.request.regions[0].shape == region.request.pixels.shape[:2]
    grounding = by_task["grounding"][0]
    assert len(grounding.targets) == 1 and grounding.targets[0].shape == grounding.request.pixels.shape[:2]
    assert grounding.reference == "Sure, it is <SEG>."
    assert ControlToken.SEG in grounding.request.turns[-1].assistant
    assert grounding.question_only().turns[-1].assistant is None
    # One pixel array per image file, shared by its samples.
    same_image = [e for e in examples if e.id.split("/")[0] == grounding.id.split("/")[0]]
    assert len({id(e.request.pixels) for e in same_image}) == 1


def test_captions_are_one_per_image_from_its_description(store: ExampleStore) -> None:
    examples = store.examples()
    captions = caption_examples(examples)
    images = {id(e.request.pixels) for e in examples}
    assert len(captions) == len(images)
    assert all(c.task == "caption" and c.request.turns[0].user == "" for c in captions)
    assert all(c.reference.endswith(".") for c in captions)


def test_collated_batches_carry_labels_on_answers_and_mask_targets(store: ExampleStore) -> None:
    torch.manual_seed(0)
    model = build_medplib("tiny")
    collator = Collator(MedPLIBProcessor(model.config, model.tokenizer))
    examples = store.examples()
    chosen = [next(e for e in examples if e.task == task) for task in ("vqa", "region_vqa", "grounding")]
    batch = collator(chosen)
    assert batch["mask_targets"][0] is None and batch["mask_targets"][2].shape[0] == 1
    assert [len(m) for m in batch["region_masks"]] == [0, 1, 0]
    seg = model.config.seg_token_id
    assert (batch["labels"][2] == seg).sum() == 1  # the <SEG> is supervised
    answer = batch["labels"][0][batch["labels"][0] != -100]
    assert model.tokenizer.decode(answer[:-1]).strip() == chosen[0].reference
    generation = collator(chosen, train=False)
    assert generation["attention_mask"][:, -1].all()  # left-padded, ready for generation
    assert not np.any(generation["input_ids"].numpy() == seg)
    # On a device, tensors inside lists go too: the region masks, the grounding targets.
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].is_meta and moved["region_masks"][1].is_meta
    assert moved["mask_targets"][0] is None and moved["mask_targets"][2].is_meta
    assert moved["examples"] == batch["examples"]


def test_held_out_wordings_are_marked(store: ExampleStore, built_dataset: Path) -> None:
    assert not any(e.held_out_wording for e in store.examples())  # training never uses them
    test = ExampleStore.open(built_dataset, split="test").examples()
    assert any(e.held_out_wording for e in test)
