"""Ray Train: two CPU workers train exactly as one process with the same global batch; a worker killed
with SIGKILL mid-run is restarted from the last checkpoint Ray registered, and the run ends with the
very weights of a run never interrupted. One local Ray cluster serves the module."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medplib.core.errors import CheckpointError, MedplibError
from medplib.trainers.distributed import RAY_FOLDER, RUN_NAME, run_distributed, worker_pid_file
from medplib.trainers.train import StageRun, run_stage

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as patch:
        # Ray Train's controller polls its workers every 2 s (registering reported checkpoints, noticing
        # a dead worker); 0.5 s keeps the kill below close behind the first registered checkpoint.
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


def test_bad_inputs_fail_in_one_line_before_ray_starts_a_worker(built_dataset: Path, tmp_path: Path) -> None:
    # A worker's error would be retried as a dead worker (FailureConfig) and end in a Ray traceback.
    ray = pytest.importorskip("ray")
    started = ray.is_initialized()
    run = StageRun(stage="1", model="tiny", data=str(built_dataset), out=str(tmp_path / "out"), steps=2)
    with pytest.raises(CheckpointError, match="neither a preset"):
        run_distributed(replace(run, model=str(tmp_path / "no-such-model")), workers=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedplibError, match=str(empty)):
        run_distributed(replace(run, data=str(empty)), workers=2)
    assert ray.is_initialized() == started


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


CHECKPOINT_EVERY = 2


def registered_steps(out: Path) -> list[int]:
    """The checkpoints Ray has registered for the run in `out` (its run snapshot lists them)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snapshot = out / RAY_FOLDER / RUN_NAME / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    if not snapshot.is_file():
        return []
    try:
        text = snapshot.read_text()
        json.loads(text)
    except (OSError, ValueError):  # being rewritten
        return []
    return sorted({int(name) for name in re.findall(r"step-(\d{6})", text)})


def losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


def weights(out: Path) -> dict[str, torch.Tensor]:
    trunk = load_file(str(out / "model" / "model.safetensors"))
    adapter = load_file(str(out / "adapters" / "vision_language" / "adapter_model.safetensors"))
    return trunk | {f"adapter.{key}": value for key, value in adapter.items()}


def test_a_killed_worker_restarts_from_the_last_checkpoint(
    ray_cluster, built_dataset: Path, tmp_path: Path
) -> None:
    # Stage II: LoRA dropout draws from each worker's generator, so the restored RNG state matters.
    run = StageRun(
        stage="2",
        model="tiny",
        data=str(built_dataset),
        out=str(tmp_path / "whole"),
        steps=8,
        batch_size=1,
        checkpoint_every=CHECKPOINT_EVERY,
        progress=False,
    )
    whole = tmp_path / "whole"
    assert run_distributed(run, workers=2, max_failures=0)["started_at_step"] == 0

    killed = tmp_path / "killed"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["record"] = run_distributed(replace(run, out=str(killed)), workers=2, max_failures=1)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 120
    while not registered_steps(killed):
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "Ray registered no checkpoint within two minutes"
        time.sleep(0.05)
    victim = int(worker_pid_file(killed, 1).read_text())
    os.kill(victim, signal.SIGKILL)
    assert not (killed / "stage.json").exists(), "the run finished before the worker was killed"
    thread.join(timeout=240)
    assert not thread.is_alive(), "the restarted run did not finish"
    assert "error" not in outcome, outcome.get("error")

    record = outcome["record"]
    assert record["started_at_step"] >= CHECKPOINT_EVERY  # the new worker group resumed, not restarted
    assert int(worker_pid_file(killed, 1).read_text()) != victim  # rank 1 is a new process
    assert losses(killed) == losses(whole)  # every step once, with the same loss
    expected, restarted = weights(whole), weights(killed)
    assert expected.keys() == restarted.keys()
    assert all(torch.equal(expected[key], restarted[key]) for key in expected)
