"""save_pretrained / from_pretrained: exact round trips (local, memory://), the tokenizer, bad checkpoints."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from medplib.core.errors import CheckpointError
from medplib.core.model import (
    ControlToken,
    MedPLIBForCausalLM,
    MedPLIBProcessor,
    Request,
    Turn,
    build_medplib,
)
from medplib.core.model.tokenizer import control_token_ids


@pytest.fixture
def batch(processor: MedPLIBProcessor, image, box_mask) -> dict:
    turns = [Turn(["What is", ControlToken.REGION, "?"], ["It is", ControlToken.SEG, "."])]
    return processor([Request(image, turns, [box_mask])])


def _architecture(config) -> dict:
    """A config's fields minus what loading records about the load itself (path, dtype, class names)."""
    bookkeeping = {"_name_or_path", "dtype", "architectures", "transformers_version"}
    fields = config.to_dict()
    return {
        k: {kk: vv for kk, vv in v.items() if kk not in bookkeeping} if isinstance(v, dict) else v
        for k, v in fields.items()
        if k not in bookkeeping
    }


def _assert_same_model(a: MedPLIBForCausalLM, b: MedPLIBForCausalLM, batch: dict) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert _architecture(b.config) == _architecture(a.config)
    assert b.tokenizer.get_vocab() == a.tokenizer.get_vocab()
    assert control_token_ids(b.tokenizer) == b.config.control_token_ids
    with torch.no_grad():
        out_a, out_b = a.eval()(**batch), b.eval()(**batch)
    assert torch.equal(out_a.logits, out_b.logits)
    assert torch.equal(out_a.pred_masks[0].logits, out_b.pred_masks[0].logits)


def test_round_trip_local_folder_is_exact(
    tiny_model: MedPLIBForCausalLM, batch: dict, tmp_path: Path
) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    _assert_same_model(tiny_model, MedPLIBForCausalLM.from_pretrained(tmp_path / "ckpt"), batch)


def test_round_trip_keeps_the_image_feature_statistics(batch: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_medplib("tiny", options={"image_feature_standardize": True}).eval()
    model.projector.standardize.running_mean.uniform_(-2, 2)
    model.projector.standardize.running_var.uniform_(0.5, 3)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MedPLIBForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.image_feature_standardize
    _assert_same_model(model, loaded, batch)


def test_round_trip_memory_uri_is_exact(tiny_model: MedPLIBForCausalLM, batch: dict) -> None:
    uri = f"memory://medplib-tests/{uuid.uuid4().hex}/ckpt"
    try:
        tiny_model.save_pretrained(uri)
        _assert_same_model(tiny_model, MedPLIBForCausalLM.from_pretrained(uri), batch)
    finally:
        fsspec.filesystem("memory").rm(uri.removeprefix("memory://"), recursive=True)


def test_auto_model_loads_the_checkpoint(tiny_model: MedPLIBForCausalLM, batch: dict, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    tiny_model.save_pretrained(tmp_path)
    for auto in (AutoModel, AutoModelForCausalLM):
        _assert_same_model(tiny_model, auto.from_pretrained(tmp_path), batch)


def test_missing_and_unexpected_keys_are_listed(tiny_model: MedPLIBForCausalLM, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["seg_head.fc1.weight"], state["sam.mask_decoder.iou_token.weight"]
    state["leftover.from.another.model"] = torch.zeros(2)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        MedPLIBForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert "missing keys (2)" in message and "unexpected keys (1)" in message
    for key in ("seg_head.fc1.weight", "sam.mask_decoder.iou_token.weight", "leftover.from.another.model"):
        assert key in message


def test_mis_shaped_weights_are_refused(tiny_model: MedPLIBForCausalLM, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["projector.linear_1.weight"] = torch.zeros(3, 3)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"projector\.linear_1\.weight"):
        MedPLIBForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_corrupt_checkpoints_raise_checkpoint_error(
    tiny_model: MedPLIBForCausalLM, tmp_path: Path, damage
) -> None:
    tiny_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        weights.unlink()
    with pytest.raises(CheckpointError):
        MedPLIBForCausalLM.from_pretrained(tmp_path)


def test_a_checkpoint_needs_its_tokenizer(tiny_model: MedPLIBForCausalLM, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        MedPLIBForCausalLM.from_pretrained(tmp_path)
    tiny_model.tokenizer = None
    with pytest.raises(CheckpointError, match="no tokenizer"):
        tiny_model.save_pretrained(tmp_path / "again")


def test_no_checkpoint_there(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        MedPLIBForCausalLM.from_pretrained(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        MedPLIBForCausalLM.from_pretrained(f"memory://medplib-tests/{uuid.uuid4().hex}")
