"""One fully specified configuration, evaluated: its predicted memory per device and samples/s.

The planner (plan.py), tool/paper_scale.py and tool/validate_model.py evaluate through
`evaluate(workload, configuration)`; nothing else combines cuts, bytes and times.

* `Configuration`: method, pipeline depth N x data parallel D, micro-batch size,
  recomputation, rank layout, and the split of the blocks into partitions: uniform (the
  released runtime's, `uniform_plan`) or balanced (`balanced_ranges`).
* `Workload`: a model's measured blocks (blockcost.BlockCost, at one precision) on one
  hardware preset with its op-time source (optimes.py); it caches what configurations
  share (cuts, partition costs, op seconds).
* `Evaluation`: the cut, the engine's memory accounting and the predicted bytes per device
  (costmodel.py), whether the largest fits the preset's budget, and samples/s.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from collections.abc import Callable
from functools import lru_cache

from .. import schedule
from . import costmodel
from .blockcost import BlockCost
from .hardware import Hardware
from .optimes import OpTimes
from .partition import uniform

SPLITS = ("uniform", "balanced")
LAYOUTS = ("pipeline_major", "replica_major")


@dataclass(frozen=True)
class Configuration:
    method: str
    pipeline_depth: int
    data_parallel: int
    micro_batch_size: int
    recompute: bool
    rank_layout: str = "pipeline_major"
    split: str = "uniform"

    @property
    def layout(self) -> str:
        return f"{self.pipeline_depth}x{self.data_parallel}"

    def describe(self) -> str:
        return (f"{self.layout}, mb {self.micro_batch_size}, recompute {'on' if self.recompute else 'off'}, "
                f"{self.rank_layout.replace('_major', '')}-major, {self.split}")


@dataclass
class Evaluation:
    configuration: Configuration
    ranges: list[range]
    accounting: list[dict]           # per device: the engine's memory report (costmodel.accounting)
    memory_per_device: list[int]     # predicted bytes held at the peak (costmodel.device_memory)
    fits: bool                       # the largest device within the preset's budget
    samples_per_second: float | None  # None when not timed

    @property
    def memory_bytes(self) -> int:
        """The largest device's predicted bytes."""
        return max(self.memory_per_device)


class Workload:
    """A model's blocks at one precision on one hardware preset (module docstring)."""

    def __init__(self, blocks: list[BlockCost], uniform_plan: Callable[[int], list[list[str]]], hw: Hardware,
                 times: OpTimes, precision: str = "fp32"):
        self.blocks, self.uniform_plan, self.hw, self.times, self.precision = blocks, uniform_plan, hw, times, precision
        self.names = [b.name for b in blocks]
        self._ranges, self._parts, self._seconds, self._singles = {}, {}, {}, {}

    def ranges(self, c: Configuration) -> list[range]:
        """The partitions' block ranges of configuration c."""
        k = schedule.num_partitions(c.method, c.pipeline_depth)
        if c.split == "uniform":
            key = (k, "uniform")
            if key not in self._ranges:
                self._ranges[key] = ranges_of(self.names, self.uniform_plan(k))
        elif c.split == "balanced":
            key = (c.method, c.pipeline_depth, c.micro_batch_size, c.recompute, "balanced")
            if key not in self._ranges:
                self._ranges[key] = balanced_ranges(self, c.method, c.pipeline_depth, c.micro_batch_size,
                                                    c.recompute)
        else:
            raise ValueError(f"unknown split {c.split!r}; choose from {', '.join(SPLITS)}")
        return self._ranges[key]

    def parts(self, ranges: list[range], b: int) -> list[costmodel.PartitionCost]:
        key = (tuple((r.start, r.stop) for r in ranges), b)
        if key not in self._parts:
            self._parts[key] = costmodel.partition_costs(self.blocks, ranges, b)
        return self._parts[key]

    def seconds(self, r: range, b: int, recompute: bool) -> tuple[float, float, float]:
        """(forward, backward, update) op seconds of the partition holding blocks r."""
        key = (r.start, r.stop, b, recompute)
        if key not in self._seconds:
            self._seconds[key] = costmodel.op_seconds(self.blocks, r, b, self.times, self.hw, recompute)
        return self._seconds[key]

    def singles(self, b: int) -> list[costmodel.PartitionCost]:
        """Each block alone as a partition, at micro-batch size b."""
        if b not in self._singles:
            alone = [range(i, i + 1) for i in range(len(self.blocks))]
            self._singles[b] = costmodel.partition_costs(self.blocks, alone, b)
        return self._singles[b]


