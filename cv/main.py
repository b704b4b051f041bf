"""ResNeXt on CIFAR-10/100 or Oxford Flowers-102 with any pipeline method: fine-tuning,
training from scratch, or throughput. Run under torchrun (gloo on CPU, nccl with CUDA):

    torchrun --nproc_per_node 2 cv/main.py --config network_conf/cv_tiny.yaml [--key value ...]

Reads top to bottom: `CvConfig` -> `make_task` (model split, pretrained file, datasets:
every check, before any process group exists) -> `wpipe.train.main` (process group,
Pipeline, train with evaluation on the test split after each epoch, or throughput;
`<output_dir>/summary.json`, whose `eval` holds `test_top1`).
"""
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # torchrun runs this file as a script

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Subset

from cv.data import DATASETS, load_dataset, micro_batch_labels, micro_batch_loader, synthetic_dataset
from cv.model import (
    build_resnext_partition,
    check_image_size,
    resnext_block_specs,
    resnext_partition_plan,
    resnext_spec,
)
from wpipe import schedule
from wpipe.planning.measure import ModelBlocks
from wpipe.schedule import Topology
from wpipe.train import Task, TrainConfig, cli

log = logging.getLogger("wpipe.cv")
BALANCES = ("uniform", "params")
REFERENCE_BATCH = 256
"""lr_scale_by_batch: the global batch (samples per update) at which lr is taken as given."""


@dataclass
class CvConfig(TrainConfig):
    model: str = "resnext50_32x4d"
    """resnext{D}_32x4d (paper family, 50 <= D <= 800), resnext50_32x4d, resnext101_32x8d
    (torchvision's), or resnext_tiny (tests and CPU runs)."""
    dataset: str = "flowers102"
    """cifar10, cifar100, flowers102 or digits (scikit-learn's 8x8 handwritten digits, no
    data_dir); sets the number of classes."""
    data_dir: str | None = None
    """Folder holding cifar-10-batches-py/, cifar-100-python/ or flowers-102/ (as extracted
    from the official archives). None: synthetic images (learnable: noise plus a per-class
    colour offset), a quarter as many held out for evaluation."""
    image_size: int = 224
    """Square side (px) after the paper's transforms; >= 32."""
    pretrained: str | None = None
    """A torchvision state dict of `model` (torch.save(model.state_dict())); fc is kept
    from the file only when its class count matches. None: random initialisation."""
    verify_data: bool = True
    """Check the dataset files' md5 sums against the official releases. false only for
    generated copies (cv.fixtures), never for real data."""
    num_workers: int = 0
    """Image-decoding processes per rank that runs the first partition (0: in the rank)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay (L2, on every parameter, as the released runtime)."""
    lr_decay_every: int = 30
    """Epochs between the x0.1 steps of the learning rate (paper: 10 for CIFAR, 30 for
    Flowers-102)."""
    lr_scale_by_batch: bool = False
    """Scale lr by the global batch (micro_batch_size x micro-batches per update x
    data_parallel) / 256, as the released runtime does when asked."""
    balance: str = "uniform"
    """How blocks are cut into partitions: uniform (by count, the released runtime's
    rule) or params (balanced parameter counts)."""
    synthetic_samples: int = 1024
    """Without data_dir: synthetic training images; throughput mode cycles through this
    many (keep it small at 224 px: 0.6 MB an image)."""

    def validate(self) -> None:
        super().validate()
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        resnext_spec(self.model)
        check_image_size(self.image_size, self.micro_batch_size)
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {self.balance!r}")
        for name in ("lr_decay_every", "synthetic_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset]


def make_task(cfg: CvConfig) -> Task:
    """Everything the runner needs for ResNeXt on cfg.dataset. Plans the split, checks the
    pretrained file and reads the datasets now, so that a bad setting or file fails before
    any process group exists."""
    num_partitions = schedule.num_partitions(cfg.method, cfg.pipeline_depth)
    plan = resnext_partition_plan(cfg.model, num_partitions, balance=cfg.balance,
                                  num_classes=cfg.num_classes)
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(f"pretrained: {cfg.pretrained} is not a file (expected "
                                f"torch.save(model.state_dict()) of torchvision's {cfg.model})")
    train, test = _datasets(cfg)
    mbs, replicas = cfg.micro_batch_size, cfg.data_parallel
    decodes = _runs_first_partition(cfg)

    def batches(dataset, replica: int, num_replicas: int, epoch: int, **order):
        """One replica's micro-batches as this rank needs them: (images, labels) on the rank
        of partition 0, else (None, labels) without decoding an image."""
        args = (dataset, mbs, replica, num_replicas, cfg.seed, epoch)
        if decodes:
            return micro_batch_loader(*args, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, **order)
        return [(None, labels) for labels in micro_batch_labels(*args, **order)]

    def synthetic_data(count: int, replica: int) -> list:
        """`count` micro-batches cycling through synthetic_samples images made in advance."""
        images = synthetic_dataset(max(cfg.synthetic_samples, mbs), cfg.image_size,
                                   cfg.num_classes, cfg.seed + replica)
        pool = list(batches(images, 0, 1, 0, shuffle=False))
        return [pool[i % len(pool)] for i in range(count)]

    lr = cfg.lr * (mbs * cfg.period * replicas / REFERENCE_BATCH if cfg.lr_scale_by_batch else 1)
    source = f"from {cfg.pretrained}" if cfg.pretrained else "random init"
    data = "synthetic" if cfg.mode != "train" or cfg.data_dir is None else cfg.data_dir
    return Task(
        build_partition=lambda i: build_resnext_partition(i, num_partitions, cfg.model, cfg.num_classes,
                                                          cfg.pretrained, cfg.seed, cfg.balance),
        loss_fn=torch.nn.functional.cross_entropy,
        make_optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                                                      weight_decay=cfg.weight_decay),
        make_lr_scheduler=lambda optimizer, total: _warmup_then_step_decay(
            optimizer, cfg.warmup_periods, cfg.lr_decay_every * _periods_per_epoch(cfg, total)),
        train_data=lambda epoch, replica: batches(train, replica, replicas, epoch),
        eval_data=lambda replica: {} if test is None else {
            "test": batches(test, replica, replicas, 0, shuffle=False, drop_last=False)},
        metrics=lambda name, logits, labels: {"top1": (logits.argmax(1) == labels).float().mean().item()},
        synthetic_data=synthetic_data,
        describe=(f"{cfg.model} ({source}) in {num_partitions} partitions of "
                  f"{'/'.join(str(len(p)) for p in plan)} blocks, {cfg.dataset} ({data}) at "
                  f"{cfg.image_size} px, lr {lr:g}"),
    )


