"""The models the tools plan, measure and validate (a module the tools share, not a tool).

* `load_model(config)`: a cv or nlp configuration file as the cost model's chain of blocks
  (the entry points' `model_blocks`), with `--key value`-style overrides;
* `workload(model, hw, precision)`: its blocks measured once per model and precision on
  this CPU (cached under runs/cache), with the hardware's op-time source
  (wpipe.planning.optimes), ready for wpipe.planning.evaluate;
* `check_op_times(...)`: what a planning run needs that only the hardware can lack, checked
  before anything is measured;
* `build_blocks`, `make_optimizer`: tool/bench.py's model (identical transformer layers).

The tools import it as a sibling module (Python puts a script's own folder first on
sys.path); tests import it through pytest's pythonpath.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))      # cv/ and nlp/, the entry points' model code

from wpipe.config import load_config  # noqa: E402
from wpipe.planning.evaluate import Workload  # noqa: E402
from wpipe.planning.measure import ModelBlocks, cached_blocks, time_blocks  # noqa: E402
from wpipe.planning.optimes import model_shape, op_times  # noqa: E402

CACHE = ROOT / "runs" / "cache"


def load_model(config_path: str | Path, overrides: dict | None = None):
    """(ModelBlocks, config) of a cv or nlp configuration file (cv when it names a `model`)."""
    import yaml
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    overrides = {k: str(v) for k, v in (overrides or {}).items()}
    if "model" in raw:
        from cv.main import CvConfig, model_blocks
        cfg = load_config(CvConfig, path, overrides)
    else:
        from nlp.main import NlpConfig, model_blocks
        cfg = load_config(NlpConfig, path, overrides)
    return model_blocks(cfg), cfg


def check_op_times(model: ModelBlocks, hw, precision: str, micro_batches_given: bool) -> str:
    """The description of the op times `workload` will use, or ValueError naming what is
    missing: a precision the preset does not train in, or, for a preset whose op times are
    measured in this process (each block timed on this CPU at each micro-batch size
    planned), micro-batch sizes chosen by the user rather than the default sweep to 512."""
    times = op_times(hw, precision, model_shape(model.description))
    if hw.op_times == "measured" and not micro_batches_given:
        raise ValueError(f"hardware {hw.label}: op_times measured times every block on this CPU at each "
                         f"micro-batch size planned: name the sizes with --micro-batches (e.g. --micro-batches 8), "
                         f"or plan for a GPU preset (op_times fitted or flops)")
    return times.description


def workload(model: ModelBlocks, hw, precision: str = "fp32", cache_dir: Path | None = CACHE,
             timed_micro_batches=()) -> Workload:
    """The model's blocks at `precision` (measured on this CPU, cached) on `hw` with its op
    times; a measured preset's blocks are timed here at each of `timed_micro_batches`."""
    if hw.op_times == "measured":
        blocks = model.measure(precision=precision)
        for b in sorted(set(timed_micro_batches)):
            for block, seconds in zip(blocks, time_blocks(model.specs, model.make_inputs, model.make_optimizer,
                                                          b, 3, precision)):
                block.seconds[b] = seconds
    else:
        blocks = cached_blocks(model, cache_dir, precision)
    return Workload(blocks, model.uniform_plan, hw, op_times(hw, precision, model_shape(model.description)),
                    precision)


def build_blocks(args, indices) -> nn.Sequential:
    """tool/bench.py's blocks `indices` (args.hidden wide); block i is seeded by i, so any
    cut holds the same weights."""
    blocks = []
    for i in indices:
        torch.manual_seed(1000 + i)
        blocks.append(nn.TransformerEncoderLayer(args.hidden, nhead=4, dim_feedforward=4 * args.hidden,
                                                 dropout=0.0, batch_first=True))
    return nn.Sequential(*blocks)


def make_optimizer(params):
    """tool/bench.py's optimizer."""
    return torch.optim.AdamW(params, lr=1e-4)
