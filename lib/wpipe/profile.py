"""Measured cost of a model's blocks, to cut partitions balanced by time.

`block_seconds` times one forward and one backward of each block of a chain, in one
process, on the device the blocks live on. The entry points measure on rank 0 only and
hand every rank the same numbers (runner.setup), since timings differ from one process
to the next and every rank must cut the model the same way.
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn


def block_seconds(blocks: Sequence[nn.Module], inputs: tuple, repeats: int = 3) -> list[float]:
    """Median seconds, over `repeats` passes after an untimed one, of one forward and one
    backward (from gradients of ones) of each block; block i+1 takes block i's outputs.
    Floating-point inputs of a block are leaves that need gradients, as in a pipeline."""
    times: list[list[float]] = [[] for _ in blocks]
    for attempt in range(repeats + 1):
        x = inputs
        for i, block in enumerate(blocks):
            x = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in x)
            _synchronize(x)
            start = time.perf_counter()
            out = block(*x)
            outputs = out if isinstance(out, tuple) else (out,)
            roots = [o for o in outputs if o.requires_grad]
            torch.autograd.backward(roots, [torch.ones_like(o) for o in roots])
            _synchronize(outputs)
            if attempt:
                times[i].append(time.perf_counter() - start)
            x = tuple(o.detach() for o in outputs)
    for block in blocks:
        block.zero_grad(set_to_none=True)
    return [statistics.median(t) for t in times]


def _synchronize(tensors) -> None:
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()
