"""How a checked `Query` becomes the model's `Request`, once: the grounding wording, where each region
goes in its question, earlier answers with their `<SEG>` and expert tokens, and what the answer must hold.

Regions: a question marks the k-th region with the k-th `{region}`; a question without any gets them
appended ("… in region 1 <region>, in region 2 <region>"). Grounding asks for a mask, so its answer
must hold a `<SEG>` (`require_seg`); a capability asked for steers the answer to its expert's token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from medplib.core.errors import RegionError
from medplib.core.expert_heads import capability_token
from medplib.core.image import MedicalImage
from medplib.core.model import ControlToken, MedPLIBForCausalLM, Request, Turn
from medplib.core.model.conversation import ExpertToken
from medplib.core.queries import REGION_PLACEHOLDER, Query

# The grounding wording of the MeCoVQA question templates (trainers/data/templates.py), which the
# presets are trained on.
GROUNDING_QUESTION = "Please segment {text} in this image."
SEG_TEXT = ControlToken.SEG.value

# The answer the presets are trained to give a grounding request (trainers/data/templates.py), and
# how `ground` gets its <SEG> state: by decoding the model's own answer, or by prefilling this one;
# "auto": prefilled for a model trained on medplib's templates (docs/performance.md), else decoded.
GROUNDING_ANSWER = "Sure, it is {seg}."
GROUNDING_ANSWER_MODES = ("auto", "generate", "template")


def model_request(
    query: Query, image: MedicalImage, model: MedPLIBForCausalLM, *, prefill_grounding: bool
) -> Request:
    """`query` (checked by `InferenceLimits.check`) about its loaded `image` as the model's `Request`:
    every region prompt a mask on the image grid, the turns laid out, the answer's requirements set.
    `prefill_grounding`: a grounding request's answer is the template, prefilled, not decoded."""
    config = model.config
    text = query.text.strip()
    question = grounding_question(text, config.compat) if query.task == "ground" else text
    users, answers = query.history[0::2], [m.content for m in query.history[1::2]]
    questions = [*((m.content.strip(), m.regions) for m in users), (question, query.regions)]
    if prefill_grounding and query.task == "ground":
        answers.append(GROUNDING_ANSWER.format(seg=SEG_TEXT))
    height, width = image.size
    expert_tokens = list(config.expert_token_ids)
    turns, masks = [], []
    for index, (words, regions) in enumerate(questions):
        masks += [prompt.to_mask(height, width) for prompt in regions]
        answer = answer_parts(answers[index], expert_tokens) if index < len(answers) else None
        turns.append(Turn(question_parts(words, len(regions)), answer))
    token, at_start = capability_token(model, query.capability) or (None, False)
    return Request(
        image.pixels,
        turns,
        masks,
        require_seg=query.task == "ground" or token == config.seg_token_id,
        require_token=token,
        require_at_start=at_start,
    )


def auto_grounding_answer(untrained: bool, compat: str | None) -> str:
    """`answer="auto"`: the template is prefilled for a model trained on medplib's templates (a
    trained stage IV model answers every grounding test request with it, so the masks are the same,
    docs/performance.md); an untrained preset and a converted MedPLIB checkpoint decode their own."""
    return "generate" if untrained or compat == "medplib" else "template"


def grounding_question(text: str, compat: str | None) -> str:
    """medplib's grounding wording; under `compat: medplib` a whole sentence is MedPLIB's question as
    typed (its grounding answers follow MedPLIB's own question wording), a phrase gets the wording."""
    if compat == "medplib" and text.rstrip().endswith((".", "?")):
        return text
    return GROUNDING_QUESTION.format(text=text)


def question_parts(text: str, num_regions: int) -> list[str | ControlToken]:
    """A question's parts: a region where each `{region}` stands, or appended when none is marked."""
    pieces = text.split(REGION_PLACEHOLDER)
    marked = len(pieces) - 1
    if marked == 0 and num_regions:
        appended: list[str | ControlToken] = [text]
        for k in range(num_regions):
            appended += [f"{',' if k else ''} in region {k + 1}", ControlToken.REGION]
        return appended
    if marked != num_regions:
        raise RegionError(
            f"the question marks {marked} region(s) with {REGION_PLACEHOLDER} but {num_regions} region "
            "prompt(s) were given"
        )
    parts: list[str | ControlToken] = [pieces[0]]
    for piece in pieces[1:]:
        parts += [ControlToken.REGION, piece]
    return [part for part in parts if part != ""]


def answer_parts(text: str, expert_tokens: Sequence[str] = ()) -> list[str | ControlToken | ExpertToken]:
    """An earlier answer's parts: `<SEG>` where the assistant made a mask, an expert's token (e.g.
    `<MOD>`, of `expert_tokens`) where its head ran, text elsewhere; as the assistant wrote them."""
    tokens = [SEG_TEXT, *(token for token in expert_tokens if token != SEG_TEXT)]
    parts: list[str | ControlToken | ExpertToken] = []
    for piece in re.split(f"({'|'.join(re.escape(token) for token in tokens)})", text):
        if piece == SEG_TEXT:
            parts.append(ControlToken.SEG)
        elif piece in tokens:
            parts.append(ExpertToken(piece))
        elif piece:
            parts.append(piece)
    return parts
