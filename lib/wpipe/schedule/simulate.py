"""Timing and memory of a schedule without running it. Pure.

Each device runs its ops in order. A forward or backward starts when its device is free
and its dependency (`check.dependency`) has finished, plus a transfer cost when that
dependency ran on another device (wpipe's wrap-around dev(N-1) <-> dev0 included).
Transfers overlap with compute and never contend (sends are asynchronous). A "U"
(optimizer step) starts when its device is free and its data-parallel all-reduce, started
when the device reached the U, has finished. With `defer_updates` (what the engine does),
a device that reaches a U keeps it pending and runs it when it would otherwise wait for a
message, or at the latest before the partition's next op that needs it: a backward, or a
forward on the version the update makes (a stale partition's next forwards run on the
version before, so its all-reduce overlaps them).

Times are in whatever unit the costs are given in. Integer or `Fraction` costs give exact
results (`bubble_fraction` a `Fraction`), floats give floats. Memory is counted in units
of the whole model: A = the activations of one micro-batch through all partitions,
W = all weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from numbers import Rational

from .check import Report, check_schedule, dependency
from .methods import Op, default_period, device_of, weights_version
from .methods import num_partitions as count_partitions

Time = int | Fraction | float


@dataclass
class Simulation:
    makespan: Time                 # end of the last op, the run starting at 0
    busy: list[Time]               # per device: time spent in ops
    idle: list[Time]               # per device: makespan - busy
    bubble_fraction: Time          # sum(idle) / (devices x makespan)
    stash_peak: list[Time]         # per device: most activations stashed at once, in A
    weight_copies: list[Time]      # per device: weights incl. stale versions, in W
    start: list[list[Time]]        # per device, per op (aligned with the schedule)
    end: list[list[Time]]
    report: Report                 # what check_schedule found (versions, semantics)

    @property
    def ideal(self) -> Time:
        """The busiest device's work: the makespan a bubble-free run would have."""
        return max(self.busy)


