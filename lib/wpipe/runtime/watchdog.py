"""Deadlines for work the host does not wait for.

On a GPU, waiting for a message or an all-reduce with a timeout blocks the host until the
device has done everything before it; waiting without one makes the compute stream wait
instead, and the host goes on launching kernels. Such a wait can no longer time out by
itself, so it is `watch`ed: the engine `check`s before every op, without blocking, that no
watched work is past its deadline, and otherwise fails naming the rank, the op and what
it waited for. (The process group's own timeout, NCCL's watchdog, ends a wait that the
host never comes back to check.)
"""
from __future__ import annotations

import time

from ..errors import CommError


class Watchdog:
    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.timeout_s = rank, timeout_s
        self.watched: list[tuple[object, float, str]] = []   # (work, deadline, what and who waits)

    def watch(self, work, what: str) -> None:
        """`work` (a torch.distributed Work the stream waits for) must complete within the
        timeout; `what` names the op and the message or collective, for the error."""
        self.watched.append((work, time.monotonic() + self.timeout_s, what))

    def check(self) -> None:
        """Forget completed work; raise CommError for work past its deadline."""
        now = time.monotonic()
        pending = []
        for work, deadline, what in self.watched:
            if work.is_completed():
                continue
            if now > deadline:
                raise CommError(f"rank {self.rank}, {what}: not complete after {self.timeout_s:g} s. Likely "
                                f"cause: the peer stopped (crashed, was killed, or is stuck in an earlier op); its "
                                f"own log says why. If it is only slow, raise timeout_s.")
            pending.append((work, deadline, what))
        self.watched = pending
