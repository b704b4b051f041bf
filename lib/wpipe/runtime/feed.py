"""The micro-batches of one call of Pipeline.train or evaluate, pulled lazily, in order.

Only the ranks that need them pull items: partition 0's rank for inputs, the last
partition's for targets. An item is dropped as soon as nothing needs it any more, so a
DataLoader is read as the pipeline goes and at most a few items are held at once.
"""
from __future__ import annotations

import torch


def count(micro_batches) -> int:
    """The number of micro-batches; the schedule is planned for a known number."""
    try:
        return len(micro_batches)
    except TypeError:
        raise TypeError("micro_batches must have a length (a list, or a DataLoader): the schedule "
                        "is planned for a known number of micro-batches") from None


def to_device(x, device: torch.device):
    """`x` (a tensor, or a tuple or list of them, or anything else) on `device`, copied
    without waiting (from pinned memory the host goes on at once: the loaders pin on CUDA)."""
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


class Feed:
    """Items (inputs, target) of `micro_batches` by index."""

    def __init__(self, micro_batches, device: torch.device):
        self.count = count(micro_batches)
        self.device = device
        self.source = iter(micro_batches)
        self.items: dict[int, tuple] = {}
        self.next = 0

    def inputs(self, mb: int, keep_target: bool) -> tuple:
        """Micro-batch `mb`'s inputs on the device, as a tuple; the item is dropped unless
        its target is still to be taken."""
        inputs = self._item(mb)[0]
        if not keep_target:
            del self.items[mb]
        return tuple(to_device(inputs if isinstance(inputs, (tuple, list)) else (inputs,), self.device))

    def target(self, mb: int, keep: bool = False):
        """Micro-batch `mb`'s target on the device; `keep` it for a later call (the
        recomputation takes it again), else drop the item."""
        target = self._item(mb)[1] if keep else self.take(mb)[1]
        return to_device(target, self.device)

    def take(self, mb: int) -> tuple:
        """The item itself, dropped."""
        self._item(mb)
        return self.items.pop(mb)

    def _item(self, mb: int) -> tuple:
        while self.next <= mb:
            try:
                self.items[self.next] = next(self.source)
            except StopIteration:
                raise ValueError(f"micro_batches yielded {self.next} items but its length "
                                 f"said {self.count}") from None
            self.next += 1
        return self.items[mb]
