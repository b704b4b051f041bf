"""Plan a run: every configuration of a model on G devices, its predicted memory and speed.

`plan(blocks, uniform_plan, hw, gpus)` enumerates, per method, pipeline depth N x data
parallel D = G, micro-batch sizes 1..512 (powers of two), recomputation on and off, both
rank layouts (one when N = 1 or D = 1, where they coincide) and two splits of the blocks:

* uniform: the released runtime's (`uniform_plan(k)`: block names per partition);
* balanced: a cut that balances, against their means, both each partition's time and its
  memory with the stash multiplicity the schedule gives it (how many micro-batches it
  holds at once: up to 2N-s in a wpipe G0 partition, N-s in G1 and in a 2BW stage), so
  that activation-heavy blocks (ResNeXt's early ones) do not pile up in G0.

It keeps the candidates whose predicted largest-device memory fits the hardware's budget,
and returns them ranked by predicted samples/s (costmodel.py). Pure given the measured
blocks: no process, no device.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Callable

from .. import schedule
from . import costmodel
from .blockcost import BlockCost
from .hardware import Hardware
from .partition import uniform

METHODS = ("wpipe", "pipedream_2bw", "pipedream_flush", "gpipe", "data_parallel")
MICRO_BATCHES = tuple(2 ** i for i in range(10))
SPLITS = ("uniform", "balanced")
LAYOUTS = ("pipeline_major", "replica_major")


@dataclass
class Candidate:
    method: str
    pipeline_depth: int
    data_parallel: int
    micro_batch_size: int
    recompute: bool
    rank_layout: str
    split: str
    predicted_samples_per_second: float
    predicted_memory_bytes: int        # the largest device's
    memory_per_device: list[int]
    partition_blocks: list[int]        # blocks per partition

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def layout(self) -> str:
        return f"{self.pipeline_depth}x{self.data_parallel}"


def layouts(method: str, gpus: int, blocks: int) -> list[tuple[int, int]]:
    """(N, D) with N x D = gpus and enough blocks for the method's partitions."""
    if method == "data_parallel":
        return [(1, gpus)]
    return [(n, gpus // n) for n in range(1, gpus + 1)
            if gpus % n == 0 and schedule.num_partitions(method, n) <= blocks]


def configurations(method: str, gpus: int, blocks: int, micro_batches=MICRO_BATCHES,
                   recompute=(False, True), splits=SPLITS):
    """Every (N, D, rank_layout, recompute, split, micro-batch) to consider, micro-batches
    ascending last (a larger one never fits where a smaller one did not)."""
    for (n, d), r, split in itertools.product(layouts(method, gpus, blocks), recompute, splits):
        for layout in (LAYOUTS if n > 1 and d > 1 else LAYOUTS[:1]):
            yield n, d, layout, r, split, list(micro_batches)


def plan(blocks: list[BlockCost], uniform_plan: Callable[[int], list[list[str]]], hw: Hardware,
         gpus: int, methods=METHODS, micro_batches=MICRO_BATCHES, recompute=(False, True),
         splits=SPLITS, rates=None, largest_only: bool = False) -> list[Candidate]:
    """The fitting candidates, ranked by predicted samples/s (highest first). `rates`:
    (forward, backward) FLOP/s measured by a probe, instead of the hardware's efficiency.
    `largest_only`: per (method, N, D, layout, recompute, split), time only the largest
    micro-batch that fits (the fastest in this model, where a larger micro-batch only
    amortises fixed costs better): far fewer simulations."""
    names = [b.name for b in blocks]
    cache, single = {}, {}

    def partitions(method, n, split, b, r):
        """(ranges, partition costs); the same for every D and rank layout."""
        k = schedule.num_partitions(method, n)
        key = (k, split, b) if split == "uniform" else (method, n, split, b, r)
        if key not in cache:
            if split == "uniform":
                ranges = ranges_of(names, uniform_plan(k))
            else:
                if b not in single:
                    single[b] = costmodel.partition_costs(blocks, [range(i, i + 1) for i in range(len(blocks))], b)
                ranges = balanced_ranges(blocks, method, n, b, r, hw, rates, single[b])
            cache[key] = ranges, costmodel.partition_costs(blocks, ranges, b)
        return cache[key]

    out = []
    for method in methods:
        for n, d, layout, r, split, sizes in configurations(method, gpus, len(blocks), micro_batches,
                                                            recompute, splits):
            fitting = []
            for b in sizes:
                ranges, parts = partitions(method, n, split, b, r)
                memory = costmodel.device_memory(method, n, d, parts, r)
                if max(memory) > hw.memory_budget_bytes:
                    break
                fitting.append((b, ranges, parts, memory))
            for b, ranges, parts, memory in (fitting[-1:] if largest_only else fitting):
                speed = costmodel.samples_per_second(method, n, d, layout, parts, b, hw, r, rates)
                out.append(Candidate(method, n, d, b, r, layout, split, speed, max(memory), memory,
                                     [len(x) for x in ranges]))
    return sorted(out, key=lambda c: -c.predicted_samples_per_second)


def best_per_method(candidates: list[Candidate]) -> dict[str, Candidate]:
    best = {}
    for c in candidates:   # ranked: the first of each method is its best
        best.setdefault(c.method, c)
    return best


def ranges_of(names: list[str], plan_names: list[list[str]]) -> list[range]:
    """Block-name lists per partition -> index ranges into `names`."""
    index = {name: i for i, name in enumerate(names)}
    return [range(index[p[0]], index[p[-1]] + 1) for p in plan_names]


def stash_multiplicity(method: str, depth: int) -> list[int]:
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
    return most


def balanced_ranges(blocks: list[BlockCost], method: str, depth: int, b: int, recompute: bool,
                    hw: Hardware, rates=None, single=None) -> list[range]:
    """A contiguous cut minimising the largest, over partitions, of its time relative to the
    mean partition time and of its memory relative to its share of the device budget (the
    budget over the partitions a device holds). Memory counts the partition's stash
    multiplicity and weight versions (a heuristic: per-block bytes are added, storages
    shared across a block boundary are counted twice). So with memory to spare the cut
    balances time; where memory binds, activation-heavy blocks move to partitions that hold
    fewer micro-batches. `single`: each block alone as a partition at b, if known.
    """
    k = schedule.num_partitions(method, depth)
    single = single or costmodel.partition_costs(blocks, [range(i, i + 1) for i in range(len(blocks))], b)
    seconds = [sum(costmodel.op_seconds(p, hw, recompute, rates)[:2]) for p in single]
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
    share = hw.memory_budget_bytes * depth / k       # a device holds k / depth partitions

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


def probe_rates(probe: dict, blocks: list[BlockCost], uniform_plan) -> tuple[float, float]:
    """(forward, backward) FLOP/s that a probe measured (probe.json of probe mode, wpipe.train.probe:
    its method, pipeline_depth, micro_batch_size, recompute, and per device a list `ops` of
    per-partition `partition`, `forward_s`, `backward_s` and `recompute_s`): the FLOPs of those
    partitions (the runtime's uniform split) over the seconds measured; a recomputation counts
    as backward work, as op_seconds times it."""
    for key in ("method", "pipeline_depth", "micro_batch_size", "devices"):
        if key not in probe:
            raise ValueError(f"probe profile: field {key!r} is missing")
    method, depth, b = probe["method"], probe["pipeline_depth"], probe["micro_batch_size"]
    ranges = ranges_of([x.name for x in blocks], uniform_plan(schedule.num_partitions(method, depth)))
    parts = costmodel.partition_costs(blocks, ranges, b)
    flops = {"forward": 0.0, "backward": 0.0}
    seconds = {"forward": 0.0, "backward": 0.0}
    for device in probe["devices"]:
        for op in device["ops"]:
            part = parts[op["partition"]]
            seconds["forward"] += op["forward_s"]
            seconds["backward"] += op["backward_s"] + op.get("recompute_s", 0.0)
            flops["forward"] += part.forward_flops
            flops["backward"] += part.backward_flops + (part.forward_flops if probe.get("recompute") else 0.0)
    if not all(seconds.values()):
        raise ValueError("probe profile: no forward or backward seconds measured")
    return flops["forward"] / seconds["forward"], flops["backward"] / seconds["backward"]


def format_table(candidates: list[Candidate], hw: Hardware, top: int = 15) -> str:
    """The ranked candidates (first `top`) and the best per method, with ratios to
    pipedream_2bw's best."""
    gib = 2 ** 30
    head = (f"{'method':<16} {'N x D':>6} {'mb':>4} {'recompute':>9} {'layout':>14} {'split':>8} "
            f"{'samples/s':>11} {'memory GiB':>10}")

    def row(c, extra=""):
        return (f"{c.method:<16} {c.layout:>6} {c.micro_batch_size:>4} {'on' if c.recompute else 'off':>9} "
                f"{c.rank_layout:>14} {c.split:>8} {c.predicted_samples_per_second:>11.1f} "
                f"{c.predicted_memory_bytes / gib:>10.2f}{extra}")
    lines = [f"{len(candidates)} fitting candidates on {hw.name} (budget "
             f"{hw.memory_budget_bytes / gib:.1f} GiB per device); top {min(top, len(candidates))}:", head]
    lines += [row(c) for c in candidates[:top]]
    best = best_per_method(candidates)
    base = best.get("pipedream_2bw")
    lines += ["", "best per method (ratios to pipedream_2bw's best):",
              head + f" {'x speed':>8} {'x memory':>8}"]
    for method, c in best.items():
        ratios = (f" {c.predicted_samples_per_second / base.predicted_samples_per_second:>8.2f}"
                  f" {c.predicted_memory_bytes / base.predicted_memory_bytes:>8.2f}") if base else ""
        lines.append(row(c, ratios))
    return "\n".join(lines)
