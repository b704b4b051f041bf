"""Seconds of each block's forward, backward and update: where the cost model's time comes from.

Three sources, one interface (`OpTimes.block_seconds(block, b)` -> (forward, backward,
update) seconds of one block at micro-batch size b):

* `FittedTimes`: a curve fitted to measured points, per model family and precision, read
  from a profile file (network_conf/profiles/*.yaml: a published table with its source, or
  what tool/profile_device.py measured on a named GPU). A curve holds the throughput of a
  whole network of `network_blocks` blocks doing `network_forward_flop` FLOPs per sample
  at several batch sizes; its seconds per batch are fitted as

      t(b) = max(floor, fixed + b x per_sample)          (`fit`)

  and carried over to one block of a model of that family as

      forward(b) = max(floor / n, fixed / n + F(b) x per_sample / network_forward_flop)

  with n = network_blocks and F(b) the block's forward FLOPs at b (blockcost, counted as
  the curve's network was): each block pays an equal share of the network's fixed cost
  and floor, and its FLOPs at the network's marginal rate. A curve measured forward only
  (inference, `pass: forward`) becomes training time by the rule
  backward(b) = BACKWARD_PER_FORWARD x forward(b) (an assumption: a backward does twice
  a forward's FLOPs, as the FLOP counts here show for transformer layers and
  convolutions, and the PipeDream-2BW paper's recompute cost of 4/3 = (1 + 2 + 1) / (1 + 2)
  implies); a profile that timed backwards (`pass: backward`) is used as measured.
* `FlopTimes`: the FLOP model, the fallback where no curve applies: FLOPs at the preset's
  efficiency of its peak at the precision, plus a fixed cost per kernel launch.
* `MeasuredTimes`: seconds measured per block in this process (CPU validation), at the
  micro-batch sizes measured only.

Every source times an optimizer step alike (except MeasuredTimes, which measured it): it
streams parameters, gradients and optimizer state through device memory, read and written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .blockcost import BlockCost

BACKWARD_PER_FORWARD = 2.0
FAMILIES = {"bert": ("hidden", "seq"), "resnext": ("image_size",)}
"""Model families a curve can describe, with the shape fields that pick the nearest curve."""
PASSES = ("forward", "backward")


@dataclass(frozen=True)
class Fit:
    """t(b) = max(floor, fixed + b x per_sample), seconds per batch of the whole network."""
    floor: float
    fixed: float
    per_sample: float

    def __call__(self, b: float) -> float:
        return max(self.floor, self.fixed + b * self.per_sample)


@dataclass(frozen=True)
class Curve:
    """Measured throughput of one network at several batch sizes (module docstring)."""
    family: str
    shape: dict
    precision: str
    pass_: str
    network: str
    network_blocks: int
    network_forward_flop: float
    points: dict[int, float]          # batch size -> samples/s
    source: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        shape = ", ".join(f"{k} {v}" for k, v in self.shape.items())
        return f"{self.network} ({shape}), {self.precision}, {self.pass_}"

    def seconds(self) -> dict[int, float]:
        """Seconds per batch at each measured batch size."""
        return {b: b / rate for b, rate in self.points.items()}

    def fit(self) -> Fit:
        return fit(self.seconds())


def fit(seconds: dict[int, float]) -> Fit:
    """The t(b) = max(floor, fixed + b x per_sample) closest to `seconds` (batch size ->
    seconds) in relative error: for k = 0 and each k >= 2, the k smallest batch sizes on
    the floor (the mean of their seconds) and a line through the others (least squares in
    relative error, fixed >= 0), keeping the k with the least squared relative error over
    all points. A floor needs two points of its own and two left for the line: a flat
    stretch is seen, not guessed from one point (which would fit any three points exactly)."""
    points = sorted(seconds.items())
    if len(points) < 2 or any(t <= 0 or b <= 0 for b, t in points):
        raise ValueError(f"a fit needs at least two batch sizes with seconds > 0, got {dict(points)}")
    best = None
    for k in [0, *range(2, len(points) - 1)]:
        floor = sum(t for _, t in points[:k]) / k if k else 0.0
        fixed, per_sample = _line(points[k:])
        candidate = Fit(floor, fixed, per_sample)
        error = sum(((candidate(b) - t) / t) ** 2 for b, t in points)
        if best is None or error < best[0] - 1e-15:
            best = (error, candidate)
    return best[1]


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed >= 0, per_sample > 0) of t = fixed + b x per_sample, weighted least squares
    with weights 1 / t^2 (relative errors)."""
    w = [1 / t ** 2 for _, t in points]
    sw = sum(w)
    sb = sum(wi * b for wi, (b, _) in zip(w, points))
    st = sum(wi * t for wi, (_, t) in zip(w, points))
    sbb = sum(wi * b * b for wi, (b, _) in zip(w, points))
    sbt = sum(wi * b * t for wi, (b, t) in zip(w, points))
    det = sw * sbb - sb * sb
    if det > 0:
        fixed = (sbb * st - sb * sbt) / det
        per_sample = (sw * sbt - sb * st) / det
        if fixed >= 0 and per_sample > 0:
            return fixed, per_sample
    return 0.0, sbt / sbb


