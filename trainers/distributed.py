"""Ray Train scale-out: the same `run_stage` on N workers under Ray Train's `TorchTrainer`.

Ray starts the workers and their torch process group (gloo on CPU, nccl on GPU); each worker runs
`run_stage` with its rank. The loop itself does the data parallelism: every worker takes the
`rank::world` share of each global batch (a deterministic sharding of one seeded permutation, as
`DistributedSampler` does), and gradients are summed in one all-reduce before clipping and the
optimizer step, so N workers with micro-batch B train as one process with batch N * B. That is done
by hand rather than with `DistributedDataParallel`: a stage leaves some trainable parameters
untouched in a micro-batch (a mask decoder on a VQA-only share, an expert the router skipped), which
DDP's bucketed hooks treat as an error.

Ray Train 2.x (its v2 API, the default) needs a storage path for its run records; they go into
`OUT/ray/`. The stage's own checkpoints stay where `medplib train` always puts them, so `--resume`
works the same with or without Ray.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from medplib.core.errors import InvalidInputError
from medplib.loading import read_record
from medplib.trainers.train import StageRun, run_stage


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    run_stage(
        StageRun(**config),
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        device=ray.train.torch.get_device(),
    )


def run_distributed(run: StageRun, workers: int) -> dict:
    """Run the stage on `workers` Ray Train workers; starts a local Ray if none is running."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 2:
        raise InvalidInputError(f"Ray Train needs at least 2 workers, got {workers}")
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
        run_config=RunConfig(name="medplib-train", storage_path=str(out / "ray")),
    )
    trainer.fit()
    return read_record(out)


def launch(run: StageRun, workers: int = 1) -> dict:
    """`medplib train`: in this process, or on `workers` Ray Train workers."""
    if workers > 1:
        return run_distributed(run, workers)
    run_stage(run)
    return read_record(Path(run.out))
