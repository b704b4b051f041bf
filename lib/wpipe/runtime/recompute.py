"""Recomputation: run a partition's forward again, before its backward, exactly as the first time
(docs/design.md §6.5).

With `recompute`, a forward keeps only its inputs and the RNG state it started with
(`rng_state`); the backward first runs the forward again under `as_before`: the same RNG
state (dropout draws the same masks), and BatchNorm running statistics put back afterwards
(the first forward already updated them once). The weights version is the stashed one.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def rng_state(device: torch.device) -> tuple:
    """The CPU RNG state and, on a GPU, the device's."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def as_before(module: nn.Module, rng: tuple, device: torch.device):
    """Inside: the RNG state `rng` (the caller's own state is restored after); after: the
    module's buffers hold what they held before."""
    buffers = [(b, b.clone()) for b in module.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        yield
    for buffer, value in buffers:
        buffer.copy_(value)
