"""Conversion benchmark: peak memory and throughput of `medplib convert medplib` on ~1 GB shards.

    .venv/bin/python benchmarks/convert.py [--hidden 2048] [--shards 3] [--work /tmp/medplib-convert-bench]

Builds a synthetic checkpoint in MedPLIB's released layout (transformers 4.31 `.bin` shards plus
`pytorch_model.bin.index.json`, bf16 weights with float32 gates, `moe` dict in config.json): the
LLaMA trunk and its two dense experts per layer at `--hidden` width (random weights), with the CLIP
tower, projector, region adapter, `<SEG>` head and SAM-Med2D taken from the test fixture
(tests/fixtures/medplib-original, whose tokenizer and CLIP folder it also uses). Layers are added
until the shards hold about `--shard-gb` each.

The conversion then runs in a child process (`convert_medplib`, shard size = the source shard
size), which reports its own peak resident set (`VmHWM` of /proc/self/status, per process since its
exec: `ru_maxrss` would inherit the parent's peak across fork) and, as the baseline, its resident set
right after importing torch and medplib. Throughput = source bytes /
wall seconds of the conversion. The last stdout line is the JSON written to `OUT/convert.json`;
`OUT/convert.md` holds the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "medplib-original"
GB = 10**9


def llm_layer(index: int, hidden: int, intermediate: int, experts: int) -> dict[str, tuple]:
    """Key -> (shape, dtype) of one routed LLaMA layer in MedPLIB's names."""
    prefix = f"model.layers.{index}."
    shapes = {prefix + f"self_attn.{p}_proj.weight": ((hidden, hidden), torch.bfloat16) for p in "qkvo"}
    shapes[prefix + "self_attn.rotary_emb.inv_freq"] = ((64,), torch.float32)  # head_dim 128
    shapes[prefix + "mlp.deepspeed_moe.gate.wg.weight"] = ((experts, hidden), torch.float32)
    for expert in range(experts):
        base = prefix + f"mlp.deepspeed_moe.experts.deepspeed_experts.{expert}."
        shapes[base + "gate_proj.weight"] = ((intermediate, hidden), torch.bfloat16)
        shapes[base + "up_proj.weight"] = ((intermediate, hidden), torch.bfloat16)
        shapes[base + "down_proj.weight"] = ((hidden, intermediate), torch.bfloat16)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        shapes[prefix + f"{norm}.weight"] = ((hidden,), torch.bfloat16)
    return shapes


def nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def build_release(folder: Path, hidden: int, shard_bytes: int, num_shards: int) -> dict:
    """Write the synthetic release; returns its description (layers, shard sizes)."""
    folder.mkdir(parents=True)
    config = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    fixture_state = {}
    for shard in sorted((FIXTURE / "checkpoint").glob("*.bin")):
        fixture_state.update(torch.load(shard, weights_only=True, mmap=True))
    hidden_fixture = config["hidden_size"]
    # Everything outside the LLM comes from the fixture; the projector, region adapter and <SEG> head
    # read or write the LLM width, so they are regrown at `hidden`.
    others = {}
    for key, value in fixture_state.items():
        if key.startswith(("model.layers.", "model.embed_tokens", "lm_head", "model.norm")):
            continue
        joins = key.startswith(("model.mm_projector.", "model.region_fea_adapter.", "model.text_hidden_fcs."))
        shape = tuple(hidden if joins and size == hidden_fixture else size for size in value.shape)
        others[key] = (shape, value.dtype)
    vocab, intermediate, experts = config["vocab_size"], hidden * 11008 // 4096, 2
    head = {"model.embed_tokens.weight": ((vocab, hidden), torch.bfloat16)}
    tail = {
        "model.norm.weight": ((hidden,), torch.bfloat16),
        "lm_head.weight": ((vocab, hidden), torch.bfloat16),
    }
    # Add layers until the checkpoint fills `num_shards` shards of about `shard_bytes`.
    layers: list[dict] = []
    total = sum(nbytes(*spec) for spec in (head | tail | others).values())
    while total < shard_bytes * num_shards:
        layers.append(llm_layer(len(layers), hidden, intermediate, experts))
        total += sum(nbytes(*spec) for spec in layers[-1].values())
    ordered = head | {k: v for layer in layers for k, v in layer.items()} | tail | others
    shards: list[dict] = [{}]
    for key, spec in ordered.items():
        if shards[-1] and sum(nbytes(*s) for s in shards[-1].values()) + nbytes(*spec) > shard_bytes:
            shards.append({})
        shards[-1][key] = spec
    weight_map, sizes = {}, []
    generator = torch.Generator().manual_seed(0)
    for number, shard in enumerate(shards, start=1):
        name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        state = {}
        for key, (shape, dtype) in shard.items():
            if key in fixture_state and tuple(fixture_state[key].shape) == shape:
                state[key] = fixture_state[key].clone()
            else:
                state[key] = torch.empty(shape, dtype=dtype).uniform_(-0.05, 0.05, generator=generator)
        torch.save(state, folder / name)
        del state
        weight_map.update(dict.fromkeys(shard, name))
        sizes.append((folder / name).stat().st_size)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
    )
    config |= {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": len(layers),
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "mm_vision_tower": str(FIXTURE / "clip"),
        "vision_tower": str(FIXTURE / "clip"),
        "torch_dtype": "bfloat16",
    }
    config["moe"] |= {"moe_layers_idx": list(range(len(layers))), "num_experts": [experts] * len(layers)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"layers": len(layers), "hidden": hidden, "intermediate": intermediate, "shard_bytes": sizes}


CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from medplib.router.convert_medplib import convert_medplib

def status(field):  # kB -> bytes; VmHWM: this process's peak resident set since its exec
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

baseline = status("VmRSS")
start = time.perf_counter()
report = convert_medplib(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], sam_decoder_heads=2,
                         shard_size=int(sys.argv[4]))
print(baseline, status("VmHWM"), time.perf_counter() - start, report.bytes_written, len(report.shards))
"""


def disk_write_speed(folder: Path, size: int = 256 * 2**20) -> float:
    """Bytes per second of a plain sequential write with fsync here: the ceiling for the conversion."""
    path, block = folder / "disk-probe", os.urandom(2**20)
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medplib-convert-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(args.work, ignore_errors=True)
    release, converted = args.work / "release", args.work / "converted"
    built = build_release(release, args.hidden, int(args.shard_gb * GB), args.shards)
    largest = max(built["shard_bytes"])
    disk = disk_write_speed(args.work)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-c",
        CHILD,
        str(release),
        str(converted),
        str(FIXTURE / "tokenizer"),
        str(largest),
    ]
    start = time.perf_counter()
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.split()
    wall = time.perf_counter() - start
    baseline, peak = int(output[-5]), int(output[-4])
    seconds, written, out_shards = float(output[-3]), int(output[-2]), int(output[-1])
    source = sum(built["shard_bytes"])
    result = {
        "benchmark": "convert",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}",
        "release": built,
        "source_bytes": source,
        "largest_shard_bytes": largest,
        "written_bytes": written,
        "output_shards": out_shards,
        "conversion_seconds": round(seconds, 2),
        "process_seconds": round(wall, 2),
        "throughput_gb_per_s": round(source / GB / seconds, 3),
        "disk_write_gb_per_s": round(disk / GB, 3),
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": int(baseline),
        "peak_rss_over_largest_shard": round(peak / largest, 3),
        "peak_rss_above_baseline_over_largest_shard": round((peak - baseline) / largest, 3),
        "budget": "peak RSS <= 1.5 x the largest source shard",
        "within_budget": peak <= 1.5 * largest,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("synthetic release", f"{built['layers']} MoE layers x 2 dense experts, hidden {args.hidden}, bf16"),
        (
            "source",
            f"{source / GB:.2f} GB in {len(built['shard_bytes'])} .bin shards "
            f"(largest {largest / GB:.2f} GB)",
        ),
        ("written", f"{written / GB:.2f} GB in {out_shards} safetensors shards"),
        ("conversion time", f"{seconds:.1f} s ({source / GB / seconds:.3f} GB/s)"),
        (
            "disk, plain write + fsync",
            f"{disk / GB:.3f} GB/s (the ceiling: every byte is read and written once)",
        ),
        ("peak RSS", f"{peak / GB:.2f} GB = {peak / largest:.2f} x largest shard (budget 1.5 x)"),
        ("RSS after import", f"{baseline / GB:.2f} GB (torch, transformers, medplib)"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    (args.out / "convert.md").write_text(
        "# `medplib convert medplib`: memory and throughput\n\n"
        f"{result['machine']}; `python benchmarks/convert.py`.\n\n{table}\n"
    )
    shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
