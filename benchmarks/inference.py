"""Inference benchmark at the `small` preset, in one run on this machine's CPU.

    .venv/bin/python benchmarks/inference.py [--threads 1] [--repeats 7] [--out benchmarks/results]

Measures, on real DICOM images from pydicom / pydicom-data:

1. Grounding latency on the same image, cold (cache cleared) vs cached (its CLIP features, SAM
   embedding and prompt prefix cached), interleaved and reported as medians. An untrained model never
   ends on its own, so every grounding decodes as many tokens as the training data's grounding answer
   ("Sure, it is <SEG>." and </s>): the length a trained model's answer has. Measured again with
   `answer="template"`: that answer prefilled with the question, nothing decoded.
2. Throughput of one batch of 8 questions (8 images) against 8 single calls, cold and cached.
3. The LLM prefill's share of this CPU's own fp32 matmul throughput. The prefill's FLOPs, counted
   from the config (useful work only: real tokens, the causal half of attention):

       per layer: 2 * T * (d*d + 2*d*d_kv + d*d + 3*d*d_ff)      q, k, v, o and the SwiGLU MLP
                + 2 * T^2 * d                                     QK^T and AV, causal half (2*T*T*d*2/2)

   summed over layers (the LM head runs on the last position only, so it is left out); divided by
   the measured prefill time and by the FLOP/s of a 2048^3 fp32 matmul at the same thread count.
4. Peak resident memory of the process (`resource.getrusage`).

Threads: the machine has 2 cores shared with other jobs. OpenMP's spinning threads collapse when a
core is taken by another process (a 2-thread run was measured 10-50x slower than a 1-thread run under
such load), so the default is 1 thread; matmul peak and prefill are measured at the same count.
The last stdout line is the JSON object also written to `OUT/inference.json`; `OUT/inference.md` holds
the table the README shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from medplib.core.assistant import MedPLIB, load
from medplib.core.io import load_image
from medplib.core.io.registry_data import DICOM_FILES, dicom_file
from medplib.core.model import MedPLIBProcessor, Request, Turn, tokenize_user_text
from medplib.trainers.data.templates import GROUNDING_ANSWER

QUESTIONS = [
    "What modality is this image?",
    "Which plane is this slice in?",
    "Which body region does this image show?",
    "Describe the image.",
    "Is there a lesion in this image?",
    "Which structures can be seen?",
    "Is this image normal?",
    "What is the most notable finding?",
]
ANSWER_TOKENS = 16  # per question of the batch measurement


def median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 2)


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def grounding_answer_tokens(assistant: MedPLIB) -> int:
    """Tokens of the training data's grounding answer, <SEG> and </s> included."""
    before, after = GROUNDING_ANSWER.split("{seg}")
    tokenizer = assistant.model.tokenizer
    return (
        len(tokenize_user_text(tokenizer, " " + before)) + 1 + len(tokenize_user_text(tokenizer, after)) + 1
    )


def measure_grounding(assistant: MedPLIB, image, repeats: int, answer: str = "generate") -> dict:
    """`answer`: "generate" decodes the answer (as long as the template, see above); "template"
    prefills the template and decodes nothing."""
    tokens = grounding_answer_tokens(assistant)
    cold, cached, stages = [], [], {"cold": [], "cached": []}

    def ground():
        return assistant.ground(image, "the liver lesion", answer=answer, max_new_tokens=tokens)

    for _ in range(repeats):
        assistant.clear_cache()
        seconds, result = timed(ground)
        cold.append(seconds)
        stages["cold"].append(result.timings_ms)
        seconds, result = timed(ground)
        assert result.cache.sam == "hit" and result.cache.prefix == "hit", result.cache
        cached.append(seconds)
        stages["cached"].append(result.timings_ms)
    per_stage = {
        kind: {stage: round(statistics.median(t[stage] for t in runs), 2) for stage in runs[0]}
        for kind, runs in stages.items()
    }
    return {
        "answer": answer,
        "decoded_tokens": tokens if answer == "generate" else 0,
        "cold_ms": median_ms(cold),
        "cached_ms": median_ms(cached),
        # The median of paired ratios: a burst of load from other jobs hits a cold and its cached run alike.
        "cached_speedup": round(statistics.median(c / w for c, w in zip(cold, cached, strict=True)), 2),
        "stages_ms": per_stage,
    }


