"""The communication check (wpipe.schedule.comms): every method's schedules are free of
deadlock under the transport's rules; the transport as it was (no warm-up, receives posted
ahead) deadlocks wpipe under NCCL's lazy communicator creation; a broken order is reported
with its blocked ops on the grid."""
import itertools
import re
from dataclasses import replace

import pytest
from test_check import literal

from wpipe.schedule import METHODS, ScheduleError, Topology, build_schedule, check_schedule, default_period
from wpipe.schedule.comms import GLOO, NCCL, Rules, check_communication

UNFIXED = Rules(creation="lazy", sends="rendezvous")
"""The transport before the fix, under NCCL: receives posted ahead, no warm-up, lazy creation."""
LAYOUTS = ("pipeline_major", "replica_major")


def grid():
    """(method, depth, data_parallel, rank_layout, periods per call): every method at depths
    1..8 (data_parallel: 1), 1..4 replicas, both layouts, calls of 1..3 periods."""
    for method in METHODS:
        for depth, dp, layout, periods in itertools.product(
                [1] if method == "data_parallel" else range(1, 9), range(1, 5), LAYOUTS, range(1, 4)):
            yield method, depth, dp, layout, periods


def deadlocks(rules) -> set[tuple]:
    """The configurations of `grid()` whose communication deadlocks under `rules` (the
    schedules themselves pass check_schedule: test_check.py)."""
    found = set()
    for method, depth, dp, layout, periods in grid():
        schedule = build_schedule(method, depth, periods * default_period(method, depth))
        try:
            check_communication(schedule, Topology(method, depth, dp, layout), rules)
        except ScheduleError:
            found.add((method, depth, dp, layout, periods))
    return found


@pytest.mark.parametrize("rules", [NCCL, GLOO], ids=["nccl", "gloo"])
def test_every_method_is_free_of_deadlock(rules):
    """Under the transport's own rules: NCCL's at their worst (lazy creation after the
    warm-up, rendezvous sends, kernels that hold the host, receives posted when taken), and
    gloo's (receives posted ahead)."""
    assert len(list(grid())) == 792
    assert deadlocks(rules) == set()


@pytest.mark.parametrize("rules", [UNFIXED, replace(NCCL, warm_up=False)], ids=["unfixed", "no_warm_up"])
def test_lazy_creation_deadlocks_wpipe_calls_of_several_periods(rules):
    """Without the warm-up a stream's first message meets its receiver only when the
    receiver takes it: wpipe deadlocks at every depth >= 2 once a call spans two periods,
    on every replica count and layout; the other methods do not."""
    expected = {(method, depth, dp, layout, periods) for method, depth, dp, layout, periods in grid()
                if method == "wpipe" and depth >= 2 and periods >= 2}
    assert deadlocks(rules) == expected


def test_the_wpipe_deadlock_is_reported_on_the_grid():
    """Depth 2, three periods: device 0 blocks in 2B0, sending the first message of the
    wrap-around gradient stream, while device 1 waits in 1F2 for 0F2's output."""
    schedule = build_schedule("wpipe", 2, 6)
    with pytest.raises(ScheduleError) as error:
        check_communication(schedule, Topology("wpipe", 2, 1, "pipeline_major"), UNFIXED)
    lines = str(error.value).splitlines()
    assert lines[0] == (
        "device 0, step 4, op 2B0: deadlock (lazy creation, rendezvous sends, async kernels, receives posted "
        "ahead): rank 0 waits in its first use of the communicator of stream B2 (partition 2's input "
        "gradients, rank 0 -> 1), to send the input gradients of op 2B0 to rank 1 (lazy creation: every "
        "member's first use meets there)")
    assert lines[1] == "  device 1, step 7, op 1F2: rank 1 waits for the output of op 0F2 from rank 0"
    assert lines[2] == " tick dev0   dev1"
    assert [line for line in lines if "<--" in line] == [
        "    5 2B0    3F1     <-- device 0, step 4",
        "    7 2B1 2U 1F2     <-- device 1, step 7"]


def test_receives_posted_ahead_deadlock_when_kernels_block():
    """Why the transport posts a receive under NCCL only when its op is about to run: a
    receive posted ahead may hold the host (a device-wide synchronisation waits for every
    kernel). In gpipe's second call both devices post their first receive before their
    first op, and device 0's gradients need device 1's forwards."""
    schedule, topology = build_schedule("gpipe", 2, 2), Topology("gpipe", 2, 1, "pipeline_major")
    check_communication(schedule, topology, NCCL)
    with pytest.raises(ScheduleError, match=re.escape(
            "device 0, step 0, op 0F0 (call 2): deadlock (lazy creation after a warm-up, rendezvous sends, "
            "blocking kernels, receives posted ahead): rank 0 waits for the input gradients of op 1B0 from rank 1 "
            "(its receive, posted here, holds the host: blocking kernels)\n"
            "  device 1, step 0, op 1F0 (call 2): rank 1 waits for the output of op 0F0 from rank 0")):
        check_communication(schedule, topology, replace(NCCL, posting="ahead"))


def test_a_swapped_order_is_reported():
    """Broken on purpose: wpipe's first device runs 2F0 before 0F1. The dependencies still
    allow it and the warm-up makes it safe, but under lazy creation device 0's first use of
    stream F2 waits for device 1's, which waits in 1F1 for 0F1."""
    schedule = literal("""
        dev0: 0F0 2F0 0F1 2F1 2B0 2B1 2U  0B0 0B1 0U
        dev1: 1F0 1F1 3F0 3B0 3F1 3B1 3U  1B0 1B1 1U
    """)
    assert build_schedule("wpipe", 2, 2)[0][1:3] == schedule[0][2:0:-1]
    topology = Topology("wpipe", 2, 1, "pipeline_major")
    check_schedule(schedule, "wpipe", 2, 2, topology=topology, rules=NCCL)
    with pytest.raises(ScheduleError) as error:
        check_schedule(schedule, "wpipe", 2, 2, topology=topology, rules=replace(NCCL, warm_up=False))
    text = str(error.value)
    assert text.startswith("device 0, step 1, op 2F0: deadlock (lazy creation, rendezvous sends, blocking "
                           "kernels, receives posted taken): rank 0 waits in its first use of the communicator "
                           "of stream F2 (partition 2's outputs, rank 0 -> 1), to send the output of op 2F0")
    assert "\n  device 1, step 1, op 1F1: rank 1 waits for the output of op 0F1 from rank 0\n" in text
    assert "    2 2F0            <-- device 0, step 1" in text
    assert "    4        1F1     <-- device 1, step 1" in text


def test_messages_taken_out_of_order_are_kept():
    """A device that needs a stream's later message first takes the earlier one and keeps
    it (the transport's `early`), FIFO on the communicator."""
    schedule = literal("""
        dev0: 0F0 0F1 0B0 0B1 0U
        dev1: 1F1 1F0 1B0 1B1 1U
    """)
    check_schedule(schedule, "gpipe", 2, 2, topology=Topology("gpipe", 2, 1, "pipeline_major"), rules=NCCL)


def test_rules_and_topology_are_validated():
    with pytest.raises(ValueError, match=r"Rules.sends must be one of buffered, rendezvous, got 'eager'"):
        Rules(sends="eager")
    with pytest.raises(ValueError, match=r"topology is gpipe at depth 2, the schedule wpipe at depth 2"):
        check_schedule(build_schedule("wpipe", 2, 2), "wpipe", 2, 2, topology=Topology("gpipe", 2, 1, "pipeline_major"),
                       rules=NCCL)
