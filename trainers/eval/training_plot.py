"""`medplib plot LOG`: a training metrics log (JSONL, one line per step) as a PNG.

Panels: the loss and its parts, the learning rate, throughput, and, when the log has them (stage IV),
the share of tokens routed to each expert per layer. matplotlib is imported here only (the `plot`
extra), with its non-interactive backend, so nothing needs a display.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medplib.core.errors import InvalidInputError

LOSS_PARTS = ("loss", "ce", "bce", "dice", "focal", "router", "balance")


def read_log(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable metrics log ({exc})") from None


def plot_log(log: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Draw the log's curves into `out` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(Path(log))
    if not records:
        raise InvalidInputError(f"{log} holds no steps")
    steps = [r["step"] for r in records]
    routed = [r for r in records if "routing" in r]
    panels = 4 if routed else 3
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), constrained_layout=True)
    for part in LOSS_PARTS:
        points = [(r["step"], r[part]) for r in records if part in r]
        if points:
            axes[0].plot(*zip(*points, strict=True), label=part, linewidth=1)
    axes[0].set(title=f"stage {records[0].get('stage', '?')}: loss", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r["lr"] for r in records])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot(steps, [r.get("samples_per_s", 0) for r in records], linewidth=1)
    axes[2].set(title="throughput (samples/s)", xlabel="step")
    if routed:
        # Per expert, its share of text and of image tokens, averaged over the routed layers.
        route_steps = [r["step"] for r in routed]
        for e, name in enumerate(routed[-1]["routing"]["experts"]):
            for kind, style in (("text", "-"), ("image", "--")):
                shares = [_mean(layer[kind][e] for layer in r["routing"]["layers"].values()) for r in routed]
                axes[3].plot(route_steps, shares, style, label=f"{name} ({kind})", linewidth=1)
        axes[3].set(title="routing share", xlabel="step", ylim=(0, 1))
        axes[3].legend(fontsize=7)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
