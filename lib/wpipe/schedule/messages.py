"""The messages a schedule implies. Pure.

A forward of partition p sends its outputs to p + 1 and a backward sends the gradients of
its inputs to p - 1, when that partition lives on another device. A message is named by a
key `(kind, partition, micro_batch)` (`("F", 2, 3)`: the output of op 2F3); the messages of
one (kind, partition) form a *stream*, carried in the order its sender runs the ops.
"""
from __future__ import annotations

from .methods import Op
from .topology import Topology

Key = tuple[str, int, int]


def destination(op: Op, topology: Topology) -> int | None:
    """The partition that receives what `op` sends, or None when it sends nothing to
    another device (an update, the ends of the chain, a neighbour on the same device)."""
    if op.kind == "U":
        return None
    to = op.partition + 1 if op.kind == "F" else op.partition - 1
    if not 0 <= to < topology.num_partitions or topology.device_of(to) == topology.device_of(op.partition):
        return None
    return to


def key(op: Op) -> Key:
    return (op.kind, op.partition, op.micro_batch)


def taken(op: Op, topology: Topology) -> Key | None:
    """The message `op` takes from another device before it computes (its inputs, or the
    gradients of its outputs), or None."""
    if op.kind == "U":
        return None
    source = Op(op.kind, op.partition - 1 if op.kind == "F" else op.partition + 1, op.micro_batch)
    if 0 <= source.partition < topology.num_partitions and destination(source, topology) == op.partition:
        return key(source)
    return None


def incoming(schedule: list[list[Op]], topology: Topology, device: int) -> list[Key]:
    """The keys of the messages the other devices send `device` during `schedule`, each
    sender's in its own order."""
    return [key(op) for d, ops in enumerate(schedule) if d != device for op in ops
            if (to := destination(op, topology)) is not None and topology.device_of(to) == device]
