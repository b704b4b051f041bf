"""The one accounting rule (runtime/memory.py): saved storages counted once each, weights'
storages apart, and a partition's inputs counted once, as inputs (docs/design.md §8.3)."""
import torch
from torch import nn

from wpipe.runtime import memory


def test_a_saved_input_counts_once_and_weights_never():
    linear = nn.Linear(1000, 10)
    x = torch.randn(4, 1000, requires_grad=True)           # 16000 bytes, saved by linear for its weight's gradient
    saved = {}
    with memory.count_saved(saved, linear.parameters()):
        linear(torch.tanh(x))                              # tanh saves its output: the same storage linear saves
    assert sum(saved.values()) == 16000
    saved = {}
    with memory.count_saved(saved, [*linear.parameters(), x]):
        linear(x)
    assert saved == {}                                      # a partition stashes x as its input, once


def test_stash_holds_entries_and_its_peak():
    stash = memory.Stash()
    first = memory.Stashed((), None, None, 0, None, 100)
    stash.put((0, 0), first)
    stash.put((0, 1), memory.Stashed((), None, None, 0, None, 50))
    stash.release(stash.take((0, 0)))
    stash.working_set(80)                                   # a recomputation on top of what is left
    assert (stash.bytes, stash.peak) == (50, 150)
    stash.working_set(200)
    assert stash.peak == 250
