"""The request a trigger token answers, as token states a head can read (`ExpertHead.read_request`).

The request of a state at column p of a row: the row's real tokens after its last `<im_end>` (the
image and the system prompt before it are the cached prefix at inference) up to and including p,
i.e. the question and the answer so far. Training, scoring, decoding and the template prefill all
build it here, so a head reads the same tokens in each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from medplib.core.model.modeling_medplib import MedPLIBForCausalLM


def request_columns(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, im_end_id: int
) -> torch.Tensor:
    """(B, T) bool: the real columns after each row's last `<im_end>` (every real column without one)."""
    is_end = input_ids == im_end_id
    seen = is_end.long().cumsum(dim=1)
    after = (seen == seen[:, -1:]) & ~is_end
    return after if attention_mask is None else after & attention_mask.bool()


def grounding_head(model: MedPLIBForCausalLM) -> torch.nn.Module | None:
    """The head `<SEG>` triggers when it reads the request, else None (nothing to do)."""
    name = getattr(model, "trigger_experts", {}).get(model.config.seg_token_id)
    head = model.expert_heads.get(name) if name is not None else None
    return head if head is not None and getattr(head, "reads_request", False) else None


def request_embeddings(
    model: MedPLIBForCausalLM, token_ids: torch.Tensor, request: torch.Tensor
) -> torch.Tensor:
    """(B, T, H) input embeddings of the `request` (B, T) columns of `token_ids`; zeros elsewhere (the
    image's and padding's slots, whose ids may be placeholders, are never read)."""
    ids = torch.where(request, token_ids, 0)
    embeddings = model.get_input_embeddings()(ids)
    rows = getattr(model, "build_word_rows", None) if model.config.seg_read_build_rows else None
    if rows is not None:  # the build's rows; tokens added after the build (experts') keep their own
        built = rows[ids.clamp(max=len(rows) - 1)].to(embeddings.dtype)
        embeddings = torch.where((ids < len(rows))[..., None], built, embeddings)
    return embeddings * request[..., None].to(embeddings.dtype)


def read_requests(
    model: MedPLIBForCausalLM,
    states: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
    hidden: torch.Tensor,
    request: torch.Tensor,
    token_ids: torch.Tensor,
) -> list[torch.Tensor]:
    """Per row, its `<SEG>` states (n, H), at `columns` (n,) of `hidden` (B, T, H), as the grounding
    head takes them: each reads the `request` (B, T) bool columns up to its own, the states and, for
    a head that `reads_embeddings`, the input embeddings of `token_ids` (B, T). Unchanged when the
    head does not read requests."""
    head = grounding_head(model)
    if head is None:
        return list(states)
    embeddings = None
    if getattr(head, "reads_embeddings", False):
        embeddings = request_embeddings(model, token_ids.to(hidden.device), request.to(hidden.device))
    read = []
    span = torch.arange(hidden.shape[1], device=hidden.device)
    for row, (row_states, row_columns) in enumerate(zip(states, columns, strict=True)):
        if not len(row_states):
            read.append(row_states)
            continue
        row_columns = row_columns.to(hidden.device)
        mask = request[row][None, :] & (span[None, :] <= row_columns[:, None])
        mask[torch.arange(len(row_columns), device=hidden.device), row_columns] = True  # its own state
        context = hidden[row].expand(len(row_states), -1, -1)
        if embeddings is None:
            read.append(head.read_request(row_states, context, mask))
        else:
            words = embeddings[row].expand(len(row_states), -1, -1)
            read.append(head.read_request(row_states, context, mask, words))
    return read