def measure_batch(assistant: MedPLIB, images: list, repeats: int) -> dict:
    queries = [{"image": image, "text": question} for image, question in zip(images, QUESTIONS, strict=True)]
    results: dict[str, dict[str, list[float]]] = {"cold": {"singles": [], "batch": []}, "cached": {}}
    results["cached"] = {"singles": [], "batch": []}
    matches = True
    for _ in range(repeats):
        for kind in ("cold", "cached"):
            if kind == "cold":
                assistant.clear_cache()
            seconds, singles = timed(
                lambda: [assistant.answer_batch([q], max_new_tokens=ANSWER_TOKENS)[0] for q in queries]
            )
            results[kind]["singles"].append(seconds)
            if kind == "cold":
                assistant.clear_cache()
            seconds, batch = timed(lambda: assistant.answer_batch(queries, max_new_tokens=ANSWER_TOKENS))
            results[kind]["batch"].append(seconds)
            matches &= [r.text for r in batch] == [r.text for r in singles]
    summary = {
        "requests": len(queries),
        "new_tokens_per_request": ANSWER_TOKENS,
        "batch_matches_singles": matches,
    }
    for kind, runs in results.items():
        singles, batch = statistics.median(runs["singles"]), statistics.median(runs["batch"])
        ratios = [s / b for s, b in zip(runs["singles"], runs["batch"], strict=True)]
        summary[kind] = {
            "singles_ms": median_ms(runs["singles"]),
            "batch_ms": median_ms(runs["batch"]),
            "singles_requests_per_s": round(len(queries) / singles, 2),
            "batch_requests_per_s": round(len(queries) / batch, 2),
            "speedup": round(statistics.median(ratios), 2),
        }
    return summary


def prefill_flops(config, tokens_per_row: list[int]) -> float:
    """Useful FLOPs of the LLM prefill (see the module docstring)."""
    text = config.text_config
    d, d_ff, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    d_kv = d * text.num_key_value_heads // text.num_attention_heads
    per_token = 2 * (d * d + 2 * d * d_kv + d * d + 3 * d * d_ff)
    return layers * sum(per_token * t + 2 * t * t * d for t in tokens_per_row)


def matmul_flops_per_s(a: torch.Tensor, b: torch.Tensor) -> float:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / timed(lambda: a @ b)[0]


