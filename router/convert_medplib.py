"""`medplib convert medplib SRC OUT`: MedPLIB's released checkpoint -> a medplib checkpoint folder.

The source is read one shard at a time (memory-mapped) and each output shard is written tensor by
tensor with a streaming safetensors writer, so peak memory stays near one source shard plus one
tensor, not the model. Every key is renamed by `RELEASE_KEY_RULES`; before a byte is written, every
source key must map to exactly one key of the converted model, and every key that model expects must
come from the source, or the conversion fails naming the keys.

The output is an ordinary checkpoint: sharded safetensors with their index, `config.json` (with
`compat: medplib` and the `routed_experts` record of the `moe` dict), the tokenizer (MedPLIB's ids,
plus medplib's `<image>` and `<region_feat>` placeholders after them) and `spiece.model` for
MedPLIB's exact prompt tokenisation. Gates stay float32 whatever `dtype` the rest is written in.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medplib.core.errors import CheckpointError, InvalidInputError, describe_key_problems
from medplib.core.model.compat import SPIECE_FILE
from medplib.core.model.configuration_medplib import MedPLIBConfig
from medplib.core.model.medplib_release import (
    SAM_MED2D_DECODER_HEADS,
    ReleaseCheckpoint,
    release_key,
    sam_config_from_shapes,
    text_config_from,
    vision_config_from,
)
from medplib.core.model.tokenizer import add_control_tokens
from medplib.router.factor_experts import EXPERT_KEY, LayerFactorizer, factored_shapes

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
GROWN_ROWS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class ConversionReport:
    source_keys: int = 0
    written_keys: int = 0
    dropped_keys: list[str] = field(default_factory=list)
    mapping: dict[str, str | None] = field(default_factory=dict)  # source key -> converted key
    bytes_written: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # --experts lora: per routed projection, the largest relative error over its experts
    factorization_error: dict[str, float] = field(default_factory=dict)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


def write_safetensors(path: Path, entries: list[tuple[str, tuple, torch.dtype, Callable[[], torch.Tensor]]]):
    """A safetensors file written tensor by tensor: the header from shapes, then each tensor's bytes as
    it is produced, so only one tensor is in memory at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        size = _nbytes(shape, dtype)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, shape, dtype, produce in entries:
            tensor = produce()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(
                    f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}"
                )
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
MADV_DONTNEED = 4


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Drop the pages of a tensor memory-mapped from a source file out of this process's memory.

    Reading a mapped shard tensor by tensor would otherwise leave the whole shard resident until the
    next one is mapped. The pages are clean copies of the file, so the kernel re-reads any that is
    touched again (the page-aligned range may reach into a neighbour). Only for file-mapped tensors.
    """
    if _LIBC is None or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def convert_tokenizer(location: str | Path, vocab_size: int):
    """MedPLIB's tokenizer as a fast tokenizer with medplib's control tokens; its ids unchanged."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(location))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read MedPLIB's tokenizer at {location}: {exc}") from None
    if len(tokenizer) != vocab_size:
        raise CheckpointError(
            f"the tokenizer at {location} has {len(tokenizer)} tokens, the checkpoint {vocab_size}: "
            "not its tokenizer"
        )
    tokenizer.pad_token = tokenizer.unk_token  # MedPLIB pads with <unk> (id 0)
    before = tokenizer.get_vocab()
    ids = add_control_tokens(tokenizer)
    after = tokenizer.get_vocab()
    changed = [token for token, index in before.items() if after.get(token) != index]
    if changed or ids["seg_token_id"] != before.get("<SEG>"):
        raise CheckpointError(f"adding medplib's control tokens moved MedPLIB's ids: {changed[:5]}")
    return tokenizer, ids


