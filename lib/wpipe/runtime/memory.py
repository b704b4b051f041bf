"""Bytes the runtime counts (docs/design.md §8.3), by one rule shared by the engine, planning/measure.py (the cost
model's blocks) and tool/bench.py, so that predictions and runs count the same thing.

* **Saved activations** (`count_saved`): every storage autograd saves during a forward,
  each storage once, in the dtype it is stored in (so autocast's fp16/bf16 copies count at
  their size), the weights' storages excluded, and in a partition the storages of its
  inputs too (they are counted once, as inputs).
* **A stash entry** (`Stash`): what one forward leaves for its backward: the partition's
  inputs plus the other saved bytes (none with recomputation). `Stash` holds the entries
  and the most bytes held at once (`peak`), a recomputation's working set included.
* **The process peak** (`process_peak`): CUDA max allocated on a GPU, else the CPU max
  resident set.
"""
from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def nbytes(tensors: Iterable) -> int:
    """Bytes of the tensors among `tensors` (other items count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def count_saved(saved: dict[int, int], exclude: Iterable):
    """Context manager: while it is open, record in `saved` (storage pointer -> bytes) each
    storage autograd saves for the backward, except the storages of the tensors among
    `exclude` (the weights; a partition's inputs, counted apart)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if torch.is_tensor(t)}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


@dataclass
class Stashed:
    """What a forward leaves for its backward."""
    inputs: tuple
    outputs: tuple | None      # None with recomputation
    loss: torch.Tensor | None  # on the last partition, without recomputation
    version: int               # the weights version the forward ran on
    rng: tuple | None          # RNG state at the forward, to recompute it exactly
    nbytes: int


class Stash:
    """Entries by (partition, micro-batch), and the bytes they hold: now and at most."""

    def __init__(self):
        self.entries: dict[tuple[int, int], Stashed] = {}
        self.bytes = 0
        self.peak = 0

    def put(self, key: tuple[int, int], entry: Stashed) -> None:
        self.entries[key] = entry
        self.bytes += entry.nbytes
        self.peak = max(self.peak, self.bytes)

    def take(self, key: tuple[int, int]) -> Stashed:
        """The entry, still counted until `release` (its backward holds it meanwhile)."""
        return self.entries.pop(key)

    def release(self, entry: Stashed) -> None:
        self.bytes -= entry.nbytes

    def working_set(self, extra: int) -> None:
        """Count `extra` bytes held on top of the stash for a moment (a recomputation)."""
        self.peak = max(self.peak, self.bytes + extra)


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    return sum(nbytes(state.values()) for optimizer in optimizers for state in optimizer.state.values())


def process_peak(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): the process's measured peak on `device`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"