def simulate(schedule: list[list[Op]], method: str, depth: int, num_micro_batches: int,
             forward_cost, backward_cost, transfer_cost=0, update_cost=0,
             activation_size=None, weight_size=None,
             micro_batches_per_update: int | None = None, *,
             backward_transfer_cost=None, allreduce_cost=0, defer_updates: bool = False,
             report: Report | None = None) -> Simulation:
    """Check `schedule` (raises `check.ScheduleError`), then time it.

    Each cost and size is one number for every partition or a list indexed by global
    partition. `forward_cost`, `backward_cost`, `update_cost`: time of one F, B or U op of
    that partition.
    `transfer_cost[p]`: time to move partition p's output forward to p+1, and the
    gradient of that output backward unless `backward_transfer_cost[p]` says otherwise
    (the last entries are unused). `allreduce_cost[p]`: the data-parallel all-reduce of
    partition p's gradients (0 without data parallelism).
    `activation_size[p]`: what one micro-batch stashes in partition p from the end of its
    forward to the end of its backward, in A (default 1 / partitions). `weight_size[p]`:
    one copy of partition p's weights, in W (default 1 / partitions); a device holds
    `max_versions_alive` copies of each (`check.PartitionReport`). `report`: what
    check_schedule found for this very schedule, when the caller has it already (the check
    is then skipped: a planner times one schedule with many costs).
    """
    if report is None:
        report = check_schedule(schedule, method, depth, num_micro_batches, micro_batches_per_update)
    n = count_partitions(method, depth)
    forward = _per_partition("forward_cost", forward_cost, n)
    backward = _per_partition("backward_cost", backward_cost, n)
    transfer = {"F": _per_partition("transfer_cost", transfer_cost, n)}
    transfer["B"] = (transfer["F"] if backward_transfer_cost is None
                     else _per_partition("backward_transfer_cost", backward_transfer_cost, n))
    update = _per_partition("update_cost", update_cost, n)
    allreduce = _per_partition("allreduce_cost", allreduce_cost, n)
    activation = _per_partition("activation_size", Fraction(1, n) if activation_size is None
                                else activation_size, n)
    weight = _per_partition("weight_size", Fraction(1, n) if weight_size is None else weight_size, n)
    costs = {"F": forward, "B": backward, "U": update}

    start = [[0] * len(ops) for ops in schedule]
    end = [[0] * len(ops) for ops in schedule]
    finished: dict[tuple[str, int, int], Time] = {}
    free = [0] * depth
    pending: list[list[tuple[int, Time]]] = [[] for _ in range(depth)]   # (U index, time reached)

    def run(d, i, earliest):
        op = schedule[d][i]
        start[d][i] = max(free[d], earliest)
        end[d][i] = free[d] = start[d][i] + costs[op.kind][op.partition]

    period = micro_batches_per_update or default_period(method, depth)
    updates_run = [0] * n

    def run_updates(d, which):
        for j, reached in [u for u in pending[d] if which(*u)]:
            pending[d].remove((j, reached))
            run(d, j, reached + allreduce[schedule[d][j].partition])
            updates_run[schedule[d][j].partition] += 1

    def waits_for_update(d, op, j):
        """Whether `op` on device d needs the pending update at step j (the engine's rule)."""
        return (schedule[d][j].partition == op.partition
                and (op.kind == "B" or weights_version(method, op.partition, depth, op.micro_batch, period)
                     > updates_run[op.partition]))

    # Lockstep ticks order every op after its dependency and after its device's earlier ops.
    order = sorted((tick, d, i) for d, ticks in enumerate(report.ticks) for i, tick in enumerate(ticks))
    for _, d, i in order:
        op = schedule[d][i]
        if op.kind == "U":
            pending[d].append((i, free[d]))
            if not defer_updates:
                run_updates(d, lambda j, reached: True)
            continue
        run_updates(d, lambda j, reached: waits_for_update(d, op, j))
        arrival, dep = 0, dependency(op, n)
        if dep is not None:
            arrival = finished[(dep.kind, dep.partition, dep.micro_batch)]
            if device_of(method, dep.partition, depth) != d:
                arrival += transfer[op.kind][min(op.partition, dep.partition)]
                if arrival > free[d]:   # it would wait: the updates whose all-reduce is done run first
                    now = free[d]
                    run_updates(d, lambda j, reached: reached + allreduce[schedule[d][j].partition] <= now)
        run(d, i, arrival)
        finished[(op.kind, op.partition, op.micro_batch)] = end[d][i]
    for d in range(depth):
        run_updates(d, lambda j, reached: True)

    makespan = max(free)
    busy = [sum(e - s for s, e in zip(starts, ends)) for starts, ends in zip(start, end)]
    idle = [makespan - b for b in busy]
    return Simulation(
        makespan=makespan, busy=busy, idle=idle,
        bubble_fraction=_divide(sum(idle), depth * makespan) if makespan else 0,
        stash_peak=[_stash_peak(ops, activation) for ops in schedule],
        weight_copies=[sum(weight[p] * report.partitions[p].max_versions_alive
                           for p in {op.partition for op in ops}) for ops in schedule],
        start=start, end=end, report=report)


def _stash_peak(ops: list[Op], activation: list[Time]) -> Time:
    """Most activations stashed at once on a device. Its ops run one after another, so
    the order alone decides: a forward adds its partition's size, a backward frees it."""
    stashed = peak = 0
    for op in ops:
        if op.kind == "F":
            stashed += activation[op.partition]
            peak = max(peak, stashed)
        elif op.kind == "B":
            stashed -= activation[op.partition]
    return peak


def _divide(a: Time, b: Time) -> Time:
    """a / b, exact when both are exact."""
    return Fraction(a, b) if isinstance(a, int) and isinstance(b, int) else a / b


def _per_partition(name: str, value, n: int) -> list[Time]:
    """One non-negative number per partition; ints stay ints (fast and exact), other
    rationals become Fractions, anything else floats."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, expected one per partition ({n})")
    values = [v if isinstance(v, int) else Fraction(v) if isinstance(v, Rational) else float(v)
              for v in values]
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return values
