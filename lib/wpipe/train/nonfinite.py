"""Non-finite losses and gradients: stop the run naming where, or skip that update.

The guard wraps the loss function the runner hands the Pipeline (to remember each
micro-batch's loss), and the Pipeline asks it (`check`, its `on_nonfinite`) about every
update whose gradients are not finite: the engine checks each update's gradients once,
with one host sync (runtime/updates.py). A NaN or Inf loss makes every gradient of its
period non-finite on every partition it flows back through (both wpipe groups, and every
replica after the all-reduce), so each partition sees the same period as bad:

* `stop` (default): the first update that meets non-finite gradients raises
  NonFiniteError naming the update, the partition, a parameter, and the micro-batches
  whose loss was not finite (on the rank that computes the loss);
* `skip`: the optimizer step of that update is left out (the weights stay, the optimizer
  state does not advance; the LR schedule does, as with a skipped AMP step). After every
  chunk the runner checks that every partition skipped the same updates (`consistent`),
  and stops when one did not (gradients that overflowed inside one partition while the
  loss stayed finite).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist

from ..errors import NonFiniteError

MODES = ("stop", "skip")
log = logging.getLogger("wpipe")


class NonFiniteStop(SystemExit):
    """Raised (exit status 3) once a non-finite loss or gradient stopped the run."""


class Guard:
    def __init__(self, mode: str, period: int):
        self.mode, self.period = mode, period
        self.losses: list[torch.Tensor] = []   # this chunk's losses, in micro-batch order
        self.first_update = 0                  # the chunk's first update of the run
        self.skipped: dict[int, list[int]] = {}  # partition -> updates skipped (0-based)
        self.recompute = False

    def loss_fn(self, loss_fn):
        def checked(output, target):
            loss = loss_fn(output, target)
            self.losses.append(loss.detach())
            return loss
        return checked

    def attach(self, pipe, recompute: bool) -> None:
        """Learn this rank's partitions (after the Pipeline is built)."""
        self.recompute = recompute
        for p in pipe.versions:
            self.skipped.setdefault(p, [])

    @contextlib.contextmanager
    def chunk(self, first_update: int):
        """Around one Pipeline.train call whose first update is `first_update` (of the run,
        from 0): a NonFiniteError raised in it (the engine wraps it) is logged on this rank
        and becomes NonFiniteStop; in skip mode, every rank's skips are compared after it
        (a collective) and rank 0 logs the new ones."""
        self.losses, self.first_update = [], first_update
        try:
            yield
            if self.mode == "skip":
                self._check_ranks()
        except RuntimeError as error:
            if not isinstance(error.__cause__, NonFiniteError):
                raise
            log.error("stopped: %s", str(error).splitlines()[0])
            raise NonFiniteStop(3) from None
        except NonFiniteError as error:
            log.error("stopped: %s", error)
            raise NonFiniteStop(3) from None

    def _check_ranks(self) -> None:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.skipped)
        self.consistent(gathered)
        new = sorted({u for updates in self.skipped.values() for u in updates if u >= self.first_update})
        if new and dist.get_rank() == 0:
            log.warning("skipped update(s) %s: non-finite loss or gradients (on_nonfinite skip)",
                        ", ".join(str(u + 1) for u in new))

    def check(self, partition: int, versions, grads: list[torch.Tensor]) -> bool:
        """The Pipeline's `on_nonfinite`: update `versions.newest` of `partition` met the
        non-finite `grads` (aligned with its named parameters). skip: record it and return
        False (the step is left out); stop: raise NonFiniteError naming where."""
        update = versions.newest
        if self.mode == "skip":
            self.skipped[partition].append(update)
            return False
        bad = next(name for (name, _), g in zip(versions.module.named_parameters(), grads)
                   if not g.isfinite().all())
        raise NonFiniteError(f"non-finite gradient at update {update + 1} of the run in partition {partition} "
                             f"(parameter {bad}){self._bad_losses(update)}; the last complete checkpoint is "
                             f"kept: resume from it with a lower lr, or set on_nonfinite skip")

    def _bad_losses(self, update: int) -> str:
        if not self.losses or self.recompute:  # with recompute, losses are computed twice: no order to read
            return ""
        start = (update - self.first_update) * self.period
        values = [float(v) for v in self.losses[start:start + self.period]]
        bad = [f"micro-batch {i} ({v})" for i, v in enumerate(values) if not math.isfinite(v)]
        if not bad:
            return "; every loss of that update was finite"
        return "; non-finite loss at " + ", ".join(bad) + " of that update"

    def consistent(self, gathered: list[dict]) -> None:
        """`gathered`: every rank's `skipped`. Raise NonFiniteError unless every partition
        skipped the same updates."""
        sets = {p: tuple(updates) for skipped in gathered for p, updates in skipped.items()}
        if len(set(sets.values())) > 1:
            detail = ", ".join(f"partition {p}: {list(u) or 'none'}" for p, u in sorted(sets.items()))
            raise NonFiniteError(f"partitions skipped different updates ({detail}): gradients became "
                                 f"non-finite inside a partition while the loss stayed finite; lower the lr")
