"""Mixed precision: autocast around partitions, the fp16 loss scaler, reduced-precision wire.

One `Policy` per run (`Policy.from_config`), used the same way by the engine (engine.py,
transport.py) and by the oracle (reference.py), so that both compute the same numbers:

* **precision** fp32 | bf16 | fp16: `autocast()` wraps every partition's forward (and its
  recompute) in torch.autocast on the run's device. Weights, gradients and optimizer state
  keep their own dtype (fp32 master weights); `loss_input` casts fp16/bf16 outputs to fp32
  before the loss. float64 tensors are never autocast (torch's rule).
* **wire_dtype** null | fp16 | bf16: point-to-point messages travel cast (`Wire`, whose
  rule wire.py states).

The fp16 loss scaler (`LossScaler`; `Agreement` runs it across ranks). Partitions with the
same staleness form a *scaler group*: "stale" (wpipe's G0, every pipedream_2bw stage) and
"synchronous" (wpipe's G1, every stage of the synchronous methods). Periods t = 0, 1, ...
count over the whole run. The exact rule (docs/design.md §7):

1. Period t has one scale S_t. Every micro-batch of period t back-propagates
   loss x S_t / m from the last partition, and every partition multiplies period t's
   gradients by 1 / S_t at its update t (after the data-parallel average).
2. overflow(g, t): some gradient of some partition of group g at period t, on any rank of
   any replica, is not finite (an all-reduce MAX over every rank, one per group and
   period, agreed before any rank applies or skips the update). Then update t of every
   partition of g is skipped on every rank: weights and optimizer state stay, the weights
   version count and the LR schedule advance (as with a skipped torch AMP step). The other
   group's update t is applied or skipped on its own verdict.
3. S_0 = loss_scale_init. S_{t+1} follows from S_t and the verdicts overflow(g, t - lag_g)
   with t - lag_g >= 0, where lag is 0 for the synchronous group and 1 for the stale one:
   a stale group's period-t backwards end after the last partition has started period
   t+1's (wpipe's G0 backward follows G1's), so its verdict moves the scale one period
   later. For wpipe, S_{t+1} sees G1's period t and G0's period t-1. If any of those
   verdicts is an overflow, S_{t+1} = S_t / 2 and the count of clean periods restarts at
   0; else the count grows by one and, when it reaches loss_scale_growth_interval,
   S_{t+1} = 2 S_t and the count restarts at 0.

bf16 and fp32 need no scaler (`Policy.make_scaler` returns None).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import CommError
from ..schedule import get_method
from .wire import REDUCED, Wire


@dataclass(frozen=True)
class Policy:
    precision: str = "fp32"
    wire_dtype: str | None = None
    device_type: str = "cpu"
    loss_scale_init: float = 2.0 ** 16
    loss_scale_growth_interval: int = 2000

    @classmethod
    def from_config(cls, cfg, device_type: str) -> Policy:
        return cls(cfg.precision, cfg.wire_dtype, device_type, cfg.loss_scale_init, cfg.loss_scale_growth_interval)

    def check_device(self) -> None:
        """Raise ValueError when this device cannot autocast to the precision."""
        if self.precision == "fp32":
            return
        if not torch.amp.autocast_mode.is_autocast_available(self.device_type):
            raise ValueError(f"precision {self.precision}: torch cannot autocast on {self.device_type}; use fp32")
        if self.device_type == "cuda" and self.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision bf16: this GPU does not support bfloat16; use fp16 (with its loss scaler)")

    def autocast(self):
        """The context every partition's forward runs in."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=REDUCED[self.precision])

    @staticmethod
    def loss_input(output):
        """The last partition's output as the loss sees it: fp16/bf16 tensors in fp32."""
        if isinstance(output, tuple):
            return tuple(Policy.loss_input(x) for x in output)
        if torch.is_tensor(output) and output.dtype in (torch.float16, torch.bfloat16):
            return output.float()
        return output

    @property
    def wire(self) -> Wire:
        return Wire(self.wire_dtype)

    def make_scaler(self, method: str, depth: int) -> LossScaler | None:
        """The fp16 loss scaler of `method` at `depth` (None unless precision is fp16)."""
        if self.precision != "fp16":
            return None
        return LossScaler(self.loss_scale_init, self.loss_scale_growth_interval, scaler_groups(method, depth))


def scaler_groups(method: str, depth: int) -> dict[str, int]:
    """{group: lag} of the groups `method` has ("stale" lags 1 period, "synchronous" 0)."""
    spec = get_method(method)
    return {group_of(spec.stale(p, depth)): int(spec.stale(p, depth))
            for p in range(spec.num_partitions(depth))}


def group_of(stale: bool) -> str:
    return "stale" if stale else "synchronous"


# ------------------------------------------------------------------ the fp16 loss scaler

