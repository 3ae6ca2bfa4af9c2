"""Decoding: greedy or sampled, with the LLM's KV cache, over a left-padded batch.

A small explicit loop instead of `GenerationMixin.generate`: the prompt's embeddings carry spliced
image and region tokens, and the hidden state that predicts each generated `<SEG>` has to be kept
for grounding. The prompt runs once (prefill); each step then feeds one token per row against the
cache. Placeholder and structural tokens are never generated.

Two entry points serve callers that cache per image: `image_features` replace the CLIP tower, and
`past_key_values` hold the KV of a prefix of every row (the template up to the image, identical for
every question about that image), so only the rest of the prompt is prefilled. A LLaMA trunk runs
through `kv_cache.run_trunk` over keys and values allocated once for the whole generation; another
trunk through transformers' forward and `DynamicCache`. Every pass runs the model's own trunk over that
cache: the prompt's is `MedPLIBForCausalLM.forward`, the pass training and scoring run too, each step's
its `step_pass` (the same trunk and LM head, without building an output object). `require_seg` makes
rows that must yield a mask (grounding) emit `<SEG>` where they would otherwise end.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from transformers.cache_utils import Cache

from medplib.core.errors import InvalidInputError
from medplib.core.model.kv_cache import PrefixKV, StaticKVCache, generation_cache
from medplib.core.model.request_states import grounding_head, read_requests, request_columns

if TYPE_CHECKING:
    from medplib.core.model.modeling_medplib import MedPLIBForCausalLM

R = TypeVar("R")


@dataclass(frozen=True)
class GenerationOutput:
    sequences: torch.Tensor  # (B, L) generated ids; after a row's </s>, pad
    seg_hidden_states: list[torch.Tensor]  # per row (n_seg, hidden): what predicted each <SEG>
    seg_forced: torch.Tensor  # (B,) bool: the row's <SEG> (or `require_token`) was forced
    seconds: dict[str, float]  # wall time of "prefill" (embedding included) and "decode"
    # per row, (token id, hidden state that predicted it) of every expert trigger token, in order
    triggered: list[list[tuple[int, torch.Tensor]]] | None = None


def elapsed(start: float, device: torch.device) -> float:
    """Seconds since `start`, after the device finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _pick(
    logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float, generator
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def decode(model: MedPLIBForCausalLM, *args: Any, **kwargs: Any) -> GenerationOutput:
    """`decode_steps` run to the end: the generated sequences and `<SEG>` hidden states."""
    return run_to_end(decode_steps(model, *args, **kwargs))


def run_to_end(steps: Generator[Any, None, R]) -> R:
    """What a step generator returns, its steps dropped: the non-streamed call of a streamed one."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


@torch.no_grad()
def decode_steps(
    model: MedPLIBForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    region_masks: list[torch.Tensor] | None = None,
    *,
    image_features: torch.Tensor | None = None,
    past_key_values: Cache | PrefixKV | None = None,
    require_seg: bool | torch.Tensor = False,
    require_token: torch.Tensor | None = None,
    require_at_start: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Generator[torch.Tensor, None, GenerationOutput]:
    """Generate up to `max_new_tokens` per row, yielding each step's tokens (B,) as they are picked
    (pad for finished rows), and return the whole output. The last column of `attention_mask` must be
    all real tokens.

    Rows are left-padded, or padded between a cached prefix and the rest. `past_key_values` covers
    the first `get_seq_length()` columns of `input_ids` (it is read, not extended); only the columns
    after it are embedded and run. `require_seg` (bool, or per row): a row that has produced no
    `<SEG>` gets one instead of its `</s>`, or as its last token, and then ends; `seg_forced` says
    which rows needed that; `require_token` (B,) ids (-1: none) does so for any expert's trigger
    token (a capability asked for); where `require_at_start` (B,) holds, the row's first token is
    the required one (forced if the model picks another), and decoding goes on after it. Under
    `compat: medplib` nothing is forced (the ids stay MedPLIB's): such a row is grounded on the
    second-to-last hidden state it produced, as MedPLIB's `evaluate` does.
    """
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise InvalidInputError(f"temperature must be positive when sampling, got {temperature}")
    if not attention_mask[:, -1].all():
        raise InvalidInputError("generation needs left-padded inputs: the last column must be real tokens")
    config, text_config = model.config, model.config.text_config
    eos_id, seg_id = text_config.eos_token_id, config.seg_token_id
    pad_id = text_config.pad_token_id if text_config.pad_token_id is not None else eos_id
    # Placeholders and structure are the template's to place: only <SEG> and </s> may be generated.
    never = [i for name, i in config.control_token_ids.items() if name != "seg_token_id"]
    never += [i for i in (text_config.pad_token_id, text_config.bos_token_id) if i not in (None, eos_id)]
    if config.compat == "medplib":  # MedPLIB bans nothing; only medplib's own placeholders are not its tokens
        never = [config.image_token_id, config.region_token_id]

    device = input_ids.device
    never = torch.tensor(never, dtype=torch.long, device=device)
    start = time.perf_counter()
    past = 0 if past_key_values is None else past_key_values.get_seq_length()
    embeds = model.embed_inputs(input_ids[:, past:], pixel_values, region_masks, image_features)
    rows, length = input_ids.shape
    # The mask of the whole generation, allocated once: the prompt's, then one real column per step.
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, max_new_tokens)], dim=1)
    cache = generation_cache(model, past_key_values, rows, length + max_new_tokens, embeds)
    # Without padding the lean trunk's steps need no mask (`run_trunk`).
    step_masks = not isinstance(cache, StaticKVCache) or not bool(attention_mask.all())
    # Positions count real tokens only, so padding (left or after the prefix) shifts nothing.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions[:, past:],
        past_key_values=cache,
        logits_to_keep=1,
    )
    hidden, logits = out.last_hidden_state, out.logits[:, -1]
    seconds = {"prefill": elapsed(start, device)}
    start = time.perf_counter()
    # A head that reads the request needs every state after the cached prefix: the prompt's, then
    # one per step; each <SEG> records how many of the steps' states it may read.
    reads = grounding_head(model) is not None
    prompt_ids, prompt_mask = input_ids[:, past:], attention_mask[:, past:]
    prompt_hidden, step_hidden, seg_steps = hidden, [], [[] for _ in range(len(hidden))]
    last = hidden[:, -1]
    # MedPLIB (compat) grounds a row without <SEG> on the second-to-last hidden state it produced.
    medplib = config.compat == "medplib"
    before_last = hidden[:, -2] if hidden.shape[1] > 1 else last
    positions = attention_mask.long().sum(dim=1, keepdim=True)  # next position per row
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    require = torch.as_tensor(require_seg, dtype=torch.bool, device=device).expand(rows)
    # The token each row must say before it ends (-1: none): <SEG> for grounding, else `require_token`.
    required = torch.full((rows,), -1, dtype=torch.long, device=device)
    if require_token is not None:
        required = torch.as_tensor(require_token, dtype=torch.long, device=device).expand(rows).clone()
    required = required.masked_fill(require, seg_id)
    require = required >= 0
    at_start = torch.zeros(rows, dtype=torch.bool, device=device)
    if require_at_start is not None:
        at_start = torch.as_tensor(require_at_start, dtype=torch.bool, device=device).expand(rows) & require
    has_seg = torch.zeros_like(finished)
    forced = torch.zeros_like(finished)
    seg_hidden: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    triggers = torch.tensor(sorted(getattr(model, "trigger_experts", {})), dtype=torch.long, device=device)
    triggered: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(rows)]
    generated = []
    embedding = model.get_input_embeddings()
    # Whether any row must say a token before it ends: else the forcing rules are skipped per step.
    rules = bool(require.any())
    kept = {*triggers.tolist(), seg_id}  # tokens whose hidden state is kept
    trigger_ids = set(triggers.tolist())
    # `finished` as a list too: the per-step checks on a few rows are cheaper in Python than as
    # tensor ops, and while no row has finished the masking below is the identity and is skipped.
    done = finished.tolist()
    for step in range(max_new_tokens):
        logits = logits.float()
        logits.index_fill_(-1, never, float("-inf"))
        token = _pick(
            logits,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        if any(done):
            token = token.masked_fill(finished, pad_id)
        force = None
        if rules:
            ending = (token == eos_id) | (step == max_new_tokens - 1)
            force = require & ~has_seg & ~finished & (token != required) & ending & (not medplib)
            if step == 0:  # a token asked for at the start opens the answer; decoding then goes on
                opening = at_start & (token != required)
                forced |= opening
                token = torch.where(at_start, required, token)
                force = force & ~at_start
            token = torch.where(force, required, token)
            forced |= force
        said = token.tolist()
        for row, token_id in enumerate(said):
            if token_id in kept and not done[row]:
                if token_id == seg_id:
                    seg_hidden[row].append(last[row])
                    seg_steps[row].append(step)
                if token_id in trigger_ids:
                    triggered[row].append((token_id, last[row]))
        generated.append(token)
        yield token
        if rules:
            has_seg |= token == required
            finished |= (token == eos_id) | force  # a forced <SEG> stands where the answer ended
            done = finished.tolist()
        elif eos_id in said:
            finished |= token == eos_id
            done = finished.tolist()
        if all(done) or step == max_new_tokens - 1:
            break
        step_mask = full_mask[:, : length + step + 1] if step_masks else None
        newest, logits = model.step_pass(embedding(token[:, None]), step_mask, positions, cache)
        if reads:
            step_hidden.append(newest)
        if any(done):
            running = ~finished[:, None]
            if medplib:
                before_last = torch.where(running, last, before_last)
            last = torch.where(running, newest, last)
        else:  # every row still running: the update above keeps every row's new state
            if medplib:
                before_last = last
            last = newest
        positions = positions + 1
    if medplib:
        for row in torch.nonzero(require & ~has_seg & (required == seg_id)).flatten().tolist():
            seg_hidden[row].append(before_last[row])
            seg_steps[row].append(max(len(generated) - 2, 0))  # the state before the last
            forced[row] = True
    seconds["decode"] = elapsed(start, device)
    empty = last.new_zeros(0, last.shape[-1])
    seg_states = [torch.stack(states) if states else empty for states in seg_hidden]
    if reads:
        steps = generated[: len(step_hidden)]  # step s's state is the one after generated token s
        step_ids = torch.stack(steps, dim=1) if steps else prompt_ids.new_zeros(rows, 0)
        seg_states = _read_decoded_requests(
            model, seg_states, seg_steps, prompt_hidden, step_hidden, prompt_ids, prompt_mask, step_ids
        )
    return GenerationOutput(
        sequences=torch.stack(generated, dim=1),
        seg_hidden_states=seg_states,
        seg_forced=forced,
        seconds=seconds,
        triggered=triggered,
    )


@torch.no_grad()
def prefill_answers(
    model: MedPLIBForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_length: int,
    *,
    pixel_values: torch.Tensor | None = None,
    region_masks: list[torch.Tensor] | None = None,
    image_features: torch.Tensor | None = None,
    past_key_values: Cache | PrefixKV | None = None,
) -> GenerationOutput:
    """Teacher-forced, in one pass: the last `answer_length` columns of every row are a known answer
    (the same in every row, e.g. the grounding template with its `</s>`). Its `<SEG>` hidden states
    are those decoding that answer would keep, without decoding it token by token. Arguments as
    `decode`; the answer must lie after the cached prefix.
    """
    rows, length = input_ids.shape
    past = 0 if past_key_values is None else past_key_values.get_seq_length()
    if not 0 < answer_length < length - past:
        raise InvalidInputError(f"an answer of {answer_length} tokens does not fit after the prompt")
    answers = input_ids[:, -answer_length:]
    if not (answers == answers[:1]).all() or not attention_mask[:, -answer_length:].all():
        raise InvalidInputError("prefilled answers must be the same real tokens in every row")
    start = time.perf_counter()
    embeds = model.embed_inputs(input_ids[:, past:], pixel_values, region_masks, image_features)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions[:, past:],
        past_key_values=generation_cache(model, past_key_values, rows, length, embeds),
        logits_to_keep=None,
    ).last_hidden_state
    predicting = hidden[:, -answer_length - 1 : -1]  # column c predicts column c + 1
    is_seg = answers == model.config.seg_token_id
    seg_states = [states[seg] for states, seg in zip(predicting, is_seg, strict=True)]
    if grounding_head(model) is not None:
        first = hidden.shape[1] - answer_length - 1  # the column of `predicting`'s first state
        columns = [first + torch.nonzero(seg).flatten() for seg in is_seg]
        suffix_ids, suffix_mask = input_ids[:, past:], attention_mask[:, past:]
        request = request_columns(suffix_ids, suffix_mask, model.config.im_end_token_id)
        seg_states = read_requests(model, seg_states, columns, hidden, request, suffix_ids)
    triggers = torch.tensor(sorted(getattr(model, "trigger_experts", {})), dtype=torch.long)
    is_trigger = torch.isin(answers.cpu(), triggers)
    triggered = [
        [(int(answers[row, col]), predicting[row, col]) for col in torch.nonzero(is_trigger[row]).flatten()]
        for row in range(rows)
    ]
    return GenerationOutput(
        sequences=answers,
        seg_hidden_states=seg_states,
        seg_forced=torch.zeros(rows, dtype=torch.bool, device=input_ids.device),
        seconds={"prefill": elapsed(start, input_ids.device), "decode": 0.0},
        triggered=triggered,
    )


def _read_decoded_requests(
    model: MedPLIBForCausalLM,
    seg_states: list[torch.Tensor],
    seg_steps: list[list[int]],
    prompt_hidden: torch.Tensor,
    step_hidden: list[torch.Tensor],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    step_ids: torch.Tensor,
) -> list[torch.Tensor]:
    """The decoded `<SEG>` states as the grounding head takes them: a `<SEG>` picked at step s was
    predicted by the state of column T + s - 1 of the prompt's T states and the steps' states (the
    states after the `step_ids` (B, S) tokens)."""
    rows, length = prompt_ids.shape
    request = request_columns(prompt_ids, prompt_mask, model.config.im_end_token_id)
    hidden = prompt_hidden
    if step_hidden:
        hidden = torch.cat([prompt_hidden, torch.stack(step_hidden, dim=1)], dim=1)
    # A step's state is real wherever a <SEG> reads it: its row was still running at that step.
    request = torch.cat([request, request.new_ones(rows, hidden.shape[1] - length)], dim=1)
    columns = [torch.tensor([length - 1 + s for s in steps], dtype=torch.long) for steps in seg_steps]
    token_ids = torch.cat([prompt_ids, step_ids.to(prompt_ids.device)], dim=1)
    return read_requests(model, seg_states, columns, hidden, request, token_ids)