def measure_prefill(assistant: MedPLIB, images: list, repeats: int) -> dict:
    """The LLM trunk alone on whole prompts (image tokens spliced in), one request and a batch of 8.

    Each prefill run is paired with a matmul run just before it and the share is the median of the
    pairs' ratios, so load from other jobs on the shared machine weighs on both sides alike.
    """
    model = assistant.model
    processor = MedPLIBProcessor(model.config, model.tokenizer)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b  # warm-up
    out = {}
    for name, count in (("single", 1), ("batch_8", 8)):
        requests = [
            Request(image.pixels, [Turn(q)]) for image, q in zip(images[:count], QUESTIONS, strict=False)
        ]
        batch = processor(requests)
        mask = batch["attention_mask"]
        flops = prefill_flops(model.config, mask.sum(dim=1).tolist())
        with torch.no_grad():
            embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
            model.run_language_model(embeds, mask)  # warm-up
            pairs = []
            for _ in range(repeats):
                peak = matmul_flops_per_s(a, b)
                seconds = timed(lambda embeds=embeds, mask=mask: model.run_language_model(embeds, mask))[0]
                pairs.append((flops / seconds, peak))
        out[name] = {
            "tokens": int(mask.sum()),
            "gflop": round(flops / 1e9, 3),
            "gflops_per_s": round(statistics.median(rate for rate, _ in pairs) / 1e9, 2),
            "matmul_gflops_per_s": round(statistics.median(peak for _, peak in pairs) / 1e9, 2),
            "matmul_share": round(statistics.median(rate / peak for rate, peak in pairs), 3),
        }
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(report: dict) -> str:
    g, b, p = report["grounding"], report["batch"], report["prefill"]
    t = report["grounding_template"]
    rows = [
        ("Grounding, cold (cache cleared)", f"{g['cold_ms']:.0f} ms", ""),
        (
            "Grounding, same image again (cached)",
            f"{g['cached_ms']:.0f} ms",
            f"**{g['cached_speedup']}x** (goal 5x)",
        ),
        ("Grounding, template answer prefilled, cold", f"{t['cold_ms']:.0f} ms", ""),
        (
            "Grounding, template answer prefilled, same image again",
            f"{t['cached_ms']:.0f} ms",
            f"**{t['cached_speedup']}x**; vs decoded cold: **{report['template_cached_vs_generate_cold']}x**",
        ),
        (
            "8 questions on 8 images, cold: 8 calls / 1 batch",
            f"{b['cold']['singles_ms']:.0f} / {b['cold']['batch_ms']:.0f} ms",
            f"**{b['cold']['speedup']}x** (goal 2x)",
        ),
        (
            "8 questions, images cached: 8 calls / 1 batch",
            f"{b['cached']['singles_ms']:.0f} / {b['cached']['batch_ms']:.0f} ms",
            f"{b['cached']['speedup']}x",
        ),
        (
            f"LLM prefill, 1 request ({p['single']['tokens']} tokens)",
            f"{p['single']['gflops_per_s']} GFLOP/s",
            f"**{100 * p['single']['matmul_share']:.0f}%** of matmul (goal 50%)",
        ),
        (
            f"LLM prefill, 8 requests ({p['batch_8']['tokens']} tokens)",
            f"{p['batch_8']['gflops_per_s']} GFLOP/s",
            f"{100 * p['batch_8']['matmul_share']:.0f}% of matmul",
        ),
        ("fp32 matmul 2048^3 (this CPU, same threads)", f"{p['single']['matmul_gflops_per_s']} GFLOP/s", ""),
        (
            "Peak resident memory (libraries alone, after imports)",
            f"{report['peak_rss_mb']:.0f} MB ({report['rss_after_imports_mb']:.0f} MB)",
            "",
        ),
    ]
    env = report["environment"]
    lines = [
        f"`small` preset, {env['cpu']}, {env['threads']} thread(s), torch {env['torch']}, fp32, "
        f"load average {env['load_average_start']} at start (shared machine).",
        "",
        "| measurement | result | ratio |",
        "|---|---|---|",
        *[f"| {a} | {b_} | {c} |" for a, b_, c in rows],
        "",
        "Grounding stages, median ms (cold → cached): "
        + ", ".join(
            f"{s} {g['stages_ms']['cold'][s]:.0f} → {g['stages_ms']['cached'][s]:.0f}"
            for s in g["stages_ms"]["cold"]
        ),
        "",
        "With the template answer prefilled: "
        + ", ".join(
            f"{s} {t['stages_ms']['cold'][s]:.0f} → {t['stages_ms']['cached'][s]:.0f}"
            for s in t["stages_ms"]["cold"]
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, transformers, SAM

    assistant = load("small", device="cpu")
    images = [load_image(dicom_file(name)) for name in DICOM_FILES]  # 8 real DICOM images
    lesion = images[list(DICOM_FILES).index("mr_abdomen_lesion")]
    assistant.answer(images[0], "Warm up.", max_new_tokens=2)  # first-call costs are not latency

    report = {
        "grounding": measure_grounding(assistant, lesion, args.repeats),
        "grounding_template": measure_grounding(assistant, lesion, args.repeats, answer="template"),
        "batch": measure_batch(assistant, images, max(3, args.repeats // 2)),
        "prefill": measure_prefill(assistant, images, args.repeats),
    }
    report["template_cached_vs_generate_cold"] = round(
        report["grounding"]["cold_ms"] / report["grounding_template"]["cached_ms"], 2
    )
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["rss_after_imports_mb"] = round(imports_rss, 1)
    report["environment"] = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "load_average_start": round(load_start, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": assistant.model.parameter_counts()["total"],
    }
    headline = {
        "cached_speedup": report["grounding"]["cached_speedup"],
        "cached_speedup_template": report["grounding_template"]["cached_speedup"],
        "batch_speedup": report["batch"]["cold"]["speedup"],
        "batch_speedup_cached": report["batch"]["cached"]["speedup"],
        "prefill_matmul_share": report["prefill"]["single"]["matmul_share"],
        "prefill_matmul_share_batch": report["prefill"]["batch_8"]["matmul_share"],
        "peak_rss_mb": report["peak_rss_mb"],
    }
    report = {**headline, **report}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "inference.md").write_text(markdown(report))
    print(markdown(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
