"""The conversation template: how a question, its image and its regions become token ids.

LLaVA-1.5's Vicuna-v1 layout, with the image as `<im_start>` + one `<image>` per CLIP patch +
`<im_end>` opening the first user turn and every region as `<region><region_feat></region>`::

    <s>SYSTEM USER:<im_start><image>…<im_end>
    QUESTION ASSISTANT: ANSWER</s>USER: QUESTION ASSISTANT: ANSWER</s>

A turn is a sequence of parts: a `str` is always plain text (see `tokenize_user_text`), a
`ControlToken` is structure. Users' turns may hold `ControlToken.REGION` (a region goes here),
answers may hold `ControlToken.SEG` (a mask goes here) or an `ExpertToken` (a plugin expert's trigger
token, e.g. `<MOD>`: its head runs here), each placed by id. Only the answers and their `</s>` are
supervised; everything else is labelled -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

from medplib.core.errors import InvalidInputError
from medplib.core.model.tokenizer import ControlToken, tokenize_user_text

SYSTEM_PROMPT = (
    "You are MedPLIB, a medical imaging assistant. Answer questions about the image, about regions the"
    " user marks, and segment what is asked."
)
USER, ASSISTANT = "USER:", "ASSISTANT:"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ExpertToken:
    """An expert's trigger token in an answer (`<MOD>`), placed by id: text never becomes one."""

    text: str


Part = str | ControlToken | ExpertToken


@dataclass(frozen=True)
class Turn:
    """One exchange; `assistant` is None for the turn the model is asked to answer."""

    user: str | Sequence[Part]
    assistant: str | Sequence[Part] | None = None


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    num_regions: int


def _parts(value: str | Sequence[Part], *, lead: str = "") -> list[Part]:
    """The parts of a turn, `lead` joined to the first text so a word keeps its leading space."""
    parts = [value] if isinstance(value, str) else list(value)
    if parts and isinstance(parts[0], str):
        return [lead + parts[0], *parts[1:]]
    if parts and isinstance(parts[0], ExpertToken):
        # An answer that opens with an expert's token says it first, right after `ASSISTANT:`: where a
        # capability asked for forces it (`decode_steps`' `require_at_start`), with no space before it.
        return parts
    return [lead, *parts] if lead else parts


class _Encoder:
    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.input_ids: list[int] = []
        self.labels: list[int] = []
        self.num_regions = 0

    def ids(self, ids: list[int], *, supervised: bool) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

    def text(self, text: str, *, supervised: bool = False) -> None:
        if text:
            self.ids(tokenize_user_text(self.tokenizer, text), supervised=supervised)

    def control(self, *tokens: ControlToken, supervised: bool = False) -> None:
        # One lookup per distinct token (the image's run of placeholders is one): `get_vocab()` would
        # copy the whole vocabulary for every conversation.
        lookup = {token: self.tokenizer.convert_tokens_to_ids(token.value) for token in set(tokens)}
        self.ids([lookup[token] for token in tokens], supervised=supervised)

    def user_parts(self, parts: Sequence[Part]) -> None:
        for part in parts:
            if isinstance(part, str):
                self.text(part)
            elif part is ControlToken.REGION:
                self.control(ControlToken.REGION_START, ControlToken.REGION, ControlToken.REGION_END)
                self.num_regions += 1
            else:
                raise InvalidInputError(f"a question may hold text and regions, not {part.value}")

    def answer_parts(self, parts: Sequence[Part]) -> None:
        for part in parts:
            if isinstance(part, str):
                self.text(part, supervised=True)
            elif part is ControlToken.SEG:
                self.control(part, supervised=True)
            elif isinstance(part, ExpertToken):
                token_id = self.tokenizer.convert_tokens_to_ids(part.text)
                if part.text not in self.tokenizer.all_special_tokens:
                    raise InvalidInputError(f"{part.text} is no expert token of this model's tokenizer")
                self.ids([token_id], supervised=True)
            else:
                raise InvalidInputError(f"an answer may hold text, <SEG> and expert tokens, not {part.value}")


def encode_conversation(
    tokenizer: PreTrainedTokenizerFast, turns: Sequence[Turn], *, num_image_tokens: int
) -> EncodedConversation:
    """Token ids and labels of a conversation about one image.

    Every turn but the last must have an answer. When the last has none, the ids end with
    `ASSISTANT:`, ready for generation.
    """
    if not turns:
        raise InvalidInputError("a conversation needs at least one turn")
    encoder = _Encoder(tokenizer)
    encoder.ids([tokenizer.bos_token_id], supervised=False)
    encoder.text(f"{SYSTEM_PROMPT} {USER}")
    encoder.control(ControlToken.IM_START, *[ControlToken.IMAGE] * num_image_tokens, ControlToken.IM_END)
    for index, turn in enumerate(turns):
        if index:
            encoder.text(USER)
        encoder.user_parts(_parts(turn.user, lead=" " if index else "\n"))
        encoder.text(f" {ASSISTANT}")
        if turn.assistant is None:
            if index != len(turns) - 1:
                raise InvalidInputError(f"turn {index} has no answer but is not the last turn")
            break
        encoder.answer_parts(_parts(turn.assistant, lead=" "))
        encoder.ids([tokenizer.eos_token_id], supervised=True)
    return EncodedConversation(encoder.input_ids, encoder.labels, encoder.num_regions)


def decode_answer(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int]) -> str:
    """Text of generated ids up to the first `</s>`; `<SEG>` and expert tokens (`<MOD>`) stay visible
    where their heads ran; structure (image, region, BOS/EOS/pad) is dropped."""
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    structure = [t.value for t in ControlToken if t is not ControlToken.SEG]
    hidden = {tokenizer.convert_tokens_to_ids(t) for t in structure}
    named = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    hidden |= {i for i in named if i is not None}
    return tokenizer.decode([i for i in ids if i not in hidden]).strip()
