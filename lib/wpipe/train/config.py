"""The configuration of a training run: the runtime's fields (wpipe.config.PipelineConfig)
plus what the run loop needs. Entry points extend it with their model's and data's fields."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import PipelineConfig
from ..runtime.distributed import resolve_backends, run_device
from . import nonfinite

MODES = ("train", "throughput", "probe")


@dataclass
class TrainConfig(PipelineConfig):
    mode: str = "train"
    """train: epochs with evaluation after each; throughput: timed periods on synthetic data;
    probe: one process runs each device's op list alone and writes probe.json (probe.py)."""
    output_dir: str = "runs/default"
    """Where summary.json and config.yaml go (created by rank 0)."""
    seed: int = 42
    """Seeds weights (identically on every rank) and data order."""
    micro_batch_size: int = 32
    """Samples per micro-batch (what one forward pass takes)."""
    epochs: int = 1
    lr: float = 1e-3
    """Base learning rate of every group's optimizer."""
    warmup_periods: int = 0
    """Updates (periods) of linear learning-rate warm-up."""
    max_periods_per_epoch: int | None = None
    """Cap on updates per epoch (short runs on CPU); None: the whole training set."""
    max_eval_batches: int | None = None
    """Cap on evaluation micro-batches; None: the whole evaluation set."""
    throughput_periods: int = 20
    """throughput mode: periods timed after the warm-up."""
    throughput_warmup_periods: int = 3
    """Periods excluded from timing (also in train mode's samples_per_second)."""
    probe_periods: int = 3
    """probe mode: periods timed (medians) after throughput_warmup_periods untimed ones."""
    probe_device: int | None = None
    """probe mode: the device position to probe (0 .. pipeline_depth - 1); None: every
    device of replica 0, one after another."""
    log_every: int = 10
    """Log a line every this many periods."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many updates (periods) of the run; 0: only at epoch
    ends (which always get one, the last included)."""
    checkpoint_dir: str | None = None
    """Folder of the checkpoints (one sub-folder each); None: <output_dir>/checkpoints."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (older ones are removed once a newer one is complete); 0: all."""
    resume: str | None = None
    """auto: the latest complete checkpoint under checkpoint_dir (a fresh start if none);
    a checkpoint folder (or a checkpoint_dir: its latest); None: start afresh."""
    on_nonfinite: str = "stop"
    """A NaN or Inf loss or gradient: stop (naming update, partition, micro-batch) or skip
    that update on every partition (summary.json skipped_updates lists them, from 1)."""

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("micro_batch_size", "epochs", "throughput_periods", "probe_periods", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.throughput_warmup_periods < 0 or self.warmup_periods < 0:
            raise ValueError("throughput_warmup_periods and warmup_periods must be >= 0")
        for name in ("checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.probe_device is not None and not 0 <= self.probe_device < self.pipeline_depth:
            raise ValueError(f"probe_device must be a device position 0 .. {self.pipeline_depth - 1} "
                             f"(pipeline_depth {self.pipeline_depth}) or null (every device), got {self.probe_device}")
        if self.max_periods_per_epoch is not None and self.max_periods_per_epoch < 1:
            raise ValueError(f"max_periods_per_epoch must be >= 1 or null, got {self.max_periods_per_epoch}")
        if self.on_nonfinite not in nonfinite.MODES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(nonfinite.MODES)}, got {self.on_nonfinite!r}")
        if self.resume is not None and self.mode != "train":
            raise ValueError(f"resume applies to mode train, not {self.mode}: drop resume or use mode train")

    @property
    def pin_memory(self) -> bool:
        """Whether the loaders pin micro-batches: this run computes on a GPU."""
        backend, _ = resolve_backends(self.backend, self.p2p_backend)
        return run_device(backend, self.p2p_backend).type == "cuda"

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.output_dir) / "checkpoints"


def parse_cli(argv: Sequence[str]) -> tuple[str | None, dict]:
    """`--config PATH` and `--key value` / `--key=value` pairs -> (path, overrides)."""
    path, overrides, args = None, {}, list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --config FILE and --key value overrides")
        key, _, value = arg[2:].partition("=")
        if not _:
            if not args:
                raise ValueError(f"--{key} needs a value")
            value = args.pop(0)
        key = key.replace("-", "_")
        if key == "config":
            path = value
        else:
            overrides[key] = value
    return path, overrides