def build_converted_config(
    release: ReleaseCheckpoint,
    shapes: dict,
    ids: dict[str, int],
    vocab_size: int,
    *,
    vision_tower: str | Path | None = None,
    sam_decoder_heads: int = SAM_MED2D_DECODER_HEADS,
) -> MedPLIBConfig:
    source = release.config
    checks = {
        "mm_vision_select_feature": ("patch", source.get("mm_vision_select_feature", "patch")),
        "mm_projector_type": ("mlp2x_gelu", source.get("mm_projector_type", "mlp2x_gelu")),
        "mm_use_im_start_end": (True, source.get("mm_use_im_start_end", True)),
    }
    for name, (wanted, found) in checks.items():
        if found != wanted:
            raise CheckpointError(
                f"{release.folder}: {name} = {found!r}; only {wanted!r} (MedPLIB's release) converts"
            )
    return MedPLIBConfig(
        vision_config=vision_config_from(release, shapes, vision_tower),
        text_config=text_config_from(release, vocab_size),
        sam_config=sam_config_from_shapes(shapes, sam_decoder_heads),
        vision_feature_layer=source.get("mm_vision_select_layer", -2),
        region_max_cells=source.get("max_sample_point", 512),
        compat="medplib",
        routed_experts=release.routed_experts(),
        **ids,
    )


