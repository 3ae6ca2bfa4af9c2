"""MedPLIB's released format converted and run, against MedPLIB's own recorded outputs.

The fixture (tests/fixtures/medplib-original) is a scaled MedPLIB saved and run by MedPLIB's original
code; see its README. Tolerances: logits and hidden states 1e-5, `<SEG>` prompt and masks 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from segment_anything.modeling.image_encoder import Block

import medplib
from medplib.core.errors import CheckpointError
from medplib.core.io import load_image
from medplib.core.model.compat import model_input_ids
from medplib.core.model.medplib_release import ReleaseCheckpoint
from medplib.core.prompts import model_request
from medplib.core.queries import Decoding, Query
from medplib.core.regions import BoxPrompt
from medplib.loading import model_info
from medplib.router import dense
from medplib.router.convert_medplib import convert_medplib
from medplib.router.dense import MedPLIBWithRoutedExperts
from medplib.router.routed_mlp import Routing

FIXTURE = Path(__file__).parents[1] / "fixtures" / "medplib-original"
CHECKPOINT, TOKENIZER = FIXTURE / "checkpoint", FIXTURE / "tokenizer"
# MedPLIB's SAM is hard-coded (not in config.json); the fixture scaled its mask decoder to 2 heads.
OPTIONS = {"tokenizer": TOKENIZER, "sam_decoder_heads": 2, "vision_tower": FIXTURE / "clip"}


def convert(source: Path, out: Path, **options):
    return convert_medplib(source, out, **(OPTIONS | options))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("converted") / "medplib-7b-2e"
    return out, convert(CHECKPOINT, out)


@pytest.fixture(scope="module")
def model(converted) -> MedPLIBWithRoutedExperts:
    return MedPLIBWithRoutedExperts.from_pretrained(converted[0]).eval()


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference-top1.safetensors")


def model_ids(model, ids: torch.Tensor) -> torch.Tensor:
    config = model.config
    spelled = model_input_ids(
        ids[0].tolist(),
        image_token_id=config.image_token_id,
        region_token_id=config.region_token_id,
        num_image_tokens=config.num_image_tokens,
    )
    return torch.tensor([spelled])


@torch.no_grad()
def run(model, ref) -> dict[str, torch.Tensor]:
    ids = model_ids(model, ref["input_ids"])
    out = model(
        ids, torch.ones_like(ids), pixel_values=ref["images_clip"], region_masks=[ref["region_mask"][None]]
    )
    prompt = model.seg_head(out.seg_hidden_states[0])
    image_emb = model.sam_image_embeddings(ref["sam_image"])
    low_res, iou = model.sam.decode(image_emb, prompt)
    vocab = ref["logits"].shape[-1]  # MedPLIB's; the converted model adds two placeholder rows after it
    return {
        "logits": out.logits[..., :vocab],
        "last_hidden": out.last_hidden_state,
        "seg_prompt": prompt,
        "image_emb": image_emb,
        "low_res": low_res[:, None],
        "iou": iou[:, None],
        "mask_50": model.sam.postprocess(low_res, (64, 64), (50, 50))[:, None],
    }


TOLERANCES = {
    "logits": 1e-5,
    "last_hidden": 1e-5,
    "seg_prompt": 1e-4,
    "image_emb": 1e-4,
    "low_res": 1e-4,
    "iou": 1e-4,
    "mask_50": 1e-4,
}


def max_differences(model, ref) -> dict[str, float]:
    outputs = run(model, ref)
    return {name: (outputs[name] - ref[name]).abs().max().item() for name in TOLERANCES}


# ---- the conversion ------------------------------------------------------------------------------------


def test_every_source_key_is_used_exactly_once(converted):
    out, report = converted
    source_keys = ReleaseCheckpoint.open(CHECKPOINT).keys
    assert sorted(report.mapping) == sorted(source_keys) and len(source_keys) == 282
    targets = [target for target in report.mapping.values() if target is not None]
    assert len(targets) == len(set(targets)) == report.written_keys == 280
    assert (
        all(key.endswith("rotary_emb.inv_freq") for key in report.dropped_keys)
        and len(report.dropped_keys) == 2
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(targets)
    config = json.loads((out / "config.json").read_text())
    assert config["compat"] == "medplib"
    assert config["routed_experts"] | {"names": None} == {
        "kind": "dense",
        "layers": [0, 1],
        "num_experts": 2,
        "top_k": 1,
        "names": None,
        "eval_capacity_factor": 2.0,
    }
    assert config["sam_config"]["adapter_hidden_dim"] == 12
    assert config["sam_config"]["global_attn_indexes"] == [1] and config["sam_config"]["window_size"] == 2


def test_tensors_are_copied_unchanged(converted):
    out, report = converted
    source = {}
    for _, state in ReleaseCheckpoint.open(CHECKPOINT).iter_shards():
        source.update(state)
    written = {}
    for shard in report.shards:
        written.update(load_file(out / shard))
    for key, target in report.mapping.items():
        if target is not None:
            value = written[target][: len(source[key])]  # embeddings grow by the placeholder rows
            assert torch.equal(value, source[key]), key


# ---- the converted model against MedPLIB's outputs --------------------------------------------------------


def test_outputs_equal_medplibs(model, ref):
    differences = max_differences(model, ref)
    assert all(differences[name] <= TOLERANCES[name] for name in TOLERANCES), differences


def test_router_logits_equal_medplibs(model, ref):
    run(model, ref)
    for layer in (0, 1):
        logits = model.language_model.model.layers[layer].mlp.last_routing.logits
        assert torch.allclose(logits, ref[f"gate_logits_layer{layer}"], atol=1e-5)


def test_greedy_ids_equal_medplibs(model, ref):
    prompt = model_ids(model, ref["prompt_ids"])
    out = model.generate(
        prompt,
        torch.ones_like(prompt),
        pixel_values=ref["images_clip"],
        region_masks=[ref["region_mask"][None]],
        max_new_tokens=6,
    )
    assert out.sequences[0].tolist() == ref["gen_ids"][0, ref["prompt_ids"].shape[1] :].tolist()


# ---- negative controls: each deviation from MedPLIB's semantics is caught ---------------------------------


def fails(model, ref) -> bool:
    differences = max_differences(model, ref)
    return any(differences[name] > TOLERANCES[name] for name in TOLERANCES)


def test_swapped_experts_fail(model, ref):
    experts = model.language_model.model.layers[0].mlp.experts
    experts[0], experts[1] = experts[1], experts[0]
    try:
        assert fails(model, ref)
    finally:
        experts[0], experts[1] = experts[1], experts[0]
    assert not fails(model, ref)


def test_weight_one_instead_of_probability_fails(model, ref, monkeypatch):
    """Top-1 renormalised (the winner's output at weight 1) is not what MedPLIB computes."""
    original = dense.route

    def weight_one(logits, top_k, capacity=None):
        routing = original(logits, top_k)
        return Routing(routing.logits, routing.experts, torch.ones_like(routing.weights), None)

    monkeypatch.setattr(dense, "route", weight_one)
    assert fails(model, ref)


def test_bfloat16_gate_fails(model, ref, monkeypatch):
    def bf16_gate(self, x):
        return torch.nn.functional.linear(x.bfloat16(), self.weight.bfloat16()).float()

    monkeypatch.setattr(dense.Float32Gate, "forward", bf16_gate)
    assert fails(model, ref)


def test_dropped_adapter_branch_fails(model, ref):
    blocks = model.sam.image_encoder.blocks
    adapted = [block.__class__ for block in blocks]
    for block in blocks:
        block.__class__ = Block  # segment-anything's block: no adapter branch
    try:
        assert fails(model, ref)
    finally:
        for block, cls in zip(blocks, adapted, strict=True):
            block.__class__ = cls


# ---- other layouts and bad checkpoints -------------------------------------------------------------------


def release_as_safetensors(folder: Path, edit=None) -> Path:
    """The release with its tensors in two *.safetensors shards and no index (as on the Hub)."""
    folder.mkdir()
    shutil.copy(CHECKPOINT / "config.json", folder / "config.json")
    state = {}
    for _, shard in ReleaseCheckpoint.open(CHECKPOINT).iter_shards():
        state.update({key: value.clone() for key, value in shard.items()})
    if edit is not None:
        edit(state)
    keys = sorted(state)
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        save_file({key: state[key] for key in part}, str(folder / f"model-0000{number}-of-00002.safetensors"))
    return folder


def test_safetensors_shards_without_index_convert_the_same(tmp_path, converted):
    source = release_as_safetensors(tmp_path / "release")
    report = convert(source, tmp_path / "out")
    assert ReleaseCheckpoint.open(source).kind == "safetensors"
    first = {k: v for shard in converted[1].shards for k, v in load_file(converted[0] / shard).items()}
    second = {k: v for shard in report.shards for k, v in load_file(tmp_path / "out" / shard).items()}
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_an_unmapped_key_is_named(tmp_path):
    def rename(state):
        state["model.mm_projector.1.weight"] = state.pop("model.mm_projector.2.weight")

    with pytest.raises(CheckpointError, match=r"model\.mm_projector\.1\.weight.*not mapped"):
        convert(release_as_safetensors(tmp_path / "release", rename), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_key_is_named(tmp_path):
    def drop(state):
        del state["model.region_fea_adapter.bias"]

    with pytest.raises(CheckpointError, match=r"missing keys \(1\): region_encoder\.adapter\.bias"):
        convert(release_as_safetensors(tmp_path / "release", drop), tmp_path / "out")


def test_a_bfloat16_conversion_keeps_the_gates_float32(tmp_path):
    report = convert(CHECKPOINT, tmp_path / "out", dtype=torch.bfloat16, shard_size=200_000)
    written = {k: v for shard in report.shards for k, v in load_file(tmp_path / "out" / shard).items()}
    assert len(report.shards) > 3
    gates = [key for key in written if key.endswith("mlp.router.weight")]
    assert len(gates) == 2 and all(written[key].dtype == torch.float32 for key in gates)
    assert written["language_model.model.layers.0.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    loaded = medplib.load(tmp_path / "out", device="cpu", dtype="bfloat16")
    assert loaded.model.language_model.model.layers[0].mlp.router.weight.dtype == torch.float32


# ---- medplib.load, info and the whole raw case ------------------------------------------------------------


def test_loading_an_unconverted_release_says_to_convert_it():
    with pytest.raises(CheckpointError, match="medplib convert medplib") as caught:
        medplib.load(CHECKPOINT)
    assert "\n" not in str(caught.value)


def test_info_describes_the_release_without_converting():
    info = model_info(CHECKPOINT)
    assert info.weights.startswith("MedPLIB release")
    assert info.routed_experts["num_experts"] == 2 and info.routed_experts["top_k"] == 1
    assert info.routed_experts["layers"] == [0, 1]
    assert info.routed_experts["parameters"] == 2 * 2 * 3 * 64 * 96
    assert info.parameters["total"] == sum(v for k, v in info.parameters.items() if k != "total")
    assert info.parameters["sam_image_encoder"] > 0 and info.parameters["region_encoder"] == 64 * 32 + 64


def test_raw_case_end_to_end_through_load_and_ground(converted):
    case = json.loads((FIXTURE / "case-raw" / "reference.json").read_text())
    tensors = load_file(FIXTURE / "case-raw" / "reference.safetensors")
    assistant = medplib.load(converted[0], device="cpu")
    image = np.asarray(Image.open(FIXTURE / "case-raw" / "image.png").convert("RGB"))
    box = BoxPrompt(box=(24, 12, 52, 32))  # rows 12..31, columns 24..51 inclusive: region.png
    question = "What is shown in {region}? Please segment it."
    result = assistant.ground(image, question, regions=[box], max_new_tokens=8)
    assert result.text == case["gen_text"]
    assert result.new_tokens == 8 and result.seg_forced  # no <SEG> generated: MedPLIB's fallback state
    assert result.masks[0].score == pytest.approx(tensors["gen_iou"].item(), abs=1e-4)
    expected = tensors["gen_mask"][0] > 0
    assert np.array_equal(result.masks[0].mask.to_array(), expected.numpy())

    query = Query(image=image, text=question, task="ground", regions=[box])
    request = model_request(query, load_image(image), assistant.model, prefill_grounding=False)
    encoded, regions = assistant._generator.processor.encode_request(request)
    assert encoded.input_ids == model_ids(assistant.model, tensors["input_ids"])[0].tolist()
    assert torch.equal(regions, tensors["region_mask_grid"])
    row = assistant._generator.run([request], Decoding(max_new_tokens=8)).rows[0]
    assert (row.masks.logits - tensors["gen_mask"]).abs().max() <= 1e-4


# ---- --experts lora --rank R ----------------------------------------------------------------------------


def test_lora_experts_at_full_rank_reproduce_medplib(tmp_path, ref):
    """Shared MLP + per-expert SVD deltas: exact at full rank (64 = min(64, 96)), reported error ~0."""
    report = convert(CHECKPOINT, tmp_path / "full", experts="lora", rank=64)
    assert max(report.factorization_error.values()) < 1e-5 and len(report.factorization_error) == 6
    model = MedPLIBWithRoutedExperts.from_pretrained(tmp_path / "full").eval()
    assert model.language_model.model.layers[0].mlp.experts[1].lora_A["up_proj"].weight.shape == (64, 64)
    differences = max_differences(model, ref)
    assert all(differences[name] <= TOLERANCES[name] for name in TOLERANCES), differences


def test_lora_experts_at_low_rank_report_their_error(tmp_path, ref):
    report = convert(CHECKPOINT, tmp_path / "low", experts="lora", rank=4)
    assert min(report.factorization_error.values()) > 0.1  # random experts are far from rank 4
    assert fails(MedPLIBWithRoutedExperts.from_pretrained(tmp_path / "low").eval(), ref)
    with pytest.raises(medplib.core.errors.InvalidInputError, match="rank 97 exceeds"):
        convert(CHECKPOINT, tmp_path / "too-high", experts="lora", rank=97)


# ---- the command line ---------------------------------------------------------------------------------


def test_convert_command_writes_a_loadable_checkpoint_and_refuses_a_used_folder(tmp_path):
    from typer.testing import CliRunner

    from medplib.cli import app

    out = tmp_path / "converted"
    arguments = ["convert", "medplib", str(CHECKPOINT), str(out), "--tokenizer", str(TOKENIZER)]
    arguments += ["--vision-tower", str(FIXTURE / "clip"), "--sam-decoder-heads", "2", "--shard-size", "1MB"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "converted 282 keys (2 dropped) into 280 tensors" in result.output
    assert len(list(out.glob("model-*.safetensors"))) >= 4
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "routed    2 dense experts" in info.output

    again = CliRunner().invoke(app, arguments)
    assert again.exit_code == 2
    assert again.output.count("\n") == 1 and "not empty" in again.output
    bad = CliRunner().invoke(app, [*arguments[:3], str(tmp_path / "other"), "--shard-size", "lots"])
    assert bad.exit_code == 2 and "shard size 'lots'" in bad.output