class LossScaler:
    """The scale of every period from the overflow verdicts (rule 3 of the module
    docstring). Pure bookkeeping: the engine feeds it agreed verdicts (`Agreement`), the
    oracle its own."""

    def __init__(self, init: float, growth_interval: int, lags: dict[str, int]):
        self.init, self.growth_interval, self.lags = float(init), growth_interval, dict(lags)
        self.scales = [self.init]              # S_0, S_1, ... computed so far
        self.clean = 0                         # clean periods counted after scales[-1]
        self.overflows: dict[tuple[str, int], bool] = {}

    def record(self, group: str, t: int, overflow: bool) -> None:
        self.overflows[(group, t)] = bool(overflow)

    def missing(self, t: int) -> list[tuple[str, int]]:
        """The verdicts still unknown that S_t depends on."""
        return [(g, u - lag) for u in range(len(self.scales) - 1, t) for g, lag in sorted(self.lags.items())
                if u - lag >= 0 and (g, u - lag) not in self.overflows]

    def scale(self, t: int) -> float:
        """S_t; every verdict it depends on must be recorded (`missing(t)` empty)."""
        while len(self.scales) <= t:
            u = len(self.scales) - 1
            verdicts = [self.overflows[(g, u - lag)] for g, lag in sorted(self.lags.items()) if u - lag >= 0]
            scale = self.scales[-1]
            if any(verdicts):
                scale, self.clean = scale / 2, 0
            else:
                self.clean += 1
                if self.clean == self.growth_interval:
                    scale, self.clean = scale * 2, 0
            self.scales.append(scale)
        return self.scales[t]

    def changes(self, periods: int) -> list[list]:
        """[period, scale] for period 0 and every period whose scale differs from the one
        before, over the first `periods` periods (their verdicts must be recorded)."""
        scales = [self.scale(t) for t in range(periods)]
        return [[t, s] for t, s in enumerate(scales) if t == 0 or s != scales[t - 1]]

    def skipped(self) -> dict[str, list[int]]:
        """Per group, the periods whose update was skipped (overflow), in order."""
        return {g: sorted(t for (h, t), bad in self.overflows.items() if h == g and bad) for g in sorted(self.lags)}

    def state_dict(self) -> dict:
        return {"scales": list(self.scales), "clean": self.clean,
                "overflows": [[g, t, bad] for (g, t), bad in sorted(self.overflows.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.scales, self.clean = list(state["scales"]), state["clean"]
        self.overflows = {(g, t): bad for g, t, bad in state["overflows"]}


def overflowed(grads) -> bool:
    """Whether any of `grads` holds an inf or a NaN."""
    grads = [g for g in grads if g is not None]
    return bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())


class Agreement:
    """A LossScaler shared by every rank: each verdict overflow(g, t) is the MAX of every
    rank's local one, by an all-reduce on a gloo group of its own per scaler group (each
    rank holds one partition of every group, so every rank takes part). `start` at the
    update's place in the order; the verdict is awaited only when needed: before the
    update is applied or skipped, or when a scale depends on it. Create on every rank in
    the same order (it makes process groups)."""

    def __init__(self, scaler: LossScaler, rank: int, timeout_s: float):
        self.scaler, self.rank, self.timeout = scaler, rank, timedelta(seconds=timeout_s)
        ranks = list(range(dist.get_world_size()))
        self.groups = {g: dist.new_group(ranks, backend="gloo") for g in sorted(scaler.lags)}
        self.pending: dict[tuple[str, int], tuple] = {}

    def start(self, group: str, t: int, grads) -> None:
        flag = torch.tensor([int(overflowed(grads))])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.groups[group], async_op=True)
        self.pending[(group, t)] = (work, flag)

    def ready(self, group: str, t: int) -> bool:
        """Whether the verdict is known without waiting."""
        entry = self.pending.get((group, t))
        return entry is None or entry[0].is_completed()

    def overflow(self, group: str, t: int) -> bool:
        self._settle((group, t))
        return self.scaler.overflows[(group, t)]

    def scale(self, t: int) -> float:
        for key in self.scaler.missing(t):
            self._settle(key)
        return self.scaler.scale(t)

    def _settle(self, key) -> None:
        if key in self.scaler.overflows:
            return
        if key not in self.pending:
            raise RuntimeError(f"rank {self.rank}: the fp16 overflow verdict of the {key[0]} group at "
                               f"period {key[1]} is needed before this rank's update of it started")
        work, flag = self.pending.pop(key)
        try:
            work.wait(self.timeout)
        except Exception as error:
            raise CommError(f"rank {self.rank}: waited for every rank's fp16 overflow verdict of the "
                            f"{key[0]} group at period {key[1]} and it did not come within "
                            f"{self.timeout.total_seconds():g} s. Likely cause: a rank stopped; its own "
                            f"log says why.") from error
        self.scaler.record(*key, bool(flag.item()))