def _expected_shapes(config: MedPLIBConfig) -> dict[str, tuple[int, ...]]:
    from medplib.router.dense import MedPLIBWithRoutedExperts

    with torch.device("meta"):
        model = MedPLIBWithRoutedExperts(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def convert_medplib(
    source: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    shard_size: int = 5 * 10**9,
    tokenizer: str | Path | None = None,
    vision_tower: str | Path | None = None,
    sam_decoder_heads: int = SAM_MED2D_DECODER_HEADS,
    experts: str = "dense",
    rank: int | None = None,
) -> ConversionReport:
    """Convert; `dtype` None keeps each tensor's own. `out` must not exist or be empty.

    `experts="lora"` stores each layer's dense experts as a shared MLP plus rank-`rank` deltas
    (`factor_experts.py`); the approximation error is in the report's `factorization_error`."""
    if experts not in ("dense", "lora") or (experts == "lora") != (rank is not None):
        raise InvalidInputError(f"experts {experts!r} with rank {rank}: use 'dense', or 'lora' with a rank")
    start = time.perf_counter()
    release = ReleaseCheckpoint.open(source)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; convert into a new folder")
    shapes = release.shapes()
    report = ConversionReport(source_keys=len(shapes))
    report.mapping = {key: release_key(key) for key in release.keys}
    report.dropped_keys = [key for key, target in report.mapping.items() if target is None]
    targets = [target for target in report.mapping.values() if target is not None]
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    if duplicates:
        raise CheckpointError(f"{source}: several source keys map to {duplicates[:5]}")

    converted_tokenizer, ids = convert_tokenizer(tokenizer or source, release.config["vocab_size"])
    config = build_converted_config(
        release,
        shapes,
        ids,
        len(converted_tokenizer),
        vision_tower=vision_tower,
        sam_decoder_heads=sam_decoder_heads,
    )
    factorizer = None
    if experts == "lora":
        config.routed_experts = config.routed_experts | {"kind": "lora", "rank": rank}
        shard_of = {key: name for name, keys in release.shards.items() for key in keys}
        factorizer = LayerFactorizer(
            lambda key: release.read_shard(shard_of[key])[key],
            {target: key for key, target in report.mapping.items() if target is not None},
            config.routed_experts["num_experts"],
            rank,
        )
    expected = _expected_shapes(config)
    found = {}
    for key, target in report.mapping.items():
        if target is not None and factorizer is not None and EXPERT_KEY.fullmatch(target):
            prefix, _, projection = EXPERT_KEY.fullmatch(target).groups()
            found |= factored_shapes(prefix, projection, shapes[key][0], factorizer.experts, rank)
        elif target is not None:
            found[target] = shapes[key][0]
    problems = {
        "missing_keys": sorted(expected.keys() - found.keys()),
        "unexpected_keys": sorted(found.keys() - expected.keys()),
        "mismatched_keys": sorted(
            key
            for key in expected.keys() & found.keys()
            if found[key] != expected[key] and not (key in GROWN_ROWS and found[key][1:] == expected[key][1:])
        ),
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        raise CheckpointError(describe_key_problems(f"{source} (converted)", problems))

    out.mkdir(parents=True, exist_ok=True)
    weight_map, partials = {}, []
    for shard_name, state in release.iter_shards():
        batch, batch_bytes = [], 0

        def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                partial = out / f"part-{len(partials):05d}.partial"
                report.bytes_written += write_safetensors(partial, batch)
                partials.append((partial, [name for name, *_ in batch]))
            batch, batch_bytes = [], 0

        for key in release.shards[shard_name]:
            target = report.mapping[key]
            if target is None:
                continue
            source_dtype = shapes[key][1]
            wanted = torch.float32 if target.endswith("mlp.router.weight") else (dtype or source_dtype)
            if not source_dtype.is_floating_point:
                wanted = source_dtype
            if factorizer is not None and EXPERT_KEY.fullmatch(target):
                planned = {
                    name: (shape, lambda name=name, wanted=wanted: factorizer.produce(name).to(wanted))
                    for name, shape in factorizer.plan(target, shapes[key][0]).items()
                }
            else:
                shape = expected[target]
                planned = {
                    target: (shape, _producer(state, key, shape, wanted, mapped=release.kind == "bin"))
                }
            for name, (shape, produce) in planned.items():
                size = _nbytes(shape, wanted)
                if batch and batch_bytes + size > shard_size:
                    flush()
                batch.append((name, shape, wanted, produce))
                batch_bytes += size
        flush()  # a source shard's tensors are written before the next one is mapped
        del state
    total = len(partials)
    for number, (partial, names) in enumerate(partials, start=1):
        name = f"model-{number:05d}-of-{total:05d}.safetensors"
        os.replace(partial, out / name)
        report.shards.append(name)
        weight_map.update(dict.fromkeys(names, name))
    index = {"metadata": {"total_size": report.bytes_written}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config.architectures = ["MedPLIBWithRoutedExperts"]
    config.save_pretrained(out)
    converted_tokenizer.save_pretrained(out)
    spiece = Path(tokenizer or source, "tokenizer.model")
    if not spiece.is_file():
        raise CheckpointError(f"{spiece.parent}: no tokenizer.model (MedPLIB's SentencePiece model)")
    shutil.copyfile(spiece, out / SPIECE_FILE)
    report.written_keys = len(weight_map)
    if factorizer is not None:
        report.factorization_error = {name: max(errors) for name, errors in factorizer.errors.items()}
    report.seconds = time.perf_counter() - start
    return report


def _producer(
    state: Mapping[str, torch.Tensor], key: str, shape: tuple, dtype: torch.dtype, *, mapped: bool
) -> Callable[[], torch.Tensor]:
    """The converted tensor, made when written: cast, and the placeholder rows appended where grown.
    A file-mapped source tensor's pages are released once it has been read (`release_mapped_pages`)."""

    def produce() -> torch.Tensor:
        tensor = state[key]
        value = tensor.to(dtype)
        if tuple(value.shape) != tuple(shape):  # embed_tokens / lm_head: zero rows for <image>, <region_feat>
            value = torch.cat([value, value.new_zeros(shape[0] - value.shape[0], *shape[1:])])
        if mapped:
            value = value.clone() if value.data_ptr() == tensor.data_ptr() else value
            release_mapped_pages(tensor)
        return value

    return produce


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2e9' -> bytes (decimal units, as transformers' max_shard_size)."""
    import re

    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMG]?B)?\s*", text.upper())
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    try:
        size = int(float(match[1]) * units[match[2]]) if match else 0
    except ValueError:
        size = 0
    if size <= 0:
        from medplib.core.errors import InvalidInputError

        raise InvalidInputError(f"shard size {text!r} is not a positive size like 5GB or 500MB")
    return size


def parse_dtype(text: str) -> torch.dtype | None:
    choices = {"keep": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if text not in choices:
        from medplib.core.errors import InvalidInputError

        raise InvalidInputError(f"dtype {text!r}: use one of {sorted(choices)}")
    return choices[text]
