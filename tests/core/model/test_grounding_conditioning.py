"""SAM and `<SEG>` head initialisation (kept on load) and the FiLM dense conditioning of SAM's prompt."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medplib.core.model import MedPLIBForCausalLM, build_medplib
from medplib.core.model.presets import build_config
from medplib.experts.pixel_grounding.head import ImageFiLM
from medplib.trainers.stage_folder import add_image_film
from medplib.trainers.stages import stage_spec


def test_sam_and_seg_head_start_from_their_modules_own_init(tiny_model: MedPLIBForCausalLM) -> None:
    decoder = tiny_model.sam.mask_decoder
    # nn.Embedding's default is N(0, 1): a 128-wide token has norm ~11; transformers' N(0, 0.02) gives ~0.2.
    assert 8 < decoder.iou_token.weight.norm() < 15
    assert (decoder.mask_tokens.weight.norm(dim=1) > 8).all()
    film = tiny_model.seg_head.dense_film
    width = film.scale.in_features
    assert abs(float(film.scale.weight.detach().std()) * width**0.5 - 1) < 0.05  # N(0, 1/width)
    assert not film.scale.bias.any() and not film.shift.bias.any()
    # nn.Linear's default (kaiming uniform, std 1/sqrt(3 fan_in)), not N(0, 0.02).
    fc1 = tiny_model.seg_head.fc1
    assert abs(float(fc1.weight.detach().std()) * (3 * fc1.in_features) ** 0.5 - 1) < 0.05


def test_loading_never_reinitialises_sam_or_the_seg_head(
    tiny_model: MedPLIBForCausalLM, tmp_path: Path
) -> None:
    with torch.no_grad():  # values no initialiser would produce
        tiny_model.sam.mask_decoder.mask_tokens.weight.fill_(0.125)
        tiny_model.seg_head.dense_film.shift.bias.fill_(-0.5)
        tiny_model.sam.image_encoder.pos_embed.fill_(0.25)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = MedPLIBForCausalLM.from_pretrained(tmp_path / "ckpt")
    saved, reloaded = tiny_model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    different = [k for k in saved if not torch.equal(saved[k], reloaded[k])]
    assert different == []


def test_presets_turn_film_on_and_the_7b_preset_keeps_it_off() -> None:
    assert build_config("tiny").seg_dense_film and build_config("small").seg_dense_film
    assert not build_config("medplib-7b").seg_dense_film


def test_a_checkpoint_without_the_field_loads_without_film(tmp_path: Path) -> None:
    """A config.json written before `seg_dense_film` existed loads as before: no FiLM, same keys."""
    torch.manual_seed(0)
    config = build_config("tiny")
    config.seg_dense_film = False
    model = MedPLIBForCausalLM(config)
    model.tokenizer = build_medplib("tiny").tokenizer
    model.save_pretrained(tmp_path / "old")
    stored = json.loads((tmp_path / "old" / "config.json").read_text())
    del stored["seg_dense_film"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(stored))
    loaded = MedPLIBForCausalLM.from_pretrained(tmp_path / "old")
    assert loaded.seg_head.dense_film is None
    assert not any("dense_film" in key for key in loaded.state_dict())


def _decode_without_film(model: MedPLIBForCausalLM, embedding: torch.Tensor, prompts: torch.Tensor):
    """What the decoder computed before FiLM existed: SAM's no-mask embedding as the dense prompt."""
    sam = model.sam
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    dense = dense.expand(len(prompts), -1, *sam.prompt_encoder.image_embedding_size)
    low_res, iou = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=prompts[:, None],
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return low_res[:, 0], iou[:, 0]