def model_blocks(cfg: CvConfig) -> ModelBlocks:
    """cfg's ResNeXt as the cost model's chain of blocks (wpipe.planning.measure, tool/plan.py): the
    inputs are the task's synthetic images, the optimizer the task's."""
    def inputs(b: int) -> tuple:
        return (make_task(replace(cfg, mode="throughput", micro_batch_size=b, synthetic_samples=b))
                .synthetic_data(1, 0)[0][0],)
    return ModelBlocks(
        f"{cfg.model}_c{cfg.num_classes}_px{cfg.image_size}", resnext_block_specs(cfg.model, cfg.num_classes),
        inputs, make_task(replace(cfg, mode="throughput")).make_optimizer,
        lambda k: resnext_partition_plan(cfg.model, k, num_classes=cfg.num_classes))


def _datasets(cfg: CvConfig):
    """(training set, test set); none for throughput and probe, which make their own images."""
    if cfg.mode != "train":
        if cfg.data_dir is not None:
            log.warning("%s mode times synthetic images: data_dir %s is not read", cfg.mode, cfg.data_dir)
        return None, None
    if cfg.dataset == "digits":
        if cfg.data_dir is not None:
            log.warning("dataset digits comes with scikit-learn: data_dir %s is not read", cfg.data_dir)
        return tuple(load_dataset("digits", None, split, cfg.image_size) for split in ("train", "test"))
    if cfg.data_dir is None:
        # One synthetic set split in two, so that both parts share the class colours.
        held_out = max(cfg.synthetic_samples // 4, 1)
        images = synthetic_dataset(cfg.synthetic_samples + held_out, cfg.image_size,
                                   cfg.num_classes, cfg.seed)
        return (_Part(images, range(cfg.synthetic_samples)),
                _Part(images, range(cfg.synthetic_samples, len(images))))
    return tuple(load_dataset(cfg.dataset, cfg.data_dir, split, cfg.image_size, cfg.verify_data)
                 for split in ("train", "test"))


class _Part(Subset):
    """Some samples of a dataset, with their `labels` (which micro_batch_labels reads)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        self.labels = [dataset.labels[i] for i in self.indices]


def _runs_first_partition(cfg: CvConfig) -> bool:
    """Whether this rank (torchrun's RANK) holds partition 0, the only one that reads images."""
    topology = Topology.from_config(cfg)
    _, device = topology.coordinates(int(os.environ.get("RANK", 0)))
    return 0 in topology.partitions_of(device)


def _periods_per_epoch(cfg: CvConfig, total_periods: int) -> int:
    """Updates per epoch from the run's total (the runner's epochs x updates per epoch); a
    throughput run counts as one epoch."""
    return total_periods // cfg.epochs if cfg.mode == "train" else total_periods


def _warmup_then_step_decay(optimizer, warmup: int, decay_every: int) -> LambdaLR:
    """One step per update t = 0, 1, ...: lr x (t + 1) / warmup while t < warmup (the
    released runtime's linear warm-up), times 0.1 every `decay_every` updates."""
    def factor(t: int) -> float:
        return min(1.0, (t + 1) / warmup if warmup else 1.0) * 0.1 ** (t // decay_every)
    return LambdaLR(optimizer, factor)


if __name__ == "__main__":
    cli(CvConfig, make_task)
