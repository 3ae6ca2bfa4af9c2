"""The `compat: medplib` profile: how MedPLIB's own code prepares inputs and reads outputs.

A checkpoint converted from MedPLIB's release (`medplib convert medplib`) answers as MedPLIB does
only if everything around the weights is MedPLIB's too. These rules differ from medplib's defaults:

- Template: vicuna v1 (`MEDPLIB_SYSTEM`, `USER: ` / ` ASSISTANT:`), `<im_start><image><im_end>\\n`
  in front of the first question, and `<region></region>` where a question marks a region.
- Tokenisation (transformers 4.31's slow LLaMA tokenizer, legacy): the prompt is split on MedPLIB's
  added tokens; whitespace next to an added token is dropped, every text piece is encoded on its own
  by SentencePiece (with its dummy prefix); `<image>` is placeholder -200 and between `<region>` and
  `</region>` sits placeholder -300, neither a vocabulary token.
- CLIP input: the image's longest side resized to 336 (bilinear), centre-padded with the CLIP mean
  colour, then resized (bicubic, shortest edge) and centre-cropped to the tower's input.
- SAM input: longest side resized to SAM's size (bilinear), normalised, centre-padded with zeros.
- Regions: the mask goes through the CLIP resize and padding, is sampled to the 24x24 patch grid by
  nearest neighbour, and keeps its largest 8-connected component; features are sampled bilinearly
  (align_corners=True) at every cell of it and averaged (`sample_region_features`).
- Masks: the low-res mask is cropped by the SAM-scale size as MedPLIB's `postprocess_masks` does
  (`postprocess_masks`), then resized straight to the original size.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medplib.core.errors import CheckpointError, InvalidInputError, RegionError

MEDPLIB_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER, REGION_PLACEHOLDER = -200, -300
CLIP_CANVAS, CLIP_PATCH = 336, 14  # fixed in MedPLIB's data path, whatever the tower's input size
SPIECE_FILE = "spiece.model"  # the SentencePiece model of a converted checkpoint's tokenizer


def medplib_prompt(turns: Sequence[tuple[str, str | None]], *, image: bool = True) -> str:
    """MedPLIB's prompt text of (question, answer) turns; a last answer of None ends in 'ASSISTANT:'."""
    parts = [MEDPLIB_SYSTEM + " "]
    for index, (question, answer) in enumerate(turns):
        question = question.replace("<image>", "").strip()
        if image and index == 0:
            question = f"<im_start><image><im_end>\n{question}"
        parts.append(f"USER: {question} ")
        parts.append("ASSISTANT:" if answer is None else f"ASSISTANT: {answer}</s>")
    return "".join(parts)


class MedPLIBTokenization:
    """Prompt text -> MedPLIB's input ids, exactly as its transformers 4.31 code produced them."""

    def __init__(
        self, spiece_model: str | Path, added_tokens: dict[str, int], special_tokens: dict[str, int]
    ) -> None:
        """`added_tokens`: MedPLIB's (whitespace next to them is dropped); `special_tokens`: `<s>`, `</s>`,
        `<unk>` (matched, whitespace kept)."""
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
        self.stripping = set(added_tokens)
        self.added = {**special_tokens, **added_tokens}
        self.bos_id = special_tokens["<s>"]
        # Longest first, so `</region>` is never read as text around `region>`.
        names = sorted(self.added, key=len, reverse=True)
        self.splitter = re.compile("(" + "|".join(re.escape(name) for name in names) + ")")

    @classmethod
    def from_tokenizer(cls, tokenizer, folder: str | Path) -> MedPLIBTokenization:
        """For a converted checkpoint's tokenizer: its SentencePiece model and MedPLIB's added tokens."""
        path = Path(folder, SPIECE_FILE)
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {SPIECE_FILE}; was it written by `medplib convert medplib`?")
        import sentencepiece

        own = sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
        vocab = tokenizer.get_vocab()
        # MedPLIB's added tokens follow SentencePiece's ids; medplib's two placeholder tokens are not its.
        placeholders = {"<image>", "<region_feat>"}
        added = {t: i for t, i in vocab.items() if i >= own and t not in placeholders}
        specials = {t: vocab[t] for t in ("<s>", "</s>", "<unk>")}
        return cls(path, added, specials)

    def _text_ids(self, text: str) -> list[int]:
        return self.processor.encode(text) if text else []

    def _chunk_ids(self, chunk: str) -> list[int]:
        pieces = self.splitter.split(chunk)
        ids: list[int] = []
        for index, piece in enumerate(pieces):
            if piece in self.added:
                ids.append(self.added[piece])
                continue
            # 4.31 strips the whitespace touching one of MedPLIB's added tokens on either side.
            if index > 0 and pieces[index - 1] in self.stripping:
                piece = piece.lstrip()
            if index < len(pieces) - 1 and pieces[index + 1] in self.stripping:
                piece = piece.rstrip()
            ids.extend(self._text_ids(piece))
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        """BOS, then each text chunk between `<image>` tags, joined by -200; -300 inside each region pair."""
        ids = [self.bos_id]
        for index, chunk in enumerate(prompt.split("<image>")):
            if index:
                ids.append(IMAGE_PLACEHOLDER)
            ids.extend(self._chunk_ids(chunk))
        start, end = self.added.get("<region>"), self.added.get("</region>")
        with_regions: list[int] = []
        for index, token in enumerate(ids):
            with_regions.append(token)
            if token == start and index + 1 < len(ids) and ids[index + 1] == end:
                with_regions.append(REGION_PLACEHOLDER)
        return with_regions


