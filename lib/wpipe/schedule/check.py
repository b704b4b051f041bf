"""Prove a schedule runs, and find the weight versions each op uses. Pure.

`check_schedule` raises `ScheduleError` (message `device d, step i, op X: ...` followed by
the grid with the failing op marked) when a schedule

* puts an op on a device that does not hold its partition,
* misses or repeats a forward or backward of some (partition, micro-batch),
* deadlocks: some op waits for another that can never run first. Dependencies: the
  forward of partition p after that of p-1 (same micro-batch); the backward of p after
  that of p+1, the last partition's backward after its forward,
* steps a partition's optimizer anywhere but between the last backward of a period and
  the first backward of the next,
* runs a forward on weights that do not exist yet (a synchronous partition's period t
  needs version t, made by the t-th update),
* with `rules`: deadlocks in its communication, every rank's messages replayed as the
  transport carries them under those rules (comms.py: NCCL's lazy communicator creation,
  rendezvous sends, kernels that hold the host).

It replays the updates ("U" ops) per partition to report which version every forward and
backward uses (the method's rule, `schedule.weights_version`), whether that is the newest
version at the time, and how many versions must be alive at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ScheduleError
from .comms import Rules, check_communication
from .methods import Op, build_schedule, get_method, validate, weights_version
from .topology import Topology

Schedule = list[list[Op]]



@dataclass
class PartitionReport:
    """What the replay found for one partition."""
    lags: set[int] = field(default_factory=set)   # period - version over F ops of periods >= 1
    always_newest: bool = True                   # every F ran on the newest version then
    max_versions_alive: int = 1                  # weight copies needed at once

    @property
    def semantics(self) -> str:
        """'t' (synchronous), 't-1' (one period stale) or a list when mixed."""
        return "/".join("t" if lag == 0 else f"t-{lag}" for lag in sorted(self.lags)) or "t"


@dataclass
class Report:
    ticks: list[list[int]]                        # per device, per op: lockstep clock tick
    partitions: dict[int, PartitionReport]


def lockstep(schedule: Schedule, num_partitions: int) -> list[list[int]]:
    """Run every device in unit clock ticks: an F or B takes one tick and may start once
    its dependencies finished in an earlier tick; a U takes no time. Returns the tick of
    every op. Raises ScheduleError naming each stuck device's next op on deadlock."""
    done: dict[tuple[str, int, int], int] = {}
    ticks = [[None] * len(ops) for ops in schedule]
    next_index = [0] * len(schedule)
    tick = 0
    while any(i < len(ops) for i, ops in zip(next_index, schedule)):
        progressed = False
        finished = []
        for d, ops in enumerate(schedule):
            i = next_index[d]
            if i < len(ops) and ops[i].kind != "U" and _ready(ops[i], done, num_partitions, tick):
                ticks[d][i] = tick
                finished.append(ops[i])
                i += 1
                progressed = True
            while i < len(ops) and ops[i].kind == "U":
                ticks[d][i] = ticks[d][i - 1] if i else 0
                i += 1
                progressed = True
            next_index[d] = i
        for op in finished:
            done[(op.kind, op.partition, op.micro_batch)] = tick
        if not progressed:
            waits = [f"device {d} waits at step {i} for {dependency(ops[i], num_partitions)} (op {ops[i]})"
                     for d, (i, ops) in enumerate(zip(next_index, schedule)) if i < len(ops)]
            d, i = next((d, i) for d, (i, ops) in enumerate(zip(next_index, schedule)) if i < len(ops))
            raise ScheduleError(f"device {d}, step {i}, op {schedule[d][i]}: deadlock at tick {tick}:\n  "
                                + "\n  ".join(waits) + "\n"
                                + _grid(schedule, _steps(schedule), "step", (d, i)))
        tick += 1
    return ticks


def dependency(op: Op, num_partitions: int) -> Op | None:
    """The op that must finish before forward or backward `op` may start (None for the
    first partition's forward): F(p) after F(p-1), B(p) after B(p+1), and the last
    partition's backward after its own forward (the loss)."""
    if op.kind == "F":
        return None if op.partition == 0 else Op("F", op.partition - 1, op.micro_batch)
    if op.partition == num_partitions - 1:
        return Op("F", op.partition, op.micro_batch)
    return Op("B", op.partition + 1, op.micro_batch)


