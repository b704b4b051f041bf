"""Preemption: SIGTERM or SIGINT asks the run to stop at the end of the current chunk of
training (torchrun forwards both to its workers). The handler only notes the signal; after
every chunk all ranks agree (one all-reduce), write a checkpoint and raise Preempted."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class Preempted(SystemExit):
    """Raised after the checkpoint that a signal asked for (exit status 128 + signal)."""


class Signals:
    """While entered, SIGTERM and SIGINT are noted instead of ending the process; a second
    one stops at once (KeyboardInterrupt), without a checkpoint."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _note(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signum

    def agreed(self, device) -> int:
        """The signal any rank received (0: none), on every rank: all stop after the same chunk.
        A collective: call on every rank at the same point."""
        flag = torch.tensor([int(self.received or 0)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
