"""Data parallelism for the training loop: torch's `DistributedDataParallel` around one micro-batch's loss.

DDP needs the whole differentiable computation to pass through the module it wraps, and the loop
calls the model's pieces (`loop.forward_losses`), not `model.forward`; so `MicroBatchLoss` is that
computation as a module. Three settings follow from how the loop trains:

- `find_unused_parameters=True`: a micro-batch may leave trained parameters untouched (the mask
  decoder on a VQA-only share, an expert the router skipped, a worker's share without a region);
- gradients are summed, not averaged (`_sum_allreduce`): each micro-batch's loss is already
  normalised by the *global* batch, so the sum over workers is the gradient of the global batch;
- `init_sync=False`: every worker rebuilds the same frozen trunk from the same source and seed, so
  only the trained parameters are broadcast from rank 0 (`broadcast_trained`), not a 7B trunk.

A parameter no worker reached keeps `grad=None` under DDP; `fill_missing_gradients` makes it 0, as it
is in-process, so that AdamW steps every trained parameter alike in both.
"""

# No `from __future__ import annotations`: DDP checks the comm hook's annotations as objects.
import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


class MicroBatchLoss(torch.nn.Module):
    """`compute(batch, *args)` (one micro-batch's loss) as a module that owns the model's parameters."""

    def __init__(self, model: torch.nn.Module, compute: Callable) -> None:
        super().__init__()
        self.model = model
        self.compute = compute

    def forward(self, batch: dict, *args):
        return self.compute(batch, *args)


def _sum_allreduce(_: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce without its division by the world size."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def data_parallel(module: MicroBatchLoss, world: int) -> torch.nn.Module:
    """`module` itself for one worker; DDP over the process group for several."""
    if world == 1:
        return module
    wrapped = DistributedDataParallel(
        module, find_unused_parameters=True, forward_sync_buffers=False, init_sync=False
    )
    wrapped.register_comm_hook(state=None, hook=_sum_allreduce)
    return wrapped


def syncing(runner: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces the gradients on the last micro-batch of a step only."""
    if isinstance(runner, DistributedDataParallel) and not last:
        return runner.no_sync()
    return contextlib.nullcontext()


def broadcast_trained(parameters: Sequence[torch.nn.Parameter], world: int) -> None:
    """Rank 0's values of the trained parameters on every worker."""
    if world > 1:
        for p in parameters:
            dist.broadcast(p.data, src=0)


def fill_missing_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def sum_over_workers(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
