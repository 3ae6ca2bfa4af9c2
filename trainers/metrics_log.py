"""The training loop's per-step log: values summed over Ray Train's workers, one JSON line per step."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medplib.trainers.data_parallel import sum_over_workers
from medplib.trainers.losses import LOSS_PARTS

LOG_FILE = "metrics.jsonl"


class MetricsLog:
    """The JSONL metrics log; a run that starts at step N (resumed, or restarted by Ray) first drops
    the lines after N, which a killed attempt wrote past its last checkpoint."""

    def __init__(self, path: Path, enabled: bool, start: int) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            kept = [
                line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= start
            ]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def step_record(tally: dict[str, list[float]], tokens: int, world: int) -> dict:
    """The step's log values over all workers. Every worker sends every part, in one order: a
    worker's share may lack some (no mask in it), and the all-reduce needs equal tensors."""
    names = ("loss", *LOSS_PARTS)
    values = [v for name in names for v in tally.get(name, (0.0, 0.0))] + [tokens]
    values = sum_over_workers(torch.tensor(values, dtype=torch.float64), world).tolist()
    record: dict[str, float] = {"loss": values[0], "tokens": values[-1]}
    for i, name in enumerate(names[1:], start=1):
        total, count = values[2 * i], values[2 * i + 1]
        if count:
            record[name] = total / count
    return record
