"""Single-process trainers with each method's exact update rule: the oracle.

`train` runs the whole model (all partitions, in one process, one micro-batch at a time)
and applies docs/design.md §5 literally, period by period:

* a synchronous partition runs period t on W(t); W(t+1) = step(W(t), g(W(t)));
* a stale partition (wpipe's first group, every pipedream_2bw stage) runs period t,
  forward and backward, on W(t-1) (W(-1) := W(0)); W(t+1) = step(W(t), g(W(t-1))).

The gradient of a period is the sum over its micro-batches of grad(loss / m); with D
replicas it is averaged over the replicas. Each partition has its own optimizer (and
optional LR scheduler) stepped once per period. Buffers (BatchNorm statistics) are not
versioned; each replica keeps its own. Nothing here is distributed: it is the number the
engine must reproduce.

With a precision `policy` (precision.py) it applies the engine's rules too: each partition's
forward under autocast, the loss on fp32 outputs, the wire casts at every boundary between
two devices (forward values and backward gradients), and with fp16 the loss scaler: period
t's losses scaled by S_t, its gradients unscaled by 1 / S_t, and a group's update skipped
when any of its gradients overflowed in that period.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .. import schedule
from . import precision


def train(partitions: Sequence[nn.Module], loss_fn: Callable, make_optimizer: Callable,
          micro_batches: Sequence, method: str, depth: int, *,
          micro_batches_per_update: int | None = None, data_parallel: int = 1,
          make_lr_scheduler: Callable | None = None, policy: precision.Policy | None = None,
          scaler: precision.LossScaler | None = None) -> list[float]:
    """Train `partitions` in place (they end holding the newest weights).

    micro_batches: a sequence of (inputs, target) when data_parallel == 1, else a list of
    `data_parallel` such sequences, one per replica, of equal length. Returns the mean
    loss of every period (over its micro-batches and replicas). `policy`: the precision
    rules (default fp32, no wire cast); with fp16, `scaler` (default
    `policy.make_scaler(method, depth)`) records the scales and overflows.
    """
    period = schedule.validate(method, depth, len(micro_batches if data_parallel == 1 else micro_batches[0]),
                               micro_batches_per_update)
    if len(partitions) != schedule.num_partitions(method, depth):
        raise ValueError(f"{method} at depth {depth} needs {schedule.num_partitions(method, depth)} "
                         f"partitions, got {len(partitions)}")
    per_replica = [micro_batches] if data_parallel == 1 else list(micro_batches)
    if len(per_replica) != data_parallel or len({len(seq) for seq in per_replica}) != 1:
        raise ValueError(f"expected {data_parallel} replica sequences of equal length")
    stale = [schedule.get_method(method).stale(p, depth) for p in range(len(partitions))]
    policy = policy or precision.Policy()
    scaler = scaler or policy.make_scaler(method, depth)
    wire = policy.wire
    boundary = [schedule.device_of(method, p, depth) != schedule.device_of(method, p + 1, depth)
                for p in range(len(partitions) - 1)]
    # Replica r >= 1 owns its buffers but runs on replica 0's parameters.
    replicas = [list(partitions)] + [[copy.deepcopy(m) for m in partitions] for _ in range(data_parallel - 1)]
    optimizers = [make_optimizer(list(m.parameters())) for m in partitions]
    schedulers = [make_lr_scheduler(opt) for opt in optimizers] if make_lr_scheduler else []
    previous = [_snapshot(m) if s else None for m, s in zip(partitions, stale)]

    losses = []
    for start in range(0, len(per_replica[0]), period):
        t = start // period
        scale = scaler.scale(t) if scaler else None
        # The tensors this period runs on: W(t-1) for stale partitions, W(t) otherwise.
        weights = [previous[p] if stale[p] else dict(partitions[p].named_parameters())
                   for p in range(len(partitions))]
        total = 0.0
        for r, sequence in enumerate(per_replica):
            for inputs, target in sequence[start:start + period]:
                x = inputs
                for p, (module, w) in enumerate(zip(replicas[r], weights)):
                    with policy.autocast():
                        x = functional_call(module, w, x if isinstance(x, tuple) else (x,))
                    if p < len(boundary) and boundary[p]:
                        x = wire.across(x if isinstance(x, tuple) else (x,))
                loss = loss_fn(policy.loss_input(x), target)
                ((loss * scale if scaler else loss) / period).backward()
                total += loss.item()
        losses.append(total / (period * data_parallel))
        grads = [{name: None if w.grad is None else w.grad / data_parallel for name, w in weights[p].items()}
                 for p in range(len(partitions))]
        skip = {}
        if scaler:
            for group in {precision.group_of(s) for s in stale}:
                bad = precision.overflowed(g for p in range(len(partitions)) if precision.group_of(stale[p]) == group
                                           for g in grads[p].values())
                scaler.record(group, t, bad)
                skip[group] = bad
        for p, module in enumerate(partitions):
            newest = _snapshot(module) if stale[p] else None
            if not skip.get(precision.group_of(stale[p])):
                for name, param in module.named_parameters():
                    grad = grads[p][name]
                    param.grad = grad * (1 / scale) if scaler and grad is not None else grad
                optimizers[p].step()
            optimizers[p].zero_grad(set_to_none=True)
            if schedulers:
                schedulers[p].step()
            previous[p] = newest
    return losses


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters as leaves that collect their own gradients."""
    return {name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in module.named_parameters()}
