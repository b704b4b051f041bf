"""The pure side: what runs where and in which order, proved before anything runs.
No torch is imported here or below.

    methods     Op, parse_op, the method registry, build_schedule, weight versions
    check       check_schedule (placement, dependencies, versions, communication), format_schedule
    comms       communication replayed under NCCL's rules (Rules): deadlock freedom
    simulate    timing and memory of a schedule without running it
    topology    rank <-> (replica, device), partition -> device, message streams
    messages    the messages a schedule implies, in the order each stream carries them
"""
from .check import ScheduleError, check_schedule, format_schedule, last_uses
from .comms import Rules, check_communication
from .methods import (KINDS, METHODS, PIPELINES, Method, Op, build_schedule, default_period, device_of, get_method,
                      num_partitions, parse_op, validate, weights_version)
from .simulate import simulate
from .topology import Topology

__all__ = ["KINDS", "METHODS", "PIPELINES", "Method", "Op", "Rules", "ScheduleError", "Topology", "build_schedule",
           "check_communication", "check_schedule", "default_period", "device_of", "format_schedule", "get_method",
           "last_uses", "num_partitions", "parse_op", "simulate", "validate", "weights_version"]
