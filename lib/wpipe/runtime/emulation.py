"""p2p_backend nccl_emulated: gloo carries the bytes, and NCCL's host-visible rules hold.

Run a pipeline on a laptop under the rules that decide whether it deadlocks on GPUs. A
communicator is every group the data path uses (each stream's data group, each
data-parallel group), and:

* creation: a communicator is created at its first use on each rank, and that use blocks
  until every member has made its own (ncclCommInitRank is collective, and ProcessGroupNCCL
  creates a communicator at its first operation without a bound device, pytorch#129140).
  Here the first use exchanges a token with every other member first. With communicators
  eager, the first uses are the transport's warm-up at start-up (distributed.warm_up).
* rendezvous sends: a send completes only once the receiver posted the matching receive
  (ncclSend blocks the GPU until the peer's ncclRecv). gloo's own protocol does this: its
  sender moves the payload only once the receiver said it posted the receive
  (tests/test_comm.py checks it), and the transport waits for its sends at the end of a call.
* FIFO per communicator: each stream's data group is a gloo group of its own.

The transport posts a message's receives when the op that needs them runs, as over NCCL
(transport.py). `schedule.comms` replays the same rules; the engine proves each schedule
under them before it runs (not with communicators lazy: wpipe deadlocks there, which is
what that setting shows).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import CommError
from .transport import Links
from .updates import GradientMean

CREATE = 1
"""The tag of the creation tokens on a data group (the tensors travel with tag 0)."""


class EmulatedLinks(Links):
    """`Links` over gloo data groups under NCCL's rules (the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.created: set[tuple] = set()

    def _send_data(self, stream, tensors, what, waiter):
        self._create(stream, waiter)
        super()._send_data(stream, tensors, what, waiter)

    def _recv_data(self, stream, meta, waiter):
        self._create(stream, waiter)
        return super()._recv_data(stream, meta, waiter)

    def _create(self, stream, waiter: str) -> None:
        """At the first use of `stream`'s data group on this rank: wait until the other
        member makes its own."""
        if stream in self.created:
            return
        src, dst, _, data = self.streams[stream]
        peer = dst if self.rank == src else src
        mine, theirs = torch.zeros(1), torch.empty(1)
        for work in (dist.isend(mine, peer, group=data, tag=CREATE), dist.irecv(theirs, peer, group=data, tag=CREATE)):
            try:
                work.wait(self.timeout)
            except Exception as error:
                raise CommError(
                    f"rank {self.rank}, op {waiter}: its first use of the data group of stream "
                    f"{stream[0]}{stream[1]} waited for rank {peer}'s first use, which did not come within "
                    f"{self.timeout.total_seconds():g} s (NCCL creates a communicator at its first use, and that "
                    f"use waits for every member's). Likely cause: rank {peer} waits for something this rank "
                    f"has yet to send, a deadlock (communicators eager creates them all at start-up), or it "
                    f"stopped; its own log says which.") from error
        self.created.add(stream)


class EmulatedMean(GradientMean):
    """`GradientMean` over a gloo group whose first all-reduce (the warm-up's, with
    communicators eager) waits until every member reaches its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.created = False

    def start(self, grads):
        if not self.created:
            work = dist.all_reduce(torch.zeros(1), group=self.group, async_op=True)
            try:
                work.wait(self.timeout)
            except Exception as error:
                raise CommError(f"rank {self.rank}: its first data-parallel all-reduce waited for ranks "
                                f"{self.ranks} to make theirs, which did not come within "
                                f"{self.timeout.total_seconds():g} s (NCCL creates a communicator at its first "
                                f"use). Likely cause: one of those ranks is stuck or stopped; its own log says "
                                f"why.") from error
            self.created = True
        return super().start(grads)
