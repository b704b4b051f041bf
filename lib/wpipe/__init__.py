"""WPipe: group-based interleaved pipeline parallelism, with its baselines.

Public API (README, docs/design.md):
    build_schedule, parse_op, Op, METHODS, check_schedule, format_schedule, ScheduleError,
    simulate                                 -- pure schedules (no torch needed)
    PipelineConfig, load_config              -- configuration
    init_distributed, Pipeline, CommError    -- the runtime
    reference                                -- the single-process oracle

Layers (each imports only from those after it): train -> runtime -> schedule, and
planning -> schedule (and runtime.memory, the one accounting rule); all may use config,
errors, files and trace. Names are imported on
first use, so `python -m wpipe` and the pure side do not load torch.
"""
import importlib

_API = {
    "build_schedule": "schedule", "parse_op": "schedule", "Op": "schedule", "METHODS": "schedule",
    "check_schedule": "schedule", "format_schedule": "schedule", "ScheduleError": "errors",
    "simulate": "schedule",
    "PipelineConfig": "config", "load_config": "config",
    "init_distributed": "runtime.distributed", "Pipeline": "runtime.engine", "CommError": "errors",
}
_MODULES = {
    "schedule": "schedule", "config": "config", "errors": "errors", "trace": "trace",
    "runtime": "runtime", "train": "train", "planning": "planning",
    "reference": "runtime.reference", "precision": "runtime.precision",
}
__all__ = [*_API, "reference", "precision"]


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'wpipe' has no attribute {name!r}")
