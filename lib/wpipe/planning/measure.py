"""Measure a model's blocks, in this process: bytes, FLOPs, kernels and seconds.

* `measure_blocks` runs each block alone, at micro-batch sizes 2 and 4, with the engine's
  saved-tensor accounting (runtime/memory.py), and returns one `blockcost.BlockCost` per
  block (what the cost model needs; that module's docstring says what each field means).
  Blocks of the same `kind` are identical (BERT's layers): the first is measured, the others
  share its record.
* `block_seconds` times one forward and one backward of each block of a chain, so that the
  entry points can cut partitions balanced by time. They measure on rank 0 only and hand
  every rank the same numbers (train/loop.py), since timings differ from one process to
  the next and every rank must cut the model the same way.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..runtime import memory
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from ..files import write_atomic
from .blockcost import Affine, BlockCost

MICRO_BATCHES = (2, 4)
"""Sizes measured (2 and up: BatchNorm needs two values per channel at a 1 x 1 image)."""
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
CACHE_VERSION = 3
"""Part of the cache file names: raise it when what measure_blocks records changes."""


def block_seconds(blocks: Sequence[nn.Module], inputs: tuple, repeats: int = 3) -> list[float]:
    """Median seconds, over `repeats` passes after an untimed one, of one forward and one
    backward (from gradients of ones) of each block; block i+1 takes block i's outputs.
    Floating-point inputs of a block are leaves that need gradients, as in a pipeline."""
    times: list[list[float]] = [[] for _ in blocks]
    for attempt in range(repeats + 1):
        x = inputs
        for i, block in enumerate(blocks):
            x = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in x)
            _synchronize(x)
            start = time.perf_counter()
            out = block(*x)
            outputs = out if isinstance(out, tuple) else (out,)
            roots = [o for o in outputs if o.requires_grad]
            torch.autograd.backward(roots, [torch.ones_like(o) for o in roots])
            _synchronize(outputs)
            if attempt:
                times[i].append(time.perf_counter() - start)
            x = tuple(o.detach() for o in outputs)
    for block in blocks:
        block.zero_grad(set_to_none=True)
    return [statistics.median(t) for t in times]


def _synchronize(tensors) -> None:
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()


@dataclass
class BlockSpec:
    """A block to measure: `build()` makes it (on CPU, in training mode)."""
    name: str
    kind: str
    build: Callable[[], nn.Module]


@dataclass
class ModelBlocks:
    """A model as the cost model sees it (the entry points' `model_blocks(cfg)` make it)."""
    description: str                                   # names the model and its input sizes
    specs: list[BlockSpec]
    make_inputs: Callable[[int], tuple]                # micro-batch size -> partition 0's inputs
    make_optimizer: Callable                           # the task's optimizer factory
    uniform_plan: Callable[[int], list[list[str]]]     # partitions -> block names (the runtime's split)

    def measure(self, timed_micro_batch: int | None = None, precision: str = "fp32") -> list[BlockCost]:
        return measure_blocks(self.specs, self.make_inputs, self.make_optimizer, timed_micro_batch,
                              precision=precision)


def cached_blocks(model: ModelBlocks, cache_dir: Path | None, precision: str = "fp32") -> list[BlockCost]:
    """`model.measure(precision=precision)`, read from `cache_dir` when this code measured
    the same model (its description) at that precision before, else measured and written there."""
    cache = cache_dir / f"blocks_v{CACHE_VERSION}_{model.description}_{precision}.json" if cache_dir else None
    if cache and cache.is_file():
        return [BlockCost.from_json(b) for b in json.loads(cache.read_text())]
    blocks = model.measure(precision=precision)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps([b.to_json() for b in blocks]))
    return blocks


def measure_blocks(blocks: Sequence[BlockSpec], make_inputs: Callable[[int], tuple],
                   make_optimizer: Callable, timed_micro_batch: int | None = None,
                   repeats: int = 3, precision: str = "fp32") -> list[BlockCost]:
    """Measure every block of the chain (see the module docstring). `make_inputs(b)`: the
    first block's inputs for a micro-batch of b samples, as the engine gives them to
    partition 0 (the task's own data). With `timed_micro_batch`, also time each kind's
    forward, backward and optimizer step at that size (median of `repeats`, in this process)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    runs = {b: _run_chain(blocks, make_inputs(b), precision=precision) for b in MICRO_BATCHES}
    timed = (time_blocks(blocks, make_inputs, make_optimizer, timed_micro_batch, repeats, precision)
             if timed_micro_batch else None)
    out, by_kind = [], {}
    for i, spec in enumerate(blocks):
        if spec.kind not in by_kind:
            module = spec.build()
            by_kind[spec.kind] = (sum(p.numel() * p.element_size() for p in module.parameters()),
                                  _optimizer_bytes(module, make_optimizer))
        params, optimizer = by_kind[spec.kind]
        one, two = (runs[b][i] for b in MICRO_BATCHES)
        if [label for label, _ in one["saved"]] != [label for label, _ in two["saved"]] \
                or one["outputs"] != two["outputs"]:
            raise RuntimeError(f"block {spec.name}: autograd saves different storages at micro-batch "
                               f"sizes {MICRO_BATCHES}: its bytes cannot be scaled with the size")
        out.append(BlockCost(
            spec.name, spec.kind, params, optimizer,
            Affine.fit(one["input_bytes"], two["input_bytes"]),
            Affine.fit(one["input_grad_bytes"], two["input_grad_bytes"]),
            [(label, Affine.fit(a, b)) for (label, a), (_, b) in zip(one["saved"], two["saved"])],
            one["outputs"],
            Affine.fit(one["forward_flops"], two["forward_flops"]),
            Affine.fit(one["backward_flops"], two["backward_flops"]),
            one["forward_kernels"], one["backward_kernels"],
            {timed_micro_batch: timed[i]} if timed else {}))
    return out


def time_blocks(blocks: Sequence[BlockSpec], make_inputs: Callable[[int], tuple], make_optimizer: Callable,
                micro_batch: int, repeats: int, precision: str = "fp32",
                device: torch.device | None = None) -> list[dict[str, float]]:
    """Per block, the median seconds of its forward, backward and optimizer step at
    `micro_batch` over `repeats` (each kind timed once, in chain order, in this process),
    on `device` (default CPU; a GPU is synchronised around each timed part), forwards under
    the precision's autocast there."""
    device = device or torch.device("cpu")
    inputs = tuple(t.to(device) if torch.is_tensor(t) else t for t in make_inputs(micro_batch))
    return [r["seconds"] for r in _run_chain(blocks, inputs, (repeats, make_optimizer), precision, device)]


