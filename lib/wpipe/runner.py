"""The run loop shared by the entry points (cv/main.py, nlp/main.py).

An entry point describes its task (model partitions, loss, optimizer, learning-rate
schedule, data, metrics) as a `Task` and calls `main(ConfigClass, make_task)`, which
reads top to bottom: configuration -> task (data checked) -> process group -> Pipeline ->
train (+ evaluation after each epoch) or throughput -> summary.json.

`<output_dir>/summary.json` (written by rank 0, atomically, at the end) holds method,
pipeline_depth, data_parallel, micro_batch_size, samples_per_second, final_loss, eval
(metrics of the last evaluation), memory (one report per rank, with the precision its
bytes were measured under), history (per-epoch metrics and per-period losses), precision
(Pipeline.precision_report: settings, device, fp16 loss-scale changes and overflow skips)
and the resolved config, which is also written beside it as config.yaml when training
starts (so that a run that dies can be replayed: tool/replay.py). With `trace: true` it
also holds `timeline` (per rank busy_s, wait_s, window_s, bubble_fraction; trace.py) and
every rank's events go to trace.json beside it.

Checkpoints (checkpoint.py): training runs in chunks that end at every `checkpoint_every`-th
update (counted over the whole run) and at epoch ends; after a chunk the runner may write a
checkpoint, and stops there when a SIGTERM or SIGINT arrived (every rank agrees first), after
writing one. `--resume` continues from a checkpoint at the exact micro-batch: weights
(versions included), optimizers, LR schedules, RNG states, losses and history, so the run
ends as an uninterrupted one with the same settings would, bit for bit on CPU. (The chunks
follow `checkpoint_every`; with dropout, RNG draws follow the chunks, so compare runs with
the same checkpoint_every.)

`cli` is what the entry points run: errors of the user's input (configuration, data,
checkpoints, launch), found before training starts, print one line `error: ...` on rank 0
(or on the one rank that alone can see it: a corrupt rank file) and exit with status 2;
WPIPE_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, nonfinite, probe
from .preemption import Preempted, Signals
from .config import PipelineConfig, load_config
from .engine import Pipeline
from .topology import init_distributed
from .trace import timeline_summary, write_trace

log = logging.getLogger("wpipe")
MODES = ("train", "throughput", "probe")
INPUT_ERRORS = (ValueError, TypeError, OSError, RuntimeError)
"""What setting up a run raises for bad input (bugs there look the same: WPIPE_DEBUG=1)."""


@dataclass
class TrainConfig(PipelineConfig):
    mode: str = "train"
    """train: epochs with evaluation after each; throughput: timed periods on synthetic data;
    probe: one process runs each device's op list alone and writes probe.json (probe.py)."""
    output_dir: str = "runs/default"
    """Where summary.json and config.yaml go (created by rank 0)."""
    seed: int = 42
    """Seeds weights (identically on every rank) and data order."""
    micro_batch_size: int = 32
    """Samples per micro-batch (what one forward pass takes)."""
    epochs: int = 1
    lr: float = 1e-3
    """Base learning rate of every group's optimizer."""
    warmup_periods: int = 0
    """Updates (periods) of linear learning-rate warm-up."""
    max_periods_per_epoch: int | None = None
    """Cap on updates per epoch (short runs on CPU); None: the whole training set."""
    max_eval_batches: int | None = None
    """Cap on evaluation micro-batches; None: the whole evaluation set."""
    throughput_periods: int = 20
    """throughput mode: periods timed after the warm-up."""
    throughput_warmup_periods: int = 3
    """Periods excluded from timing (also in train mode's samples_per_second)."""
    probe_periods: int = 3
    """probe mode: periods timed (medians) after throughput_warmup_periods untimed ones."""
    probe_device: int | None = None
    """probe mode: the device position to probe (0 .. pipeline_depth - 1); None: every
    device of replica 0, one after another."""
    log_every: int = 10
    """Log a line every this many periods."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many updates (periods) of the run; 0: only at epoch
    ends (which always get one, the last included)."""
    checkpoint_dir: str | None = None
    """Folder of the checkpoints (one sub-folder each); None: <output_dir>/checkpoints."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (older ones are removed once a newer one is complete); 0: all."""
    resume: str | None = None
    """auto: the latest complete checkpoint under checkpoint_dir (a fresh start if none);
    a checkpoint folder (or a checkpoint_dir: its latest); None: start afresh."""
    on_nonfinite: str = "stop"
    """A NaN or Inf loss or gradient: stop (naming update, partition, micro-batch) or skip
    that update on every partition (summary.json skipped_updates lists them, from 1)."""

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("micro_batch_size", "epochs", "throughput_periods", "probe_periods", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.throughput_warmup_periods < 0 or self.warmup_periods < 0:
            raise ValueError("throughput_warmup_periods and warmup_periods must be >= 0")
        for name in ("checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.probe_device is not None and not 0 <= self.probe_device < self.pipeline_depth:
            raise ValueError(f"probe_device must be a device position 0 .. {self.pipeline_depth - 1} "
                             f"(pipeline_depth {self.pipeline_depth}) or null (every device), got {self.probe_device}")
        if self.max_periods_per_epoch is not None and self.max_periods_per_epoch < 1:
            raise ValueError(f"max_periods_per_epoch must be >= 1 or null, got {self.max_periods_per_epoch}")
        if self.on_nonfinite not in nonfinite.MODES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(nonfinite.MODES)}, got {self.on_nonfinite!r}")
        if self.resume is not None and self.mode != "train":
            raise ValueError(f"resume applies to mode train, not {self.mode}: drop resume or use mode train")

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.output_dir) / "checkpoints"


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