def evaluate(workload: Workload, c: Configuration, timed: bool = True, per_update: bool = True,
             run_micro_batches: int | None = None) -> Evaluation:
    """Configuration c's cut, memory (accounting for a run of `run_micro_batches`, default
    costmodel.PERIODS periods) and, if `timed`, samples/s (`per_update` False: optimizer
    steps and all-reduces free, see costmodel.samples_per_second)."""
    ranges = workload.ranges(c)
    parts = workload.parts(ranges, c.micro_batch_size)
    accounting = costmodel.accounting(c.method, c.pipeline_depth, parts, c.recompute, run_micro_batches)
    memory = costmodel.held_bytes(accounting, parts, c.data_parallel)
    speed = None
    if timed:
        seconds = [workload.seconds(r, c.micro_batch_size, c.recompute) for r in ranges]
        speed = costmodel.samples_per_second(c.method, c.pipeline_depth, c.data_parallel, c.rank_layout, parts,
                                             seconds, c.micro_batch_size, workload.hw, per_update)
    return Evaluation(c, ranges, accounting, memory, max(memory) <= workload.hw.memory_budget_bytes, speed)


def ranges_of(names: list[str], plan_names: list[list[str]]) -> list[range]:
    """Block-name lists per partition -> index ranges into `names`."""
    index = {name: i for i, name in enumerate(names)}
    return [range(index[p[0]], index[p[-1]] + 1) for p in plan_names]


@lru_cache(maxsize=64)
def stash_multiplicity(method: str, depth: int) -> tuple[int, ...]:
    """Per partition, the most micro-batches it holds stashed at once (its device's op order)."""
    period = schedule.default_period(method, depth)
    ops, _ = costmodel.schedule_and_report(method, depth, period, costmodel.PERIODS * period)
    most = [0] * schedule.num_partitions(method, depth)
    for device_ops in ops:
        held = {}
        for op in device_ops:
            if op.kind in "FB":
                held[op.partition] = held.get(op.partition, 0) + (1 if op.kind == "F" else -1)
                most[op.partition] = max(most[op.partition], held[op.partition])
    return tuple(most)


def balanced_ranges(workload: Workload, method: str, depth: int, b: int, recompute: bool) -> list[range]:
    """A contiguous cut minimising the largest, over partitions, of its time relative to the
    mean partition time and of its memory relative to its share of the device budget (the
    budget over the partitions a device holds). Memory counts the partition's stash
    multiplicity and weight versions (a heuristic: per-block bytes are added, storages
    shared across a block boundary are counted twice). So with memory to spare the cut
    balances time; where memory binds, activation-heavy blocks move to partitions that hold
    fewer micro-batches.
    """
    blocks = workload.blocks
    k = schedule.num_partitions(method, depth)
    single = workload.singles(b)
    seconds = [sum(workload.seconds(range(i, i + 1), b, recompute)[:2]) for i in range(len(blocks))]
    multiplicity = stash_multiplicity(method, depth)
    stale = schedule.get_method(method).stale
    versions = [2 if stale(j, depth) else 1 for j in range(k)]
    time_prefix = list(itertools.accumulate(seconds, initial=0.0))
    saved_prefix = list(itertools.accumulate([p.saved_bytes for p in single], initial=0))
    param_prefix = list(itertools.accumulate([p.param_bytes for p in single], initial=0))
    optim_prefix = list(itertools.accumulate([p.optimizer_bytes for p in single], initial=0))

    def memory(j, a, e):
        params, saved = param_prefix[e] - param_prefix[a], saved_prefix[e] - saved_prefix[a]
        stash = single[a].input_bytes + (0 if recompute else saved)
        return (multiplicity[j] * stash + (saved if recompute else 0) + (versions[j] + 1) * params
                + optim_prefix[e] - optim_prefix[a])
    mean_time = time_prefix[-1] / k or 1.0
    share = workload.hw.memory_budget_bytes * depth / k       # a device holds k / depth partitions

    def cost(j, a, e):
        return max((time_prefix[e] - time_prefix[a]) / mean_time, memory(j, a, e) / share)

    def cut(limit):
        sizes, a = [], 0
        for j in range(k):
            left = k - j - 1
            e = a + 1
            while e < len(blocks) - left and cost(j, a, e + 1) <= limit:
                e += 1
            if j == k - 1:
                e = len(blocks)
            if cost(j, a, e) > limit:
                return None
            sizes.append(range(a, e))
            a = e
        return sizes
    lo, hi = 0.0, max(cost(j, r.start, r.stop) for j, r in enumerate(uniform(len(blocks), k)))
    best = cut(hi) or uniform(len(blocks), k)
    for _ in range(30):
        mid = (lo + hi) / 2
        found = cut(mid)
        if found:
            best, hi = found, mid
        else:
            lo = mid
    return best
