"""Waits the host does not make (a GPU stream waits for NCCL instead) still time out: the
watchdog keeps their deadlines and fails naming the rank, the op and the message."""
import time

import pytest
import torch

from wpipe.errors import CommError
from wpipe.runtime.transport import Links, Place
from wpipe.runtime.watchdog import Watchdog


class Work:
    """A torch.distributed Work that completes when told to, recording how it was waited for."""

    def __init__(self):
        self.done, self.waits = False, []

    def wait(self, *args):
        self.waits.append(args)
        return True

    def is_completed(self):
        return self.done


def test_past_deadline_fails_naming_the_wait():
    watchdog = Watchdog(rank=3, timeout_s=0.05)
    late, finished = Work(), Work()
    watchdog.watch(late, "op 1B0: the data of the input gradients of op 2B0 from rank 2")
    watchdog.watch(finished, "op 1B0: another")
    watchdog.check()                       # before the deadline: nothing to say
    finished.done = True
    time.sleep(0.06)
    with pytest.raises(CommError, match=r"rank 3, op 1B0: the data of the input gradients of op 2B0 from rank 2: "
                                        r"not complete after 0.05 s\. Likely cause: the peer stopped"):
        watchdog.check()
    late.done = True
    watchdog.check()
    assert watchdog.watched == []          # completed work is forgotten


def test_device_data_is_waited_for_by_the_stream_not_the_host():
    links = Links(Place(0, 0, 0, torch.device("cpu")), {}, timeout_s=5)
    host, device = Work(), Work()
    links._wait(host, 1, ("F", 0, 2), "1F2", "header")
    links._wait(device, 1, ("F", 0, 2), "1F2", "data", on_device=True)
    assert host.waits[0][0].total_seconds() == 5          # the host waits, up to the timeout
    assert device.waits == [()]                           # the stream waits: no timeout, no host block
    assert [what for _, _, what in links.watchdog.watched] == ["op 1F2: the data of the output of op 0F2 from rank 1"]
