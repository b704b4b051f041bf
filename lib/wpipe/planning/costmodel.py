"""Predict a configuration's per-device memory and its samples/s, from measured blocks.

Memory is the engine's own accounting (Pipeline.memory_report, summary.json `memory`):

* weights_bytes: parameter bytes of the device's partitions x the weight versions each
  keeps alive at once (check.PartitionReport.max_versions_alive: 2 for a stale partition);
* activations_bytes: the most stashed at once, found by walking the device's op list as the
  engine does: a forward stashes what autograd saved in the partition (each storage once)
  plus its inputs; with recomputation only its inputs, and a backward first recomputes,
  holding the partition's saved bytes on top of the stash; a backward frees its entry;
* optimizer_state_bytes: the optimizer's state for the device's parameters.

`device_memory` adds what the accounting leaves out but a device holds: one gradient per
parameter and, with data parallelism, the flat buffer the all-reduce sends.

Time: per partition, forward/backward/update seconds are the sums over its blocks of an
op-time source's (optimes.py: curves fitted to measured points, the FLOP model, or seconds
measured here), plus the engine's own time per op, a recomputation's forward, and the CPU
time a host spends on each message an op sends or receives (zero on GPUs); transfers and
the data-parallel all-reduce from the links between the ranks (hardware.py); the
calibrated event simulator (simulate.py, updates deferred as the engine defers them) turns
them into the time between period ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .. import schedule
from ..schedule import Topology, check_schedule, simulate
from .blockcost import BlockCost
from .hardware import Hardware
from .optimes import OpTimes

PERIODS = 4
"""Periods simulated: the rate is taken between the ends of periods 1 and PERIODS - 1
(after the fill, before the drain), and the stash peak is reached by the second."""


@dataclass
class PartitionCost:
    """One partition at micro-batch size b: bytes, FLOPs and kernels."""
    blocks: range
    param_bytes: int
    optimizer_bytes: int
    input_bytes: int          # received (or the micro-batch data) and stashed per micro-batch
    input_grad_bytes: int     # gradients sent back per micro-batch
    saved_bytes: int          # what autograd saves in one forward (each storage once), inputs aside
    forward_flops: float
    backward_flops: float
    forward_kernels: int
    backward_kernels: int


def partition_costs(blocks: list[BlockCost], ranges: list[range], b: int) -> list[PartitionCost]:
    """Per partition (contiguous `ranges` of `blocks`), its costs at micro-batch size b."""
    return [_partition(blocks, r, b) for r in ranges]


def _partition(blocks: list[BlockCost], r: range, b: int) -> PartitionCost:
    first = blocks[r.start]
    # Labels of the tensors flowing between blocks: a storage saved by two blocks of the
    # partition (an output saved by one, saved again as the next one's input) counts once.
    current: list[tuple] | None = None      # None: the partition's own inputs
    stored: dict[tuple, float] = {}
    for i in r:
        block = blocks[i]

        def resolve(label, i=i):
            if label[0] == "in":
                return ("partition input", label[1]) if current is None else current[label[1]]
            return (label[0], i, label[1])
        for label, size in block.saved:
            stored[resolve(label)] = size(b)
        current = [resolve(label) for label in block.outputs]
    # The partition's inputs are stashed as inputs: the engine counts them once, there.
    saved = sum(size for label, size in stored.items() if label[0] != "partition input")
    return PartitionCost(
        r, sum(blocks[i].param_bytes for i in r), sum(blocks[i].optimizer_bytes for i in r),
        round(first.input_bytes(b)), round(first.input_grad_bytes(b)), round(saved),
        sum(blocks[i].forward_flops(b) for i in r), sum(blocks[i].backward_flops(b) for i in r),
        sum(blocks[i].forward_kernels for i in r), sum(blocks[i].backward_kernels for i in r))


@lru_cache(maxsize=64)
def schedule_and_report(method: str, depth: int, period: int, num_micro_batches: int):
    """The schedule and its check report (versions alive), cached: they depend on no cost."""
    ops = schedule.build_schedule(method, depth, num_micro_batches, period)
    return ops, check_schedule(ops, method, depth, num_micro_batches, period)


def accounting(method: str, depth: int, parts: list[PartitionCost], recompute: bool,
               num_micro_batches: int | None = None, period: int | None = None) -> list[dict]:
    """Per device, the engine's memory accounting (the module docstring): weights_bytes,
    activations_bytes, optimizer_state_bytes, as summary.json reports them for a run of
    `num_micro_batches` (default PERIODS periods)."""
    period = period or schedule.default_period(method, depth)
    states, report = _stash_states(method, depth, period, num_micro_batches or PERIODS * period)
    inputs = np.array([p.input_bytes for p in parts], dtype=np.int64)
    saved = np.array([p.saved_bytes for p in parts], dtype=np.int64)
    entry = inputs if recompute else inputs + saved
    out = []
    for mine, forwards, backwards, recomputed in states:
        peak = int((forwards @ entry).max(initial=0))
        if recompute:
            peak = max(peak, int((backwards @ entry + saved[recomputed]).max(initial=0)))
        out.append({"partitions": list(mine),
                    "weights_bytes": sum(parts[p].param_bytes * report.partitions[p].max_versions_alive
                                         for p in mine),
                    "activations_bytes": peak,
                    "optimizer_state_bytes": sum(parts[p].optimizer_bytes for p in mine)})
    return out


@lru_cache(maxsize=256)
def _stash_states(method: str, depth: int, period: int, num_micro_batches: int):
    """Per device, as the engine walks its op list: its partitions (ascending); the distinct
    stash states right after a forward (micro-batches stashed per partition, one row each,
    one column per partition of the model); the distinct states right before a backward,
    and for each the backward's partition (a recomputation holds its saved bytes on top).
    The stash peak of any byte sizes is reached in one of them, so `accounting` weighs
    these few states instead of walking every op."""
    ops, report = schedule_and_report(method, depth, period, num_micro_batches)
    k = schedule.num_partitions(method, depth)
    out = []
    for device_ops in ops:
        counts = [0] * k
        forwards, backwards = set(), set()
        for op in device_ops:
            if op.kind == "F":
                counts[op.partition] += 1
                forwards.add(tuple(counts))
            elif op.kind == "B":
                backwards.add((tuple(counts), op.partition))
                counts[op.partition] -= 1
        ordered = sorted(backwards)
        out.append((tuple(sorted({op.partition for op in device_ops})),
                    np.array(sorted(forwards), dtype=np.int64).reshape(-1, k),
                    np.array([c for c, _ in ordered], dtype=np.int64).reshape(-1, k),
                    np.array([p for _, p in ordered], dtype=np.int64)))
    return out, report


def device_memory(method: str, depth: int, data_parallel: int, parts: list[PartitionCost],
                  recompute: bool) -> list[int]:
    """Per device, predicted bytes held at the peak (held_bytes of its accounting)."""
    return held_bytes(accounting(method, depth, parts, recompute), parts, data_parallel)


def held_bytes(reports: list[dict], parts: list[PartitionCost], data_parallel: int) -> list[int]:
    """Per device, the accounting `reports` plus one gradient per parameter and, with data
    parallelism, the all-reduce's flat copy of the gradients."""
    out = []
    for report in reports:
        params = sum(parts[p].param_bytes for p in report["partitions"])
        out.append(report["weights_bytes"] + report["activations_bytes"] + report["optimizer_state_bytes"]
                   + params + (params if data_parallel > 1 else 0))
    return out


