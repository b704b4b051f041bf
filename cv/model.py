"""ResNeXt as an ordered list of blocks, built one pipeline partition at a time.

Blocks, in order: `stem` (conv1, bn1, relu, maxpool), every torchvision Bottleneck block
(`layer1.0` ... `layer4.{n-1}`), `head` (avgpool, flatten, fc). They are cut with
`wpipe.planning.partition.uniform` (the released runtime's rule), or with `wpipe.planning.partition.balanced`
over parameter counts when `balance="params"`.

Contract: a partition's `state_dict()` keys are exactly torchvision's keys for those blocks
(`conv1.weight`, `layer3.4.conv2.weight`, `fc.bias`, ...), so the partitions of one network
together hold torchvision's `ResNet.state_dict()`, and the forward of partition 0 through
partition n-1 in turn equals torchvision's forward. Partition 0 takes images (B, 3, H, W),
every later one the previous partition's tensor, the last returns logits (B, num_classes).

Initialisation is torchvision's (kaiming normal, fan_out, on convs; BatchNorm weight 1, bias
0; nn.Linear's default for fc; no zero_init_residual), drawn from a generator seeded by
(seed, block index): partitions built separately on different ranks, for any number of
partitions, form the same network.

BatchNorm: running statistics are buffers of the partition that holds the layer; they are
not exchanged between partitions or replicas and not versioned with the weights. In a stale
group (WPipe's G0, every PipeDream-2BW stage: forwards run with the previous period's
weights) the statistics are therefore updated by forwards that used the older weights,
which is what the paper's runtime does too.
"""
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

from wpipe.planning import partition

log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 32
"""Smallest image side (px): the network downsamples by 32 (stem x4, stages 2-4 x8)."""

_STAGE_PLANES = (64, 128, 256, 512)
_PAPER_MIN_DEPTH, _PAPER_MAX_DEPTH = 50, 800
_VALID_FORMS = (
    f"resnext{{D}}_32x4d with {_PAPER_MIN_DEPTH} <= D <= {_PAPER_MAX_DEPTH} (paper family, "
    "blocks [3,4,6,3] x floor((D-2)/3/16)), resnext50_32x4d, resnext101_32x8d (torchvision), "
    "resnext_tiny (tests: blocks [1,1,1,1], 8 groups x 8)")


@dataclass(frozen=True)
class ResNeXtSpec:
    name: str
    layers: tuple[int, int, int, int]
    """Bottleneck blocks per stage."""
    groups: int
    """Groups of the 3x3 convolution (cardinality)."""
    width_per_group: int
    """Channels per group in stage 1 (torchvision's width_per_group)."""


