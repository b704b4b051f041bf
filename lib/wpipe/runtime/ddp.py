"""data_parallel's forward through torch's DistributedDataParallel (docs/design.md §6.3).

The whole model on every rank: its gradients are averaged over the replicas by DDP's
reducer, in buckets launched as soon as their gradients are ready during the backward of
a period's last micro-batch, so the all-reduce overlaps the rest of that backward (the
pipelined methods' one flat reduction per update is updates.GradientMean). The other
micro-batches of a period only accumulate (`no_sync`). Buffers are not broadcast: each
replica keeps its own BatchNorm statistics, as the reference does.
"""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


class ReplicatedForward:
    """Calls the module through DDP on the replicas' group `group`, synchronising the
    gradients in the backward of micro-batch `mb` only when it ends a period of `period`."""

    def __init__(self, module: nn.Module, group, period: int):
        self.ddp = DistributedDataParallel(module, process_group=group, broadcast_buffers=False)
        self.period = period

    def __call__(self, mb: int, inputs: tuple):
        if mb % self.period == self.period - 1:
            return self.ddp(*inputs)
        with self.ddp.no_sync():
            return self.ddp(*inputs)
