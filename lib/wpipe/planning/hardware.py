"""A machine the cost model predicts for: `network_conf/hardware/*.yaml`.

Every field is required (no silent defaults: a preset states its assumptions); bad values
fail naming the file and the field. Ranks fill nodes in order: rank r is on node
r // ranks_per_node (torchrun's numbering), so which links a transfer or an all-reduce
crosses follows from the rank layout (wpipe.schedule.Topology).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

OP_TIMES = ("flops", "profile", "measured")


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
    peak_tflops: float
    """Peak TFLOP/s of one device at the training precision (fp32 here)."""
    efficiency: float
    """Share of the peak that the model's kernels reach (FLOP model)."""
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
    """Where per-op times come from: flops (FLOP counts at `efficiency`), profile (the
    FLOP/s that probe mode measured on this device, `profile`), measured (seconds of
    each block measured in this process: CPU validation)."""
    profile: str | None
    """probe.json of this device (relative to the repository root) for op_times: profile."""

    @property
    def flops_per_s(self) -> float:
        return self.peak_tflops * 1e12 * self.efficiency

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
    names = [f.name for f in fields(Hardware)]
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
        elif (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
              or value < 0 or (value == 0 and "_us" not in name)):
            raise ValueError(f"{path}: field {name!r} must be a number > 0"
                             f"{' (or 0)' if '_us' in name else ''}, got {value!r}")
    for name in ("usable_memory_fraction", "efficiency"):
        if raw[name] > 1:
            raise ValueError(f"{path}: field {name!r} is a share, at most 1, got {raw[name]!r}")
    if raw["op_times"] not in OP_TIMES:
        raise ValueError(f"{path}: field 'op_times' must be one of {', '.join(OP_TIMES)}, got {raw['op_times']!r}")
    if raw["op_times"] == "profile" and not raw["profile"]:
        raise ValueError(f"{path}: field 'profile' must name a probe.json when op_times is profile")
    return Hardware(**{n: (float(raw[n]) if isinstance(raw[n], int) and n not in ("ranks_per_node",) else raw[n])
                       for n in names})