_FIXED_SPECS = {
    "resnext50_32x4d": ResNeXtSpec("resnext50_32x4d", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ResNeXtSpec("resnext101_32x8d", (3, 4, 23, 3), 32, 8),
    "resnext_tiny": ResNeXtSpec("resnext_tiny", (1, 1, 1, 1), 8, 8),
}


def resnext_spec(name: str) -> ResNeXtSpec:
    """Spec of a named network. `resnext{D}_32x4d` follows the paper's formula, so e.g.
    resnext200_32x4d has [12,16,24,12] blocks and resnext101_32x4d [6,8,12,6] (not the
    usual [3,4,23,3]); resnext50_32x4d is torchvision's and the paper's alike."""
    if name in _FIXED_SPECS:
        return _FIXED_SPECS[name]
    match = re.fullmatch(r"resnext(\d+)_32x4d", name)
    if match and _PAPER_MIN_DEPTH <= int(match.group(1)) <= _PAPER_MAX_DEPTH:
        repeat = (int(match.group(1)) - 2) // 3 // 16
        return ResNeXtSpec(name, tuple(n * repeat for n in (3, 4, 6, 3)), 32, 4)
    raise ValueError(f"unknown model {name!r}: valid names are {_VALID_FORMS}")


def _block_names(spec: ResNeXtSpec) -> list[str]:
    return (["stem"]
            + [f"layer{s + 1}.{j}" for s, n in enumerate(spec.layers) for j in range(n)]
            + ["head"])


def num_blocks(name: str) -> int:
    """Blocks of the network: stem + Bottleneck blocks + head."""
    return len(_block_names(resnext_spec(name)))


def check_image_size(size: int, micro_batch_size: int = 2) -> None:
    """Raise ValueError when `size` (px, the square side) is too small for ResNeXt, or gives
    BatchNorm a single value per channel at micro-batches of `micro_batch_size` (training)."""
    if not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size {size!r} px is too small for ResNeXt: the network downsamples by 32, "
            f"so use an integer image_size >= {MIN_IMAGE_SIZE} (the paper uses 224)")
    side = size
    for _ in range(5):   # the stem's convolution and pooling, then three strided stages: each ceil(x / 2)
        side = -(-side // 2)
    if micro_batch_size * side * side < 2:
        raise ValueError(
            f"image_size {size} px with micro_batch_size {micro_batch_size}: ResNeXt downsamples it to "
            f"{side} x {side} px, where BatchNorm (training) sees one value per channel; use "
            f"micro_batch_size >= 2 or image_size > {MIN_IMAGE_SIZE}")


def resnext_partition_plan(name: str, num_partitions: int, *, balance: str = "uniform",
                           num_classes: int = 1000) -> list[list[str]]:
    """Block names of each partition, e.g. [["stem", "layer1.0"], ..., ["layer4.0", "head"]].
    `num_classes` matters only for balance="params" (it sizes fc)."""
    spec = resnext_spec(name)
    names = _block_names(spec)
    return [[names[i] for i in r] for r in _plan(spec, num_partitions, balance, num_classes)]


def build_resnext_partition(index: int, num_partitions: int, name: str, num_classes: int,
                            pretrained: str | os.PathLike | None = None, seed: int = 0,
                            balance: str = "uniform") -> nn.Module:
    """Build only partition `index` of `num_partitions` of network `name` (see module doc),
    on the CPU (or the meta device when that is the default device).

    `pretrained`: path of a torchvision state dict (`torch.save(model.state_dict())`); the
    partition's keys are loaded from it. When the file's fc has another number of classes,
    fc keeps its seeded initialisation (logged).
    """
    spec = resnext_spec(name)
    if not 0 <= index < num_partitions:
        raise ValueError(f"partition index {index} is out of range for {num_partitions} partitions")
    ranges = _plan(spec, num_partitions, balance, num_classes)
    names = _block_names(spec)
    module = ResNeXtPartition()
    # Draw every block from the CPU generator seeded by (seed, block index), whatever the
    # default device (meta stays meta: shapes only); the caller moves the module.
    device = "meta" if torch.get_default_device().type == "meta" else "cpu"
    for i in ranges[index]:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.default_generator.manual_seed(
                int(np.random.SeedSequence((seed, i)).generate_state(1, np.uint64)[0]))
            module.add_block(names[i], _build_block(spec, names[i], num_classes))
    if pretrained is not None:
        _load_pretrained(module, pretrained, spec, num_classes)
    return module


class ResNeXtPartition(nn.Module):
    """Consecutive ResNeXt blocks; submodules sit at torchvision's names (see module doc)."""

    def __init__(self):
        super().__init__()
        self.block_names: list[str] = []

    def add_block(self, name: str, block: nn.Module) -> None:
        if name in ("stem", "head"):
            for child_name, child in block.named_children():
                self.add_module(child_name, child)
        else:
            stage, position = name.split(".")
            if not hasattr(self, stage):
                self.add_module(stage, nn.ModuleDict())
            getattr(self, stage)[position] = block
        self.block_names.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.block_names:
            if name == "stem":
                x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            elif name == "head":
                x = self.fc(torch.flatten(self.avgpool(x), 1))
            else:
                stage, position = name.split(".")
                x = getattr(self, stage)[position](x)
        return x

    def extra_repr(self) -> str:
        return "blocks=" + ", ".join(self.block_names)


def resnext_block_specs(name: str, num_classes: int) -> list:
    """The chain stem, Bottleneck blocks, head as blocks for wpipe.planning.measure; the blocks
    after the first of a stage share one kind per stage (they are identical)."""
    from wpipe.planning.measure import BlockSpec
    spec = resnext_spec(name)

    def build(block):
        module = ResNeXtPartition()
        module.add_block(block, _build_block(spec, block, num_classes))
        return module
    kinds = {n: n if n in ("stem", "head") or n.endswith(".0") else n.split(".")[0] for n in _block_names(spec)}
    return [BlockSpec(n, kind, lambda n=n: build(n)) for n, kind in kinds.items()]


def _plan(spec: ResNeXtSpec, num_partitions: int, balance: str, num_classes: int) -> list[range]:
    names = _block_names(spec)
    if num_partitions > len(names):
        raise ValueError(
            f"{spec.name} has {len(names)} blocks (stem, {len(names) - 2} Bottleneck blocks, "
            f"head) but {num_partitions} partitions were asked for: every partition needs a "
            f"block, so use at most {len(names)} partitions (WPipe cuts 2 x pipeline depth) "
            f"or a deeper model")
    if balance == "uniform":
        return partition.uniform(len(names), num_partitions)
    if balance == "params":
        with torch.device("meta"):
            weights = [sum(p.numel() for p in _build_block(spec, n, num_classes).parameters())
                       for n in names]
        return partition.balanced(weights, num_partitions)
    raise ValueError(f"unknown balance {balance!r}: valid values are 'uniform', 'params'")


def _build_block(spec: ResNeXtSpec, name: str, num_classes: int) -> nn.Module:
    """One block with torchvision's constructor arguments and initialisation."""
    expansion = Bottleneck.expansion
    if name == "stem":
        block = nn.Sequential()
        block.add_module("conv1", nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False))
        block.add_module("bn1", nn.BatchNorm2d(64))
        block.add_module("relu", nn.ReLU(inplace=True))
        block.add_module("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    elif name == "head":
        block = nn.Sequential()
        block.add_module("avgpool", nn.AdaptiveAvgPool2d((1, 1)))
        block.add_module("fc", nn.Linear(_STAGE_PLANES[-1] * expansion, num_classes))
    else:
        stage, position = int(name[len("layer"):name.index(".")]) - 1, int(name.split(".")[1])
        planes = _STAGE_PLANES[stage]
        if position > 0:
            block = Bottleneck(planes * expansion, planes, groups=spec.groups,
                               base_width=spec.width_per_group)
        else:  # first block of a stage: torchvision's _make_layer adds stride and downsample
            inplanes = 64 if stage == 0 else _STAGE_PLANES[stage - 1] * expansion
            stride = 1 if stage == 0 else 2
            downsample = nn.Sequential(conv1x1(inplanes, planes * expansion, stride),
                                       nn.BatchNorm2d(planes * expansion))
            block = Bottleneck(inplanes, planes, stride, downsample, spec.groups,
                               spec.width_per_group)
    for m in block.modules():  # as torchvision's ResNet.__init__
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return block


def _load_pretrained(module: nn.Module, path, spec: ResNeXtSpec, num_classes: int) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained file not found: {path} (expected torch.save(model.state_dict()) of "
            f"torchvision's {spec.name})")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    own = module.state_dict()
    if "fc.weight" in own and "fc.weight" in state \
            and state["fc.weight"].shape[0] != num_classes:
        log.info("%s: %s has fc for %d classes, %d asked: fc is initialised from the seed",
                 spec.name, path, state["fc.weight"].shape[0], num_classes)
        own = {k: v for k, v in own.items() if not k.startswith("fc.")}
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"pretrained file {path} lacks {len(missing)} keys of this partition "
                         f"of {spec.name}, e.g. {missing[:3]}: is it a {spec.name} state dict?")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"pretrained file {path} does not fit {spec.name}: shapes differ for "
                         f"{len(wrong)} keys, e.g. {wrong[:3]}")
    module.load_state_dict({k: state[k] for k in own}, strict=False)