def leave_one_out(curve: Curve) -> list[tuple[int, float, float]]:
    """For each measured batch size: (b, samples/s measured, samples/s predicted by the fit
    to the other points). Points whose removal leaves fewer than two are skipped."""
    seconds = curve.seconds()
    out = []
    for b, rate in sorted(curve.points.items()):
        others = {x: t for x, t in seconds.items() if x != b}
        if len(others) >= 2:
            out.append((b, rate, b / fit(others)(b)))
    return out


@dataclass(frozen=True)
class Profile:
    """The curves of one profile file, with what the file says about their device."""
    path: str
    device: str
    curves: list[Curve]
    checks: list[dict]

    def curve(self, family: str, precision: str, shape: dict, pass_: str = "forward") -> Curve | None:
        """The curve of `family`, `precision` and `pass_` nearest to `shape` (the sum of
        |log(value / curve's value)| over the family's shape fields), or None."""
        fitting = [c for c in self.curves if (c.family, c.precision, c.pass_) == (family, precision, pass_)]
        if not fitting:
            return None
        return min(fitting, key=lambda c: sum(abs(math.log(shape[k] / c.shape[k])) for k in FAMILIES[family]))


def load_profile(path: str | Path) -> Profile:
    """Read a profile YAML (network_conf/profiles/README.md says its form); errors name the
    file and the field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("device"), str) or not isinstance(raw.get("curves"), list):
        raise ValueError(f"{path}: expected a mapping with 'device' (a string) and 'curves' (a list)")
    curves = [_curve(path, i, c) for i, c in enumerate(raw["curves"])]
    checks = raw.get("training_checks") or []
    if not isinstance(checks, list):
        raise ValueError(f"{path}: 'training_checks' must be a list")
    return Profile(str(path), raw["device"], curves, checks)


def _curve(path: Path, i: int, raw) -> Curve:
    where = f"{path}: curves[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping")
    need = ("family", "shape", "precision", "pass", "network", "network_blocks", "network_forward_flop",
            "points", "source")
    missing = [k for k in need if k not in raw]
    if missing:
        raise ValueError(f"{where}: field {missing[0]!r} is missing")
    family = raw["family"]
    if family not in FAMILIES:
        raise ValueError(f"{where}: field 'family' must be one of {', '.join(FAMILIES)}, got {family!r}")
    shape = raw["shape"]
    if not isinstance(shape, dict) or set(shape) != set(FAMILIES[family]) \
            or not all(isinstance(v, (int, float)) and v > 0 for v in shape.values()):
        raise ValueError(f"{where}: field 'shape' must give {', '.join(FAMILIES[family])} (numbers > 0), got {shape!r}")
    if raw["pass"] not in PASSES:
        raise ValueError(f"{where}: field 'pass' must be one of {', '.join(PASSES)}, got {raw['pass']!r}")
    for key in ("network_blocks", "network_forward_flop"):
        if not isinstance(raw[key], (int, float)) or isinstance(raw[key], bool) or raw[key] <= 0:
            raise ValueError(f"{where}: field {key!r} must be a number > 0, got {raw[key]!r}")
    points = raw["points"]
    if (not isinstance(points, dict) or len(points) < 2
            or not all(isinstance(b, int) and b > 0 and isinstance(r, (int, float)) and r > 0
                       for b, r in points.items())):
        raise ValueError(f"{where}: field 'points' must map at least two batch sizes to samples/s > 0")
    if not isinstance(raw["source"], dict) or not raw["source"]:
        raise ValueError(f"{where}: field 'source' must say where the points come from")
    return Curve(family, dict(shape), str(raw["precision"]), raw["pass"], str(raw["network"]),
                 int(raw["network_blocks"]), float(raw["network_forward_flop"]),
                 {int(b): float(r) for b, r in points.items()}, dict(raw["source"]))


class OpTimes(Protocol):
    description: str
    """Where the times come from, in words (printed beside every prediction)."""

    def block_seconds(self, block: BlockCost, b: int) -> tuple[float, float, float]:
        """(forward, backward, update) seconds of one block at micro-batch size b."""


def update_seconds(block: BlockCost, memory_bandwidth_gbs: float) -> float:
    """An optimizer step: parameters, gradients and optimizer state read and written once."""
    return 2 * (2 * block.param_bytes + block.optimizer_bytes) / (memory_bandwidth_gbs * 1e9)


class FlopTimes:
    """The FLOP model (module docstring)."""

    def __init__(self, hw, precision: str):
        self.hw = hw
        self.rate = hw.flops_per_s(precision)
        self.description = (f"FLOP model: FLOP counts at {self.rate / 1e12:.3g} TFLOP/s "
                            f"({hw.efficiency[precision]:.0%} of {hw.peak_tflops[precision]:g}, {precision}) "
                            f"+ {hw.kernel_overhead_us:g} us per kernel launch")

    def block_seconds(self, block: BlockCost, b: int) -> tuple[float, float, float]:
        kernel = self.hw.kernel_overhead_us * 1e-6
        return (block.forward_flops(b) / self.rate + block.forward_kernels * kernel,
                block.backward_flops(b) / self.rate + block.backward_kernels * kernel,
                update_seconds(block, self.hw.memory_bandwidth_gbs))


class FittedTimes:
    """Times from a fitted forward curve and, if measured, a backward one (module docstring)."""

    def __init__(self, hw, forward: Curve, backward: Curve | None = None):
        self.hw = hw
        self.curves = (forward, backward)
        self.fits = (forward.fit(), backward.fit() if backward else None)
        self.description = (f"fitted to {forward.label} [{_cite(forward.source)}]"
                            + (f" and {backward.label}" if backward else
                               f"; backward = {BACKWARD_PER_FORWARD:g} x forward (assumed)"))

    def block_seconds(self, block: BlockCost, b: int) -> tuple[float, float, float]:
        forward = _per_block(self.curves[0], self.fits[0], block.forward_flops(b))
        backward = (_per_block(self.curves[1], self.fits[1], block.forward_flops(b)) if self.fits[1]
                    else BACKWARD_PER_FORWARD * forward)
        return forward, backward, update_seconds(block, self.hw.memory_bandwidth_gbs)


def _per_block(curve: Curve, f: Fit, flops: float) -> float:
    n = curve.network_blocks
    return max(f.floor / n, f.fixed / n + flops * f.per_sample / curve.network_forward_flop)


def _cite(source: dict) -> str:
    return ", ".join(str(source[k]) for k in ("repository", "file", "commit", "url") if k in source)


class MeasuredTimes:
    """Seconds measured per block in this process (blockcost.BlockCost.seconds)."""
    description = "seconds measured per block in this process"

    def __init__(self, hw):
        self.hw = hw

    def block_seconds(self, block: BlockCost, b: int) -> tuple[float, float, float]:
        if b not in block.seconds:
            raise ValueError(f"hardware {self.hw.label}: op_times measured, but block {block.name} has no "
                             f"seconds measured at micro-batch size {b} (measured: "
                             f"{sorted(block.seconds) or 'none'})")
        s = block.seconds[b]
        return s["forward"], s["backward"], s["update"]


def op_times(hw, precision: str, shape: dict | None):
    """The op-time source of hardware `hw` for a model of `shape` (`model_shape`) at
    `precision`: its profile's nearest curve when op_times is fitted and one applies, else
    the FLOP model (fitted presets name the reason in the description), or measured
    seconds. Raises ValueError when the preset cannot train at that precision."""
    if precision not in hw.peak_tflops:
        raise ValueError(f"hardware {hw.label}: precision {precision} is not among its peak_tflops "
                         f"({', '.join(hw.peak_tflops)})")
    if hw.op_times == "measured":
        return MeasuredTimes(hw)
    if hw.op_times == "fitted":
        profile = load_profile(hw.profile_path)
        if shape is None:
            reason = "the model's family is not known"
        else:
            forward = profile.curve(shape["family"], precision, shape, "forward")
            if forward is not None:
                return FittedTimes(hw, forward, profile.curve(shape["family"], precision, shape, "backward"))
            reason = f"no {precision} {shape['family']} curve in {hw.profile}"
        times = FlopTimes(hw, precision)
        times.description += f" (fallback: {reason})"
        return times
    return FlopTimes(hw, precision)


def model_shape(description: str) -> dict | None:
    """Family and shape of a model from its description (the entry points' model_blocks:
    `bert_L<layers>_h<hidden>_..._s<seq>_...`, `resnext..._px<size>`), or None."""
    import re

    bert = re.match(r"bert_L\d+_h(\d+)_.*_s(\d+)_", description)
    if bert:
        return {"family": "bert", "hidden": int(bert.group(1)), "seq": int(bert.group(2))}
    resnext = re.match(r"resnext.*_px(\d+)$", description)
    if resnext:
        return {"family": "resnext", "image_size": int(resnext.group(1))}
    return None
