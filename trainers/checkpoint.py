"""Training checkpoints: everything a killed run needs to continue exactly where it stopped.

A checkpoint is a folder `checkpoints/step-000120/` holding

- `trainable.safetensors`: the parameters the stage trains (the frozen rest is rebuilt from the
  stage's source, so a 7B checkpoint does not copy 7B frozen weights every N steps);
- `optimizer.safetensors`: AdamW's state tensors, flattened as `<parameter name>/<state key>`;
- `rng-<rank>.safetensors`: each worker's torch (and CUDA) generator state, which LoRA dropout draws
  from; the data order needs none, being a pure function of the seed and the epoch;
- `state.json`: step, data position (epoch and index into that epoch's seeded permutation), the
  scheduler's state and the optimizer's hyper-parameters.

In-process it is written into a hidden sibling folder and renamed into place (`os.replace`), so a
run killed mid-write leaves no folder that looks complete; `latest_checkpoint` only ever sees finished
ones. Under Ray Train the same files go to Ray's storage instead (`distributed.py`): each worker
reports its part and Ray registers the checkpoint once every part has arrived.
Nothing is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from medplib.core.errors import CheckpointError

STEP_FOLDER = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"


@dataclass(frozen=True)
class Position:
    step: int  # optimizer steps done
    epoch: int
    index: int  # samples of `epoch` already consumed (in its seeded permutation)


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The finished checkpoint with the highest step under `root`, or None."""
    if not root.is_dir():
        return None
    found = [
        (int(m[1]), p)
        for p in root.iterdir()
        if (m := STEP_FOLDER.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[f"cuda{i}"] for i in range(len(state) - 1) if f"cuda{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list[dict]]:
    state = optimizer.state_dict()
    tensors = {
        f"{names[index]}/{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for index, param_state in state["state"].items()
        for key, value in param_state.items()
    }
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]
    return tensors, groups


def write_rng(partial: Path, rank: int) -> None:
    """One worker's generator state into the checkpoint being written (every rank calls this)."""
    partial.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in rng_state().items()}, str(partial / f"rng-{rank}.safetensors"))


def partial_folder(root: Path, step: int) -> Path:
    return root / f".step-{step:06d}.partial"


def write_training_state(
    folder: Path,
    position: Position,
    named_parameters: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Rank 0's part of a checkpoint (all but the generators) into `folder`, as is: no publishing."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in named_parameters]
    save_file(
        {name: p.detach().contiguous().cpu() for name, p in named_parameters},
        str(folder / "trainable.safetensors"),
    )
    tensors, groups = _optimizer_tensors(optimizer, names)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / "optimizer.safetensors"))
    state = {
        "position": asdict(position),
        "scheduler": scheduler.state_dict(),  # a LambdaLR keeps its lambda out: its step only
        "param_groups": groups,
    }
    (folder / STATE_FILE).write_text(json.dumps(state, default=_to_list))


def save_checkpoint(
    root: Path,
    position: Position,
    named_parameters: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically (after every rank's `write_rng`) and drop all but the newest `keep`."""
    partial = partial_folder(root, position.step)
    write_training_state(partial, position, named_parameters, optimizer, scheduler)
    for path in partial.iterdir():
        _fsync(path)
    final = step_folder(root, position.step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync(root)
    finished = sorted(p for p in root.iterdir() if STEP_FOLDER.match(p.name))
    for old in finished[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: Path,
    named_parameters: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> Position:
    """Restore parameters, optimizer, scheduler and generators from `folder`; return the data position."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        params = load_file(str(folder / "trainable.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
        rng_file = folder / f"rng-{rank}.safetensors"
        rng = load_file(str(rng_file if rng_file.is_file() else folder / "rng-0.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the checkpoint {folder}: {exc}") from None
    names = [name for name, _ in named_parameters]
    if set(params) != set(names):
        missing, extra = sorted(set(names) - set(params)), sorted(set(params) - set(names))
        raise CheckpointError(
            f"{folder} does not fit this stage: missing {missing[:5]}, unexpected {extra[:5]}; "
            "resume with the same stage, model and options"
        )
    with torch.no_grad():
        for name, param in named_parameters:
            param.copy_(params[name])
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt_tensors.items():
        name, _, field = key.rpartition("/")
        per_param.setdefault(names.index(name), {})[field] = value
    # The optimizer's groups hold the parameters in the order of `named_parameters`, group by group.
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if len(sizes) != len(state["param_groups"]):
        raise CheckpointError(
            f"{folder} has {len(state['param_groups'])} learning-rate groups, this stage "
            f"{len(sizes)}; resume with the same stage, model and options"
        )
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    groups = [
        {**group, "params": list(range(start, start + size))}
        for group, start, size in zip(state["param_groups"], starts, sizes, strict=True)
    ]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rng)
    return Position(**state["position"])


class Session(Protocol):
    """An engine that keeps a run's checkpoints and restarts failed workers from them (Ray Train:
    `distributed.RayTrainSession`); without one a run checkpoints into its stage folder."""

    def restored(self) -> AbstractContextManager[Path | None]:
        """The checkpoint folder to continue from, if the engine holds one."""
        ...

    def report(self, record: dict, checkpoint: Path | None) -> None:
        """One step's metrics, with this worker's part of a checkpoint when one is due."""
        ...


Parameters = list[tuple[str, torch.nn.Parameter]]


def report_step(
    session: Session,
    record: dict,
    position: Position | None,
    named_parameters: Parameters,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
) -> None:
    """Every worker reports every step (Ray's report is a barrier); at a checkpoint each hands over
    its part, rank 0 the training state and every rank its generators, which the engine merges."""
    if position is None:
        session.report(record, None)
        return
    with tempfile.TemporaryDirectory(prefix="medplib-checkpoint-") as staging:
        folder = Path(staging)
        if rank == 0:
            write_training_state(folder, position, named_parameters, optimizer, scheduler)
        write_rng(folder, rank)
        session.report(record, folder)


def checkpoint_step(
    root: Path,
    position: Position,
    named_parameters: Parameters,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
    world: int = 1,
    keep: int = 2,
) -> None:
    """A checkpoint into the stage folder, from every worker of a run without a `Session`."""
    write_rng(partial_folder(root, position.step), rank)
    if world > 1:
        dist.barrier()  # every worker's generator state is in the folder before it is published
    if rank == 0:
        save_checkpoint(root, position, named_parameters, optimizer, scheduler, keep=keep)
    if world > 1:
        dist.barrier()


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk, so a rename never publishes unwritten data."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_list(value: object) -> object:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint's JSON")
