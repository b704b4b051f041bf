"""A transport without peers: one device of a pipeline, alone in a plain process (probe mode).

`Loopback` stands in for the real links (transport.Links): every message the device
receives is handed back as fresh tensors of exactly the shapes, dtypes and gradient flags
its neighbour would send, and every message it sends is checked against them and dropped.
Those messages are inferred once (`infer_outputs`) by a forward of every partition on the
meta device: exact shapes for any model size, no memory and no compute.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import CommError
from ..schedule import Topology
from .transport import Place


@dataclass(frozen=True)
class Spec:
    """One tensor of a message."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> Spec:
        return cls(tuple(t.shape), t.dtype, t.requires_grad)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def infer_outputs(build_partition: Callable, num_partitions: int, inputs: tuple) -> list[list[Spec]]:
    """Per partition, the tensors its forward returns for the micro-batch `inputs` (as a
    Pipeline sends them: floats that need gradients are flagged), from a forward of every
    partition in turn on the meta device, in training mode. Partition i+1 gets partition i's
    outputs as leaves carrying their flags, as a received message is."""
    x = tuple(t.to("meta") for t in inputs)
    outputs = []
    for p in range(num_partitions):
        with torch.device("meta"):
            module = build_partition(p)
        out = module.to("meta").train()(*x)   # .to: a builder may ignore the default device
        out = out if isinstance(out, tuple) else (out,)
        outputs.append([Spec.of(t) for t in out])
        x = tuple(t.detach().requires_grad_(t.requires_grad) for t in out)
    return outputs


class Loopback:
    """A `Transport` for device `device_index` of replica 0, without peers.

    `outputs` (from `infer_outputs`) says what every partition sends forward; a backward
    message carries the gradients of the previous partition's outputs that need them.
    Receives return fresh tensors (floats drawn from a normal distribution, other dtypes
    ones), sends are checked against the inferred message and dropped. Counts the bytes of
    every message by stream: `sent` and `received` map (kind, partition) to the largest
    message's bytes. No data-parallel mean (probe mode times none) and no fp16 agreement
    (probe mode measures float32); every op is timed to the device's end."""

    p2p_backend = "loopback"
    mean = None
    synchronize_ops = True
    rules = None            # no peers: no communication to prove

    def __init__(self, topology: Topology, device_index: int, outputs: list[list[Spec]],
                 device: torch.device, seed: int = 0):
        self.place = Place(topology.rank_of(0, device_index), 0, device_index, device)
        self.topology, self.device_index, self.outputs, self.device = topology, device_index, outputs, device
        self.generator = torch.Generator(device).manual_seed(seed)
        self.expected: set[tuple] = set()
        self.sent: dict[tuple[str, int], int] = {}
        self.received: dict[tuple[str, int], int] = {}

    def message(self, kind: str, partition: int) -> list[Spec]:
        """The tensors of a message on stream (kind, partition)."""
        if kind == "F":
            return self.outputs[partition]
        return [Spec(s.shape, s.dtype, False) for s in self.outputs[partition - 1] if s.requires_grad]

    def agreement(self, scaler):
        raise ValueError("precision fp16 needs every rank's overflow verdict: a loopback has no peers "
                         "(probe mode measures float32)")

    def expect(self, keys: list[tuple]) -> None:
        self.expected = set(keys)

    def arrived(self, key: tuple) -> bool:
        return True

    def recv(self, key: tuple, waiter: str) -> tuple[torch.Tensor, ...]:
        if key not in self.expected:
            raise CommError(f"probe of device {self.device_index}, op {waiter}: message {key} is not "
                            f"among those the schedule says this device receives")
        self.expected.discard(key)
        specs = self.message(*key[:2])
        self._count(self.received, key, specs)
        return tuple(self._make(s) for s in specs)

    def send(self, key: tuple, tensors: tuple[torch.Tensor, ...]) -> None:
        specs = [Spec.of(t) for t in tensors]
        if specs != self.message(*key[:2]):
            kind, partition, micro_batch = key
            raise RuntimeError(f"probe of device {self.device_index}: op {partition}{kind}{micro_batch} sends "
                               f"{_spell(specs)}, but the forward on the meta device gave "
                               f"{_spell(self.message(kind, partition))}: a partition whose outputs depend "
                               f"on its inputs' values, or that builds differently there, cannot be probed")
        self._count(self.sent, key, specs)

    def finish(self, waiter: str = "end of train") -> None:
        if self.expected:
            raise CommError(f"probe of device {self.device_index}, {waiter}: messages {sorted(self.expected)} "
                            f"were expected but never asked for")

    def _make(self, spec: Spec) -> torch.Tensor:
        if spec.dtype.is_floating_point:
            t = torch.randn(spec.shape, dtype=spec.dtype, device=self.device, generator=self.generator)
        else:
            t = torch.ones(spec.shape, dtype=spec.dtype, device=self.device)
        return t.requires_grad_(spec.requires_grad)

    @staticmethod
    def _count(counts: dict, key: tuple, specs: list[Spec]) -> None:
        counts[key[:2]] = max(counts.get(key[:2], 0), sum(s.nbytes for s in specs))


def _spell(specs: list[Spec]) -> str:
    return "(" + ", ".join(f"{str(s.dtype).removeprefix('torch.')}{list(s.shape)}"
                           f"{' requires_grad' if s.requires_grad else ''}" for s in specs) + ")"
