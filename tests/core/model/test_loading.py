"""Real-weight loading from checkpoints the tests write in the real formats: a transformers LLaVA folder
(`LlavaForConditionalGeneration.save_pretrained`) and a segment-anything `Sam` state dict made for a
larger input (`.pth` via torch.save, and safetensors)."""

from __future__ import annotations

import io
import uuid
from functools import partial
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from medplib.core.errors import CheckpointError
from medplib.core.model import (
    ControlToken,
    MedPLIBForCausalLM,
    MedPLIBProcessor,
    Request,
    Turn,
    load_llava_and_sam,
)
from medplib.core.model.loading import llava_key

SAM_SOURCE_SIZE, SAM_TARGET_SIZE, SAM_PATCH = 128, 64, 16  # the checkpoint's grid is 8x8, the model's 4x4
SAM_CONFIG = {
    "image_size": SAM_TARGET_SIZE,
    "patch_size": SAM_PATCH,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "global_attn_indexes": [1],
    "window_size": 2,
    "prompt_embed_dim": 32,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}


def _llava_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaVA-style tokenizer: BOS/EOS/UNK and `<image>`, none of MedPLIB's other tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(["a chest x-ray of the lung", "what is shown here"] * 10, trainer)
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<image>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=["<image>"],
    )


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, LlavaForConditionalGeneration]:
    torch.manual_seed(1)
    tokenizer = _llava_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    )
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def sam() -> Sam:
    torch.manual_seed(2)
    grid = SAM_SOURCE_SIZE // SAM_PATCH
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=SAM_SOURCE_SIZE,
            patch_size=SAM_PATCH,
            embed_dim=32,
            depth=2,
            num_heads=2,
            out_chans=32,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=2,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32,
            image_embedding_size=(grid, grid),
            input_image_size=(SAM_SOURCE_SIZE,) * 2,
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=32,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            iou_head_hidden_dim=32,
        ),
    )
    with torch.no_grad():
        for parameter in sam.parameters():  # SAM zero-initialises its position embeddings: make them telling
            parameter.normal_()
    return sam


@pytest.fixture(params=["pth", "safetensors"])
def sam_file(request, sam: Sam, tmp_path: Path) -> Path:
    state = sam.state_dict()
    if request.param == "pth":
        torch.save(state, tmp_path / "sam_vit_b.pth")
        return tmp_path / "sam_vit_b.pth"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "sam_vit_b.safetensors")
    return tmp_path / "sam_vit_b.safetensors"


def test_llava_key_spellings() -> None:
    assert (
        llava_key("language_model.model.layers.0.mlp.up_proj.weight")
        == "language_model.model.layers.0.mlp.up_proj.weight"
    )
    assert (
        llava_key("model.language_model.layers.0.mlp.up_proj.weight")
        == "language_model.model.layers.0.mlp.up_proj.weight"
    )
    assert (
        llava_key("language_model.lm_head.weight")
        == llava_key("lm_head.weight")
        == "language_model.lm_head.weight"
    )
    assert (
        llava_key("vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias")
        == "vision_tower.encoder.layers.1.mlp.fc1.bias"
    )
    assert (
        llava_key("model.vision_tower.embeddings.class_embedding")
        == "vision_tower.embeddings.class_embedding"
    )
    assert llava_key("multi_modal_projector.linear_2.bias") == "projector.linear_2.bias"


def test_weights_come_from_the_checkpoints(llava, sam: Sam, sam_file: Path) -> None:
    folder, source = llava
    model = load_llava_and_sam(folder, sam_file, sam_config=SAM_CONFIG)
    state, llava_state, sam_state = model.state_dict(), source.state_dict(), sam.state_dict()
    renamed = {
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "projector.",
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    }
    vocab = source.config.text_config.vocab_size
    for key, value in llava_state.items():
        prefix = next(p for p in renamed if key.startswith(p))
        ours = state[renamed[prefix] + key.removeprefix(prefix)]
        assert torch.equal(
            ours[:vocab] if key.endswith(("embed_tokens.weight", "lm_head.weight")) else ours, value
        ), key
    # The control tokens were added (LLaVA's <image> kept its id) and their rows start at the mean row.
    assert model.config.image_token_id == source.config.image_token_id
    assert model.config.text_config.vocab_size == len(model.tokenizer) == vocab + len(ControlToken) - 1 + 1
    embeddings = state["language_model.model.embed_tokens.weight"]
    torch.testing.assert_close(
        embeddings[vocab], llava_state["model.language_model.embed_tokens.weight"].mean(0)
    )
    # SAM: equal where the geometry agrees, interpolated where the input size changed.
    for key, value in sam_state.items():
        ours = state[f"sam.{key}"]
        if key == "image_encoder.pos_embed":
            assert ours.shape == (1, 4, 4, 32)
            expected = F.interpolate(value.permute(0, 3, 1, 2), (4, 4), mode="bilinear").permute(0, 2, 3, 1)
            torch.testing.assert_close(ours, expected)
        elif key.startswith("image_encoder.blocks.1.attn.rel_pos"):  # the global-attention block
            assert value.shape == (15, 16) and ours.shape == (7, 16)
            torch.testing.assert_close(ours, F.interpolate(value[None, None], (7, 16), mode="bilinear")[0, 0])
        else:
            assert torch.equal(ours, value), key
    # New in MedPLIB, initialised (not garbage): the region adapter (transformers' N(0, 0.02)) and the
    # <SEG> head (nn.Linear's own init, uniform within 1/sqrt(fan_in), as LISA's head starts).
    adapter = state["region_encoder.adapter.weight"]
    assert torch.isfinite(adapter).all() and 0 < adapter.std() < 0.1
    head = state["seg_head.fc2.weight"]
    assert torch.isfinite(head).all() and head.std() > 0 and head.abs().max() <= head.shape[1] ** -0.5