def op_seconds(blocks: list[BlockCost], r: range, b: int, times: OpTimes, hw: Hardware,
               recompute: bool) -> tuple[float, float, float]:
    """(forward, backward incl. recomputation, update) seconds of the ops of the partition
    holding blocks `r`, at micro-batch size b: the blocks' times from `times`, plus the
    engine's own time per op (hw.op_overhead_us)."""
    forward = backward = update = 0.0
    for i in r:
        f, bwd, u = times.block_seconds(blocks[i], b)
        forward, backward, update = forward + f, backward + bwd, update + u
    overhead = hw.op_overhead_us * 1e-6
    return forward + overhead, backward + (forward if recompute else 0.0) + overhead, update + overhead


def message_cpu_seconds(parts: list[PartitionCost], topology: Topology, hw: Hardware) -> list[tuple]:
    """Per partition, the (forward, backward, update) seconds its ops spend moving their
    messages to and from other devices on the rank's own CPU (hw.p2p_cpu_us_per_mb): a
    forward receives its inputs and sends its outputs, a backward receives its outputs'
    gradients and sends its inputs'."""
    n = len(parts)
    crosses = [topology.device_of(p) != topology.device_of(p + 1) for p in range(n - 1)]
    per_byte = hw.p2p_cpu_us_per_mb * 1e-12
    out = []
    for p, part in enumerate(parts):
        before = p > 0 and crosses[p - 1]
        after = p < n - 1 and crosses[p]
        forward = (part.input_bytes if before else 0) + (parts[p + 1].input_bytes if after else 0)
        backward = (parts[p + 1].input_grad_bytes if after else 0) + (part.input_grad_bytes if before else 0)
        out.append((forward * per_byte, backward * per_byte, 0.0))
    return out


