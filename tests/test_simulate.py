"""Timing and memory of every method against the closed forms of docs/design.md §4.3 and
§8.1, in exact arithmetic (integer or Fraction costs)."""
from fractions import Fraction

import pytest

from wpipe.schedule import Op, build_schedule, device_of, num_partitions, simulate
from wpipe.schedule.check import ScheduleError, dependency

COSTS = [(1, 1), (1, 2), (7, 3)]    # (tf, tb) per partition op; integers keep it exact and fast


def run(method, depth, micro_batches, period=None, tf=1, tb=2, **kwargs):
    schedule = build_schedule(method, depth, micro_batches, period)
    return simulate(schedule, method, depth, micro_batches, tf, tb, micro_batches_per_update=period, **kwargs)


# --------------------------------------------------------------------------- time

@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("tf, tb", COSTS)
def test_wpipe_makespan(depth, tf, tb):
    """2M(tf + tb) of work per device plus one fill and drain of (N - 1)(tf + tb)."""
    for micro_batches in (depth, 3 * depth):
        sim = run("wpipe", depth, micro_batches, tf=tf, tb=tb)
        assert sim.makespan == 2 * micro_batches * (tf + tb) + (depth - 1) * (tf + tb)
        assert sim.busy == [2 * micro_batches * (tf + tb)] * depth


@pytest.mark.parametrize("depth", range(1, 9))
@pytest.mark.parametrize("tf, tb", COSTS)
def test_pipedream_2bw_makespan(depth, tf, tb):
    """No flush, so no bubble in steady state: one fill and drain for the whole run."""
    for period in (depth, depth + 1, 2 * depth):
        micro_batches = 2 * period
        sim = run("pipedream_2bw", depth, micro_batches, period, tf, tb)
        assert sim.makespan == (micro_batches + depth - 1) * (tf + tb)


@pytest.mark.parametrize("method", ["pipedream_flush", "gpipe"])
@pytest.mark.parametrize("depth", range(1, 9))
@pytest.mark.parametrize("tf, tb", COSTS)
def test_flush_makespan_and_bubble(method, depth, tf, tb):
    """Each period of m micro-batches takes (m + N - 1)(tf + tb); bubble (N - 1)/(m + N - 1)."""
    for period in (1, depth, 2 * depth):
        sim = run(method, depth, 2 * period, period, tf, tb)
        assert sim.makespan == 2 * (period + depth - 1) * (tf + tb)
        assert sim.bubble_fraction == Fraction(depth - 1, period + depth - 1)


def test_bubble_fraction_is_idle_over_device_time():
    tf, tb = Fraction(1, 8), Fraction(1, 4)
    sim = run("wpipe", 4, 8, tf=tf, tb=tb)
    assert sim.ideal == max(sim.busy) == 2 * 8 * (tf + tb)
    assert sim.makespan == (2 * 8 + 3) * (tf + tb)
    assert sum(sim.busy) + sum(sim.idle) == 4 * sim.makespan
    assert sim.bubble_fraction == Fraction(3, 19) == sum(sim.idle) / (4 * sim.makespan)


def test_transfer_on_every_cross_device_edge():
    """tf = 1, tb = 2, transfer 10: 2F0 on dev0 waits for 1F0 on dev1 (the wrap-around),
    1B0 on dev1 for 2B0 on dev0 (and back); updates take no time."""
    sim = run("wpipe", 2, 2, transfer_cost=10)
    #               0F0 0F1 2F0 2F1 2B0 2B1 2U  0B0 0B1 0U
    assert sim.start[0] == [0, 1, 22, 23, 46, 49, 51, 70, 73, 75]
    #               1F0 1F1 3F0 3B0 3F1 3B1 3U  1B0 1B1 1U
    assert sim.start[1] == [11, 12, 33, 34, 36, 37, 39, 58, 61, 63]
    assert sim.makespan == 75


def test_no_transfer_within_a_device():
    """Depth 1 keeps wpipe's wrap-around on one device: the transfer cost never applies."""
    assert run("wpipe", 1, 3, transfer_cost=10).makespan == run("wpipe", 1, 3).makespan == 2 * 3 * 3


@pytest.mark.parametrize("method, depth, period", [
    ("wpipe", 3, None), ("pipedream_2bw", 3, 4), ("pipedream_flush", 2, 3), ("gpipe", 3, None)])
