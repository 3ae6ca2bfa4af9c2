"""The pixel-grounding expert's head: the `<SEG>` projection and SAM, as its spec's factory builds them.

The hidden state that predicts a `<SEG>` goes through `GroundingHead` (a 2-layer MLP, as LISA's
`text_hidden_fcs`) to SAM's prompt width and becomes the one sparse prompt of SAM's mask decoder;
the dense prompt is SAM's no-mask embedding (or, with `seg_dense_film`, one the prompt modulates).
With `seg_read_request`, the state first reads the request's own token states (`RequestReader`).
`PixelGroundingHead` is the `ExpertHead` the model builds through the spec, as it builds a plugin's:
its parts sit on the model as `seg_head` and `sam`, the names every checkpoint's keys carry.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from segment_anything.modeling import PromptEncoder
from torch import nn

from medplib.core.expert_heads import ExpertHead
from medplib.core.model.configuration_medplib import MedPLIBConfig
from medplib.experts.pixel_grounding.sam import SamGrounding, build_sam


class FiLMLinear(nn.Linear):
    """A linear map with N(0, 1/width) weights and zero bias: unit-variance inputs give unit-variance
    modulation from the first step. Its own `reset_parameters`, so every init path (construction,
    transformers' guarded init of missing weights) gives the same."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.in_features**-0.5)
        nn.init.zeros_(self.bias)


class DensePromptFiLM(nn.Module):
    """The `<SEG>` prompt also conditions SAM's dense prompt, FiLM-style (`MedPLIBConfig.seg_dense_film`).

    dense = no-mask embedding + PE + scale(q) * PE + shift(q), q the layer-normalised sparse prompt and
    PE SAM's dense positional encoding (C, g, g). A randomly initialised SAM's mask features carry no
    absolute position, and its decoder learns to ignore its sparse prompt within a few steps; added
    here, the prompt modulates the positional features every mask pixel is computed from, which the
    decoder cannot route around, so left and right of a symmetric image become separable.
    """

    def __init__(self, prompt_embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(prompt_embed_dim, elementwise_affine=False)
        self.scale = FiLMLinear(prompt_embed_dim, prompt_embed_dim)
        self.shift = FiLMLinear(prompt_embed_dim, prompt_embed_dim)

    def forward(self, prompts: torch.Tensor, no_mask: torch.Tensor, positional: torch.Tensor) -> torch.Tensor:
        """(n, C) prompts, (C,) no-mask embedding, (C, g, g) PE -> (n, C, g, g) dense prompts."""
        q = self.norm(prompts)
        scale, shift = self.scale(q)[..., None, None], self.shift(q)[..., None, None]
        return no_mask[:, None, None] + positional + scale * positional + shift


class ZeroLinear(nn.Linear):
    """A linear map that starts at zero (weights and bias): a residual branch that begins as no change."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class ImageFiLM(nn.Module):
    """The `<SEG>` prompt also scales SAM's image embedding channel-wise (`MedPLIBConfig.seg_image_film`).

    SAM's decoder reads image embedding + dense prompt, so a dense term gain(q) * embedding makes that
    embedding * (1 + gain(q)) + dense, q the layer-normalised sparse prompt. The positional FiLM lets a
    prompt pick places (left, right); structures that differ by intensity or texture, not place (grey
    and white matter), need the prompt to pick the image's channels. `gain` starts at zero: a head that
    gets it first predicts what it did without.
    """

    def __init__(self, prompt_embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(prompt_embed_dim, elementwise_affine=False)
        self.gain = ZeroLinear(prompt_embed_dim, prompt_embed_dim)

    def forward(self, prompts: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        """(n, C) prompts, (1, C, g, g) image embedding -> (n, C, g, g) dense term gain(q) * embedding."""
        return self.gain(self.norm(prompts))[..., None, None] * image_embedding


class RequestReader(nn.Module):
    """The `<SEG>` state reads the request's words (`MedPLIBConfig.seg_read_request`).

    state + out(attention over the request's token states, query from the state): multi-head
    attention from the `<SEG>`-predicting state to the last-layer states of the request (the tokens
    after the image, up to that state). A from-scratch trunk whose frozen attention did not carry
    "left" or "right" to the `<SEG>` position still holds the words' own states, which differ; this
    gives the head the name whatever the trunk's attention does. `out` starts at zero, so a reader
    added to a trained head first changes nothing.
    """

    def __init__(self, hidden_size: int, heads: int = 4, embeddings: bool = False) -> None:
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {heads} heads")
        self.heads = heads
        self.query_norm = nn.LayerNorm(hidden_size)
        self.context_norm = nn.LayerNorm(hidden_size)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = ZeroLinear(hidden_size, hidden_size)
        # `seg_read_embeddings`: keys and values also carry each token's input embedding, the word's
        # identity, which differs between "left" and "right" (or "grey" and "white") whatever the
        # trunk's layers made of it.
        self.embedding_norm = nn.LayerNorm(hidden_size) if embeddings else None
        self.embedding_key = nn.Linear(hidden_size, hidden_size) if embeddings else None
        self.embedding_value = nn.Linear(hidden_size, hidden_size) if embeddings else None

    @property
    def reads_embeddings(self) -> bool:
        return self.embedding_norm is not None

    def forward(
        self,
        states: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n, H) states, (n, T, H) context, (n, T) bool mask (each row at least one True) -> (n, H);
        `embeddings` (n, T, H): the context tokens' input embeddings, needed with `reads_embeddings`."""
        n, length, width = context.shape
        split = (n, length, self.heads, width // self.heads)
        query = self.query(self.query_norm(states)).view(n, self.heads, -1)
        normed = self.context_norm(context)
        keys, values = self.key(normed), self.value(normed)
        if self.embedding_norm is not None:
            if embeddings is None:
                raise ValueError("this request reader reads the tokens' input embeddings; none were given")
            words = self.embedding_norm(embeddings)
            keys, values = keys + self.embedding_key(words), values + self.embedding_value(words)
        keys, values = keys.view(split), values.view(split)
        scores = torch.einsum("nhd,nthd->nht", query, keys) * (width // self.heads) ** -0.5
        weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(dim=-1)
        pooled = torch.einsum("nht,nthd->nhd", weights, values).reshape(n, width)
        return states + self.out(pooled)


class GroundingHead(nn.Module):
    """LLM hidden state -> SAM sparse prompt embedding (and, with `dense_film`, its dense prompt)."""

    def __init__(
        self,
        hidden_size: int,
        prompt_embed_dim: int,
        dense_film: bool = False,
        read_request: bool = False,
        read_embeddings: bool = False,
        image_film: bool = False,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, prompt_embed_dim)
        self.dense_film = DensePromptFiLM(prompt_embed_dim) if dense_film else None
        self.image_film = ImageFiLM(prompt_embed_dim) if image_film else None
        self.request = RequestReader(hidden_size, embeddings=read_embeddings) if read_request else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))

    def dense_prompts(
        self, prompts: torch.Tensor, prompt_encoder: PromptEncoder, image_embedding: torch.Tensor
    ) -> torch.Tensor | None:
        """The dense prompts (n, C, g, g) for sparse `prompts` (n, C) on one image's SAM embedding
        (1, C, g, g); None: SAM's no-mask embedding."""
        if self.dense_film is None and self.image_film is None:
            return None
        no_mask = prompt_encoder.no_mask_embed.weight[0]
        if self.dense_film is None:
            dense = no_mask[None, :, None, None].expand(len(prompts), -1, *image_embedding.shape[-2:])
        else:
            # segment-anything builds its positional encoding in float32; autocast bridges a half SAM.
            half = prompts.dtype != torch.float32
            with torch.autocast(prompts.device.type, dtype=prompts.dtype, enabled=half):
                positional = prompt_encoder.get_dense_pe()[0].to(prompts.dtype)
            dense = self.dense_film(prompts, no_mask, positional)
        if self.image_film is not None:
            dense = dense + self.image_film(prompts, image_embedding)
        return dense


class PixelGroundingHead(ExpertHead):
    """`<SEG>` hidden state -> SAM prompt -> mask. Image-conditioned: the model decodes its masks with
    SAM on the image's embedding (`MedPLIBForCausalLM.predict_masks`), and a result's `outputs` list
    those masks; its losses are the mask losses (BCE, Dice, focal) of the spec's `loss_weights`."""

    model_parts: ClassVar[dict[str, str]] = {"seg_head": "prompt", "sam": "sam"}
    image_conditioned: ClassVar[bool] = True
    forced_at: ClassVar[str] = "end"  # "Sure, it is <SEG>.": where the answer would end

    def __init__(self, prompt: GroundingHead, sam: SamGrounding) -> None:
        super().__init__()
        self.prompt = prompt
        self.sam = sam

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(n, hidden) -> SAM sparse prompts (n, prompt_embed_dim)."""
        return self.prompt(hidden_states)

    @property
    def reads_request(self) -> bool:
        return self.prompt.request is not None

    @property
    def reads_embeddings(self) -> bool:
        return self.prompt.request is not None and self.prompt.request.reads_embeddings

    def read_request(
        self,
        states: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.prompt.request is None:
            return states
        reader = self.prompt.request
        dtype = reader.out.weight.dtype
        words = embeddings.to(dtype) if embeddings is not None else None
        read = reader(states.to(dtype), context.to(dtype), mask, words)
        return read.to(states.dtype)

    def add_image_film(self) -> bool:
        """Give a head built without one its `ImageFiLM` (zero gain); False when it has one already."""
        if self.prompt.image_film is not None:
            return False
        parameter = self.prompt.fc2.weight
        film = ImageFiLM(parameter.shape[0])
        self.prompt.image_film = film.to(device=parameter.device, dtype=parameter.dtype)
        return True

    def add_request_reader(self, embeddings: bool = False) -> bool:
        """Give a head built without one its `RequestReader` (fresh; reading the tokens' input
        `embeddings` too if asked); False when it has one already."""
        if self.prompt.request is not None:
            return False
        parameter = self.prompt.fc1.weight
        reader = RequestReader(parameter.shape[1], embeddings=embeddings)
        self.prompt.request = reader.to(device=parameter.device, dtype=parameter.dtype)
        return True


def build_grounding_head(config: MedPLIBConfig) -> PixelGroundingHead:
    """The head the pixel-grounding spec names: the `<SEG>` projection and SAM, sized from the config."""
    prompt = GroundingHead(
        config.text_config.hidden_size,
        config.sam_config.prompt_embed_dim,
        dense_film=config.seg_dense_film,
        read_request=getattr(config, "seg_read_request", False),
        read_embeddings=getattr(config, "seg_read_embeddings", False),
        image_film=getattr(config, "seg_image_film", False),
    )
    return PixelGroundingHead(prompt, build_sam(config.sam_config))
