"""The schedule checker: what it reports for every method, and what it rejects."""
import pytest

from wpipe.schedule import build_schedule, parse_op
from wpipe.schedule.check import ScheduleError, check_schedule, format_schedule


def literal(text: str):
    """'dev0: 0F0 0F1 ...' lines -> a schedule."""
    return [[parse_op(op) for op in line.split(":", 1)[1].split()]
            for line in text.strip().splitlines()]


def reported(method, depth, micro_batches, period=None):
    report = check_schedule(build_schedule(method, depth, micro_batches, period),
                            method, depth, micro_batches, period)
    return {p: (r.semantics, r.always_newest, r.max_versions_alive) for p, r in report.partitions.items()}


# --------------------------------------------------------------------------- sweeps

@pytest.mark.parametrize("depth", range(1, 17))
def test_wpipe_semantics(depth):
    """G0 one period stale yet always on the newest version, two copies; G1 synchronous."""
    for micro_batches in (2 * depth, 3 * depth):
        expected = {p: ("t-1", True, 2) if p < depth else ("t", True, 1) for p in range(2 * depth)}
        assert reported("wpipe", depth, micro_batches) == expected


@pytest.mark.parametrize("depth", range(1, 9))
def test_pipedream_2bw_semantics(depth):
    """Every stage one period stale with two copies; after an update, the forwards left in
    the period still use the older version, so no stage always runs on the newest."""
    for period in (depth, depth + 1, 2 * depth):
        for micro_batches in (2 * period, 3 * period):
            assert reported("pipedream_2bw", depth, micro_batches, period) == \
                {p: ("t-1", False, 2) for p in range(depth)}


@pytest.mark.parametrize("method", ["pipedream_flush", "gpipe"])
@pytest.mark.parametrize("depth", range(1, 9))
def test_synchronous_semantics(method, depth):
    for period in (1, depth, 2 * depth):
        for micro_batches in (2 * period, 3 * period):
            assert reported(method, depth, micro_batches, period) == {p: ("t", True, 1) for p in range(depth)}


@pytest.mark.parametrize("period", [1, 2, 4])
def test_data_parallel_semantics(period):
    assert reported("data_parallel", 1, 3 * period, period) == {0: ("t", True, 1)}


# --------------------------------------------------------------------------- the grid

def test_format_schedule():
    schedule = build_schedule("pipedream_2bw", 2, 4)
    assert format_schedule(schedule, mark=(1, 4)) == "\n".join([
        " tick dev0   dev1",
        "    0 0F0",
        "    1 0F1    1F0",
        "    2        1B0",
        "    3 0B0    1F1",
        "    4 0F2    1B1 1U  <-- device 1, step 4",
        "    5 0B1 0U 1F2",
        "    6 0F3    1B2",
        "    7 0B2    1F3",
        "    8        1B3 1U",
        "    9 0B3 0U",
    ])


# --------------------------------------------------------------------------- rejections

@pytest.mark.parametrize("method, depth, micro_batches, schedule, message", [
    pytest.param("wpipe", 2, 2, """
        dev0: 0F0 0F1 2F0 2F1 2B0 2B1 2U  0B0 0B1 0U
        dev1: 3F0 1F1 1F0 3B0 3F1 3B1 3U  1B0 1B1 1U
     """, r"^device 0, step 2, op 2F0: deadlock at tick 2:\n"
          r"  device 0 waits at step 2 for 1F0 \(op 2F0\)\n"
          r"  device 1 waits at step 0 for 2F0 \(op 3F0\)\n step dev0",
        id="swapped ops deadlock"),
    pytest.param("gpipe", 2, 2, """
        dev0: 0F0 0F1 0B0 0B1 0U
        dev1: 1F0 1F1 1B1 1U
     """, r"^device 1: op 1B0 is missing\n step dev0", id="missing op"),
    pytest.param("gpipe", 2, 2, """
        dev0: 0F0 0F1 0F1 0B0 0B1 0U
        dev1: 1F0 1F1 1B0 1B1 1U
     """, r"^device 0, step 2, op 0F1: repeats step 1\n", id="repeated op"),
    pytest.param("wpipe", 2, 2, """
        dev0: 0F0 0F1 2F0 3F0 2F1 2B0 2B1 2U  0B0 0B1 0U
        dev1: 1F0 1F1 3B0 3F1 3B1 3U  1B0 1B1 1U
     """, r"^device 0, step 3, op 3F0: partition 3 is not held by device 0\n", id="wrong device"),
    pytest.param("gpipe", 2, 2, """
        dev0: 0F0 0F2 0B0 0B1 0U
        dev1: 1F0 1F1 1B0 1B1 1U
     """, r"^device 0, step 1, op 0F2: micro-batch 2 is outside 0..1\n", id="unknown micro-batch"),
    pytest.param("pipedream_2bw", 2, 4, """
        dev0: 0F0 0F1 0B0 0U  0F2 0B1 0F3 0B2 0B3 0U
        dev1: 1F0 1B0 1F1 1B1 1U  1F2 1B2 1F3 1B3 1U
     """, r"^device 0, step 3, op 0U: update 0 of partition 0 before all 2 backwards of period 0\n",
        id="update in the middle of a period"),
    pytest.param("gpipe", 2, 2, """
        dev0: 0U  0F0 0F1 0B0 0B1
        dev1: 1F0 1F1 1B0 1B1 1U
     """, r"^device 0, step 0, op 0U: update 0 of partition 0 before all 2 backwards of period 0\n",
        id="update first"),
    pytest.param("pipedream_2bw", 2, 4, """
        dev0: 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0U  0B3 0U
        dev1: 1F0 1B0 1F1 1B1 1U  1F2 1B2 1F3 1B3 1U
     """, r"^device 0, step 6, op 0B2: backward of period 1 before the update of period 0 "
          r"\(gradients would mix\)\n", id="update after the next period's backward"),
    pytest.param("pipedream_flush", 2, 4, """
        dev0: 0F0 0F1 0B0 0B1 0U  0F2 0F3 0B2 0B3 0U
        dev1: 1F0 1B0 1F1 1B1 1F2 1U  1B2 1F3 1B3 1U
     """, r"^device 1, step 4, op 1F2: forward of period 1 needs weights version 1, "
          r"but only 0 updates were applied\n", id="synchronous forward before its update"),
    pytest.param("gpipe", 2, 4, """
        dev0: 0F0 0F1 0B0 0B1 0U  0F2 0F3 0B2 0B3
        dev1: 1F0 1F1 1B0 1B1 1U  1F2 1F3 1B2 1B3 1U
     """, r"^device 0, step 8, op 0B3: partition 0 has 1 updates, expected 2 \(one per period\)\n",
        id="missing update"),
])
def test_rejects(method, depth, micro_batches, schedule, message):
    with pytest.raises(ScheduleError, match=message) as error:
        check_schedule(literal(schedule), method, depth, micro_batches)
    text = str(error.value)
    # Located errors end with the grid, an arrow on the failing op's row.
    located = text.split(":", 1)[0].split(", ")
    if len(located) == 3:
        assert f"  <-- {located[0]}, {located[1]}" in text


def test_rejects_wrong_device_count():
    with pytest.raises(ScheduleError, match=r"schedule has 1 device lists, expected depth = 2"):
        check_schedule(build_schedule("gpipe", 2, 2)[:1], "gpipe", 2, 2)