def parse_cli(argv: Sequence[str]) -> tuple[str | None, dict]:
    """`--config PATH` and `--key value` / `--key=value` pairs -> (path, overrides)."""
    path, overrides, args = None, {}, list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --config FILE and --key value overrides")
        key, _, value = arg[2:].partition("=")
        if not _:
            if not args:
                raise ValueError(f"--{key} needs a value")
            value = args.pop(0)
        key = key.replace("-", "_")
        if key == "config":
            path = value
        else:
            overrides[key] = value
    return path, overrides


def cli(config_class: type, make_task: Callable, argv: Sequence[str] | None = None) -> None:
    """What an entry point's `__main__` runs: `main`, with bad input as one line and status 2."""
    try:
        run = setup(config_class, make_task, argv)
    except INPUT_ERRORS as error:
        if os.environ.get("WPIPE_DEBUG"):
            raise
        if int(os.environ.get("RANK", 0)) == 0 or getattr(error, "rank_only", False):
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    run()


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
            _write_config(Path(cfg.output_dir), cfg)
        if cfg.mode == "throughput":
            result = _throughput(cfg, task, pipe)
        else:
            with Signals() as signals:
                result = _train(cfg, task, pipe, resumed["runner"] if resumed else None, signals, guard)
        summary = _summarize(cfg, pipe, result)
        if dist.get_rank() == 0:
            _write_summary(Path(cfg.output_dir), cfg, summary)
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


def _summarize(cfg, pipe, result) -> dict:
    """Gather the loss ranks' figures and every rank's memory report."""
    mine = {"memory": pipe.memory_report(),
            "trace": pipe.trace_events() if cfg.trace else None,
            "loss_rank": pipe.computes_loss,
            "losses": result["losses"] if pipe.computes_loss else None,
            "samples_per_second": result["samples_per_second"] if pipe.computes_loss else None}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    loss_ranks = [g for g in gathered if g["loss_rank"]]
    rates = [g["samples_per_second"] for g in loss_ranks]
    losses = loss_ranks[0]["losses"] or []
    # Replicas differ only in their data: average their per-period losses.
    if all(len(g["losses"]) == len(losses) for g in loss_ranks):
        losses = [sum(g["losses"][t] for g in loss_ranks) / len(loss_ranks) for t in range(len(losses))]
    tail = [x for x in losses[-10:] if math.isfinite(x)]  # a skipped update's loss may be NaN
    history = result["history"]
    if history and losses:  # rank 0 writes the summary but may compute no loss: per-epoch means here
        per_epoch = len(losses) // len(history)
        history = [{**record, "loss": sum(losses[i * per_epoch:(i + 1) * per_epoch]) / per_epoch}
                   for i, record in enumerate(history)]
    summary = {"method": cfg.method, "pipeline_depth": cfg.pipeline_depth, "data_parallel": cfg.data_parallel,
            "micro_batch_size": cfg.micro_batch_size, "micro_batches_per_update": cfg.period,
            "mode": cfg.mode,
            "samples_per_second": sum(rates) if all(r is not None for r in rates) else None,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "eval": result["eval"], "memory": [g["memory"] for g in gathered],
            "history": history, "losses": losses, "skipped_updates": result["skipped_updates"],
            "precision": pipe.precision_report(), "config": dataclasses.asdict(cfg)}
    if cfg.trace:
        summary["timeline"] = timeline_summary([e for g in gathered for e in g["trace"]])
        summary["trace"] = [g["trace"] for g in gathered]   # written as trace.json, not in summary.json
    return summary


def _write_config(out_dir: Path, cfg) -> None:
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def _write_summary(out_dir: Path, cfg, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = summary.pop("trace", None)
    if trace is not None:
        log.info("wrote %s", write_trace(out_dir / "trace.json", trace, cfg))
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    log.info("samples/s %s, final loss %s; wrote %s", _fmt(summary["samples_per_second"]),
             _fmt(summary["final_loss"]), out_dir / "summary.json")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[rank {rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
