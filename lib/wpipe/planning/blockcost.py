"""What each block of a model costs: bytes, FLOPs, kernels, and (optionally) seconds. Pure data.

A model is an ordered chain of blocks (BERT: embeddings, layers, head; ResNeXt: stem,
Bottleneck blocks, head). measure.py runs each block alone, at two micro-batch sizes, with
the engine's own saved-tensor accounting (runtime/memory.py: the storages autograd saves,
weights excluded, each storage once), so that the bytes of any contiguous partition of
blocks follow exactly (costmodel.partition_costs), without running the partition.

Per block a `BlockCost` records, every size an `Affine` in the micro-batch size b:

* `param_bytes`, `optimizer_bytes` (the state one step of the task's optimizer creates);
* `input_bytes`: its input tensors (what a partition starting here receives and stashes),
  `input_grad_bytes`: those that need gradients (what its backward sends back);
* `saved`: each storage autograd saves, labelled by where it comes from: ("in", k) = the
  storage of input k, ("own", j) = made inside the block; `outputs`: the same labels for
  each output, ("new", k) when the block made it without saving it. Labels let a partition
  count a storage once when one block saves its output and the next saves it as input;
* forward and backward FLOPs (torch.utils.flop_counter) and kernel launches (aten ops that
  are not views), and, when asked, measured seconds of forward, backward and update.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Affine:
    """value(b) = at1 + slope * (b - 1), b = micro-batch size (at1: the value at b = 1)."""
    at1: float
    slope: float

    def __call__(self, b: int) -> float:
        return self.at1 + self.slope * (b - 1)

    @classmethod
    def fit(cls, x2: float, x4: float) -> Affine:
        """Through value x2 at b = 2 and x4 at b = 4."""
        slope = (x4 - x2) / 2
        return cls(x2 - slope, slope)


@dataclass
class BlockCost:
    name: str
    kind: str
    param_bytes: int
    optimizer_bytes: int
    input_bytes: Affine
    input_grad_bytes: Affine
    saved: list[tuple[tuple, Affine]]     # (label, bytes)
    outputs: list[tuple]                  # label per output
    forward_flops: Affine
    backward_flops: Affine
    forward_kernels: int
    backward_kernels: int
    seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    """micro-batch size -> {"forward", "backward", "update"} measured seconds."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["saved"] = [[list(label), asdict(size)] for label, size in self.saved]
        d["outputs"] = [list(label) for label in self.outputs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> BlockCost:
        d = dict(d)
        for key in ("input_bytes", "input_grad_bytes", "forward_flops", "backward_flops"):
            d[key] = Affine(**d[key])
        d["saved"] = [(tuple(label), Affine(**size)) for label, size in d["saved"]]
        d["outputs"] = [tuple(label) for label in d["outputs"]]
        d["seconds"] = {int(b): s for b, s in d.get("seconds", {}).items()}
        return cls(**d)