def autocast(precision: str, device: torch.device):
    """The context a forward runs in at `precision`: none for fp32; on CPU bfloat16
    autocast for both reduced precisions (the module docstring says why), on a GPU the
    precision's own dtype."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else AUTOCAST[precision])


def _run_chain(blocks, inputs, timing=None, precision="fp32", device=None) -> list[dict]:
    """Run each block kind once (in chain order, each block fed the previous one's outputs
    as fresh tensors, as a partition boundary would); a repeated kind reuses its record."""
    device = device or torch.device("cpu")
    records, by_kind = [], {}
    for spec in blocks:
        if spec.kind not in by_kind:
            module = spec.build().to(device)
            by_kind[spec.kind] = (_measure(module, inputs, precision) if timing is None
                                  else {"seconds": _time(module, inputs, *timing, precision, device)},
                                  _outputs_like(module, inputs, precision, device))
        record, outputs = by_kind[spec.kind]
        records.append(record)
        inputs = outputs
    return records


def _fresh(inputs) -> tuple:
    """Copies of the inputs as the engine receives them: contiguous, own storage, floats
    flagged as before (leaves that need gradients)."""
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
                 for t in inputs)


def _outputs_like(module, inputs, precision, device) -> tuple:
    with autocast(precision, device):
        out = module(*_fresh(inputs))
    outputs = out if isinstance(out, tuple) else (out,)
    return tuple(o.detach().requires_grad_(o.requires_grad) for o in outputs)


def _measure(module: nn.Module, inputs: tuple, precision: str) -> dict:
    x = _fresh(inputs)
    input_storages = {t.untyped_storage().data_ptr(): k for k, t in enumerate(x) if torch.is_tensor(t)}
    saved: dict[int, int] = {}
    with _Kernels() as forward_kernels, _flop_counter() as forward_flops, autocast(precision, torch.device("cpu")):
        with memory.count_saved(saved, module.parameters()):   # the engine's rule; inputs labelled below
            out = module(*x)
    outputs = out if isinstance(out, tuple) else (out,)
    own = {ptr: j for j, ptr in enumerate(p for p in saved if p not in input_storages)}

    def label(ptr, k):
        if ptr in input_storages:
            return ("in", input_storages[ptr])
        return ("own", own[ptr]) if ptr in own else ("new", k)
    roots = [o for o in outputs if o.requires_grad]
    with _Kernels() as backward_kernels, _flop_counter() as backward_flops:
        torch.autograd.backward(roots, [torch.ones_like(o) for o in roots])
    tensors = [t for t in x if torch.is_tensor(t)]
    return {"input_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "input_grad_bytes": sum(t.numel() * t.element_size() for t in tensors if t.requires_grad),
            "saved": [(label(ptr, None), nbytes) for ptr, nbytes in saved.items()],
            "outputs": [label(o.untyped_storage().data_ptr(), k) for k, o in enumerate(outputs)],
            "forward_flops": forward_flops.get_total_flops(), "backward_flops": backward_flops.get_total_flops(),
            "forward_kernels": forward_kernels.count, "backward_kernels": backward_kernels.count}


def _time(module: nn.Module, inputs: tuple, repeats: int, make_optimizer: Callable, precision: str,
          device: torch.device) -> dict[str, float]:
    """Median seconds of a forward, a backward and a step of the task's optimizer, in this process."""
    times = {"forward": [], "backward": [], "update": []}
    optimizer = make_optimizer(list(module.parameters()))
    for attempt in range(repeats + 1):
        x = _fresh(inputs)
        _synchronize(x)
        start = time.perf_counter()
        with autocast(precision, device):
            out = module(*x)
        outputs = out if isinstance(out, tuple) else (out,)
        _synchronize(outputs)
        middle = time.perf_counter()
        roots = [o for o in outputs if o.requires_grad]
        torch.autograd.backward(roots, [torch.ones_like(o) for o in roots])
        _synchronize(outputs)
        end = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(outputs)
        if attempt:
            times["forward"].append(middle - start)
            times["backward"].append(end - middle)
            times["update"].append(time.perf_counter() - end)
    return {kind: statistics.median(v) for kind, v in times.items()}


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: the input gradient and the weight gradient each multiply
    as many pairs as the forward did (grouped or not)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _optimizer_bytes(module: nn.Module, make_optimizer: Callable) -> int:
    """Bytes of the state that one step of `make_optimizer`'s optimizer holds for the block."""
    params = list(module.parameters())
    optimizer = make_optimizer(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


class _Kernels(TorchDispatchMode):
    """Counts the aten ops that launch work (views and aliases excluded)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__.split(".")[0] not in ("detach", "alias", "lift_fresh"):
            self.count += 1
        return func(*args, **(kwargs or {}))