def model_input_ids(ids: Sequence[int], *, image_token_id: int, region_token_id: int, num_image_tokens: int):
    """MedPLIB's ids with its placeholders spelled as medplib's model reads them (one slot per patch)."""
    out: list[int] = []
    for token in ids:
        if token == IMAGE_PLACEHOLDER:
            out.extend([image_token_id] * num_image_tokens)
        else:
            out.append(region_token_id if token == REGION_PLACEHOLDER else token)
    return out


def resize_longest_side(pixels: np.ndarray, side: int) -> np.ndarray:
    """SAM's `ResizeLongestSide.apply_image`: PIL bilinear to the longest side `side` (uint8 in/out)."""
    height, width = pixels.shape[:2]
    scale = side / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    return np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BILINEAR))


def _centre_pad(array: np.ndarray, side: int, fill) -> np.ndarray:
    """(H, W[, C]) centred on a (side, side[, C]) canvas of `fill`; the odd pixel goes bottom/right."""
    height, width = array.shape[:2]
    top, left = (side - height) // 2, (side - width) // 2
    canvas = np.empty((side, side, *array.shape[2:]), dtype=array.dtype)
    canvas[...] = fill
    canvas[top : top + height, left : left + width] = array
    return canvas


def preprocess_clip_image(pixels: np.ndarray, *, image_size: int, mean, std) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> the CLIP tower's input (3, S, S), as MedPLIB's dataset and processor make it."""
    canvas = _centre_pad(resize_longest_side(pixels, CLIP_CANVAS), CLIP_CANVAS, [int(255 * m) for m in mean])
    image = Image.fromarray(canvas)
    if image_size != CLIP_CANVAS:  # CLIPImageProcessor: shortest edge to S (bicubic), centre crop S
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) * np.float32(1 / 255)).permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def preprocess_sam_image(pixels: np.ndarray, *, image_size: int, mean, std) -> tuple[torch.Tensor, tuple]:
    """RGB uint8 (H, W, 3) -> SAM input (3, S, S), centre-padded with zeros, and its (h, w) before padding."""
    resized = resize_longest_side(pixels, image_size)
    tensor = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1)
    tensor = (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    height, width = resized.shape[:2]
    pad_h, pad_w = image_size - height, image_size - width
    padded = F.pad(tensor, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return padded, (height, width)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 0/1 mask (the first in raster order on a tie).

    A flood fill: the mask is MedPLIB's 24x24 region grid, a few hundred cells at most.
    """
    labels = np.zeros(mask.shape, dtype=np.int32)
    sizes = [0]
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label = len(sizes)
        labels[start], stack, size = label, [start], 0
        while stack:
            row, col = stack.pop()
            size += 1
            for r in range(max(row - 1, 0), min(row + 2, height)):
                for c in range(max(col - 1, 0), min(col + 2, width)):
                    if mask[r, c] and not labels[r, c]:
                        labels[r, c] = label
                        stack.append((r, c))
        sizes.append(size)
    if len(sizes) == 1:
        raise RegionError("a region mask covers no cell of MedPLIB's 24x24 region grid")
    return (labels == int(np.argmax(sizes[1:])) + 1).astype(np.float32)


