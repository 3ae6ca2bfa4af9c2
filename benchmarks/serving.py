"""Serving benchmark at the `small` preset: HTTP through Ray Serve against in-process, batching on and off.

    .venv/bin/python benchmarks/serving.py [--repeats 3] [--rounds 3] [--out benchmarks/results]

Requests: VQA, region VQA (a box) and grounding on four real DICOM images from pydicom, 16 new tokens
each (the untrained preset never ends on its own, so every answer decodes all 16; grounding puts its
`<SEG>` at the end). Images are named by path, in-process and over HTTP alike.

1. Latency, one request at a time: the same sequence sent in-process (`MedPLIB.answer` / `ground`)
   and over HTTP (`POST /v1/vqa`, `/v1/ground` on loopback), interleaved request by request (which
   goes first alternates) so that the shared machine's load hits both alike; caches are warm on both
   sides (the sequence runs once before measuring). p50 and p95 of each and the ratio of the p50s.
   The HTTP overhead is split with the server's own timings: client to ingress and back (client
   latency minus the ingress's `total`), and inside the app (the ingress's `total` minus the model
   stages: hops between deployments, batch forming, decoding the request, encoding the masks).
2. Throughput at concurrency 16: two copies of the app side by side, `max_batch_size` 16 and 1 (off),
   rounds of 64 mixed requests alternating between them; requests per second, median over rounds.

Every replica and the in-process model use one torch thread: the machine has 2 cores shared with
other jobs (see `benchmarks/inference.py` for why one thread). The last stdout line is the JSON object
also written to `OUT/serving.json`; `OUT/serving.md` holds the table the README shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import ray
import torch

import medplib
from medplib.agents.serve.app import deploy
from medplib.agents.serve.config import ServeConfig
from medplib.core.io.registry_data import dicom_file

ROOT = Path(__file__).parents[1]
IMAGES = ["CT_small.dcm", "MR_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "emri_small.dcm"]
TOKENS = 16
CONCURRENCY = 16
ROUND_REQUESTS = 64
MODEL_STAGES = ("encode_clip", "prefill", "decode", "encode_sam", "masks")


def requests() -> list[dict[str, Any]]:
    """One of each kind per image: (kind, path, text, regions)."""
    made = []
    for index, name in enumerate(IMAGES):
        path = str(dicom_file(name))
        made.append({"kind": "vqa", "path": path, "text": f"What is shown in image {index}?", "regions": []})
        made.append(
            {
                "kind": "vqa",
                "path": path,
                "text": "What is in {region}?",
                "regions": [{"kind": "box", "box": [4, 4, 40, 40]}],
            }
        )
        made.append({"kind": "ground", "path": path, "text": f"the structure {index}", "regions": []})
    return made


def http_body(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "image": {"uri": request["path"]},
        "regions": request["regions"],
        "decoding": {"max_new_tokens": TOKENS},
    }
    if request["kind"] == "ground":
        return "/v1/ground", {**body, "text": request["text"]}
    return "/v1/vqa", {**body, "question": request["text"]}


def in_process(model: Any, request: dict[str, Any]) -> Any:
    if request["kind"] == "ground":
        return model.ground(request["path"], request["text"], request["regions"], max_new_tokens=TOKENS)
    return model.answer(request["path"], request["text"], request["regions"], max_new_tokens=TOKENS)


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] if len(samples) > 1 else samples[0]


def measure_latency(model: Any, url: str, sequence: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    local_ms, http_ms, outside_ms, inside_ms = [], [], [], []
    with httpx.Client(base_url=url, timeout=120) as client:

        def over_http(request: dict[str, Any]) -> float:
            path, body = http_body(request)
            start = time.perf_counter()
            response = client.post(path, json=body)
            elapsed = 1000 * (time.perf_counter() - start)
            response.raise_for_status()
            timings = response.json()["timings_ms"]
            outside_ms.append(elapsed - timings["total"])
            inside_ms.append(timings["total"] - sum(timings.get(stage, 0.0) for stage in MODEL_STAGES))
            return elapsed

        def local(request: dict[str, Any]) -> float:
            start = time.perf_counter()
            in_process(model, request)
            return 1000 * (time.perf_counter() - start)

        for request in sequence:  # warm: decoded images, CLIP features, prefixes, SAM embeddings
            local(request), over_http(request)
        outside_ms.clear(), inside_ms.clear()
        for repeat in range(repeats):
            for index, request in enumerate(sequence):
                if (index + repeat) % 2:
                    http_ms.append(over_http(request))
                    local_ms.append(local(request))
                else:
                    local_ms.append(local(request))
                    http_ms.append(over_http(request))
    return {
        "samples": len(http_ms),
        "inprocess_p50_ms": round(statistics.median(local_ms), 1),
        "inprocess_p95_ms": round(percentile(local_ms, 95), 1),
        "http_p50_ms": round(statistics.median(http_ms), 1),
        "http_p95_ms": round(percentile(http_ms, 95), 1),
        "http_p50_ratio": round(statistics.median(http_ms) / statistics.median(local_ms), 3),
        "paired_ratio_median": round(
            statistics.median(h / lo for h, lo in zip(http_ms, local_ms, strict=True)), 3
        ),
        "overhead_outside_app_p50_ms": round(statistics.median(outside_ms), 1),
        "overhead_inside_app_p50_ms": round(statistics.median(inside_ms), 1),
    }


async def one_round(url: str, sequence: list[dict[str, Any]]) -> float:
    """Requests per second for ROUND_REQUESTS requests, CONCURRENCY in flight at any time."""
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def send(request: dict[str, Any]) -> None:
            async with gate:
                path, body = http_body(request)
                (await client.post(path, json=body)).raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(send(sequence[i % len(sequence)]) for i in range(ROUND_REQUESTS)))
        return ROUND_REQUESTS / (time.perf_counter() - start)


def measure_throughput(urls: dict[str, str], sequence: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {name: [] for name in urls}
    for url in urls.values():  # warm both apps
        asyncio.run(one_round(url, sequence))
    for _ in range(rounds):
        for name, url in urls.items():
            rates[name].append(asyncio.run(one_round(url, sequence)))
    on, off = statistics.median(rates["batched"]), statistics.median(rates["unbatched"])
    return {
        "concurrency": CONCURRENCY,
        "requests_per_round": ROUND_REQUESTS,
        "batched_rps": round(on, 2),
        "unbatched_rps": round(off, 2),
        "batching_speedup": round(on / off, 2),
        "rounds_rps": {name: [round(r, 2) for r in values] for name, values in rates.items()},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def configs() -> dict[str, ServeConfig]:
    port = free_port()
    base = ServeConfig.from_yaml(ROOT / "examples" / "serve" / "cpu.yaml").with_overrides(
        model="small",
        http={"port": port},
        deployments={"trunk": {"torch_threads": 1}, "grounding": {"torch_threads": 1}},
    )
    made = {}
    for name, size in (("batched", CONCURRENCY), ("unbatched", 1)):
        batching = {"batching": {"max_batch_size": size}}
        made[name] = base.with_overrides(
            app_name=name,
            http={"route_prefix": f"/{name}"},
            deployments={"trunk": batching, "grounding": batching},
        )
    return made


def markdown(report: dict[str, Any]) -> str:
    lat, thr, env = report["latency"], report["throughput"], report["environment"]
    rows = [
        (
            "p50 latency, in-process / HTTP",
            f"{lat['inprocess_p50_ms']:.0f} / {lat['http_p50_ms']:.0f} ms",
            f"**{lat['http_p50_ratio']:.2f}x** (goal ≤ 1.3)",
        ),
        (
            "p95 latency, in-process / HTTP",
            f"{lat['inprocess_p95_ms']:.0f} / {lat['http_p95_ms']:.0f} ms",
            "",
        ),
        (
            "HTTP overhead p50: client ↔ ingress / inside the app",
            f"{lat['overhead_outside_app_p50_ms']:.1f} / {lat['overhead_inside_app_p50_ms']:.1f} ms",
            "",
        ),
        (
            f"throughput at concurrency {thr['concurrency']}, batching off / on",
            f"{thr['unbatched_rps']:.2f} / {thr['batched_rps']:.2f} req/s",
            f"**{thr['batching_speedup']:.2f}x** (goal ≥ 1.5)",
        ),
    ]
    setting = (
        f"`small` preset, {env['cpu']}, 1 torch thread per replica and in-process, torch {env['torch']}, "
        f"Ray {env['ray']}, load average {env['load_average_start']} at start (shared 2-core machine); "
        f"{lat['samples']} sequential requests each way, {len(thr['rounds_rps']['batched'])} rounds of "
        f"{thr['requests_per_round']} requests per throughput figure."
    )
    table = [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join([setting, "", "| measurement | result | ratio |", "|---|---|---|", *table]) + "\n"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="passes over the latency sequence")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per app")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(1)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        urls = {name: deploy(config) for name, config in configs().items()}
        model = medplib.load("small", device="cpu")
        sequence = requests()
        report = {
            "latency": measure_latency(model, urls["batched"], sequence, args.repeats),
            "throughput": measure_throughput(urls, sequence, args.rounds),
        }
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    report["environment"] = {
        "cpu": cpu_name(),
        "torch": torch.__version__.split("+")[0],
        "ray": ray.__version__,
        "load_average_start": round(load_start, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    headline = {
        key: report["latency"][key]
        for key in ("http_p50_ratio", "http_p50_ms", "http_p95_ms", "inprocess_p50_ms", "inprocess_p95_ms")
    }
    report = {**headline, "batching_speedup": report["throughput"]["batching_speedup"], **report}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "serving.md").write_text(markdown(report))
    print(markdown(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
