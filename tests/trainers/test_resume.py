"""A run killed with SIGKILL after a checkpoint and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from medplib.trainers.checkpoint import latest_checkpoint


def medplib(*args: str) -> list[str]:
    return [sys.executable, "-m", "medplib.cli", *args]


def train_args(data: Path, out: Path) -> list[str]:
    # Stage II from the tiny preset: LoRA dropout draws from the generator, so the RNG state matters.
    return medplib(
        "train", "--stage", "2", "--model", "tiny", "--data", str(data), "--out", str(out),
        "--steps", "9", "--batch-size", "2", "--checkpoint-every", "3", "--threads", "1",
    )  # fmt: skip


def losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


def weights(out: Path) -> dict[str, torch.Tensor]:
    trunk = load_file(str(out / "model" / "model.safetensors"))
    adapter = load_file(str(out / "adapters" / "vision_language" / "adapter_model.safetensors"))
    return trunk | {f"adapter.{key}": value for key, value in adapter.items()}


def test_sigkill_then_resume_matches_an_uninterrupted_run(built_dataset: Path, tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(train_args(built_dataset, whole), check=True, capture_output=True)

    process = subprocess.Popen(
        train_args(built_dataset, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while latest_checkpoint(killed / "checkpoints") is None:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within two minutes"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "stage.json").exists(), "the run finished before it was killed"
    stopped_at = int(latest_checkpoint(killed / "checkpoints").name.split("-")[1])
    assert stopped_at < 9

    result = subprocess.run([*train_args(built_dataset, killed), "--resume"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert losses(killed) == losses(whole)  # every step once, with the same loss
    expected, resumed = weights(whole), weights(killed)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_an_occupied_out_folder_needs_resume(built_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "leftover.txt").write_text("x")
    result = subprocess.run(train_args(built_dataset, tmp_path), capture_output=True, text=True)
    assert result.returncode == 2 and "--resume" in result.stderr


def test_bad_train_arguments_exit_2_with_one_line(built_dataset: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medplib.cli import app

    base = ["train", "--model", "tiny", "--data", str(built_dataset), "--out", str(tmp_path / "o")]
    for extra, message in (
        (["--stage", "5"], "unknown stage"),
        (["--stage", "2", "--schedule", "x"], "schedule"),
    ):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
