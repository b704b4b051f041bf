"""A machine the cost model predicts for: `network_conf/hardware/*.yaml`.

Every field is required (no silent defaults: a preset states its assumptions); bad values
fail naming the file and the field. Ranks fill nodes in order: rank r is on node
r // ranks_per_node (torchrun's numbering), so which links a transfer or an all-reduce
crosses follows from the rank layout (wpipe.schedule.Topology). The precisions a preset
trains in are the keys of its `peak_tflops` (and `efficiency`): fp32, fp16, bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

OP_TIMES = ("flops", "fitted", "measured")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Link:
    bandwidth: float      # bytes/s
    latency: float        # s

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth if nbytes else 0.0


@dataclass(frozen=True)
class Hardware:
    name: str
    """What the preset stands for, in words (printed beside every prediction)."""
    gpu_memory_gib: float
    """Memory of one device (GiB)."""
    usable_memory_fraction: float
    """Share of it a run may fill with what the cost model counts (the rest: CUDA context,
    allocator fragmentation, kernel workspaces)."""
    ranks_per_node: int
    """Devices (ranks) per node."""
    intra_node_bandwidth_gbs: float
    """GB/s (1e9 bytes/s) of one transfer between two devices of a node."""
    intra_node_latency_us: float
    inter_node_bandwidth_gbs: float
    """GB/s of one transfer between devices of two nodes."""
    inter_node_latency_us: float
    peak_tflops: dict
    """Peak TFLOP/s of one device per precision it trains in ({fp32: .., fp16: ..})."""
    efficiency: dict
    """Per precision, the share of the peak the model's kernels reach (FLOP model)."""
    kernel_overhead_us: float
    """Time added per kernel launch (FLOP model)."""
    memory_bandwidth_gbs: float
    """Device memory GB/s (the optimizer step is bound by it)."""
    op_overhead_us: float
    """The engine's own time per op (bookkeeping between ops)."""
    p2p_cpu_us_per_mb: float
    """Compute time one MB (1e6 bytes) of a point-to-point message takes from the rank at
    each end, on top of the transfer itself: the copies a host makes when its messages go
    through its own CPU (gloo over TCP); 0 where moving a message costs the ops nothing."""
    op_times: str
    """Where per-op times come from (wpipe.planning.optimes): fitted (curves fitted to the
    measured points of `profile`; the FLOP model where none applies), flops (FLOP counts
    at `efficiency` plus kernel_overhead_us per launch), measured (seconds of each block
    measured in this process: CPU validation)."""
    profile: str | None
    """For op_times fitted: the profile YAML (network_conf/profiles/), relative to this
    hardware file's folder."""
    profile_path: str | None = None
    """`profile` resolved (set by load_hardware; not a YAML field)."""
    file: str | None = None
    """The YAML this preset was read from (set by load_hardware; not a YAML field)."""

    @property
    def label(self) -> str:
        """How errors name the preset: its file, else its name."""
        return self.file or self.name

    def flops_per_s(self, precision: str) -> float:
        return self.peak_tflops[precision] * 1e12 * self.efficiency[precision]

    @property
    def memory_budget_bytes(self) -> float:
        return self.gpu_memory_gib * 2 ** 30 * self.usable_memory_fraction

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def link(self, a: int, b: int) -> Link:
        """The link between ranks a and b."""
        if self.node(a) == self.node(b):
            return Link(self.intra_node_bandwidth_gbs * 1e9, self.intra_node_latency_us * 1e-6)
        return Link(self.inter_node_bandwidth_gbs * 1e9, self.inter_node_latency_us * 1e-6)

    def allreduce_seconds(self, ranks: list[int], nbytes: float) -> float:
        """Ring all-reduce of `nbytes` over `ranks`: 2 (D - 1) steps, each moving
        nbytes / D over the ring's slowest link: 2 (D-1)/D x bytes / bandwidth + 2 (D-1) x latency."""
        d = len(ranks)
        if d < 2:
            return 0.0
        slowest = min((self.link(ranks[i], ranks[(i + 1) % d]) for i in range(d)),
                      key=lambda link: (link.bandwidth, -link.latency))
        return 2 * (d - 1) / d * nbytes / slowest.bandwidth + 2 * (d - 1) * slowest.latency


def load_hardware(path: str | Path) -> Hardware:
    """Read and check a hardware YAML; errors name the file and the field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hardware file {path} does not exist (presets: network_conf/hardware/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of field: value")
    names = [f.name for f in fields(Hardware) if f.name not in ("profile_path", "file")]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown field {unknown[0]!r}; fields: {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ValueError(f"{path}: field {missing[0]!r} is missing (every field is required)")
    for name in names:
        value = raw[name]
        if name in ("name", "op_times"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{path}: field {name!r} must be a non-empty string, got {value!r}")
        elif name == "profile":
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}: field 'profile' must be a path or null, got {value!r}")
        elif name == "ranks_per_node":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{path}: field 'ranks_per_node' must be an integer >= 1, got {value!r}")
        elif name in ("peak_tflops", "efficiency"):
            if (not isinstance(value, dict) or not value or set(value) - set(PRECISIONS)
                    or not all(_positive(v) for v in value.values())):
                raise ValueError(f"{path}: field {name!r} must map precisions ({', '.join(PRECISIONS)}) "
                                 f"to numbers > 0, got {value!r}")
        elif not (_positive(value) or ("_us" in name and _number(value) and value == 0)):
            raise ValueError(f"{path}: field {name!r} must be a number > 0"
                             f"{' (or 0)' if '_us' in name else ''}, got {value!r}")
    if set(raw["efficiency"]) != set(raw["peak_tflops"]):
        raise ValueError(f"{path}: field 'efficiency' must name the precisions of peak_tflops "
                         f"({', '.join(raw['peak_tflops'])}), got {', '.join(raw['efficiency'])}")
    if raw["usable_memory_fraction"] > 1 or any(v > 1 for v in raw["efficiency"].values()):
        name = "usable_memory_fraction" if raw["usable_memory_fraction"] > 1 else "efficiency"
        raise ValueError(f"{path}: field {name!r} is a share, at most 1, got {raw[name]!r}")
    if raw["op_times"] not in OP_TIMES:
        raise ValueError(f"{path}: field 'op_times' must be one of {', '.join(OP_TIMES)}, got {raw['op_times']!r}")
    if raw["op_times"] == "fitted" and not raw["profile"]:
        raise ValueError(f"{path}: field 'profile' must name a profile YAML (network_conf/profiles/) "
                         f"when op_times is fitted")
    profile_path = str((path.parent / raw["profile"]).resolve()) if raw["profile"] else None
    if profile_path and not Path(profile_path).is_file():
        raise ValueError(f"{path}: field 'profile': {profile_path} does not exist")
    values = {n: (float(raw[n]) if isinstance(raw[n], int) and n != "ranks_per_node" else raw[n]) for n in names}
    for name in ("peak_tflops", "efficiency"):
        values[name] = {k: float(v) for k, v in raw[name].items()}
    return Hardware(**values, profile_path=profile_path, file=str(path))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _number(value) and value > 0
