"""Plan a run: every configuration of a model on G devices, its predicted memory and speed.

`plan(workload, gpus)` enumerates, per method (the schedule registry's), pipeline depth N x
data parallel D = G, micro-batch sizes 1..512 (powers of two), recomputation on and off,
both rank layouts (one when N = 1 or D = 1, where they coincide) and two splits of the
blocks (evaluate.py: the released runtime's uniform one, and one balanced by time and by
memory with each partition's stash multiplicity). It keeps the candidates whose predicted
largest-device memory fits the hardware's budget, and returns them ranked by predicted
samples/s (evaluate.evaluate). Pure given the measured blocks: no process, no device.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from .. import schedule
from . import costmodel
from .blockcost import BlockCost
from .evaluate import LAYOUTS, SPLITS, Configuration, Evaluation, Workload, evaluate, ranges_of
from .hardware import Hardware

METHODS = tuple(schedule.METHODS)
MICRO_BATCHES = tuple(2 ** i for i in range(10))
BOUND_SLACK = 1.2
"""How far a simulated rate may exceed costmodel.speed_bound: the rate is taken over a
window of a short simulation (costmodel.PERIODS), which a transient can make up to about
5% faster than the busiest device allows (tests/test_plan.py checks 1.2 over a grid)."""


@dataclass
class Candidate:
    method: str
    pipeline_depth: int
    data_parallel: int
    micro_batch_size: int
    recompute: bool
    rank_layout: str
    split: str
    precision: str
    predicted_samples_per_second: float
    predicted_memory_bytes: int        # the largest device's
    memory_per_device: list[int]
    partition_blocks: list[int]        # blocks per partition

    @classmethod
    def of(cls, evaluation: Evaluation, precision: str) -> Candidate:
        c = evaluation.configuration
        return cls(c.method, c.pipeline_depth, c.data_parallel, c.micro_batch_size, c.recompute, c.rank_layout,
                   c.split, precision, evaluation.samples_per_second, evaluation.memory_bytes,
                   evaluation.memory_per_device, [len(r) for r in evaluation.ranges])

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def configuration(self) -> Configuration:
        return Configuration(self.method, self.pipeline_depth, self.data_parallel, self.micro_batch_size,
                             self.recompute, self.rank_layout, self.split)

    @property
    def layout(self) -> str:
        return f"{self.pipeline_depth}x{self.data_parallel}"


def layouts(method: str, gpus: int, blocks: int) -> list[tuple[int, int]]:
    """(N, D) with N x D = gpus and enough blocks for the method's partitions."""
    if method == "data_parallel":
        return [(1, gpus)]
    return [(n, gpus // n) for n in range(1, gpus + 1)
            if gpus % n == 0 and schedule.num_partitions(method, n) <= blocks]


def configurations(method: str, gpus: int, blocks: int, micro_batches=MICRO_BATCHES, recompute=(False, True),
                   splits=SPLITS, rank_layouts=LAYOUTS, only_layouts=None) -> list[list[Configuration]]:
    """Every configuration to consider, in groups that differ only in the micro-batch size,
    ascending (a larger one never fits where a smaller one did not). `only_layouts`: the
    (N, D) to keep, if not all."""
    groups = []
    chosen = [x for x in layouts(method, gpus, blocks) if only_layouts is None or x in only_layouts]
    for (n, d), r, split in itertools.product(chosen, recompute, splits):
        for rank_layout in (rank_layouts if n > 1 and d > 1 else LAYOUTS[:1]):
            groups.append([Configuration(method, n, d, b, r, rank_layout, split) for b in sorted(micro_batches)])
    return groups


def plan(workload: Workload, gpus: int, methods=METHODS, micro_batches=MICRO_BATCHES, recompute=(False, True),
         splits=SPLITS, largest_only: bool = False, rank_layouts=LAYOUTS, only_layouts=None,
         best_only: bool = False) -> list[Candidate]:
    """The fitting candidates, ranked by predicted samples/s (highest first).
    `largest_only`: per group of configurations (`configurations`), time only the largest
    micro-batch that fits (the fastest in this model, where a larger micro-batch never
    costs more per sample): far fewer simulations. `best_only` (implies largest_only):
    only what finding each method's best needs; groups are timed in the order of their
    speed bound (costmodel.speed_bound), and one whose bound x BOUND_SLACK is below the
    method's best so far is not simulated."""
    out = []
    for method in methods:
        largest = []
        for group in configurations(method, gpus, len(workload.blocks), micro_batches, recompute, splits,
                                    rank_layouts, only_layouts):
            fitting = []
            for c in group:
                e = evaluate(workload, c, timed=False)
                if not e.fits:
                    break
                fitting.append((c, e))
            largest += fitting[-1:] if largest_only or best_only else fitting
        if best_only:
            bounds = [costmodel.speed_bound(c.method, c.pipeline_depth, c.data_parallel,
                                            [workload.seconds(r, c.micro_batch_size, c.recompute) for r in e.ranges],
                                            c.micro_batch_size) for c, e in largest]
            largest = [x for _, x in sorted(zip(bounds, largest), key=lambda bx: -bx[0])]
            bounds.sort(reverse=True)
        best = 0.0
        for i, (c, _) in enumerate(largest):
            if best_only and bounds[i] * BOUND_SLACK < best:
                break
            candidate = Candidate.of(evaluate(workload, c), workload.precision)
            best = max(best, candidate.predicted_samples_per_second)
            out.append(candidate)
    return sorted(out, key=lambda c: -c.predicted_samples_per_second)


def best_per_method(candidates: list[Candidate]) -> dict[str, Candidate]:
    best = {}
    for c in candidates:   # ranked: the first of each method is its best
        best.setdefault(c.method, c)
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
    head = (f"{'method':<16} {'N x D':>6} {'mb':>4} {'recompute':>9} {'layout':>14} {'split':>8} {'prec':>4} "
            f"{'samples/s':>11} {'memory GiB':>10}")

    def row(c, extra=""):
        return (f"{c.method:<16} {c.layout:>6} {c.micro_batch_size:>4} {'on' if c.recompute else 'off':>9} "
                f"{c.rank_layout:>14} {c.split:>8} {c.precision:>4} {c.predicted_samples_per_second:>11.1f} "
                f"{c.predicted_memory_bytes / gib:>10.2f}{extra}")
    lines = [f"{len(candidates)} fitting candidates on {hw.name} (budget "
             f"{hw.memory_budget_bytes / gib:.1f} GiB per device); top {min(top, len(candidates))}:", head]
    if not candidates:
        return "\n".join(lines[:1] + ["nothing fits: try recompute on, smaller micro-batches, more devices, or "
                                       "a device with more memory"])
    lines += [row(c) for c in candidates[:top]]
    best = best_per_method(candidates)
    base = best.get("pipedream_2bw")
    lines += ["", "best per method (ratios to pipedream_2bw's best; each at its own configuration, so the "
                  "micro-batch sizes of a memory ratio may differ):",
              head + f" {'x speed':>8} {'x memory':>8}"]
    for c in best.values():
        ratios = (f" {c.predicted_samples_per_second / base.predicted_samples_per_second:>8.2f}"
                  f" {c.predicted_memory_bytes / base.predicted_memory_bytes:>8.2f}") if base else ""
        lines.append(row(c, ratios))
    return "\n".join(lines)