def _ready(op: Op, done, num_partitions: int, tick: int) -> bool:
    dep = dependency(op, num_partitions)
    if dep is None:
        return True
    finished = done.get((dep.kind, dep.partition, dep.micro_batch))
    return finished is not None and finished < tick


def check_schedule(schedule: Schedule, method: str, depth: int, num_micro_batches: int,
                   micro_batches_per_update: int | None = None, *, topology: Topology | None = None,
                   rules: Rules | None = None) -> Report:
    """Validate `schedule` as the given method's; return what the version replay found.
    With `rules` (comms.Rules; the transport's: `Transport.rules`), also replay its
    communication on every rank of `topology` (default: one replica, pipeline_major)."""
    period = validate(method, depth, num_micro_batches, micro_batches_per_update)
    if topology is not None and (topology.method, topology.depth) != (method, depth):
        raise ValueError(f"topology is {topology.method} at depth {topology.depth}, the schedule {method} "
                         f"at depth {depth}")
    spec = get_method(method)
    num_partitions = spec.num_partitions(depth)

    def fail(d, i, message):
        raise ScheduleError(f"device {d}, step {i}, op {schedule[d][i]}: {message}\n"
                            + format_schedule(schedule, (d, i)))

    if len(schedule) != depth:
        raise ScheduleError(f"schedule has {len(schedule)} device lists, expected depth = {depth}")
    seen: dict[tuple[str, int, int], tuple[int, int]] = {}
    for d, ops in enumerate(schedule):
        for i, op in enumerate(ops):
            if op.kind not in ("F", "B", "U"):
                fail(d, i, f"unknown kind {op.kind!r}")
            if not 0 <= op.partition < num_partitions or spec.device_of(op.partition, depth) != d:
                fail(d, i, f"partition {op.partition} is not held by device {d}")
            if op.kind == "U":
                continue
            if not 0 <= op.micro_batch < num_micro_batches:
                fail(d, i, f"micro-batch {op.micro_batch} is outside 0..{num_micro_batches - 1}")
            key = (op.kind, op.partition, op.micro_batch)
            if key in seen:
                fail(d, i, f"repeats step {seen[key][1]}")
            seen[key] = (d, i)
    for kind in ("F", "B"):
        for p in range(num_partitions):
            for mb in range(num_micro_batches):
                if (kind, p, mb) not in seen:
                    raise ScheduleError(f"device {spec.device_of(p, depth)}: op {Op(kind, p, mb)} is missing\n"
                                        + format_schedule(schedule))
    ticks = lockstep(schedule, num_partitions)
    if rules is not None:
        check_communication(schedule, topology or Topology(method, depth, 1, "pipeline_major"), rules)

    reports = {}
    for d, ops in enumerate(schedule):
        for p in sorted({op.partition for op in ops}):
            reports[p] = _replay(ops, d, p, method, depth, period, num_micro_batches, fail)
    return Report(ticks, reports)


def checked_schedule(method: str, depth: int, num_micro_batches: int, period: int, topology=None,
                     rules=None) -> Schedule:
    """build_schedule, proved by check_schedule (with `topology` and `rules`, its
    communication too). The orders repeat every period: the first 8 periods are checked."""
    full = build_schedule(method, depth, num_micro_batches, period)
    checked = min(num_micro_batches, 8 * period)
    check_schedule(full if checked == num_micro_batches else build_schedule(method, depth, checked, period),
                   method, depth, checked, period, topology=topology, rules=rules)
    return full


def locate(schedule: Schedule, device: int, step: int) -> str:
    """Where op `step` of `device` sits, for an error: the grid with it marked, or the ops
    around it when the schedule is too long to print."""
    if len(schedule[0]) <= 200:
        return format_schedule(schedule, (device, step))
    return "ops here: " + " ".join(str(o) for o in schedule[device][max(0, step - 6):step + 7])


def last_uses(ops, partition: int, version_of) -> dict[int, int]:
    """version -> index (in `ops`) of the last forward or backward of `partition` on it.
    `version_of(micro_batch)` gives the version a micro-batch runs on."""
    out = {}
    for i, op in enumerate(ops):
        if op.partition == partition and op.kind in ("F", "B"):
            out[version_of(op.micro_batch)] = i
    return out


