"""Replay a training run through the single-process oracle (`wpipe.reference.train`).

    python tool/replay.py RUN_DIR [--key value ...]

RUN_DIR is an output folder of cv/main.py or nlp/main.py (train mode): its resolved
`config.yaml` is read, `--key value` overrides change it (e.g. `--method pipedream_flush`
replays the same data and initial weights under the synchronous rule), and the whole model
trains in one process on the same micro-batches, learning-rate schedule and number of
updates, with the method's update rule applied literally. Writes
`RUN_DIR/replay_<method>[_<key><value>...].json` (the other overrides in the name): the
per-period losses, the final evaluation metrics, and,
when the method is the run's own, the largest difference from the run's losses (float32
runs without dropout agree to rounding until a diverging run amplifies it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wpipe import schedule  # noqa: E402
from wpipe.config import load_config  # noqa: E402
from wpipe.runtime import reference  # noqa: E402
from wpipe.train import parse_cli, periods_per_epoch  # noqa: E402


def entry_point(config_path: Path):
    """(config class, make_task) of the entry point that wrote `config_path`."""
    import yaml

    keys = yaml.safe_load(config_path.read_text()) or {}
    if "dataset" in keys:
        from cv.main import CvConfig, make_task
        return CvConfig, make_task
    if "task" in keys:
        from nlp.main import NlpConfig, make_task
        return NlpConfig, make_task
    raise ValueError(f"{config_path}: neither a cv (dataset) nor an nlp (task) configuration")


def replay(run_dir: Path, overrides: dict, max_periods: int | None = None) -> dict:
    """Train the run's model in one process under `overrides`; return what was measured."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: give a run folder of cv/main.py or nlp/main.py")
    config_class, make_task = entry_point(config_path)
    cfg = load_config(config_class, config_path, {"resume": None, **overrides})
    if cfg.mode != "train":
        raise ValueError(f"{config_path}: mode is {cfg.mode}; only train runs can be replayed")
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    period, replicas = cfg.period, cfg.data_parallel
    per_epoch = periods_per_epoch(cfg, len(task.train_data(0, 0)))
    total = cfg.epochs * per_epoch
    count = total if max_periods is None else min(total, max_periods)
    data = [[] for _ in range(replicas)]
    for epoch in range(math.ceil(count / per_epoch)):
        for r in range(replicas):
            data[r].extend(list(task.train_data(epoch, r))[:per_epoch * period])
    data = [d[:count * period] for d in data]
    num_partitions = schedule.num_partitions(cfg.method, cfg.pipeline_depth)
    partitions = [task.build_partition(i) for i in range(num_partitions)]
    start = time.perf_counter()
    losses = reference.train(partitions, task.loss_fn, task.make_optimizer, data[0] if replicas == 1 else data,
                             cfg.method, cfg.pipeline_depth, micro_batches_per_update=period,
                             data_parallel=replicas,
                             make_lr_scheduler=lambda optimizer: task.make_lr_scheduler(optimizer, total))
    result = {"run": str(run_dir), "method": cfg.method, "overrides": overrides, "lr": cfg.lr, "seed": cfg.seed,
              "periods": count,
              "seconds": time.perf_counter() - start, "losses": losses,
              "eval": evaluate(task, partitions, cfg.max_eval_batches) if count == total else {}}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary["method"] == cfg.method and summary.get("losses"):
            engine = summary["losses"][:count]
            diffs = [abs(a - b) for a, b in zip(engine, losses) if math.isfinite(a) and math.isfinite(b)]
            result["engine_max_abs_diff"] = max(diffs) if diffs else None
            result["engine_eval"] = summary.get("eval", {})
    return result


def evaluate(task, partitions, max_batches: int | None = None) -> dict:
    """The task's metrics of every evaluation set (its first `max_batches` micro-batches, as
    the runner takes them), on the partitions run one after another."""
    metrics = {}
    for module in partitions:
        module.eval()
    with torch.no_grad():
        for name, data in task.eval_data(0).items():
            outputs, labels = [], []
            for inputs, target in itertools.islice(data, max_batches):
                x = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
                for module in partitions:
                    x = module(*x)
                    x = x if isinstance(x, tuple) else (x,)
                outputs.append(x[0].float())
                labels.append(target)
            prefix = f"{name}_" if name else ""
            found = task.metrics(name, torch.cat(outputs), torch.cat(labels))
            metrics.update({prefix + k: v for k, v in found.items()})
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an output folder of cv/main.py or nlp/main.py")
    parser.add_argument("--periods", type=int, help="replay only the first PERIODS updates")
    args, rest = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    try:
        _, overrides = parse_cli(rest)
        result = replay(args.run_dir, overrides, args.periods)
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    name = "".join(f"_{k}{v}" for k, v in overrides.items() if k != "method")
    out = args.run_dir / f"replay_{result['method']}{name}.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    finite = [x for x in result["losses"] if math.isfinite(x)]
    print(f"{result['method']}: {result['periods']} updates in {result['seconds']:.1f} s, final loss "
          f"{(sum(finite[-10:]) / len(finite[-10:])) if finite else float('nan'):.4g}, eval {result['eval']}"
          + (f", largest difference from the run's losses {result['engine_max_abs_diff']:.3g}"
             if result.get("engine_max_abs_diff") is not None else "") + f"; wrote {out}")


if __name__ == "__main__":
    main()
