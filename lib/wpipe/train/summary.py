"""What a run leaves behind: summary.json (rank 0, at the end) and config.yaml (at the start).

`<output_dir>/summary.json` holds method, pipeline_depth, data_parallel, micro_batch_size,
samples_per_second, final_loss, eval (metrics of the last evaluation), memory (one report
per rank, with the precision its bytes were measured under), history (per-epoch metrics
and per-period losses), precision (Pipeline.precision_report: settings, device, fp16
loss-scale changes and overflow skips) and the resolved config, which is also written
beside it as config.yaml when training starts (so that a run that dies can be replayed:
tool/replay.py). With `trace: true` it also holds `timeline` (per rank busy_s, wait_s,
window_s, bubble_fraction; trace.py) and every rank's events go to trace.json beside it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch.distributed as dist

from ..files import write_atomic
from ..trace import timeline_summary, write_trace

log = logging.getLogger("wpipe")


def summarize(cfg, pipe, result) -> dict:
    """Gather the loss ranks' figures and every rank's memory report."""
    mine = {"memory": pipe.memory_report(),
            "trace": pipe.trace_events() if cfg.trace else None,
            "loss_rank": pipe.computes_loss,
            "losses": result["losses"] if pipe.computes_loss else None,
            "samples_per_second": result["samples_per_second"] if pipe.computes_loss else None}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    loss_ranks = [g for g in gathered if g["loss_rank"]]
    rates = [g["samples_per_second"] for g in loss_ranks]
    losses = loss_ranks[0]["losses"] or []
    # Replicas differ only in their data: average their per-period losses.
    if all(len(g["losses"]) == len(losses) for g in loss_ranks):
        losses = [sum(g["losses"][t] for g in loss_ranks) / len(loss_ranks) for t in range(len(losses))]
    tail = [x for x in losses[-10:] if math.isfinite(x)]  # a skipped update's loss may be NaN
    history = result["history"]
    if history and losses:  # rank 0 writes the summary but may compute no loss: per-epoch means here
        per_epoch = len(losses) // len(history)
        history = [{**record, "loss": sum(losses[i * per_epoch:(i + 1) * per_epoch]) / per_epoch}
                   for i, record in enumerate(history)]
    summary = {"method": cfg.method, "pipeline_depth": cfg.pipeline_depth, "data_parallel": cfg.data_parallel,
            "micro_batch_size": cfg.micro_batch_size, "micro_batches_per_update": cfg.period,
            "mode": cfg.mode,
            "samples_per_second": sum(rates) if all(r is not None for r in rates) else None,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "eval": result["eval"], "memory": [g["memory"] for g in gathered],
            "history": history, "losses": losses, "skipped_updates": result["skipped_updates"],
            "precision": pipe.precision_report(), "config": dataclasses.asdict(cfg)}
    if cfg.trace:
        summary["timeline"] = timeline_summary([e for g in gathered for e in g["trace"]])
        summary["trace"] = [g["trace"] for g in gathered]   # written as trace.json, not in summary.json
    return summary


def write_config(out_dir: Path, cfg) -> None:
    """The resolved configuration, as YAML that --config reads back."""
    import yaml

    write_atomic(out_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def write_summary(out_dir: Path, cfg, summary: dict) -> None:
    """summary.json (and trace.json when the summary carries every rank's events)."""
    trace = summary.pop("trace", None)
    if trace is not None:
        log.info("wrote %s", write_trace(out_dir / "trace.json", trace, cfg))
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    log.info("samples/s %s, final loss %s; wrote %s", _fmt(summary["samples_per_second"]),
             _fmt(summary["final_loss"]), out_dir / "summary.json")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"
