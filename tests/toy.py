"""A small float64 model and data for exactness tests of the engine against the reference.

Each partition is Linear -> Tanh -> LayerNorm on `x`, plus a tensor `scale` that travels
with it without gradients (like an attention mask): partitions take and return (x, scale);
the last returns x alone.
"""
import torch
from torch import nn

WIDTH = 6


class Block(nn.Module):
    def __init__(self, last: bool):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.last = last

    def forward(self, x, scale):
        x = self.norm(torch.tanh(self.linear(x))) * scale
        return x if self.last else (x, scale)


def build_partition(index: int, num_partitions: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed * 1000 + index)
    return Block(last=index == num_partitions - 1).double()


def micro_batches(count: int, replica: int = 0, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 100 + replica)
    out = []
    for _ in range(count):
        x = torch.randn(batch, WIDTH, generator=g, dtype=torch.float64)
        scale = 1 + torch.rand(batch, 1, generator=g, dtype=torch.float64)
        target = torch.randn(batch, WIDTH, generator=g, dtype=torch.float64)
        out.append(((x, scale), target))
    return out


def loss_fn(output, target):
    return ((output - target) ** 2).mean()


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def precision_fields(flags) -> dict:
    """PipelineConfig precision fields from a test case's flags: 'bf16'/'fp16' (autocast),
    'wire_fp16'/'wire_bf16', 'scale<k>' (initial loss scale 2^k), 'grow<k>' (growth
    interval k periods)."""
    fields = {"precision": next((f for f in flags if f in ("bf16", "fp16")), "fp32"),
              "wire_dtype": next((f[5:] for f in flags if f.startswith("wire_")), None)}
    for f in flags:
        if f.startswith("scale"):
            fields["loss_scale_init"] = 2.0 ** int(f[5:])
        if f.startswith("grow"):
            fields["loss_scale_growth_interval"] = int(f[4:])
    return fields


def model_dtype(flags) -> torch.dtype:
    """float64 unless the case runs under autocast (which leaves float64 alone): float32."""
    return torch.float32 if {"bf16", "fp16"} & set(flags) else torch.float64


def cast(micro_batches, dtype):
    return [(tuple(x.to(dtype) for x in inputs), target.to(dtype)) for inputs, target in micro_batches]
