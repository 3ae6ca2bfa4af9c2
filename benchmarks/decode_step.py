"""Where one decoded token's time goes: the lean trunk's step against its unavoidable kernels.

    .venv/bin/python benchmarks/decode_step.py [--repeats 300] [--out benchmarks/results]

At the `small` preset, fp32 and int8, one row decoding one token after a prompt as long as "the
same image again" has (the cached prefix plus the question), each measured alone, interleaved,
medians in microseconds:

- step: `run_trunk` on one token plus the LM head, what `decode_steps` pays per token for the model;
- products: the step's linear layers alone, called as the step calls them (int8: the fused q/k/v
  and gate/up products) on inputs of the same shapes: no implementation with these kernels is faster;
- attention: `scaled_dot_product_attention` of one query over the cache, once per layer;
- rest: step - products - attention: norms, rotary, residual adds, cache writes, Python;
- compiled: the same step through `torch.compile` (inductor, this machine's C++ compiler, the cache
  length held fixed so nothing recompiles), or the error that stopped it.

The last stdout line is the JSON object also written to `OUT/decode_step.json`; `OUT/decode_step.md`
holds the table `docs/performance.md` shows.
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
import torch.nn.functional as F

from medplib.core.model.kv_cache import StaticKVCache, run_trunk
from medplib.loading import load

PROMPT = 240  # cached prefix (system prompt, 196 image tokens) plus a short question, `small` preset


class Step:
    """One decode step of a loaded model's trunk at a fixed cache length (it rewrites one column)."""

    def __init__(self, mode: str) -> None:
        assistant = load("small", device="cpu", quantization=None if mode == "fp32" else mode)
        self.model = assistant.model
        self.trunk = self.model.language_model.model
        config = self.trunk.config
        torch.manual_seed(0)
        prompt = torch.randn(1, PROMPT, config.hidden_size)
        with torch.no_grad():
            self.cache = StaticKVCache.empty(self.trunk, 1, PROMPT + 1, prompt)
            run_trunk(self.trunk, prompt, torch.ones(1, PROMPT), torch.arange(PROMPT)[None], self.cache)
        self.token = torch.randn(1, 1, config.hidden_size)
        self.mask = torch.ones(1, PROMPT + 1)
        self.position = torch.tensor([[PROMPT]])
        fused = self.cache.fused or [None] * len(self.trunk.layers)
        self.products: list[torch.nn.Module] = []
        for layer, products in zip(self.trunk.layers, fused, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            if products is not None and products.qkv is not None:
                self.products.append(products.qkv)
            else:
                self.products += [attention.q_proj, attention.k_proj, attention.v_proj]
            self.products.append(attention.o_proj)
            if products is not None and products.gate_up is not None:
                self.products.append(products.gate_up)
            else:
                self.products += [mlp.gate_proj, mlp.up_proj]
            self.products.append(mlp.down_proj)
        self.products.append(self.model.language_model.lm_head)
        widest = max(p.in_features for p in self.products)
        self.inputs = torch.randn(1, 1, widest)
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.query = torch.randn(1, heads, 1, head_dim)
        self.scale = head_dim**-0.5

    def step(self) -> torch.Tensor:
        self.cache.length = PROMPT
        hidden = run_trunk(self.trunk, self.token, self.mask, self.position, self.cache)
        return self.model.language_model.lm_head(hidden[:, -1])

    def linear_products(self) -> None:
        for product in self.products:
            product(self.inputs[..., : product.in_features])

    def attention(self) -> None:
        for keys, values in zip(self.cache.keys, self.cache.values, strict=True):
            F.scaled_dot_product_attention(self.query, keys, values, scale=self.scale)


def median_us(samples: list[float]) -> float:
    return round(1e6 * statistics.median(samples), 1)


def measure(steps: dict[str, Step], repeats: int) -> dict:
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    for mode, step in steps.items():
        calls[mode] = {"step": step.step, "products": step.linear_products, "attention": step.attention}
        try:
            compiled = torch.compile(step.step, dynamic=False)
            started = time.perf_counter()
            compiled()
            calls[mode]["compiled"] = compiled
            print(f"{mode}: compiled in {time.perf_counter() - started:.1f} s", flush=True)
        except Exception as exc:  # what stopped it is the result
            calls[mode]["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    samples = {mode: {name: [] for name, c in named.items() if callable(c)} for mode, named in calls.items()}
    with torch.no_grad():
        for mode, named in calls.items():  # first-call costs are not latency
            for name in samples[mode]:
                for _ in range(10):
                    named[name]()
        for _ in range(repeats):
            for mode, named in calls.items():
                for name in samples[mode]:
                    started = time.perf_counter()
                    named[name]()
                    samples[mode][name].append(time.perf_counter() - started)
    results = {}
    for mode, runs in samples.items():
        row = {name: median_us(values) for name, values in runs.items()}
        row["rest"] = round(row["step"] - row["products"] - row["attention"], 1)
        row["products_share"] = round(row["products"] / row["step"], 3)
        if "compile_error" in calls[mode]:
            row["compile_error"] = calls[mode]["compile_error"]
        results[mode] = row
    return results


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"`small` preset, one row, one token after {PROMPT} cached columns, {env['threads']} thread, "
        f"torch {env['torch']}, {report['repeats']} interleaved repeats, load average "
        f"{env['load_average_start']} → {env['load_average_end']} (shared machine). Medians in µs.",
        "",
        "| mode | step (trunk + LM head) | linear products alone | attention alone | rest (norms, rotary, "
        "adds, cache writes, Python) | products' share | `torch.compile`d step |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in report["results"].items():
        compiled = f"{row['compiled']}" if "compiled" in row else f"failed: {row['compile_error']}"
        lines.append(
            f"| {mode} | {row['step']} | {row['products']} | {row['attention']} | {row['rest']} | "
            f"{100 * row['products_share']:.0f}% | {compiled} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--modes", default="fp32,int8")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    steps = {mode: Step(mode) for mode in args.modes.split(",")}
    report = {
        "repeats": args.repeats,
        "prompt_columns": PROMPT,
        "results": measure(steps, args.repeats),
        "environment": {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0],
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "decode_step.md").write_text(markdown(report))
    print(markdown(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