def region_grid(mask: np.ndarray) -> torch.Tensor:
    """Bool (H, W) region on the image -> (24, 24) float cells, as MedPLIB's data path makes them."""
    if mask.ndim != 2 or not mask.any():
        raise RegionError(f"a region mask must be a non-empty 2-D (H, W) mask, got shape {mask.shape}")
    canvas = _centre_pad(resize_longest_side(mask.astype(np.uint8), CLIP_CANVAS), CLIP_CANVAS, 0)
    nearest = canvas[::CLIP_PATCH, ::CLIP_PATCH]  # cv2 INTER_NEAREST at 1/14: source pixel 14 * j
    return torch.from_numpy(largest_component(nearest))


def sample_region_features(feature_map: torch.Tensor, mask: torch.Tensor, max_points: int) -> torch.Tensor:
    """Mean of (C, h, w) `feature_map` sampled at the set cells of `mask` (Hm, Wm), (C,).

    A cell (row, col) samples at (col / Wm, row / Hm) of the map with align_corners=True: the mask's
    own size normalises, so a 24x24 mask reads any feature grid. Over `max_points` cells, an evenly
    spaced subset (MedPLIB draws a random one).
    """
    cells = mask.nonzero().to(torch.float32)
    if len(cells) == 0:
        raise RegionError("a region mask covers no cell of the region grid")
    if len(cells) > max_points:
        cells = cells[torch.linspace(0, len(cells) - 1, max_points).round().long()]
    size = torch.tensor(mask.shape, dtype=torch.float32, device=cells.device)
    points = (cells / size).flip(-1) * 2 - 1
    samples = F.grid_sample(
        feature_map[None].float(), points.view(1, 1, -1, 2), mode="bilinear", align_corners=True
    )
    return samples[0, :, 0].mean(dim=-1).to(feature_map.dtype)


def postprocess_masks(low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]):
    """(n, L, L) low-res logits -> (n, H, W), MedPLIB's rule.

    MedPLIB crops `low_res[top : top + h, left : left + w]` with `top = (L - h) // 2` although `h` is on
    SAM's input scale (4L): the start is negative, so Python slicing counts it from the end. That crop
    is reproduced as it is, then the mask is resized bilinearly to the original size.
    """
    side = low_res.shape[-1]
    rows = _python_slice(side, (side - input_size[0]) // 2, input_size[0])
    cols = _python_slice(side, (side - input_size[1]) // 2, input_size[1])
    cropped = low_res[:, rows, cols]
    return F.interpolate(cropped[:, None], tuple(original_size), mode="bilinear", align_corners=False)[:, 0]


def _python_slice(length: int, start: int, size: int) -> slice:
    """`sequence[start : start + size]` in Python's semantics, as non-negative bounds."""
    return slice(*slice(start, start + size).indices(length)[:2])


def fallback_hidden_index(num_hidden: int) -> int:
    """Without a generated `<SEG>`, MedPLIB takes hidden state -2 of prompt + generated states."""
    return max(0, num_hidden - 2)


def tokenization_of(tokenizer) -> MedPLIBTokenization:
    """The MedPLIB tokenisation a converted checkpoint's loader attached to its tokenizer."""
    found = getattr(tokenizer, "medplib_tokenization", None)
    if found is None:
        raise CheckpointError(
            "a compat: medplib model needs its tokenizer loaded with the checkpoint (spiece.model)"
        )
    return found


def encode_turns(tokenizer, turns: Sequence, config) -> tuple[list[int], int]:
    """medplib `Turn`s (text, regions, `<SEG>`) -> the model's input ids as MedPLIB builds them, and the
    number of regions. Regions become `<region></region>` (placeholder -300 between), `<SEG>` stays."""
    from medplib.core.model.tokenizer import ControlToken

    spelling = {ControlToken.REGION: "<region></region>", ControlToken.SEG: "<SEG>"}

    def text_of(value, allowed: ControlToken) -> str:
        parts = [value] if isinstance(value, str) else list(value)
        for part in parts:
            if not isinstance(part, str) and part is not allowed:
                raise InvalidInputError(
                    f"this part of a turn may hold text and {allowed.value}, not {part.value}"
                )
        return "".join(part if isinstance(part, str) else spelling[part] for part in parts)

    pairs = [
        (
            text_of(turn.user, ControlToken.REGION),
            None if turn.assistant is None else text_of(turn.assistant, ControlToken.SEG),
        )
        for turn in turns
    ]
    ids = tokenization_of(tokenizer).prompt_ids(medplib_prompt(pairs))
    num_regions = ids.count(REGION_PLACEHOLDER)
    return (
        model_input_ids(
            ids,
            image_token_id=config.image_token_id,
            region_token_id=config.region_token_id,
            num_image_tokens=config.num_image_tokens,
        ),
        num_regions,
    )
