"""The run loop of the entry points (cv/main.py, nlp/main.py): configuration, training in
checkpointed chunks with evaluation, throughput and probe modes, summary.json.

    config      TrainConfig (PipelineConfig + the run's fields), parse_cli
    loop        Task (what an entry point supplies), setup, main
    command     cli: main with bad input as one `error:` line and exit status 2
    summary     summary.json and config.yaml
    checkpoint  write, find, verify, load checkpoints
    preemption  SIGTERM/SIGINT -> checkpoint, then stop
    nonfinite   stop on (or skip) NaN/Inf losses and gradients
    probe       one device measured alone in a plain process (probe.json)
"""
from .command import cli
from .config import TrainConfig, parse_cli
from .loop import Task, main, periods_per_epoch, setup

__all__ = ["Task", "TrainConfig", "cli", "main", "parse_cli", "periods_per_epoch", "setup"]
