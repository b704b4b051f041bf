"""The one configuration object of a pipeline, and the one way to merge YAML and overrides.

`PipelineConfig` holds what the runtime needs. Entry points extend it with their own
fields (a dataclass subclass) and load everything with `load_config(cls, path, overrides)`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import schedule

RANK_LAYOUTS = ("pipeline_major", "replica_major")
BACKENDS = (None, "gloo", "nccl")
PRECISIONS = ("fp32", "bf16", "fp16")
WIRE_DTYPES = (None, "fp16", "bf16")
P2P_BACKENDS = ("auto", "nccl", "gloo", "nccl_emulated")
COMMUNICATORS = ("eager", "lazy")


@dataclass
class PipelineConfig:
    method: str = "wpipe"
    """One of wpipe, pipedream_2bw, pipedream_flush, gpipe, data_parallel."""
    pipeline_depth: int = 2
    """N: devices per pipeline replica (1 for data_parallel)."""
    data_parallel: int = 1
    """D: pipeline replicas; world size must be N x D."""
    micro_batches_per_update: int | None = None
    """The period: micro-batches whose gradients form one update. Default N (1 for
    data_parallel); wpipe's is always N; pipedream_2bw needs >= N."""
    rank_layout: str = "pipeline_major"
    """pipeline_major: rank = replica * N + device (a pipeline stays inside a node);
    replica_major: rank = device * D + replica (replicas of one device are neighbours)."""
    backend: str | None = None
    """torch.distributed backend: nccl with CUDA, gloo without; None picks."""
    timeout_s: float = 300.0
    """Seconds a blocking wait (receive, all-reduce) may take before it fails naming who
    waited for what."""
    recompute: bool = False
    """Keep only partition inputs after a forward and recompute the partition's
    activations at its backward (less memory, one more forward)."""
    trace: bool = False
    """Record when every op computed and waited (Pipeline.trace_events; the entry points
    write <output_dir>/trace.json)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16: every partition's forward (and recompute) runs under autocast in
    that dtype; weights, optimizer state and the loss stay fp32; fp16 adds dynamic loss
    scaling (precision.py states the rule)."""
    wire_dtype: str | None = None
    """null, fp16 or bf16: float32/float64 tensors travel point to point in this dtype and
    are cast back on arrival (fp16 with a power-of-two scale per tensor)."""
    p2p_backend: str = "auto"
    """auto, nccl, gloo or nccl_emulated: how point-to-point tensors travel. gloo: through
    (pinned) CPU buffers, so several ranks may share one GPU (every collective then runs on
    gloo too, unless backend is nccl); nccl: GPU to GPU, one GPU per rank; nccl_emulated:
    gloo carries the bytes under NCCL's host-visible rules (a communicator created at its
    first use, which waits for every member's, unless created up front; sends that complete
    once received; receives posted when their op runs), so a laptop shows whether the run
    would deadlock on GPUs (docs/nccl.md); auto: nccl when the backend is nccl, else gloo."""
    communicators: str = "eager"
    """eager or lazy: when the communicators of the data path (every stream's data group,
    every data-parallel group) are created under nccl and nccl_emulated. eager: at start-up,
    in one global order (one small exchange per group), so no message waits for a creation;
    lazy: at first use, NCCL's default, where a first use waits for every member's: wpipe
    then deadlocks once a call spans two periods (kept to show it: runs under lazy are not
    checked for deadlock). No effect with gloo."""
    loss_scale_init: float = 65536.0
    """fp16: the loss scale of the first period."""
    loss_scale_growth_interval: int = 2000
    """fp16: periods without overflow after which the loss scale doubles."""

    def __post_init__(self):
        self.validate()

    @property
    def period(self) -> int:
        """Micro-batches per update, with the method's default filled in."""
        if self.micro_batches_per_update is None:
            return schedule.default_period(self.method, self.pipeline_depth)
        return self.micro_batches_per_update

    @property
    def world_size(self) -> int:
        return self.pipeline_depth * self.data_parallel

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is expected."""
        schedule.get_method(self.method)
        for name in ("pipeline_depth", "data_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.method == "data_parallel" and self.pipeline_depth != 1:
            raise ValueError(f"pipeline_depth must be 1 for data_parallel (got {self.pipeline_depth}): "
                             f"set data_parallel to the number of devices instead")
        schedule.validate(self.method, self.pipeline_depth, self.period, self.micro_batches_per_update)
        if self.rank_layout not in RANK_LAYOUTS:
            raise ValueError(f"rank_layout must be one of {', '.join(RANK_LAYOUTS)}, got {self.rank_layout!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be gloo, nccl or null (auto), got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be fp16, bf16 or null (no cast), got {self.wire_dtype!r}")
        if self.p2p_backend not in P2P_BACKENDS:
            raise ValueError(f"p2p_backend must be one of {', '.join(P2P_BACKENDS)}, got {self.p2p_backend!r}")
        if self.p2p_backend == "nccl" and self.backend == "gloo":
            raise ValueError("p2p_backend nccl needs backend nccl or null, got backend gloo: set "
                             "p2p_backend gloo (or auto) to run on gloo")
        if self.p2p_backend == "nccl_emulated" and self.backend == "nccl":
            raise ValueError("p2p_backend nccl_emulated runs on gloo, got backend nccl: set backend gloo or null")
        if self.communicators not in COMMUNICATORS:
            raise ValueError(f"communicators must be eager or lazy, got {self.communicators!r}")
        if self.communicators == "lazy" and self.p2p_backend in ("nccl", "nccl_emulated", "auto"):
            warnings.warn("communicators lazy: NCCL creates each communicator at its first use, which waits for "
                          "every member's; wpipe deadlocks once a call spans two periods, and the run is not "
                          "checked for it (docs/nccl.md)", stacklevel=4)
        if not (isinstance(self.loss_scale_init, (int, float)) and 0 < self.loss_scale_init < math.inf):
            raise ValueError(f"loss_scale_init must be a finite number > 0, got {self.loss_scale_init!r}")
        if not isinstance(self.loss_scale_growth_interval, int) or self.loss_scale_growth_interval < 1:
            raise ValueError(f"loss_scale_growth_interval must be an integer >= 1 (periods), "
                             f"got {self.loss_scale_growth_interval!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s!r}")
        if self.method == "pipedream_2bw" and self.period > 4 * self.pipeline_depth:
            warnings.warn(f"micro_batches_per_update = {self.period} is much larger than "
                          f"pipeline_depth = {self.pipeline_depth}: updates become rare", stacklevel=4)

    def pipeline_fields(self) -> PipelineConfig:
        """Just the runtime's part of a larger (subclassed) configuration."""
        names = [f.name for f in dataclasses.fields(PipelineConfig)]
        return PipelineConfig(**{name: getattr(self, name) for name in names})


