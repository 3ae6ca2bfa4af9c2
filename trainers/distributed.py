"""Ray Train scale-out: the same `run_stage` on N workers under Ray Train's `TorchTrainer`.

Ray starts the workers and their torch process group (gloo on CPU, nccl on GPU); each worker runs
`run_stage` with its rank, and every worker takes the `rank::world` share of each global batch (a
deterministic sharding of one seeded permutation, as `DistributedSampler` does); torch DDP sums the
gradients (`data_parallel.py`), so N workers with micro-batch B train as one process with batch N * B.
The loop wraps DDP itself rather than through `ray.train.torch.prepare_model`, because it also runs
in-process and DDP must wrap the loss computation (`MicroBatchLoss`), not the model's `forward`.

Ray Train is the engine, not only the launcher: every step is reported with `ray.train.report`, and
every `--checkpoint-every` steps with a checkpoint in the stage's own format (`checkpoint.py`): rank 0
hands over the training state, each rank its generators, and Ray merges the parts into
`OUT/ray/medplib-train/step-N/` and registers it once all have arrived. When a worker dies, Ray
(`FailureConfig(max_failures)`) stops the group, starts a new one, and `ray.train.get_checkpoint()`
tells it where to continue; the data position is a function of the step, so the run ends with the
weights an uninterrupted run ends with. Re-running the same command with `--resume` continues from
the last checkpoint Ray registered (Ray restores a run of the same name and storage path).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from medplib.core.errors import InvalidInputError
from medplib.loading import read_record
from medplib.trainers.train import StageRun, preflight, run_stage

RUN_NAME = "medplib-train"
RAY_FOLDER = "ray"  # under the stage folder: Ray's run records and checkpoints
DEFAULT_MAX_FAILURES = 3


def worker_pid_file(out: Path, rank: int) -> Path:
    """Where worker `rank` notes its process id (to find the process that runs a rank, e.g. to stop it)."""
    return out / RAY_FOLDER / f"worker-{rank}.pid"


class RayTrainSession:
    """The loop's `Session` inside a Ray Train worker: checkpoints and metrics go to Ray."""

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, record: dict, checkpoint: Path | None) -> None:
        import ray.train

        if checkpoint is None:
            ray.train.report(record)
            return
        ray.train.report(
            record,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
            checkpoint_dir_name=f"step-{record['step']:06d}",  # every rank's part goes to this folder
        )


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank = context.get_world_rank()
    pid_file = worker_pid_file(Path(config["out"]), rank)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")
    run_stage(
        StageRun(**config),
        rank=rank,
        world=context.get_world_size(),
        device=ray.train.torch.get_device(),
        session=RayTrainSession(),
    )


def run_distributed(run: StageRun, workers: int, max_failures: int = DEFAULT_MAX_FAILURES) -> dict:
    """Run the stage on `workers` Ray Train workers; starts a local Ray if none is running. A worker
    that dies restarts the group from the last checkpoint, up to `max_failures` times (-1: always)."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 2:
        raise InvalidInputError(f"Ray Train needs at least 2 workers, got {workers}")
    if max_failures < -1:
        raise InvalidInputError(f"--max-failures must be -1 (no limit) or more, got {max_failures}")
    preflight(run)
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    use_gpu = torch.cuda.is_available()
    out = Path(run.out).resolve()
    # Ray's workers do not share this process's working folder: every path travels absolute.
    paths = {"out": str(out), "data": str(Path(run.data).resolve())}
    if Path(run.model).exists():
        paths["model"] = str(Path(run.model).resolve())
    trainer = TorchTrainer(
        _worker,
        train_loop_config=asdict(run) | paths,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(out / RAY_FOLDER),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    return read_record(out)


def launch(run: StageRun, workers: int = 1, max_failures: int = DEFAULT_MAX_FAILURES) -> dict:
    """`medplib train`: in this process, or on `workers` Ray Train workers."""
    if workers > 1:
        return run_distributed(run, workers, max_failures)
    run_stage(run)
    return read_record(Path(run.out))
