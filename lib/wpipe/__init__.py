"""WPipe: group-based interleaved pipeline parallelism, with its baselines.

Public API (see README):
    build_schedule, parse_op, Op, check_schedule, format_schedule  -- pure schedules
    PipelineConfig, load_config                                     -- configuration
    init_distributed, Pipeline                                      -- the runtime
    reference                                                       -- the single-process oracle
"""
from . import reference
from .check import ScheduleError, check_schedule, format_schedule
from .comm import CommError
from .config import PipelineConfig, load_config
from .engine import Pipeline
from .schedule import METHODS, Op, build_schedule, parse_op
from .topology import init_distributed

__all__ = ["build_schedule", "parse_op", "Op", "METHODS", "check_schedule", "format_schedule",
           "ScheduleError", "PipelineConfig", "load_config", "init_distributed", "Pipeline",
           "CommError", "reference"]
