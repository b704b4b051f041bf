"""Per-device op lists for every method: pure data, no process group, no tensors.

A schedule is `list[list[Op]]`, one list per pipeline device, in the order that device
runs them. `Op.kind` is "F" (forward), "B" (backward) or "U" (optimizer step of the
partition's group); `Op.partition` is the global partition index; `Op.micro_batch` is
None for "U". `str(op)` is the one spelling used everywhere: `2F3` is the forward of
micro-batch 3 through partition 2, `2U` the update of partition 2.

Methods (docs/design.md §2, §3 and §9), N = depth, m = micro-batches per update:

    wpipe            2N partitions, device s holds s and N+s; grouped interleaved order
    pipedream_2bw    N partitions; 1F1B without flush; every stage one period stale
    pipedream_flush  N partitions; 1F1B with a flush every period; synchronous
    gpipe            N partitions; all forwards then all backwards; synchronous
    data_parallel    1 partition on 1 device; synchronous

This module imports no other wpipe module (check.py and simulate.py import it);
`python -m wpipe --method wpipe --depth 2 --micro-batches 6` (wpipe/__main__.py) prints a
schedule, checked and simulated.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("F", "B", "U")


@dataclass(frozen=True)
class Op:
    kind: str
    partition: int
    micro_batch: int | None = None

    def __str__(self) -> str:
        return f"{self.partition}{self.kind}" + ("" if self.micro_batch is None else str(self.micro_batch))


_OP_RE = re.compile(r"^(\d+)([FBU])(\d*)$")


def parse_op(text: str) -> Op:
    """Inverse of `str(op)`: "2F3" -> Op("F", 2, 3), "2U" -> Op("U", 2)."""
    match = _OP_RE.match(text.strip())
    if not match or (match.group(2) == "U") != (match.group(3) == ""):
        raise ValueError(f"cannot parse op {text!r}: expected e.g. '2F3', '0B1' or '1U'")
    partition, kind, micro_batch = match.groups()
    return Op(kind, int(partition), int(micro_batch) if micro_batch else None)


@dataclass(frozen=True)
class Method:
    """What distinguishes a method: how many partitions, where they live, the op order,
    and which partitions run one period stale (forward and backward of period t on
    weights version t-1, the update applied to version t)."""
    name: str
    num_partitions: Callable[[int], int]
    device_of: Callable[[int, int], int]          # (partition, depth) -> device
    order: Callable[[int, int, int], list[list[Op]]]  # (depth, micro-batches, period)
    stale: Callable[[int, int], bool]             # (partition, depth) -> one period stale?
    synchronous: bool


def default_period(method: str, depth: int) -> int:
    """Micro-batches per update when the configuration names none."""
    return 1 if method == "data_parallel" else depth


def build_schedule(method: str, depth: int, num_micro_batches: int,
                   micro_batches_per_update: int | None = None) -> list[list[Op]]:
    """One op list per device. `num_micro_batches` must be a whole number of periods."""
    spec = get_method(method)
    period = validate(method, depth, num_micro_batches, micro_batches_per_update)
    return spec.order(depth, num_micro_batches, period)


def validate(method: str, depth: int, num_micro_batches: int,
             micro_batches_per_update: int | None = None) -> int:
    """Check the arguments of `build_schedule`; return the period (micro-batches per update)."""
    get_method(method)
    if not _is_int(depth) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    if method == "data_parallel" and depth != 1:
        raise ValueError(f"depth must be 1 for data_parallel (the whole model on each device), got {depth}")
    period = default_period(method, depth) if micro_batches_per_update is None else micro_batches_per_update
    if not _is_int(period) or period < 1:
        raise ValueError(f"micro_batches_per_update must be an integer >= 1, got {period!r}")
    if method == "wpipe" and period != depth:
        raise ValueError(f"micro_batches_per_update must equal depth ({depth}) for wpipe "
                         f"(its period is one micro-batch per device), got {period}")
    if method == "pipedream_2bw" and period < depth:
        raise ValueError(f"micro_batches_per_update must be >= depth ({depth}) for pipedream_2bw "
                         f"(two weight versions suffice only then), got {period}")
    if not _is_int(num_micro_batches) or num_micro_batches < 1 or num_micro_batches % period:
        raise ValueError(f"num_micro_batches must be a positive multiple of the period "
                         f"(micro_batches_per_update = {period}), got {num_micro_batches!r}")
    return period


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


# --------------------------------------------------------------------------- orders

def _wpipe(depth: int, num_micro_batches: int, period: int) -> list[list[Op]]:
    """docs/design.md §3.2. Forwards come in blocks of N alternating G0, G1; the
    backward counter starts with a block of G1; device s runs 2N-1-s warm-up forwards,
    then one forward and one backward in turn, then drains; a group's update follows its
    N-th backward of a period."""
    n, total = depth, 2 * num_micro_batches

    def forward(s, f):
        group = (f // n) % 2
        return Op("F", s + group * n, (f // (2 * n)) * n + f % n)

    def backward(s, k):
        group = 1 - (k // n) % 2
        return Op("B", s + group * n, (k // (2 * n)) * n + k % n)

    schedule = []
    for s in range(n):
        ops, f, k = [], 0, 0
        warmup = min(2 * n - 1 - s, total)
        for _ in range(warmup):
            ops.append(forward(s, f))
            f += 1
        while k < total:
            if f < total:
                ops.append(forward(s, f))
                f += 1
            op = backward(s, k)
            ops.append(op)
            if k % n == n - 1:
                ops.append(Op("U", op.partition))
            k += 1
        schedule.append(ops)
    return schedule


def _one_f_one_b(depth: int, micro_batches: range, stage: int) -> list[Op]:
    """1F1B on one stage over the given micro-batches: N-1-s warm-up forwards, then one
    forward and one backward in turn, then the remaining backwards."""
    mbs = list(micro_batches)
    warmup = min(depth - 1 - stage, len(mbs))
    ops = [Op("F", stage, mb) for mb in mbs[:warmup]]
    for i, mb in enumerate(mbs):
        if warmup + i < len(mbs):
            ops.append(Op("F", stage, mbs[warmup + i]))
        ops.append(Op("B", stage, mb))
    return ops


def _pipedream_2bw(depth: int, num_micro_batches: int, period: int) -> list[list[Op]]:
    schedule = []
    for s in range(depth):
        ops = []
        for op in _one_f_one_b(depth, range(num_micro_batches), s):
            ops.append(op)
            if op.kind == "B" and op.micro_batch % period == period - 1:
                ops.append(Op("U", s))
        schedule.append(ops)
    return schedule


def _pipedream_flush(depth: int, num_micro_batches: int, period: int) -> list[list[Op]]:
    return [[op for start in range(0, num_micro_batches, period)
             for op in _one_f_one_b(depth, range(start, start + period), s) + [Op("U", s)]]
            for s in range(depth)]


def _gpipe(depth: int, num_micro_batches: int, period: int) -> list[list[Op]]:
    return [[op for start in range(0, num_micro_batches, period)
             for op in [Op("F", s, mb) for mb in range(start, start + period)]
             + [Op("B", s, mb) for mb in range(start, start + period)] + [Op("U", s)]]
            for s in range(depth)]


METHODS: dict[str, Method] = {
    "wpipe": Method("wpipe", lambda n: 2 * n, lambda p, n: p % n, _wpipe,
                    lambda p, n: p < n, synchronous=False),
    "pipedream_2bw": Method("pipedream_2bw", lambda n: n, lambda p, n: p, _pipedream_2bw,
                            lambda p, n: True, synchronous=False),
    "pipedream_flush": Method("pipedream_flush", lambda n: n, lambda p, n: p, _pipedream_flush,
                              lambda p, n: False, synchronous=True),
    "gpipe": Method("gpipe", lambda n: n, lambda p, n: p, _gpipe,
                    lambda p, n: False, synchronous=True),
    "data_parallel": Method("data_parallel", lambda n: 1, lambda p, n: 0, _pipedream_flush,
                            lambda p, n: False, synchronous=True),
}

PIPELINES = tuple(name for name, method in METHODS.items() if method.num_partitions(2) > 1)
"""The methods that cut the model over the devices of a pipeline (all but data_parallel)."""

def num_partitions(method: str, depth: int) -> int:
    return get_method(method).num_partitions(depth)


def device_of(method: str, partition: int, depth: int) -> int:
    """Pipeline device (0..depth-1) that holds `partition`."""
    return get_method(method).device_of(partition, depth)


def weights_version(method: str, partition: int, depth: int, micro_batch: int, period: int) -> int:
    """The weight version (number of updates applied before it) that the forward and the
    backward of `micro_batch` use on `partition`: t for synchronous partitions, t-1 for
    stale ones (clamped at 0), where t = micro_batch // period."""
    t = micro_batch // period
    return max(t - 1, 0) if get_method(method).stale(partition, depth) else t
