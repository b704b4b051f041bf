"""Deferred updates: a "U" op starts its partition's update, and it finishes later
(docs/design.md §6.3).

At the U's place in the order an update starts: the period's gradients are taken, their
data-parallel all-reduce (a mean over the replicas) is launched, and with fp16 the
overflow verdict of every rank is asked for. It finishes (`finish`: the mean, the
unscaling, the optimizer step making a new weights version, the LR schedule's step) when
the engine would otherwise wait for a message, or at the latest before the partition's
next op: the same arithmetic as at the U's place, since nothing touches the partition in
between, but off the critical path, where the other devices wait for this one's next op.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import CommError
from ..schedule import Op
from ..trace import COMPUTE, REDUCE, WAIT, WAIT_ALLREDUCE, Recorder, span_name
from .precision import overflowed
from .versions import WeightVersions
from .watchdog import Watchdog


@dataclass
class Reduction:
    """A data-parallel all-reduce in flight: the flat copy of the gradients it sums."""
    work: object
    flat: torch.Tensor


class GradientMean:
    """The mean of one device position's gradients over its replicas: one flat all-reduce
    per update on the group `group` of global ranks `ranks`, staged on `device` (the CPU
    when the group is gloo and the gradients live on a GPU)."""

    def __init__(self, group, ranks: list[int], device: torch.device, rank: int, timeout_s: float,
                 watchdog: Watchdog | None = None):
        self.group, self.ranks, self.device, self.rank = group, ranks, device, rank
        self.timeout = timedelta(seconds=timeout_s)
        self.watchdog = watchdog or Watchdog(rank, timeout_s)

    def start(self, grads: list[torch.Tensor]) -> Reduction:
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        return Reduction(dist.all_reduce(flat, group=self.group, async_op=True), flat)

    def done(self, reduction: Reduction) -> bool:
        return reduction.work.is_completed()

    def wait(self, reduction: Reduction, op: Op) -> None:
        """Until the all-reduce of `op`'s update completed (timeout: CommError naming the
        ranks). On a GPU the compute stream waits, the watchdog keeps the deadline."""
        if self.device.type == "cuda":
            reduction.work.wait()
            self.watchdog.watch(reduction.work, f"op {op}: the data-parallel all-reduce of partition "
                                                f"{op.partition}'s gradients over ranks {self.ranks}")
            return
        try:
            reduction.work.wait(self.timeout)
        except Exception as error:
            raise CommError(f"rank {self.rank}, op {op}: the data-parallel all-reduce of partition "
                            f"{op.partition}'s gradients over ranks {self.ranks} did not complete within "
                            f"{self.timeout.total_seconds():g} s. Likely cause: one of those ranks stopped; "
                            f"its own log says why.") from error

    def average(self, reduction: Reduction, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean gradients of a completed all-reduce, shaped and placed as `grads`."""
        flat = reduction.flat
        flat /= len(self.ranks)
        return [chunk.view_as(g).to(g.device) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]


@dataclass
class PendingUpdate:
    op: Op
    index: int                  # the U's position in the device's op list
    period: int                 # t within this call
    run_period: int             # t within the whole run (the loss scaler counts these)
    grads: list[torch.Tensor]
    reduction: Reduction | None


class Updates:
    """This rank's updates in flight, by partition. `mean` is None without data
    parallelism; `scaler` (precision.Agreement) None unless fp16; `scaler_group[p]` names
    partition p's scaler group; `on_nonfinite` (see Pipeline) None: no check.

    At most one host sync per update: the fp16 overflow verdict (its flag leaves the device
    once, at `start`), or else the non-finite check at `finish`."""

    def __init__(self, versions: dict[int, WeightVersions], lr_schedulers: dict, mean: GradientMean | None,
                 scaler, scaler_group: dict[int, str], trace: Recorder, on_nonfinite=None):
        self.versions, self.lr_schedulers, self.mean = versions, lr_schedulers, mean
        self.scaler, self.scaler_group, self.trace = scaler, scaler_group, trace
        self.on_nonfinite = on_nonfinite
        self.pending: dict[int, PendingUpdate] = {}

    def start(self, op: Op, index: int, period: int, run_period: int, version: int) -> None:
        """Start the update of `op.partition` whose gradients accumulated on `version`."""
        p = op.partition
        grads = self.versions[p].gradients(version)
        if self.scaler:
            self.scaler.start(self.scaler_group[p], run_period, grads)
        reduction = None
        if self.mean is not None:
            with self.trace.span(COMPUTE, span_name(REDUCE, op)):
                reduction = self.mean.start(grads)
        self.pending[p] = PendingUpdate(op, index, period, run_period, grads, reduction)

    def ready(self, p: int) -> bool:
        """Whether the pending update of `p` can finish without waiting."""
        update = self.pending[p]
        return ((update.reduction is None or self.mean.done(update.reduction))
                and (not self.scaler or self.scaler.ready(self.scaler_group[p], update.run_period)))

    def finish(self, p: int) -> PendingUpdate:
        """Apply (or, after an fp16 overflow, skip) the pending update of `p`."""
        update = self.pending.pop(p)
        grads = update.grads
        if update.reduction is not None:
            with self.trace.span(WAIT, span_name(WAIT_ALLREDUCE, update.op)):
                self.mean.wait(update.reduction, update.op)
        step = not (self.scaler and self.scaler.overflow(self.scaler_group[p], update.run_period))
        with self.trace.span(COMPUTE, update.op):
            if update.reduction is not None:
                grads = self.mean.average(update.reduction, grads)
            if not self.scaler and self.on_nonfinite is not None and overflowed(grads):
                step = self.on_nonfinite(p, self.versions[p], grads)
            if self.scaler and step:
                inverse = 1 / self.scaler.scale(update.run_period)
                grads = [g * inverse for g in grads]
            self.versions[p].update(grads, update.index, step=step)
            if self.lr_schedulers:
                self.lr_schedulers[p].step()
        return update
