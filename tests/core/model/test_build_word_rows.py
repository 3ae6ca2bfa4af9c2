"""`MedPLIBConfig.seg_read_build_rows`: the `<SEG>` reader reads the words as the build made them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medplib.core.model import MedPLIBForCausalLM, build_medplib
from medplib.core.model.request_states import request_embeddings
from medplib.loading import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def words(model: MedPLIBForCausalLM, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_off_by_default_and_the_reader_reads_the_trained_rows() -> None:
    torch.manual_seed(0)
    model = build_medplib("tiny")
    assert not hasattr(model, "build_word_rows")
    ids = words(model, " grey white")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(2.0)
    read = request_embeddings(model, ids, torch.ones_like(ids, dtype=torch.bool))
    assert torch.equal(read, model.get_input_embeddings()(ids))


def test_the_reader_reads_the_builds_rows_after_training_moved_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_medplib("tiny", options={"seg_read_build_rows": True})
    embedding = model.get_input_embeddings()
    built = embedding.weight.detach().clone()
    assert torch.equal(model.build_word_rows, built)
    ids = words(model, " grey white")
    request = torch.tensor([[True, False]])
    with torch.no_grad():  # what stage II does to the rows, in one step
        embedding.weight.add_(torch.randn_like(embedding.weight))
    read = request_embeddings(model, ids, request)
    assert torch.equal(read[0, 0], built[ids[0, 0]])
    assert torch.equal(read[0, 1], torch.zeros_like(read[0, 1]))  # not part of the request
    # A token added after the build (a plugin expert's) reads its own row.
    model.resize_token_embeddings(len(built) + 1)
    new = torch.tensor([[len(built)]])
    assert torch.equal(
        request_embeddings(model, new, torch.ones_like(new, dtype=torch.bool))[0, 0],
        model.get_input_embeddings().weight[len(built)],
    )
    # The rows are saved with the model and come back with it.
    model.resize_token_embeddings(len(built))
    model.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    loaded = load_model(str(tmp_path / "model")).model
    assert loaded.config.seg_read_build_rows
    assert torch.equal(loaded.build_word_rows, built)
