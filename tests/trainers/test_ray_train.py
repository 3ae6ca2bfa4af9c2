"""Ray Train: two CPU workers train exactly as one process with the same global batch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medplib.trainers.distributed import run_distributed
from medplib.trainers.train import StageRun, run_stage

pytestmark = pytest.mark.ray


def test_two_workers_match_one_process(ray_cluster, built_dataset: Path, tmp_path: Path) -> None:
    # Stage I has no dropout, so one process and two workers see the very same computation.
    run = StageRun(
        stage="1",
        model="tiny",
        data=str(built_dataset),
        out=str(tmp_path / "single"),
        steps=4,
        progress=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_stage(replace(run, batch_size=4))
    finally:
        torch.set_num_threads(threads)
    record = run_distributed(replace(run, out=str(tmp_path / "ray"), batch_size=2), workers=2)
    assert record["workers"] == 2 and record["steps"] == 4

    workers = [json.loads((tmp_path / "ray" / f"worker-{rank}.json").read_text()) for rank in (0, 1)]
    assert workers[0]["weights"] == workers[1]["weights"]  # synchronised to the last bit
    assert workers[0]["losses"] == pytest.approx(single.losses, rel=1e-4)
    one = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "ray" / "model" / "model.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[key], two[key], atol=1e-5) for key in one)
