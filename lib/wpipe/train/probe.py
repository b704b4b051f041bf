"""Probe mode: one device of a pipeline, measured in a plain process (no torchrun).

A device of an 8- or 64-device run is one process running its own op list, so its memory
and op times can be measured alone. For a device position s of replica 0, `probe_device`
builds only that device's partitions and runs its op list through the real `Pipeline`,
whose peers are replaced by a `Loopback` (runtime/loopback.py: messages of the exact shapes
its neighbours would send, inferred on the meta device). No data-parallel all-reduce runs (the device's
weights, stash and optimizer state are the same with one; a cost model times it).

`run` probes the configured device (`probe_device`) or every device of replica 0, one after
another, and writes `<output_dir>/probe.json`:

* top level: method, pipeline_depth, data_parallel, micro_batch_size,
  micro_batches_per_update, recompute, rank_layout, device_name ("cpu" or the CUDA device's
  name), threads (CPU threads), periods (timed), warmup_periods (run before them, untimed),
  model (the entry point's description), config (every field), devices;
* `devices`: per probed device `device`, `partitions`, `weights_bytes`, `activations_bytes`,
  `optimizer_state_bytes` (as in summary.json's memory: Pipeline.memory_report), `peak_bytes`
  and `peak_kind` (cuda_max_allocated, or cpu_max_rss: the process's peak resident set since
  this device's probe began, reset through /proc/self/clear_refs; `cpu_max_rss_since_start`
  where that reset is refused), and `ops`: per partition (`partition`) the median seconds of
  `forward_s`, `backward_s` (the backward alone), `recompute_s` (the forward run again before
  a backward with recompute; 0 without), `update_s` (optimizer step), over the timed
  periods, and the bytes one micro-batch's ops move between devices: `forward_recv_bytes`
  (inputs from the previous partition's device), `forward_send_bytes` (outputs to the next
  partition's device), `backward_recv_bytes` (output gradients from the next partition's
  device), `backward_send_bytes` (input gradients to the previous partition's device); 0
  where the neighbour partition is on the same device or there is none.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from .. import schedule
from ..files import write_atomic
from ..runtime.engine import Pipeline
from ..runtime.loopback import Loopback, Spec, infer_outputs
from ..runtime.precision import Policy
from ..schedule import Topology
from ..trace import COMPUTE, RECOMPUTE, parse_span

log = logging.getLogger("wpipe")
TIMES = {"F": "forward_s", "B": "backward_s", "U": "update_s"}


def probe_device(s: int, cfg, task, build_partition: Callable, outputs: list[list[Spec]],
                 data, total_periods: int, device: torch.device) -> dict:
    """Run device `s`'s op list on `data` (warm-up periods, then timed ones) through a
    Pipeline with a Loopback; return its entry of probe.json (module docstring)."""
    peak_kind = _reset_peak(device)
    torch.manual_seed(cfg.seed)
    topology = Topology.from_config(cfg)
    loopback = Loopback(topology, s, outputs, device, seed=cfg.seed)
    pipe = Pipeline(build_partition, task.loss_fn, task.make_optimizer,
                    dataclasses.replace(cfg.pipeline_fields(), trace=True),
                    make_lr_scheduler=lambda optimizer: task.make_lr_scheduler(optimizer, total_periods),
                    transport=loopback)
    pipe.train(data)
    memory = pipe.memory_report()
    times = op_times(pipe.trace.events, cfg.period, cfg.throughput_warmup_periods)
    ops = []
    for p in sorted(pipe.local_partitions):
        ops.append({"partition": p, **times[p],
                    "forward_recv_bytes": loopback.received.get(("F", p - 1), 0),
                    "forward_send_bytes": loopback.sent.get(("F", p), 0),
                    "backward_recv_bytes": loopback.received.get(("B", p + 1), 0),
                    "backward_send_bytes": loopback.sent.get(("B", p), 0)})
    entry = {"device": s, "partitions": memory["partitions"],
             **{k: memory[k] for k in ("weights_bytes", "activations_bytes", "optimizer_state_bytes", "peak_bytes")},
             "peak_kind": memory["peak_kind"] if peak_kind is None else peak_kind, "ops": ops}
    log.info("probe of device %d (partitions %s): weights %.4g MB, activations %.4g MB, optimizer state "
             "%.4g MB, peak %.4g MB (%s)", s, entry["partitions"], entry["weights_bytes"] / 1e6,
             entry["activations_bytes"] / 1e6, entry["optimizer_state_bytes"] / 1e6, entry["peak_bytes"] / 1e6,
             entry["peak_kind"])
    return entry


def op_times(events, period: int, warmup_periods: int) -> dict[int, dict[str, float]]:
    """Per partition, the median seconds of its forward, backward, recompute and update ops
    in the trace `events` (Recorder.events) of periods >= `warmup_periods`."""
    seconds: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    updates: dict[int, int] = defaultdict(int)
    for category, name, start, end, _ in sorted(events, key=lambda e: e[2]):
        if category != COMPUTE:
            continue
        prefix, op = parse_span(name)
        if prefix not in ("", RECOMPUTE):
            continue
        if op.kind == "U":
            t, updates[op.partition] = updates[op.partition], updates[op.partition] + 1
        else:
            t = op.micro_batch // period
        if t >= warmup_periods:
            kind = "recompute_s" if prefix == RECOMPUTE else TIMES[op.kind]
            seconds[op.partition][kind].append(end - start)
    return {p: {key: statistics.median(times[key]) if times[key] else 0.0
                for key in ("forward_s", "backward_s", "recompute_s", "update_s")}
            for p, times in seconds.items()}


def check_launch(cfg) -> None:
    """Probe mode runs in a plain process, in fp32 or bf16 (its messages carry the dtypes
    autocast gives them: autocast_dtypes): refuse torchrun's multi-process launch, fp16
    (its loss scaler needs every rank's overflow verdict) and a wire dtype (the loopback's
    messages are not cast)."""
    if cfg.precision == "fp16" or cfg.wire_dtype is not None:
        raise ValueError(f"mode probe measures fp32 and bf16 runs without a wire cast: precision is "
                         f"{cfg.precision!r} and wire_dtype {cfg.wire_dtype!r}; set precision fp32 or bf16 and "
                         f"wire_dtype null (an fp16 device's bytes and times: tool/bench.py --precision fp16)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise ValueError(f"mode probe runs as one plain process (python cv/main.py or nlp/main.py "
                         f"--mode probe ...), not under torchrun: WORLD_SIZE is {world}; it probes "
                         f"the devices one after another (probe_device picks one)")


def run(cfg, task, total_periods: int) -> dict:
    """Probe the devices; write <output_dir>/probe.json (module docstring); return its content."""
    device = (torch.device("cuda", torch.cuda.current_device())
              if torch.cuda.is_available() and cfg.backend != "gloo" else torch.device("cpu"))
    build_partition = task.build_partition
    if task.measure_block_costs is not None:
        build_partition = functools.partial(task.build_partition, block_costs=task.measure_block_costs())
    data = task.synthetic_data(total_periods * cfg.period, 0)
    inputs = data[0][0]
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    num_partitions = schedule.num_partitions(cfg.method, cfg.pipeline_depth)
    outputs = infer_outputs(build_partition, num_partitions, inputs)
    if cfg.precision != "fp32":
        policy = Policy(cfg.precision, device_type=device.type)
        dtypes = autocast_dtypes(build_partition, num_partitions, inputs, policy, device)
        outputs = [[dataclasses.replace(spec, dtype=d) for spec, d in zip(specs, out)]
                   for specs, out in zip(outputs, dtypes)]
    devices = range(cfg.pipeline_depth) if cfg.probe_device is None else [cfg.probe_device]
    report = {"method": cfg.method, "pipeline_depth": cfg.pipeline_depth, "data_parallel": cfg.data_parallel,
              "micro_batch_size": cfg.micro_batch_size, "micro_batches_per_update": cfg.period,
              "recompute": cfg.recompute, "rank_layout": cfg.rank_layout,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "periods": cfg.probe_periods,
              "warmup_periods": cfg.throughput_warmup_periods, "model": task.describe,
              "config": dataclasses.asdict(cfg),
              "devices": [probe_device(s, cfg, task, build_partition, outputs, data, total_periods, device)
                          for s in devices]}
    log.info("wrote %s", write_atomic(Path(cfg.output_dir) / "probe.json", json.dumps(report, indent=2)))
    return report


def autocast_dtypes(build_partition: Callable, num_partitions: int, inputs: tuple, policy: Policy,
                    device: torch.device) -> list[list[torch.dtype]]:
    """Per partition, the dtypes of the tensors its forward returns under `policy`'s autocast,
    which the meta device ignores (infer_outputs): every partition in turn, built on
    `device`, runs the micro-batch `inputs` without gradients (one partition held at a time)."""
    x = tuple(t.to(device) for t in inputs)
    dtypes = []
    for p in range(num_partitions):
        with torch.device(device):
            module = build_partition(p)
        with torch.no_grad(), policy.autocast():
            out = module.to(device).train()(*x)   # .to: a builder may ignore the default device
        x = out if isinstance(out, tuple) else (out,)
        dtypes.append([t.dtype for t in x])
        del module
    return dtypes


def _reset_peak(device: torch.device) -> str | None:
    """Start a fresh peak measurement, after freeing what earlier probes left. Returns the
    peak's kind when it differs from Pipeline.memory_report's (a reset refused)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return None
    try:
        Path("/proc/self/clear_refs").write_text("5")   # Linux: peak RSS := current RSS
        return None
    except OSError:
        return "cpu_max_rss_since_start"