def test_film_off_reproduces_the_sparse_only_decoder() -> None:
    torch.manual_seed(0)
    config = build_config("tiny")
    config.seg_dense_film = False
    model = MedPLIBForCausalLM(config).eval()
    grid = config.sam_config.embedding_size
    embedding = torch.randn(1, config.sam_config.prompt_embed_dim, grid, grid)
    hidden = torch.randn(3, config.text_config.hidden_size)
    with torch.no_grad():
        prompts = model.seg_head(hidden)
        assert model.seg_head.dense_prompts(prompts, model.sam.prompt_encoder, embedding) is None
        predicted = model.predict_masks(
            [hidden], None, [(128, 128)], [(128, 128)], image_embeddings=embedding
        )
        low_res, iou = _decode_without_film(model, embedding, prompts)
    expected = model.sam.postprocess(low_res, (128, 128), (128, 128))
    assert torch.equal(predicted[0].logits, expected)
    assert torch.equal(predicted[0].scores, iou)


def test_film_makes_the_dense_prompt_depend_on_the_seg_prompt(tiny_model: MedPLIBForCausalLM) -> None:
    encoder = tiny_model.sam.prompt_encoder
    prompts = torch.randn(2, encoder.embed_dim)
    embedding = torch.randn(1, encoder.embed_dim, *encoder.image_embedding_size)
    with torch.no_grad():
        dense = tiny_model.seg_head.dense_prompts(prompts, encoder, embedding)
        film = tiny_model.seg_head.dense_film
        positional = encoder.get_dense_pe()[0]
        q = torch.nn.functional.layer_norm(prompts, (encoder.embed_dim,))
        expected = (
            encoder.no_mask_embed.weight[0][:, None, None]
            + positional * (1 + film.scale(q)[..., None, None])
            + film.shift(q)[..., None, None]
        )
    assert dense.shape == (2, encoder.embed_dim, *encoder.image_embedding_size)
    assert torch.allclose(dense, expected, atol=1e-5)
    assert (dense[0] - dense[1]).abs().mean() > 0.1  # two prompts, two different dense prompts


def test_image_film_scales_the_image_embedding_by_the_prompt_and_starts_as_no_change(
    tiny_model: MedPLIBForCausalLM,
) -> None:
    """`seg_image_film`: a fresh one changes no mask; a trained one adds gain(q) * embedding per prompt,
    so two prompts pick different channels of one image (where the positional FiLM picks places)."""
    torch.manual_seed(0)
    model = tiny_model.eval()
    encoder = model.sam.prompt_encoder
    grid = model.config.sam_config.embedding_size
    embedding = torch.randn(1, encoder.embed_dim, grid, grid)
    hidden = torch.randn(2, model.config.text_config.hidden_size)
    with torch.no_grad():
        before = model.predict_masks([hidden], None, [(128, 128)], [(128, 128)], image_embeddings=embedding)
        add_image_film(model)
        assert model.config.seg_image_film and isinstance(model.seg_head.image_film, ImageFiLM)
        fresh = model.predict_masks([hidden], None, [(128, 128)], [(128, 128)], image_embeddings=embedding)
        assert torch.equal(before[0].logits, fresh[0].logits)
        model.seg_head.image_film.gain.weight.normal_(std=0.3)
        prompts = model.seg_head(hidden)
        plain = model.seg_head.dense_film(prompts, encoder.no_mask_embed.weight[0], encoder.get_dense_pe()[0])
        dense = model.seg_head.dense_prompts(prompts, encoder, embedding)
        q = torch.nn.functional.layer_norm(prompts, (encoder.embed_dim,))
        gain = model.seg_head.image_film.gain(q)[..., None, None]
        after = model.predict_masks([hidden], None, [(128, 128)], [(128, 128)], image_embeddings=embedding)
    torch.testing.assert_close(dense, plain + gain * embedding)
    assert not torch.allclose(gain[0], gain[1])
    assert not torch.allclose(before[0].logits, after[0].logits)


def test_image_film_is_off_in_every_preset_and_the_paper_schedule() -> None:
    for preset in ("tiny", "small", "medplib-7b"):
        assert not build_config(preset).seg_image_film
    assert not stage_spec("3", schedule="paper").seg_image_film