def test_loaded_model_runs_end_to_end(llava, sam_file: Path) -> None:
    model = load_llava_and_sam(llava[0], sam_file, sam_config=SAM_CONFIG).eval()
    processor = MedPLIBProcessor(model.config, model.tokenizer)
    image = np.full((40, 30, 3), 128, dtype=np.uint8)
    mask = np.zeros((40, 30), dtype=bool)
    mask[5:20, 5:20] = True
    batch = processor(
        [Request(image, [Turn(["What is", ControlToken.REGION], ["It is", ControlToken.SEG])], [mask])]
    )
    with torch.no_grad():
        out = model(**batch)
    assert out.pred_masks[0].masks.shape == (1, 40, 30)
    assert (
        model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            **{k: batch[k] for k in ("pixel_values", "region_masks")},
            max_new_tokens=3,
        ).sequences.shape[0]
        == 1
    )


def test_loading_from_uris(llava, sam: Sam, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/medplib-tests/{uuid.uuid4().hex}"
    try:
        for path in llava[0].iterdir():
            fs.pipe(f"{root}/llava/{path.name}", path.read_bytes())
        buffer = io.BytesIO()
        torch.save(sam.state_dict(), buffer)
        fs.pipe(f"{root}/sam.pth", buffer.getvalue())
        model = load_llava_and_sam(
            f"memory://{root}/llava", f"memory://{root}/sam.pth", sam_config=SAM_CONFIG
        )
    finally:
        fs.rm(root, recursive=True)
    assert torch.equal(model.sam.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)
    # And the composed model saves and reloads like any other.
    model.save_pretrained(tmp_path)
    reloaded = MedPLIBForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.projector.linear_1.weight, model.projector.linear_1.weight)


def test_sam_key_mismatches_are_listed(llava, sam: Sam, tmp_path: Path) -> None:
    state = dict(sam.state_dict())
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError) as error:
        load_llava_and_sam(llava[0], tmp_path / "sam.pth", sam_config=SAM_CONFIG)
    assert "sam.mask_decoder.iou_token.weight" in str(error.value)
    assert "sam.image_encoder.extra.weight" in str(error.value)


def test_a_sam_of_another_architecture_is_refused(llava, sam_file: Path) -> None:
    with pytest.raises(CheckpointError, match="mismatched keys"):
        load_llava_and_sam(llava[0], sam_file, sam_config={**SAM_CONFIG, "decoder_mlp_dim": 128})


@pytest.mark.parametrize("kind", ["truncated", "pickle", "not a dict", "missing"])
def test_bad_sam_files_raise_checkpoint_error(llava, sam: Sam, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "sam.pth"
    if kind == "truncated":
        torch.save(sam.state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "pickle":
        torch.save({"model": sam.state_dict(), "hook": print}, path)  # weights_only refuses arbitrary objects
    elif kind == "not a dict":
        torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError):
        load_llava_and_sam(llava[0], path, sam_config=SAM_CONFIG)


def test_bad_llava_folders_raise_checkpoint_error(llava, sam_file: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_llava_and_sam(tmp_path / "absent", sam_file, sam_config=SAM_CONFIG)
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in llava[0].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_llava_and_sam(broken, sam_file, sam_config=SAM_CONFIG)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_llava_and_sam(broken, sam_file, sam_config=SAM_CONFIG)


def test_a_medplib_folder_is_not_a_llava_one(tiny_model, sam_file: Path, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a LLaVA"):
        load_llava_and_sam(tmp_path, sam_file, sam_config=SAM_CONFIG)
