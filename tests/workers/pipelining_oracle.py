"""Worker (under torchrun, 2 ranks): the toy model split in 2 stages, trained by
torch.distributed.pipelining's ScheduleGPipe and Schedule1F1B and by our gpipe and
pipedream_flush, on the same data, in one process group.

Usage: pipelining_oracle.py OUT_DIR PERIOD [PERIOD ...]
Writes OUT_DIR/rank<r>.pt: {(runner, method, period): {"state": {partition: state_dict},
"losses": per-period mean losses on the loss rank}}, runner "pipelining" or "wpipe",
method gpipe (ScheduleGPipe) or pipedream_flush (Schedule1F1B).

Loss scaling matches ours exactly: our runtime back-propagates loss / m per micro-batch;
pipelining back-propagates loss_fn's value and, with scale_grads=True, divides the
gradients by m afterwards. So the pipelining runs use scale_grads=False and a loss_fn
that divides by m itself: the same operations in the same order.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wpipe  # noqa: E402

import toy  # noqa: E402

PERIODS = 3
STAGES = 2
SCHEDULES = {"gpipe": ScheduleGPipe, "pipedream_flush": Schedule1F1B}


def run_pipelining(method: str, period: int, data) -> dict:
    """One stage per rank; step() then SGD step, once per period."""
    rank = dist.get_rank()
    module = toy.build_partition(rank, STAGES)
    optimizer = toy.OPTIMIZERS["sgd"](list(module.parameters()))
    stage = PipelineStage(module, rank, STAGES, torch.device("cpu"))
    schedule = SCHEDULES[method](stage, n_microbatches=period, scale_grads=False,
                                 loss_fn=lambda out, target: toy.loss_fn(out, target) / period)
    losses = []
    for start in range(0, len(data), period):
        chunk = data[start:start + period]
        mb_losses = []
        # Whole batches, which the schedule splits back into these micro-batches (the call
        # every torch >= 2.11 takes; pre-split arg_mbs came later).
        if rank == 0:
            schedule.step(*(torch.cat(parts) for parts in zip(*(inputs for inputs, _ in chunk))))
        else:
            schedule.step(target=torch.cat([target for _, target in chunk]), losses=mb_losses)
            losses.append(float(sum(loss.detach() for loss in mb_losses)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"state": {rank: _copy(module)}, "losses": losses}


def run_ours(method: str, period: int, data) -> dict:
    cfg = wpipe.PipelineConfig(method=method, pipeline_depth=STAGES, micro_batches_per_update=period,
                               timeout_s=60)
    pipe = wpipe.Pipeline(lambda i: toy.build_partition(i, STAGES), toy.loss_fn, toy.OPTIMIZERS["sgd"], cfg)
    losses = pipe.train(data)
    return {"state": {p: _copy(m) for p, m in pipe.local_partitions.items()}, "losses": losses}


def _copy(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    wpipe.init_distributed(timeout_s=60)
    results = {}
    for period in map(int, sys.argv[2:]):
        data = toy.micro_batches(PERIODS * period)
        for method in SCHEDULES:
            results[("pipelining", method, period)] = run_pipelining(method, period, data)
            results[("wpipe", method, period)] = run_ours(method, period, data)
    torch.save(results, os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
