"""p2p_backend nccl_emulated: gloo carries the bytes, and NCCL's host-visible rules hold.

Run a pipeline on a laptop under the rules that decide whether it deadlocks on GPUs. A
communicator is every group the data path uses (each stream's data group, each
data-parallel group), and:

* creation (`lazy`): a communicator is created at its first use on each rank, and that use
  blocks until every member has made its own (ncclCommInitRank is collective, and
  ProcessGroupNCCL creates a communicator at its first operation without a bound device,
  pytorch#129140). Here the first use exchanges a token with every other member first.
  Without `lazy`, the communicators are created at start-up by the transport's warm-up.
* rendezvous sends (`rendezvous`): a send completes only once the receiver posted the
  matching receive (ncclSend blocks the GPU until the peer's ncclRecv). The receiver
  answers each receive it posts with a token; the sender's send is in flight until it came.
* FIFO per communicator: each stream's data group is a gloo group of its own.

The transport posts a message's receives when the op that needs them runs, as over NCCL
(transport.py). `schedule.comms` replays the same rules; the engine proves each schedule
under them before it runs (not under `lazy`: wpipe deadlocks there, which is what it shows).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import CommError
from .transport import Links
from .updates import GradientMean

CREATE, READY = 1, 2
"""Tags of the tokens on a data group (the tensors travel with tag 0)."""


class EmulatedLinks(Links):
    """`Links` over gloo data groups under NCCL's rules (the module docstring)."""

    def __init__(self, *args, lazy: bool, rendezvous: bool, **kwargs):
        super().__init__(*args, posting="taken", **kwargs)
        self.lazy, self.rendezvous = lazy, rendezvous
        self.created: set[tuple] = set()

    def _send_data(self, stream, tensors, what, waiter):
        self._create(stream, waiter)
        if self.rendezvous:
            _, dst, _, data = self.streams[stream]
            ready = torch.empty(1)
            self.in_flight.append((dist.irecv(ready, dst, group=data, tag=READY), ready,
                                   f"{what} (its receive, rendezvous send)"))
        super()._send_data(stream, tensors, what, waiter)

    def _recv_data(self, stream, meta, waiter):
        self._create(stream, waiter)
        tensors, works = super()._recv_data(stream, meta, waiter)
        if self.rendezvous:
            src, _, _, data = self.streams[stream]
            ready = torch.zeros(1)
            self.in_flight.append((dist.isend(ready, src, group=data, tag=READY), ready,
                                   f"the token of a posted receive to rank {src}"))
        return tensors, works

    def _create(self, stream, waiter: str) -> None:
        """Under lazy creation, the first use of `stream`'s data group on this rank: wait
        until the other member makes its own."""
        if not self.lazy or stream in self.created:
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
                    f"{self.timeout.total_seconds():g} s (communicators lazy: NCCL creates a communicator at "
                    f"its first use, and that use waits for every member's). Likely cause: rank {peer} waits for "
                    f"something this rank has yet to send, a deadlock (set communicators eager), or it "
                    f"stopped; its own log says which.") from error
        self.created.add(stream)


class EmulatedMean(GradientMean):
    """`GradientMean` over a gloo group whose first all-reduce, under lazy creation, waits
    until every member reaches its own."""

    def __init__(self, *args, lazy: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.created = not lazy

    def start(self, grads):
        if not self.created:
            work = dist.all_reduce(torch.zeros(1), group=self.group, async_op=True)
            try:
                work.wait(self.timeout)
            except Exception as error:
                raise CommError(f"rank {self.rank}: its first data-parallel all-reduce waited for ranks "
                                f"{self.ranks} to make theirs, which did not come within "
                                f"{self.timeout.total_seconds():g} s (communicators lazy). Likely cause: one of "
                                f"those ranks is stuck or stopped; its own log says why.") from error
            self.created = True
        return super().start(grads)