def _replay(ops, d, p, method, depth, period, num_micro_batches, fail) -> PartitionReport:
    """Replay one partition's ops on its device: updates, versions used, versions alive."""
    report = PartitionReport()
    newest = 0
    created = {0: -1}                 # version -> op index of the U that made it
    used: dict[int, int] = {}         # micro-batch -> version its forward used
    backwards_done = [0] * (num_micro_batches // period)
    for i, op in enumerate(ops):
        if op.partition != p:
            continue
        if op.kind == "U":
            t = newest
            if t >= len(backwards_done) or backwards_done[t] != period:
                fail(d, i, f"update {t} of partition {p} before all {period} backwards of period {t}")
            newest += 1
            created[newest] = i
            continue
        t = op.micro_batch // period
        if op.kind == "B" and t > newest:
            fail(d, i, f"backward of period {t} before the update of period {newest} (gradients would mix)")
        if op.kind == "F":
            version = weights_version(method, p, depth, op.micro_batch, period)
            if version > newest:
                fail(d, i, f"forward of period {t} needs weights version {version}, "
                           f"but only {newest} updates were applied")
            used[op.micro_batch] = version
            report.always_newest &= version == newest
            if t >= 1:
                report.lags.add(t - version)
        else:
            if op.micro_batch not in used:
                fail(d, i, f"backward before the forward of micro-batch {op.micro_batch}")
            version = used[op.micro_batch]
            backwards_done[t] += 1
    if newest != num_micro_batches // period:
        fail(d, len(ops) - 1, f"partition {p} has {newest} updates, expected "
                              f"{num_micro_batches // period} (one per period)")
    last_use = last_uses(ops, p, lambda mb: weights_version(method, p, depth, mb, period))
    for i in range(len(ops)):
        current = max(v for v, at in created.items() if at <= i)
        alive = {current} | {v for v, at in created.items() if at <= i and last_use.get(v, -1) > i}
        report.max_versions_alive = max(report.max_versions_alive, len(alive))
    return report


def format_schedule(schedule: Schedule, mark: tuple[int, int] | list[tuple[int, int]] | None = None) -> str:
    """Grid of lockstep clock ticks (rows) x devices (columns), idle cells blank, a U shown
    beside the op it follows. `mark=(device, step)` (or a list of them) points an arrow at
    that op's row. A schedule that deadlocks is shown step by step instead of tick by tick."""
    num_partitions = 1 + max((op.partition for ops in schedule for op in ops), default=0)
    try:
        return _grid(schedule, lockstep(schedule, num_partitions), "tick", mark)
    except ScheduleError:
        return _grid(schedule, _steps(schedule), "step", mark)


def _steps(schedule: Schedule) -> list[list[int]]:
    """Rows for a grid that needs no replay: step i of every device in row i."""
    return [list(range(len(ops))) for ops in schedule]


def _grid(schedule: Schedule, ticks: list[list[int]], label: str, mark) -> str:
    """The grid of `format_schedule`, each op in row `ticks[device][step]`."""
    rows = 1 + max((t for per_device in ticks for t in per_device), default=-1)
    cells = [["" for _ in schedule] for _ in range(rows)]
    for d, ops in enumerate(schedule):
        for op, t in zip(ops, ticks[d]):
            cells[t][d] = (cells[t][d] + " " + str(op)).strip()
    width = max([len(c) for row in cells for c in row] + [len(f"dev{len(schedule) - 1}")])
    arrows: dict[int, list[str]] = {}
    for d, i in ([mark] if isinstance(mark, tuple) else mark or []):
        if i < len(ticks[d]):
            arrows.setdefault(ticks[d][i], []).append(f"device {d}, step {i}")
    lines = [(f"{label:>5} " + " ".join(f"dev{d}".ljust(width) for d in range(len(schedule)))).rstrip()]
    for t, row in enumerate(cells):
        line = f"{t:>5} " + " ".join(c.ljust(width) for c in row)
        if t in arrows:
            line += "  <-- " + "; ".join(arrows[t])
        lines.append(line.rstrip())
    return "\n".join(lines)
