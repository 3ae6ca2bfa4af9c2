"""Scoreboard: medplib against transformers' `LlavaForConditionalGeneration` at the `small` preset.

    .venv/bin/python benchmarks/peers.py [--rounds 15] [--modes fp32,int8] [--out benchmarks/results]

The peer is what a user would otherwise run: transformers' own LLaVA (the code path MedPLIB and LISA
build on), built from medplib's `small` config (the same CLIP tower, projector widths, LLaMA and
vocabulary, random weights), fed the same image through the same CLIP preprocessing and the same
prompt ids, decoding through `generate` with exactly N new tokens (`min_new_tokens` = N). Both use
sdpa attention and one torch thread; medplib answers through its public API (`MedPLIB.answer` /
`answer_batch`), so its timings include everything a user pays for (tokenising, preprocessing,
caching). Each medplib mode (`fp32`, `int8`, `int4`: `medplib.load(..., quantization=...)`) is a
separately loaded model; every row asserts exactly N new tokens on every side.

Measurements, each round running every side in turn (the order rotates each round) so the shared
machine's load falls on all alike; medians over rounds and the median of the per-round paired ratios
peer / medplib (above 1: medplib is faster):

1. cold single question: medplib's image cache cleared first; the peer has none;
2. the same image again: the question repeated on a warm cache (the peer recomputes everything);
3. a batch of 8 cold questions on 8 images (left-padded batch on both sides);
4. decode per token: (time for N tokens - time for 1 token) / (N - 1) on the same-image path.

The load average is recorded at the start and the end. The last stdout line is the JSON object also
written to `OUT/peers.json`; `OUT/peers.md` holds the table `docs/performance.md` shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from medplib.core.assistant import MedPLIB, load
from medplib.core.io import load_image
from medplib.core.io.registry_data import DICOM_FILES, dicom_file
from medplib.core.model import MedPLIBProcessor, Request, Turn

QUESTION = "What modality is this image?"
BATCH_QUESTIONS = [
    "What modality is this image?",
    "Which plane is this slice in?",
    "Which body region does this image show?",
    "Describe the image.",
    "Is there a lesion in this image?",
    "Which structures can be seen?",
    "Is this image normal?",
    "What is the most notable finding?",
]
FLOOR = "fp32 floor"
INT8_FLOOR = "int8 floor"
SCENARIOS = ("cold_single", "same_image_again", "batch_8_cold", "decode_per_token")
GOALS = {"cold_single": 1.5, "same_image_again": 4.0, "batch_8_cold": 1.5, "decode_per_token": 1.5}


def build_peer(assistant: MedPLIB, seed: int = 0) -> LlavaForConditionalGeneration:
    """transformers' LLaVA with medplib's CLIP and LLaMA configs, image token and feature layer."""
    config = assistant.model.config
    peer_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="default",  # the CLS token dropped, as medplib does
        projector_hidden_act="gelu",
    )
    peer_config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(peer_config).eval()


class Peer:
    """The peer's whole request: medplib's tokenising and CLIP preprocessing, then `generate`."""

    def __init__(self, model: LlavaForConditionalGeneration, processor: MedPLIBProcessor) -> None:
        self.model, self.processor = model, processor

    @torch.no_grad()
    def __call__(self, images: list, questions: list[str], tokens: int) -> int:
        encoded = [
            self.processor.encode_request(Request(i.pixels, [Turn(q)]))[0]
            for i, q in zip(images, questions, strict=True)
        ]
        input_ids, attention_mask, _ = self.processor.pad(encoded, "left")
        pixel_values = torch.stack([self.processor.clip_pixels(image.pixels) for image in images])
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        new = out.shape[1] - input_ids.shape[1]
        assert new == tokens, f"the peer generated {new} tokens, not {tokens}"
        return new


class LinearFloor:
    """The linear layers no implementation of a request can skip, run alone: the time any
    implementation with these kernels needs at least, so peer / floor bounds what that precision can
    reach. Built from an fp32 model: the fp32 floor; from an int8 one: the int8 floor (its layers).

    Per request: the CLIP blocks up to the feature layer on every patch token, the projector, the LLM's
    linear layers on every prompt token (for the same image again: on the question's own tokens, the
    cached prefix excluded) and on every decoded token, the LM head once per new token. Attention's
    own products and every elementwise op are left out, so the floor is a lower bound.
    """

    def __init__(self, assistant: MedPLIB, processor: MedPLIBProcessor) -> None:
        model = assistant.model
        config = model.config
        blocks = model.vision_tower.encoder.layers
        used = blocks[: config.vision_feature_layer % (len(blocks) + 1)]

        def linears(root: torch.nn.Module) -> list[torch.nn.Module]:
            return [m for m in root.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]

        self.clip = [m for block in used for m in linears(block)]
        self.projector = linears(model.projector)
        self.llm = [m for layer in model.language_model.model.layers for m in linears(layer)]
        self.lm_head = model.language_model.lm_head
        self.patches = config.num_image_tokens + 1
        self.processor = processor
        self.prefix = assistant._generator.prefix_ids
        widest = max(m.in_features for m in [*self.clip, *self.llm, self.lm_head])
        self.inputs = torch.randn(8 * 512, widest)

    def _linears(self, modules: list[torch.nn.Module], rows: int) -> None:
        for module in modules:
            module(self.inputs[:rows, : module.in_features])

    @torch.no_grad()
    def __call__(self, images: list, questions: list[str], tokens: int, cold: bool) -> int:
        lengths = [
            len(self.processor.encode_request(Request(i.pixels, [Turn(q)]))[0].input_ids)
            for i, q in zip(images, questions, strict=True)
        ]
        if cold:
            self._linears(self.clip, self.patches * len(images))
            self._linears(self.projector, (self.patches - 1) * len(images))
        prompt = sum(lengths) if cold else sum(length - len(self.prefix) for length in lengths)
        self._linears(self.llm, prompt)
        self._linears([self.lm_head], len(images))
        for _ in range(tokens - 1):
            self._linears([*self.llm, self.lm_head], len(images))
        return tokens


def medplib_call(assistant: MedPLIB, images: list, questions: list[str], tokens: int, cold: bool) -> int:
    if cold:
        assistant.clear_cache()
    results = assistant.answer_batch(
        [{"image": i, "text": q} for i, q in zip(images, questions, strict=True)], max_new_tokens=tokens
    )
    counts = {r.new_tokens for r in results}
    assert counts == {tokens}, f"medplib generated {counts} tokens, not {tokens}"
    return tokens


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run_rounds(sides: dict[str, Callable], images: list, rounds: int, tokens: int) -> dict:
    """Per side and scenario, the seconds of every round. Each scenario runs on every side back to back
    (the order rotates each round), so a pair of measurements sees the same load."""
    lesion = images[0]
    names = list(sides)
    samples = {name: {s: [] for s in SCENARIOS} for name in names}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            samples[name]["cold_single"].append(
                timed(lambda c=sides[name]: c([lesion], [QUESTION], tokens, True))
            )
        for name in order:
            call, sample = sides[name], samples[name]
            sample["same_image_again"].append(timed(lambda c=call: c([lesion], [QUESTION], tokens, False)))
            one = timed(lambda c=call: c([lesion], [QUESTION], 1, False))
            sample["decode_per_token"].append((sample["same_image_again"][-1] - one) / (tokens - 1))
        for name in order:
            samples[name]["batch_8_cold"].append(
                timed(lambda c=sides[name]: c(images, BATCH_QUESTIONS, tokens, True))
            )
        print(f"round {index + 1}/{rounds}: load {os.getloadavg()[0]:.2f}", flush=True)
    return samples


def summarise(samples: dict, peer: str = "peer") -> dict:
    out: dict[str, dict] = {}
    for name, runs in samples.items():
        out[name] = {s: round(1000 * statistics.median(runs[s]), 2) for s in SCENARIOS}
        if name == peer:
            continue
        out[name]["ratio"] = {
            s: round(statistics.median(p / m for p, m in zip(samples[peer][s], runs[s], strict=True)), 2)
            for s in SCENARIOS
        }
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    floors = [name for name in (FLOOR, INT8_FLOOR) if name in report["results"]]
    modes = [name for name in report["results"] if name not in ("peer", *floors)]
    header = "| measurement (ms, median) | peer: transformers LLaVA | " + " | ".join(
        f"medplib {m} | peer ÷ {m}" for m in modes
    )
    header += "".join(f" | {f}: its linear layers alone | peer ÷ {f}: its ceiling" for f in floors)
    lines = [
        f"`small` preset, {env['cpu']}, {env['threads']} thread, torch {env['torch']}, transformers "
        f"{env['transformers']}, {report['rounds']} interleaved rounds, {report['new_tokens']} new tokens, "
        f"load average {env['load_average_start']} → {env['load_average_end']} (shared machine).",
        "",
        header + " |",
        "|---" * (2 + 2 * len(modes) + 2 * len(floors)) + "|",
    ]
    labels = {
        "cold_single": "cold single question",
        "same_image_again": "same image again",
        "batch_8_cold": "batch of 8, cold",
        "decode_per_token": "decode, per token",
    }
    peer = report["results"]["peer"]
    for s in SCENARIOS:
        cells = [f"{labels[s]} (goal ≥ {GOALS[s]}x)", f"{peer[s]:.1f}"]
        for m in modes:
            ratio = report["results"][m]["ratio"][s]
            mark = "**" if ratio >= GOALS[s] else ""
            cells += [f"{report['results'][m][s]:.1f}", f"{mark}{ratio}x{mark}"]
        for name in floors:
            floor = report["results"][name]
            cells += [f"{floor[s]:.1f}", f"{floor['ratio'][s]}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "A floor runs only the linear layers each request needs, at that precision (`LinearFloor`): no "
        "implementation with those kernels can beat it, so `peer ÷ floor` bounds the ratio it can reach.",
    ]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--modes", default="fp32", help="medplib modes, comma-separated: fp32, int8, int4")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    load_start = os.getloadavg()[0]
    images = [load_image(dicom_file(name)) for name in DICOM_FILES]
    lesion = list(DICOM_FILES).index("mr_abdomen_lesion")
    images = [images[lesion], *images[:lesion], *images[lesion + 1 :]][: len(BATCH_QUESTIONS)]
    sides: dict[str, Callable] = {}
    for mode in args.modes.split(","):
        quantization = None if mode == "fp32" else mode
        assistant = load("small", device="cpu", quantization=quantization)
        sides[mode] = lambda i, q, n, cold, a=assistant: medplib_call(a, i, q, n, cold)
    full = load("small", device="cpu")  # the fp32 weights the peer's and the floor's shapes come from
    processor = MedPLIBProcessor(full.model.config, full.model.tokenizer)
    sides["peer"] = lambda i, q, n, cold, p=Peer(build_peer(full), processor): p(i, q, n)
    sides[FLOOR] = LinearFloor(full, processor)
    if "int8" in sides:
        sides[INT8_FLOOR] = LinearFloor(load("small", device="cpu", quantization="int8"), processor)
    for call in sides.values():  # first-call costs are not latency
        call(images[:2], BATCH_QUESTIONS[:2], 2, True)
    samples = run_rounds(sides, images, args.rounds, args.tokens)
    report = {
        "rounds": args.rounds,
        "new_tokens": args.tokens,
        "results": summarise(samples),
        "environment": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "attention": "sdpa",
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "peers.md").write_text(markdown(report))
    print(markdown(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
