"""WPipe against PipeDream-2BW: where one method's best configuration beats the other's, and why.

`decompose(workload, wpipe_best, twobw_best)` splits the ratio of their predicted speeds
(best WPipe over best 2BW, each fitting the same memory budget) into factors along a path
of configurations from 2BW's best to WPipe's best, each step changing one thing:

    C0  2BW's best configuration, run by 2BW
    C1  the same configuration run by WPipe               schedule (at equal configuration)
    C2  C1 with WPipe's recomputation setting             recompute
    C3  C2 with WPipe's micro-batch size                  micro-batch efficiency x per-update amortisation
    C4  C3 with WPipe's N x D, rank layout and split      layout (= WPipe's best)

Each factor is the ratio of the speeds at the ends of its step, so the factors multiply to
the ratio exactly (up to float rounding). The micro-batch step is split in two: its
efficiency part is the speed ratio with optimizer steps and all-reduces made free (what a
larger micro-batch gains in the ops themselves: fixed costs and the efficiency curve); its
amortisation part is the rest (the same per-update costs spread over N x b samples).
Intermediate configurations need not fit the budget: the factors account for the
predicted speeds, they are not runs anyone could make.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import schedule
from .evaluate import Configuration, Workload, evaluate

FACTORS = ("schedule", "recompute", "micro-batch efficiency", "per-update amortisation", "layout")


@dataclass
class Decomposition:
    ratio: float                        # WPipe's best speed / 2BW's best speed
    factors: dict[str, float]           # FACTORS -> factor; their product is `ratio`
    path: list[tuple[Configuration, float]]   # C0..C4 with their samples/s

    @property
    def carrier(self) -> str:
        """The factor farthest from 1 (in log terms): what carries the ratio."""
        return max(self.factors, key=lambda k: abs(math.log(self.factors[k])))


def decompose(workload: Workload, wpipe: Configuration, twobw: Configuration) -> Decomposition | None:
    """The module docstring's factors of speed(wpipe) / speed(twobw), or None where WPipe
    cannot run 2BW's layout (2N partitions need 2N blocks)."""
    if wpipe.method != "wpipe" or twobw.method != "pipedream_2bw":
        raise ValueError(f"decompose compares wpipe with pipedream_2bw, got {wpipe.method} and {twobw.method}")
    if schedule.num_partitions("wpipe", twobw.pipeline_depth) > len(workload.blocks):
        return None
    c1 = dataclasses.replace(twobw, method="wpipe")
    c2 = dataclasses.replace(c1, recompute=wpipe.recompute)
    c3 = dataclasses.replace(c2, micro_batch_size=wpipe.micro_batch_size)
    path = [(c, evaluate(workload, c).samples_per_second) for c in (twobw, c1, c2, c3, wpipe)]
    speeds = [s for _, s in path]
    efficiency = 1.0
    if c3 != c2:
        without_updates = [evaluate(workload, c, per_update=False).samples_per_second for c in (c2, c3)]
        efficiency = without_updates[1] / without_updates[0]
    micro_batch = speeds[3] / speeds[2]
    factors = {"schedule": speeds[1] / speeds[0], "recompute": speeds[2] / speeds[1],
               "micro-batch efficiency": efficiency, "per-update amortisation": micro_batch / efficiency,
               "layout": speeds[4] / speeds[3]}
    return Decomposition(speeds[4] / speeds[0], factors, path)