def load_config(cls: type, path: str | Path | None = None, overrides: dict | None = None):
    """The only merger of configuration: overrides > YAML file > dataclass defaults.

    `overrides` values may be strings (from a command line); they are converted to the
    field's type. Unknown keys and values of the wrong type raise ValueError naming the key
    and where it came from.
    """
    import yaml

    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of field: value at the top level")
        values.update(_typed(cls, loaded, str(path), from_text=False))
    values.update(_typed(cls, overrides or {}, "overrides", from_text=True))
    return cls(**values)


def _typed(cls, raw: dict, source: str, from_text: bool) -> dict:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"{source}: unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        try:
            out[key] = _convert(value, hints[key], from_text)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: config key {key!r} expects {_type_name(hints[key])}, "
                             f"got {value!r}") from None
    return out


def _convert(value, hint, from_text: bool):
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    if value is None or (from_text and isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise TypeError
    for option in options:
        if option is type(None):
            continue
        if option is bool:
            if isinstance(value, bool):
                return value
            if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if from_text and isinstance(value, str) and value.lstrip("-").isdigit():
                return int(value)
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if from_text and isinstance(value, str):
                return float(value)
        elif option is str:
            if isinstance(value, str):
                return value
        elif typing.get_origin(option) is list:
            item = typing.get_args(option)[0]
            if from_text and isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if isinstance(value, list):
                return [_convert(v, item, from_text) for v in value]
    raise TypeError


def _type_name(hint) -> str:
    if typing.get_args(hint):  # list[int], not list: "expects list, got ['a']" would puzzle
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