def samples_per_second(method: str, depth: int, data_parallel: int, rank_layout: str,
                       parts: list[PartitionCost], seconds: list[tuple[float, float, float]], b: int,
                       hw: Hardware, per_update: bool = True) -> float:
    """Predicted samples/s of the whole run (all replicas) in steady state, from each
    partition's (forward, backward, update) op seconds (op_seconds). `per_update` False:
    optimizer steps and all-reduces cost nothing (what the rest costs on its own)."""
    period = schedule.default_period(method, depth)
    n = len(parts)
    topology = Topology(method, depth, data_parallel, rank_layout)
    times = [tuple(own + copy for own, copy in zip(op, copies))
             for op, copies in zip(seconds, message_cpu_seconds(parts, topology, hw))]
    if not per_update:
        times = [(f, bwd, 0.0) for f, bwd, _ in times]
    forward_transfer, backward_transfer = [0.0] * n, [0.0] * n
    for p in range(n - 1):
        link = _slowest_link(topology, hw, topology.device_of(p), topology.device_of(p + 1))
        forward_transfer[p] = link.seconds(parts[p + 1].input_bytes)
        backward_transfer[p] = link.seconds(parts[p + 1].input_grad_bytes)
    allreduce = [hw.allreduce_seconds([topology.rank_of(r, topology.device_of(p)) for r in range(data_parallel)],
                                      parts[p].param_bytes) if per_update else 0.0 for p in range(n)]
    if n == 1 and not schedule.get_method(method).stale(0, depth):
        # The whole model, synchronous: DDP all-reduces buckets during the period's last
        # backward (runtime/ddp.py); what outlasts that backward is exposed (ideal overlap).
        allreduce = [max(allreduce[0] - times[0][1], 0.0)]
    seconds = _period_seconds(method, depth, tuple(times), tuple(forward_transfer), tuple(backward_transfer),
                              tuple(allreduce))
    return data_parallel * period * b / seconds


def speed_bound(method: str, depth: int, data_parallel: int, seconds: list[tuple[float, float, float]],
                b: int) -> float:
    """An upper bound of samples_per_second, without simulating: a device runs its ops one
    at a time, so a period takes at least the sum of its own ops' seconds (each of its
    partitions' forwards and backwards of the period, and their updates)."""
    period = schedule.default_period(method, depth)
    busy = [0.0] * depth
    for p, (forward, backward, update) in enumerate(seconds):
        busy[schedule.device_of(method, p, depth)] += period * (forward + backward) + update
    return data_parallel * period * b / max(busy)


@lru_cache(maxsize=4096)
def _period_seconds(method, depth, times, forward_transfer, backward_transfer, allreduce) -> float:
    """Steady-state seconds per period (simulated; the same costs give the same answer, so
    rank layouts that put every link on the same kind of wire are simulated once)."""
    period = schedule.default_period(method, depth)
    count = PERIODS * period
    ops, report = schedule_and_report(method, depth, period, count)
    zeros = [0.0] * len(times)      # sizes unused here: floats spare the simulator exact fractions
    sim = simulate(ops, method, depth, count, [t[0] for t in times], [t[1] for t in times],
                   list(forward_transfer), [t[2] for t in times], zeros, zeros, micro_batches_per_update=period,
                   backward_transfer_cost=list(backward_transfer), allreduce_cost=list(allreduce),
                   defer_updates=True, report=report)
    ends = {}
    for d, device_ops in enumerate(ops):
        for i, op in enumerate(device_ops):
            if op.kind == "U":
                ends.setdefault(op.partition, []).append(sim.end[d][i])
    period_ends = [max(v[t] for v in ends.values()) for t in range(PERIODS)]
    return (period_ends[PERIODS - 2] - period_ends[0]) / (PERIODS - 2)


def _slowest_link(topology: Topology, hw: Hardware, a: int, b: int):
    """The slowest link between devices a and b over the replicas."""
    links = [hw.link(topology.rank_of(r, a), topology.rank_of(r, b)) for r in range(topology.data_parallel)]
    return min(links, key=lambda link: (link.bandwidth, -link.latency))
