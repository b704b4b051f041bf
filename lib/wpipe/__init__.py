"""WPipe: group-based interleaved pipeline parallelism, with its baselines.

Public API (see README):
    build_schedule, parse_op, Op, METHODS, check_schedule, format_schedule, simulate
                                             -- pure schedules (no torch needed)
    PipelineConfig, load_config              -- configuration
    init_distributed, Pipeline, CommError    -- the runtime
    reference                                -- the single-process oracle

Names are imported on first use, so `python -m wpipe` and the pure modules do
not load torch.
"""
import importlib

_API = {
    "build_schedule": "schedule", "parse_op": "schedule", "Op": "schedule", "METHODS": "schedule",
    "check_schedule": "check", "format_schedule": "check", "ScheduleError": "check",
    "simulate": "simulate",
    "PipelineConfig": "config", "load_config": "config",
    "init_distributed": "topology", "Pipeline": "engine", "CommError": "comm",
}
__all__ = [*_API, "reference"]


_MODULES = {"schedule", "check", "simulate", "partition", "config", "topology", "comm", "versions",
            "engine", "reference", "runner", "checkpoint", "nonfinite", "preemption", "probe", "precision",
            "blockcost", "costmodel", "hardware", "plan"}


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'wpipe' has no attribute {name!r}")