def test_every_op_starts_when_device_and_input_are_ready(method, depth, period):
    """Uneven per-partition costs: each op starts at the later of its device's previous op
    end and its dependency's end (+ the transfer cost of that boundary across devices)."""
    n = num_partitions(method, depth)
    forward, backward = [p + 1 for p in range(n)], [2 * p + 3 for p in range(n)]
    transfer, update = [Fraction(p + 1, 2) for p in range(n)], [5] * n
    micro_batches = 2 * (period or depth)
    schedule = build_schedule(method, depth, micro_batches, period)
    sim = simulate(schedule, method, depth, micro_batches, forward, backward, transfer, update,
                   micro_batches_per_update=period)
    end = {(op.kind, op.partition, op.micro_batch): sim.end[d][i]
           for d, ops in enumerate(schedule) for i, op in enumerate(ops)}
    for d, ops in enumerate(schedule):
        for i, op in enumerate(ops):
            ready = sim.end[d][i - 1] if i else 0
            dep = None if op.kind == "U" else dependency(op, n)
            if dep is not None:
                crossing = device_of(method, dep.partition, depth) != d
                ready = max(ready, end[(dep.kind, dep.partition, dep.micro_batch)]
                            + (transfer[min(op.partition, dep.partition)] if crossing else 0))
            cost = {"F": forward, "B": backward, "U": update}[op.kind][op.partition]
            assert (sim.start[d][i], sim.end[d][i]) == (ready, ready + cost), f"device {d}, step {i}, op {op}"
    assert sim.busy == [sum(e - s for s, e in zip(starts, ends)) for starts, ends in zip(sim.start, sim.end)]


def test_float_costs_give_floats():
    sim = run("pipedream_2bw", 2, 4, tf=0.5, tb=1.0)
    assert isinstance(sim.makespan, float) and sim.makespan == pytest.approx(5 * 1.5)


# --------------------------------------------------------------------------- memory

@pytest.mark.parametrize("depth", range(1, 9))
def test_memory_table(depth):
    """docs/design.md §8.1, in A (one micro-batch's activations through the whole
    model) and W (the whole model's weights), device s of N."""
    n = depth
    table = {  # method, period: (stash on device s, weight copies)
        ("gpipe", n): (lambda s: Fraction(n, n), Fraction(1, n)),
        ("gpipe", 2 * n + 1): (lambda s: Fraction(2 * n + 1, n), Fraction(1, n)),
        ("pipedream_flush", n): (lambda s: Fraction(n - s, n), Fraction(1, n)),
        ("pipedream_flush", 2 * n + 1): (lambda s: Fraction(n - s, n), Fraction(1, n)),
        ("pipedream_2bw", n): (lambda s: Fraction(n - s, n), Fraction(2, n)),
        ("pipedream_2bw", 2 * n + 1): (lambda s: Fraction(n - s, n), Fraction(2, n)),
        ("wpipe", n): (lambda s: Fraction(2 * n - s, 2 * n), Fraction(3, 2 * n)),
    }
    for (method, period), (stash, weights) in table.items():
        sim = run(method, n, 2 * period, period)
        assert sim.stash_peak == [stash(s) for s in range(n)], method
        assert sim.weight_copies == [weights] * n, method


def test_data_parallel_memory():
    sim = run("data_parallel", 1, 4, 2)
    assert (sim.stash_peak, sim.weight_copies) == ([1], [1])


def test_memory_with_given_sizes():
    """wpipe, N = 2, G0 partitions heavier: device s holds 2 copies of partition s and 1 of
    partition 2 + s. The next period's G0 forwards run before this period's G0 backwards,
    so at its peak device s stashes 2N - s micro-batches, all of them in G0."""
    sim = run("wpipe", 2, 4, activation_size=[4, 4, 1, 1], weight_size=[3, 3, 1, 1])
    assert sim.weight_copies == [2 * 3 + 1, 2 * 3 + 1]
    assert sim.stash_peak == [4 * 4, 3 * 4]


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(tf=[1, 2, 3]), r"forward_cost has 3 entries, expected one per partition \(4\)"),
    (dict(tb=-1), r"backward_cost must be >= 0, got -1"),
    (dict(activation_size=[1, 1]), r"activation_size has 2 entries, expected one per partition \(4\)"),
])
def test_bad_costs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run("pipedream_2bw", 4, 8, **kwargs)


def test_checks_the_schedule_first():
    schedule = build_schedule("gpipe", 2, 2)
    schedule[0].reverse()
    with pytest.raises(ScheduleError, match=r"^device 0, step 1, op 0B1: deadlock"):
        simulate(schedule, "gpipe", 2, 2, 1, 2)


@pytest.mark.parametrize("method, partition, overlaps", [
    ("pipedream_2bw", 0, True), ("pipedream_flush", 0, False), ("wpipe", 2, False),
    ("wpipe", 0, False)])   # wpipe's G0 ran period t+1's forwards before update t (§4.4): the next is t+2's
def test_a_stale_partitions_update_overlaps_its_next_forward(method, partition, overlaps):
    """Deferred updates: a stale partition's next forward runs on the version before the
    update's, so it starts while the update's all-reduce is in flight (docs/design.md §6.3);
    a synchronous partition's waits for the update."""
    ops = build_schedule(method, 2, 8)
    sim = simulate(ops, method, 2, 8, 1, 2, allreduce_cost=5, defer_updates=True)
    device = ops[0]
    u = device.index(Op("U", partition))
    f = next(i for i in range(u + 1, len(device)) if device[i].kind == "F" and device[i].partition == partition)
    assert (sim.start[0][f] < sim.start[0][u]) == overlaps
