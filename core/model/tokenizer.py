"""Tokens: the control tokens the model acts on, the tiny presets' trained tokenizer, and user text.

A control token (`<image>`, `<region>`, `<SEG>`, …) is only ever produced by id, from structure
(`ControlToken` members in a conversation), never by matching text. User text goes through
`tokenize_user_text`, which runs the tokenizer's normaliser, pre-tokeniser and model but none of its
added-token matching, so `"<SEG>"` typed by a user is the five characters it looks like.
"""

from __future__ import annotations

import enum
import functools
import os
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from medplib.core.errors import CheckpointError, InvalidInputError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


class ControlToken(enum.Enum):
    """The model's control tokens; each value is the token's text, each maps to one config id field."""

    IMAGE = "<image>"
    IM_START = "<im_start>"
    IM_END = "<im_end>"
    REGION_START = "<region>"
    REGION = "<region_feat>"
    REGION_END = "</region>"
    SEG = "<SEG>"

    @property
    def config_field(self) -> str:
        return f"{self.name.lower()}_token_id"


# The tiny presets' byte-level BPE, trained once on the project's corpus and shipped as package data;
# `python -m medplib.core.model.corpus` rebuilds it (a test checks the shipped file is what it builds).
TINY_TOKENIZER_FILE = Path(__file__).with_name("tiny_tokenizer.json")


@functools.cache
def _tiny_tokenizer_json() -> str:
    return TINY_TOKENIZER_FILE.read_text(encoding="utf-8")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny and small presets' tokenizer: the shipped BPE with BOS/EOS/PAD and the control tokens.

    Each call returns a fresh tokenizer object (callers add tokens to their own copy).
    """
    backend = Tokenizer.from_str(_tiny_tokenizer_json())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    add_control_tokens(tokenizer)
    return tokenizer


def add_control_tokens(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Add the control tokens (and a pad token if there is none) as special tokens; return their ids.

    A token the tokenizer already has (LLaVA's `<image>`) keeps its id, so ids only ever grow past the
    checkpoint's vocabulary.
    """
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    missing = [t.value for t in ControlToken if t.value not in tokenizer.extra_special_tokens]
    if missing:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [*tokenizer.extra_special_tokens, *missing]},
            replace_extra_special_tokens=True,
        )
    return control_token_ids(tokenizer)


def control_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The control tokens' ids by config field name; raises if the tokenizer lacks one."""
    ids = {}
    vocab = tokenizer.get_vocab()
    for token in ControlToken:
        if token.value not in vocab:
            raise CheckpointError(f"tokenizer has no {token.value} token; it was not made for MedPLIB")
        ids[token.config_field] = vocab[token.value]
    return ids


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """The tokenizer saved in a local checkpoint folder, checked to carry every control token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {exc}") from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise CheckpointError(
            f"{path}: expected a fast (tokenizer.json) tokenizer, got {type(tokenizer).__name__}"
        )
    control_token_ids(tokenizer)
    return tokenizer


def tokenize_user_text(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of `text` as plain text: no special or added token can come out of it.

    Added tokens are never matched (the backend's vocabulary model alone runs). Should the vocabulary
    model itself still spell a special token, as a SentencePiece vocabulary holding `</s>` may, that
    piece is re-encoded one character at a time, which no multi-character token survives.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8, kept by Python
        raise InvalidInputError(
            f"the text is not valid UTF-8 (undecodable {text[exc.start : exc.end]!r} at position {exc.start})"
        ) from None
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is not None:
        pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    else:
        pieces = [text]
    forbidden = set(tokenizer.all_special_ids)
    ids: list[int] = []
    for piece in pieces:
        piece_ids = [token.id for token in backend.model.tokenize(piece)]
        if forbidden.intersection(piece_ids):
            piece_ids = [token.id for char in piece for token in backend.model.tokenize(char)]
        ids.extend(piece_ids)
    return ids
