"""The run loop shared by the entry points (cv/main.py, nlp/main.py).

An entry point describes its task (model partitions, loss, optimizer, learning-rate
schedule, data, metrics) as a `Task` and calls `main(ConfigClass, make_task)`, which
reads top to bottom: configuration -> task (data checked) -> process group -> Pipeline ->
train (+ evaluation after each epoch) or throughput -> summary.json (summary.py).

Checkpoints (checkpoint.py): training runs in chunks that end at every `checkpoint_every`-th
update (counted over the whole run) and at epoch ends; after a chunk the runner may write a
checkpoint, and stops there when a SIGTERM or SIGINT arrived (every rank agrees first), after
writing one. `--resume` continues from a checkpoint at the exact micro-batch: weights
(versions included), optimizers, LR schedules, RNG states, losses and history, so the run
ends as an uninterrupted one with the same settings would, bit for bit on CPU. (The chunks
follow `checkpoint_every`; with dropout, RNG draws follow the chunks, so compare runs with
the same checkpoint_every.)
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import load_config
from ..runtime.distributed import init_distributed
from ..runtime.engine import Pipeline
from . import checkpoint, nonfinite, probe
from .config import parse_cli
from .preemption import Preempted, Signals
from .summary import summarize, write_config, write_summary

log = logging.getLogger("wpipe")


@dataclass
class Task:
    """What an entry point supplies. Data functions return sequences (with len) of
    (inputs, target) micro-batches for one data-parallel replica."""
    build_partition: Callable[[int], torch.nn.Module]
    loss_fn: Callable
    make_optimizer: Callable
    make_lr_scheduler: Callable          # (optimizer, total_periods) -> LR scheduler
    train_data: Callable                 # (epoch, replica) -> micro-batches
    eval_data: Callable                  # (replica) -> {name: micro-batches}, may be empty
    metrics: Callable                    # (name, logits, labels) -> {metric: value}
    synthetic_data: Callable             # (count, replica) -> micro-batches, for throughput
    describe: str = ""                   # one line for the log: model and data
    measure_block_costs: Callable | None = None
    """For partitions balanced by time: () -> block costs, measured on rank 0 only; every
    rank then builds its partitions with build_partition(i, block_costs=those costs)."""


def main(config_class: type, make_task: Callable, argv: Sequence[str] | None = None) -> dict | None:
    """Run an entry point under torchrun (probe mode: in this process). Returns the summary
    on rank 0 (probe mode: probe.json's content)."""
    return setup(config_class, make_task, argv)()


def setup(config_class: type, make_task: Callable, argv: Sequence[str] | None = None) -> Callable:
    """Everything before training, where bad input shows: configuration, task (data checked),
    the checkpoint to resume from (checked before any process group exists), process group,
    Pipeline, loaded state. Returns the run (train or throughput, then summary.json), which
    returns the summary on rank 0. Uses a process group that exists already (and leaves it)."""
    path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(config_class, path, overrides)
    if cfg.mode == "probe":
        probe.check_launch(cfg)
    rank = int(os.environ.get("RANK", 0))
    _setup_logging(rank)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    task = make_task(cfg)            # checks data and model settings before any process starts talking
    total_periods = _total_periods(cfg, task)
    found = checkpoint.find(cfg, rank) if cfg.mode == "train" else None
    if found and found[1].get("periods_per_epoch") != total_periods // cfg.epochs:
        raise checkpoint.CheckpointError(
            f"checkpoint {found[0]} has {found[1].get('periods_per_epoch')} updates per epoch, this run "
            f"{total_periods // cfg.epochs}: the training data or max_periods_per_epoch changed")
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    if cfg.mode == "probe":   # a plain process: no process group
        return lambda: probe.run(cfg, task, total_periods)
    owns_group = not dist.is_initialized()
    backend = init_distributed(cfg.backend, cfg.timeout_s, cfg.p2p_backend)
    guard = nonfinite.Guard(cfg.on_nonfinite, cfg.period)
    build_partition = task.build_partition
    if task.measure_block_costs is not None:   # timings differ per process: all cut by rank 0's
        costs = [task.measure_block_costs() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(costs, src=0)
        log.info("partitions balanced by block costs measured on rank 0: %s s",
                 ", ".join(f"{c:.4g}" for c in costs[0]))
        build_partition = functools.partial(task.build_partition, block_costs=costs[0])
    pipe = Pipeline(build_partition, guard.loss_fn(task.loss_fn), guard.make_optimizer(task.make_optimizer),
                    cfg.pipeline_fields(), make_lr_scheduler=lambda opt: task.make_lr_scheduler(opt, total_periods))
    guard.attach(pipe, cfg.recompute)
    log.info("%s on %d ranks (%s): %s %dx%d, micro-batch %d, %d micro-batches per update%s",
             cfg.mode, dist.get_world_size(), backend, cfg.method, cfg.pipeline_depth, cfg.data_parallel,
             cfg.micro_batch_size, cfg.period, f"; {task.describe}" if task.describe else "")
    resumed = None
    if found:
        resumed = checkpoint.load(found[0], dist.get_rank(), pipe.device)
        pipe.load_state_dict(resumed["pipeline"])
        log.info("resumed from %s: epoch %d, update %d of the epoch (%d done)", found[0],
                 resumed["runner"]["epoch"] + 1, resumed["runner"]["period_in_epoch"], found[1]["period"])

    def run() -> dict | None:
        if dist.get_rank() == 0:   # before training, so that a run that dies can still be replayed
            write_config(Path(cfg.output_dir), cfg)
        if cfg.mode == "throughput":
            result = _throughput(cfg, task, pipe)
        else:
            with Signals() as signals:
                result = _train(cfg, task, pipe, resumed["runner"] if resumed else None, signals, guard)
        summary = summarize(cfg, pipe, result)
        if dist.get_rank() == 0:
            write_summary(Path(cfg.output_dir), cfg, summary)
        if owns_group:
            dist.destroy_process_group()
        return summary if rank == 0 else None
    return run


def _total_periods(cfg, task) -> int:
    """Updates over the whole run (for learning-rate schedules)."""
    if cfg.mode == "throughput":
        return cfg.throughput_periods + cfg.throughput_warmup_periods
    if cfg.mode == "probe":
        return cfg.probe_periods + cfg.throughput_warmup_periods
    return cfg.epochs * periods_per_epoch(cfg, len(task.train_data(0, 0)))


def periods_per_epoch(cfg, num_micro_batches: int) -> int:
    """Updates per epoch from an epoch's micro-batches (capped by max_periods_per_epoch)."""
    periods = num_micro_batches // cfg.period
    if cfg.max_periods_per_epoch is not None:
        periods = min(periods, cfg.max_periods_per_epoch)
    if periods < 1:
        raise ValueError(f"the training set gives {num_micro_batches} micro-batches of "
                         f"{cfg.micro_batch_size} per replica, fewer than one period of {cfg.period}: "
                         f"use more data or a smaller micro_batch_size")
    return periods


class _Take:
    """The first `count` items of an iterable (an iterator: the next `count`), with a length."""

    def __init__(self, items, count: int):
        self.items, self.count = items, count

    def __len__(self):
        return self.count

    def __iter__(self):
        return itertools.islice(iter(self.items), self.count)


class _Meter:
    """Per-period losses and timing, fed by Pipeline.train's on_period callback."""

    def __init__(self, cfg, pipe, total: int, progress_label: str):
        self.cfg, self.pipe = cfg, pipe
        self.losses: list[float] = []
        self.times: list[list[float]] = [[]]   # period end times, one list per train() call
        self.start = time.perf_counter()
        self.bar = None
        if dist.get_rank() == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=progress_label, unit="update", leave=False)

    def __call__(self, t: int, loss: float | None) -> None:
        self.times[-1].append(time.perf_counter())
        if self.bar is not None:
            self.bar.update(1)
        if loss is None:
            return
        self.losses.append(loss)
        if len(self.losses) % self.cfg.log_every == 0 or len(self.losses) == 1:
            lrs = " ".join(f"lr[{p}]={s.get_last_lr()[0]:.3g}" for p, s in sorted(self.pipe.lr_schedulers.items()))
            rate = self.samples_per_second()
            log.info("period %d loss %.4f %s%s", len(self.losses), loss, lrs,
                     f" {rate:.1f} samples/s" if rate else "")

    def start_call(self) -> None:
        """A train() call starts: time it from now on its own (evaluation and checkpoints
        before it are not training). The first call is timed from its first period's end."""
        if self.times[-1]:
            self.times.append([time.perf_counter()])

    def samples_per_second(self) -> float | None:
        """This replica's rate over the periods after the warm-up, within train() calls
        (None before two timed periods)."""
        first = self.times[0]
        skip = min(self.cfg.throughput_warmup_periods, max(len(first) - 2, 0))
        segments = [first[skip:], *self.times[1:]]
        intervals = sum(max(len(ts) - 1, 0) for ts in segments)
        seconds = sum(ts[-1] - ts[0] for ts in segments if len(ts) > 1)
        if intervals == 0:
            return None
        return intervals * self.cfg.period * self.cfg.micro_batch_size / seconds

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _epoch_items(data, start: int):
    """An iterator over `data` from micro-batch `start` on (indexed when it can be)."""
    if start == 0:
        return iter(data)
    if hasattr(data, "__getitem__"):
        return (data[i] for i in range(start, len(data)))
    return itertools.islice(iter(data), start, None)  # a DataLoader: the skipped ones are loaded


def _train(cfg, task, pipe, resumed: dict | None, signals: Signals, guard: nonfinite.Guard) -> dict:
    history = []
    per_epoch = periods_per_epoch(cfg, len(task.train_data(0, pipe.replica)))
    meter = _Meter(cfg, pipe, per_epoch * cfg.epochs, "train")
    first_epoch, first_period = 0, 0
    if resumed:
        meter.losses, history = list(resumed["losses"]), list(resumed["history"])
        first_epoch, first_period = resumed["epoch"], resumed["period_in_epoch"]
        guard.skipped = {p: list(u) for p, u in resumed["skipped"].items()}
    every = cfg.checkpoint_every
    for epoch in range(first_epoch, cfg.epochs):
        data = task.train_data(epoch, pipe.replica)
        done = first_period if epoch == first_epoch else 0
        items = _epoch_items(data, done * cfg.period)
        while done < per_epoch:
            run_so_far = epoch * per_epoch + done
            chunk = min(every - run_so_far % every, per_epoch - done) if every else per_epoch - done
            meter.start_call()
            with guard.chunk(run_so_far):
                pipe.train(_Take(items, chunk * cfg.period), on_period=meter)
            done += chunk
            if done == per_epoch:
                record = {"epoch": epoch + 1, "eval": _evaluate(cfg, task, pipe)}
                if meter.losses:
                    record["loss"] = sum(meter.losses[-per_epoch:]) / per_epoch
                history.append(record)
                log.info("epoch %d/%d done%s%s", epoch + 1, cfg.epochs,
                         f", mean loss {record['loss']:.4f}" if "loss" in record else "",
                         "".join(f", {k} {v:.4f}" for k, v in record["eval"].items()))
            stop = signals.agreed(pipe.device)
            if stop or done == per_epoch or (every and (run_so_far + chunk) % every == 0):
                position = (epoch + 1, 0) if done == per_epoch else (epoch, done)
                folder = _save_checkpoint(cfg, pipe, per_epoch, position, meter.losses, history, guard)
            if stop:
                meter.close()
                if dist.get_rank() == 0:
                    log.info("stopped by %s after update %d: checkpoint %s; continue with --resume auto",
                             signal.Signals(stop).name, run_so_far + chunk, folder)
                raise Preempted(128 + stop)
    meter.close()
    return {"history": history, "losses": meter.losses, "samples_per_second": meter.samples_per_second(),
            "eval": history[-1]["eval"] if history else {},
            "skipped_updates": sorted({u + 1 for updates in guard.skipped.values() for u in updates})}


def _save_checkpoint(cfg, pipe, per_epoch: int, position: tuple[int, int], losses, history, guard) -> Path:
    start = time.perf_counter()
    epoch, period_in_epoch = position
    period = epoch * per_epoch + period_in_epoch
    state = {"pipeline": pipe.state_dict(),
             "runner": {"epoch": epoch, "period_in_epoch": period_in_epoch, "losses": list(losses),
                        "history": list(history), "skipped": {p: list(u) for p, u in guard.skipped.items()}}}
    info = {"epoch": epoch, "period_in_epoch": period_in_epoch, "periods_per_epoch": per_epoch}
    folder = checkpoint.save(cfg.checkpoint_root, period, state, info, cfg, cfg.keep_checkpoints)
    if dist.get_rank() == 0:
        size = sum(f.stat().st_size for f in folder.iterdir())
        log.info("checkpoint %s: %.1f MB in %.2f s", folder, size / 1e6, time.perf_counter() - start)
    return folder


def _evaluate(cfg, task, pipe) -> dict:
    """Metrics of every evaluation set, gathered from the loss ranks of all replicas."""
    metrics = {}
    for name, data in task.eval_data(pipe.replica).items():
        if cfg.max_eval_batches is not None:
            data = _Take(data, min(len(data), cfg.max_eval_batches))
        pairs = pipe.evaluate(data)
        local = None
        if pipe.computes_loss:
            local = (torch.cat([out.float().cpu() for out, _ in pairs]),
                     torch.cat([target.cpu() for _, target in pairs]))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        logits = torch.cat([g[0] for g in gathered if g is not None])
        labels = torch.cat([g[1] for g in gathered if g is not None])
        prefix = f"{name}_" if name else ""
        metrics.update({prefix + k: v for k, v in task.metrics(name, logits, labels).items()})
    return metrics


def _throughput(cfg, task, pipe) -> dict:
    count = (cfg.throughput_periods + cfg.throughput_warmup_periods) * cfg.period
    meter = _Meter(cfg, pipe, count // cfg.period, "throughput")
    pipe.train(task.synthetic_data(count, pipe.replica), on_period=meter)
    meter.close()
    return {"history": [], "losses": meter.losses, "samples_per_second": meter.samples_per_second(), "eval": {},
            "skipped_updates": []}


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[rank {rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
