"""Batched generation that reuses per-image work: CLIP features, SAM embeddings and the prompt prefix.

A batch of conversations runs as one left-padded batch through prefill and decode. Everything that
depends only on the image is looked up in an `PerImageCache` first and computed, batched over the
images that miss, only when needed:

- the prompt prefix (system prompt, `USER:`, the image tokens) is the same token sequence for every
  question, so its keys and values per image are cached; each row then prefills only its own words,
  with the padding placed between the prefix and the rest (positions count real tokens only, so this
  is the same computation as a left-padded prompt);
- CLIP features are needed to build a missing prefix and by the region encoder;
- SAM's image embedding is needed only when an answer holds a `<SEG>`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from medplib.core.errors import CapacityError, InvalidInputError
from medplib.core.expert_heads import head_outputs, trigger_states
from medplib.core.model import MaskPrediction, MedPLIBForCausalLM, MedPLIBProcessor, Request, Turn
from medplib.core.model.generation import decode_steps, elapsed, prefill_answers, run_to_end
from medplib.core.model.grounding import sam_input_size
from medplib.core.model.kv_cache import PrefixKV
from medplib.core.per_image_cache import CacheKey, PerImageCache, image_digest
from medplib.core.queries import Decoding


@dataclass(frozen=True)
class Generated:
    text: str
    masks: MaskPrediction
    seg_forced: bool
    prompt_tokens: int
    new_tokens: int
    cache: dict[str, str]  # "clip" / "sam" / "prefix" -> "hit", "miss" or "unused"
    seg_hidden_states: torch.Tensor  # (n_seg, hidden): what predicted each <SEG>, for a remote decoder
    outputs: dict[str, list[dict]] = field(default_factory=dict)  # expert -> its head's outputs (masks aside)
    # The experts whose heads run elsewhere (`heads_apart`): their trigger tokens' hidden states (n, hidden)
    head_states: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchGeneration:
    rows: list[Generated]
    milliseconds: dict[str, float]  # per stage, for the whole batch


class CachedGenerator:
    """Runs batches of conversations through `model`, keeping per-image work in `cache`.

    `fingerprint` names this model and its preprocessing in the cache keys; a cache shared between
    models keeps their entries apart by it.
    """

    def __init__(self, model: MedPLIBForCausalLM, cache: PerImageCache, fingerprint: str) -> None:
        self.model = model
        self.cache = cache
        self.fingerprint = fingerprint
        self.processor = MedPLIBProcessor(model.config, model.tokenizer)
        config = model.config
        probe = self.processor.encode_turns([Turn("?")])
        self.prefix_ids = probe.input_ids[: probe.input_ids.index(config.im_end_token_id) + 1]

    def run(
        self, conversations: Sequence[Request], decoding: Decoding, *, predict_masks: bool = True
    ) -> BatchGeneration:
        """Generate every row; `predict_masks=False` stops before SAM (rows get no masks), for a
        deployment whose grounding decoder runs elsewhere on `seg_hidden_states` (`decode_masks`)."""
        return run_to_end(self.run_steps(conversations, decoding, predict_masks=predict_masks))

    @torch.no_grad()
    def run_steps(
        self,
        conversations: Sequence[Request],
        decoding: Decoding,
        *,
        predict_masks: bool = True,
        heads_apart: Collection[str] = (),
    ) -> Generator[torch.Tensor, None, BatchGeneration]:
        """`run`, yielding each decoding step's tokens (B,) as they are picked (streaming). The heads of
        the experts `heads_apart` are not run: their rows carry the hidden states (`head_states`)."""
        ms = dict.fromkeys(("encode_clip", "prefill", "decode", "encode_sam", "masks"), 0.0)
        encoded = [self.processor.encode_request(request) for request in conversations]
        answer_length = self._answer_length(conversations, [c for c, _ in encoded])
        self._check_length([len(conversation.input_ids) for conversation, _ in encoded], decoding)
        digests = [image_digest(c.pixels) for c in conversations]
        images = {digest: c.pixels for digest, c in zip(digests, conversations, strict=True)}
        with_regions = {d for d, (_, masks) in zip(digests, encoded, strict=True) if len(masks)}
        features, prefixes, clip_uses, missing = self._image_work(images, with_regions, ms)

        prefix_length = len(self.prefix_ids)
        if any(conversation.input_ids[:prefix_length] != self.prefix_ids for conversation, _ in encoded):
            raise RuntimeError("the conversation template no longer starts with the cached prefix")
        input_ids, attention_mask, _ = self.processor.pad(
            [c for c, _ in encoded], "left", prefix=prefix_length
        )
        row_features = row_pixels = None
        if with_regions:  # the region encoder reads the features of the rows that mark regions
            row_features = _region_rows({d: features[d] for d in with_regions}, digests)
            if self.model.config.region_appearance:  # and their pixels
                pixels = {d: self.processor.clip_pixels(images[d]) for d in with_regions}
                row_pixels = _region_rows(pixels, digests).to(self.model.device)
        device = self.model.device
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "region_masks": [masks.to(device) for _, masks in encoded],
            "image_features": row_features,
            "pixel_values": row_pixels,
            "past_key_values": self._batch_cache([prefixes[digest] for digest in digests]),
        }
        if answer_length:  # the known answer is prefilled: one pass, no step to stream
            out = prefill_answers(self.model, answer_length=answer_length, **inputs)
        else:
            require_seg = torch.tensor([c.require_seg for c in conversations])
            require_token = torch.tensor([c.require_token or -1 for c in conversations])
            out = yield from decode_steps(
                self.model,
                require_seg=require_seg,
                require_token=require_token,
                require_at_start=torch.tensor([c.require_at_start for c in conversations]),
                **inputs,
                **self._sampling(decoding),
            )
        ms["prefill"] += 1000 * out.seconds["prefill"]
        ms["decode"] = 1000 * out.seconds["decode"]
        # Without mask prediction every row reads as having no <SEG>: SAM is not touched.
        wanted = out.seg_hidden_states if predict_masks else [s[:0] for s in out.seg_hidden_states]
        predictions, sam_uses = self._masks(wanted, digests, images, ms)

        texts = self.processor.decode(out.sequences)
        triggered = [trigger_states(self.model, row) for row in out.triggered]
        rows = [
            Generated(
                text=texts[row],
                masks=predictions[row],
                seg_forced=bool(out.seg_forced[row]),
                prompt_tokens=len(encoded[row][0].input_ids),
                new_tokens=self._generated_length(out.sequences[row].tolist()),
                cache={
                    "clip": clip_uses.get(digest, "unused"),
                    "sam": sam_uses.get(digest, "unused"),
                    "prefix": "miss" if digest in missing else "hit",
                },
                seg_hidden_states=out.seg_hidden_states[row],
                outputs=head_outputs(self.model, triggered[row], apart=heads_apart),
                head_states={name: s for name, s in triggered[row].items() if name in heads_apart},
            )
            for row, digest in enumerate(digests)
        ]
        return BatchGeneration(rows=rows, milliseconds=ms)

    @torch.no_grad()
    def decode_masks(
        self, seg_hidden_states: Sequence[torch.Tensor], images: Sequence[np.ndarray]
    ) -> tuple[list[MaskPrediction], list[str], dict[str, float]]:
        """The grounding half alone: per image its `<SEG>` hidden states (n, hidden) -> n masks, SAM's
        image embedding from the cache. Returns the predictions, each row's SAM cache use and the
        "encode_sam" / "masks" milliseconds."""
        ms = {"encode_sam": 0.0, "masks": 0.0}
        digests = [image_digest(pixels) for pixels in images]
        states = [s.to(device=self.model.device, dtype=self.model.dtype) for s in seg_hidden_states]
        predictions, uses = self._masks(states, digests, dict(zip(digests, images, strict=True)), ms)
        return predictions, [uses.get(digest, "unused") for digest in digests], ms

    def _answer_length(self, conversations: Sequence[Request], encoded: list) -> int:
        """Tokens of the known answer every row carries (0: the rows decode theirs)."""
        if not any(c.answered for c in conversations):
            return 0
        if not all(c.answered for c in conversations):
            raise InvalidInputError("a batch either decodes its answers or prefills known ones, not both")
        lengths = set()
        for conversation, full in zip(conversations, encoded, strict=True):
            *earlier, last = conversation.turns
            prompt = self.processor.encode_turns([*earlier, Turn(last.user)])
            lengths.add(len(full.input_ids) - len(prompt.input_ids))
        if len(lengths) != 1:
            raise InvalidInputError("prefilled answers must have the same length in every row")
        return lengths.pop()

    def _check_length(self, prompt_lengths: list[int], decoding: Decoding) -> None:
        positions = self.model.config.text_config.max_position_embeddings
        longest = max(prompt_lengths)
        if longest + decoding.max_new_tokens > positions:
            raise CapacityError(
                f"a prompt of {longest} tokens plus {decoding.max_new_tokens} new tokens exceeds the model's "
                f"{positions} positions; shorten the conversation or max_new_tokens"
            )

    def _image_work(
        self, images: dict[str, np.ndarray], with_regions: set[str], ms: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], list[str]]:
        """Per image: CLIP features where needed, the prefix's keys and values (cached or built)."""
        prefixes = {digest: self.cache.get(self._key("prefix", digest)) for digest in images}
        missing = [digest for digest, kv in prefixes.items() if kv is None]
        wanted = [digest for digest in images if digest in with_regions or digest in missing]
        with self._stage(ms, "encode_clip"):
            features, clip_uses = self._cached("clip", wanted, images, self._encode_clip)
        with self._stage(ms, "prefill"):
            if missing:
                built = self._prefix_kv(torch.stack([features[digest] for digest in missing]))
                for digest, kv in zip(missing, built, strict=True):
                    self.cache.put(self._key("prefix", digest), kv)
                    prefixes[digest] = kv
        return features, prefixes, clip_uses, missing

    def _masks(
        self,
        seg_hidden_states: list[torch.Tensor],
        digests: list[str],
        images: dict[str, np.ndarray],
        ms: dict[str, float],
    ) -> tuple[list[MaskPrediction], dict[str, str]]:
        """One mask per generated `<SEG>`; SAM's image embedding only for images that have one."""
        grounded = dict.fromkeys(digests[row] for row, states in enumerate(seg_hidden_states) if len(states))
        with self._stage(ms, "encode_sam"):
            embeddings, sam_uses = self._cached("sam", list(grounded), images, self._encode_sam)
        with self._stage(ms, "masks"):
            stacked = None
            if embeddings:
                filler = torch.zeros_like(next(iter(embeddings.values())))
                stacked = torch.stack([embeddings.get(digest, filler) for digest in digests])
            side = self.model.config.sam_config.image_size
            sizes = [images[digest].shape[:2] for digest in digests]
            predictions = self.model.predict_masks(
                seg_hidden_states,
                None,
                [sam_input_size(height, width, side) for height, width in sizes],
                sizes,
                image_embeddings=stacked,
            )
        return predictions, sam_uses

    # ---- per-image work, cached -----------------------------------------------------------------------

    def _key(self, kind: str, digest: str) -> CacheKey:
        return CacheKey(kind, digest, self.fingerprint)

    def _cached(
        self,
        kind: str,
        digests: Sequence[str],
        images: dict[str, np.ndarray],
        compute: Callable[[list[np.ndarray]], list[torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Per digest, its cached value; the missing ones are computed in one batch and stored."""
        values, uses = {}, {}
        for digest in digests:
            value = self.cache.get(self._key(kind, digest))
            if value is not None:
                values[digest], uses[digest] = value, "hit"
        missing = [digest for digest in digests if digest not in values]
        if missing:
            for digest, value in zip(missing, compute([images[d] for d in missing]), strict=True):
                self.cache.put(self._key(kind, digest), value)
                values[digest], uses[digest] = value, "miss"
        return values, uses

    def _encode_clip(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        pixels = torch.stack([self.processor.clip_pixels(image) for image in images]).to(self.model.device)
        # Own copies: a view would keep the whole batch's storage alive in the cache.
        return [features.clone() for features in self.model.image_features(pixels)]

    def _encode_sam(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        pixels = torch.stack([self.processor.sam_pixels(image)[0] for image in images]).to(self.model.device)
        return [embedding.clone() for embedding in self.model.sam_image_embeddings(pixels)]

    def _prefix_kv(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the prefix's keys and values as one (layers, 2, heads, P, head_dim) tensor."""
        ids = torch.tensor([self.prefix_ids] * len(features), device=self.model.device)
        embeds = self.model.embed_inputs(ids, image_features=features)
        cache = DynamicCache(config=self.model.config.text_config)
        _, cache = self.model.run_language_model(embeds, torch.ones_like(ids), cache=cache)
        layers = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
        return [layers[:, :, row].clone() for row in range(len(features))]

    def _batch_cache(self, kvs: list[torch.Tensor]) -> PrefixKV:
        return PrefixKV(kvs)

    # ---- helpers ---------------------------------------------------------------------------------------

    def _sampling(self, decoding: Decoding) -> dict:
        sample = decoding.temperature > 0
        generator = None
        if sample and decoding.seed is not None:
            generator = torch.Generator(self.model.device).manual_seed(decoding.seed)
        return {
            "max_new_tokens": decoding.max_new_tokens,
            "do_sample": sample,
            "temperature": decoding.temperature if sample else 1.0,
            "top_k": decoding.top_k,
            "top_p": decoding.top_p,
            "generator": generator,
        }

    def _generated_length(self, sequence: list[int]) -> int:
        """Tokens a row generated: through its </s>, else up to the padding that follows its end."""
        text_config = self.model.config.text_config
        if text_config.eos_token_id in sequence:
            return sequence.index(text_config.eos_token_id) + 1
        length = len(sequence)
        while length and sequence[length - 1] == text_config.pad_token_id:
            length -= 1
        return length

    @contextlib.contextmanager
    def _stage(self, ms: dict[str, float], name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        ms[name] += 1000 * elapsed(start, self.model.device)


def _region_rows(values: dict[str, torch.Tensor], digests: list[str]) -> torch.Tensor:
    """One row per request: its image's value if it marks regions, else zeros its slots never read."""
    filler = torch.zeros_like(next(iter(values.values())))
    return torch.stack([values.get(digest, filler) for digest in digests])
