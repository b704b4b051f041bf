"""Which configuration of a model trains fastest on G devices of a given kind, predicted.

    python tool/plan.py --config network_conf/X.yaml --hardware network_conf/hardware/H.yaml
                        --gpus G [--methods LIST] [--micro-batches LIST] [--recompute off,on]
                        [--splits uniform,balanced] [--precisions fp32,fp16] [--layouts NxD,...]
                        [--rank-layouts LIST] [--top K] [--largest-only] [--json FILE] [--check]

For each method it enumerates pipeline depth x data parallel = G, micro-batch sizes 1..512,
recomputation on and off, both rank layouts, two splits and the precisions asked for
(wpipe.planning.plan), keeps those whose predicted per-device memory fits the hardware's
budget, and prints them ranked by predicted samples/s, then the best per method with
ratios to pipedream_2bw's best. `--json FILE` writes the fitting candidates (a list of
objects with method, pipeline_depth, data_parallel, micro_batch_size, recompute,
precision, predicted_samples_per_second, predicted_memory_bytes: the largest device's, and
more). `--layouts 8x1,4x2,2x4 --methods wpipe,pipedream_2bw --splits uniform --rank-layouts
pipeline_major` is exactly what experiments/*_throughput_*.sh sweep on 8 GPUs.

The model's blocks are measured once per precision on this machine's CPU
(wpipe.planning.measure: seconds, one block at a time) and cached under --cache-dir. Op
times come from the hardware file (wpipe.planning.optimes): curves fitted to published or
profiled measurements, the FLOP model, or, for the CPU preset, each block timed here at
each micro-batch size given. Bad input prints one `error:` line (exit status 2) before
anything is measured; `--check` stops there, printing which op times would be used.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_chains import CACHE, check_op_times, load_model, workload  # noqa: E402

from wpipe.planning import plan as planner  # noqa: E402
from wpipe.planning.hardware import load_hardware  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a cv or nlp YAML (network_conf/...)")
    parser.add_argument("--hardware", required=True, help="network_conf/hardware/*.yaml")
    parser.add_argument("--gpus", type=int, required=True, help="devices G = pipeline depth x data parallel")
    parser.add_argument("--methods", default=",".join(planner.METHODS))
    parser.add_argument("--micro-batches", help=f"default {','.join(map(str, planner.MICRO_BATCHES))}")
    parser.add_argument("--recompute", default="off,on", help="off, on or off,on")
    parser.add_argument("--splits", default=",".join(planner.SPLITS))
    parser.add_argument("--precisions", default="fp32", help="fp32, fp16, bf16 (those the preset trains in)")
    parser.add_argument("--layouts", help="only these N x D, e.g. 8x1,4x2,2x4 (default: every one)")
    parser.add_argument("--rank-layouts", default=",".join(planner.LAYOUTS))
    parser.add_argument("--top", type=int, default=15, help="ranked candidates printed")
    parser.add_argument("--largest-only", action="store_true",
                        help="time only the largest fitting micro-batch of each configuration (faster)")
    parser.add_argument("--json", help="write the fitting candidates here")
    parser.add_argument("--cache-dir", default=str(CACHE), help="where measured block costs are kept ('' for none)")
    parser.add_argument("--check", action="store_true", help="check the input and print the op times, then stop")
    args = parser.parse_args(argv)
    try:
        options = parse_options(args)
        hw = load_hardware(args.hardware)
        model, _ = load_model(args.config)
        times = {p: check_op_times(model, hw, p, args.micro_batches is not None) for p in options["precisions"]}
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{model.description} on {args.gpus} devices of {hw.name}")
    for precision, description in times.items():
        print(f"op times, {precision}: {description}")
    if args.check:
        return 0
    candidates = []
    for precision in options["precisions"]:
        target = workload(model, hw, precision, Path(args.cache_dir) if args.cache_dir else None,
                          options["micro_batches"])
        candidates += planner.plan(target, args.gpus, options["methods"], options["micro_batches"],
                                   options["recompute"], options["splits"], args.largest_only,
                                   options["rank_layouts"], options["layouts"])
    candidates.sort(key=lambda c: -c.predicted_samples_per_second)
    print(planner.format_table(candidates, hw, args.top))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([c.to_json() for c in candidates], indent=1))
        print(f"wrote {args.json}")
    return 0


def parse_options(args) -> dict:
    """The list-valued flags, checked; ValueError naming the flag otherwise."""
    def choices(flag, text, valid):
        values = [v for v in text.split(",") if v]
        for v in values:
            if v not in valid:
                raise ValueError(f"--{flag}: unknown value {v!r}; choose from {', '.join(valid)}")
        if not values:
            raise ValueError(f"--{flag}: expected at least one of {', '.join(valid)}")
        return values

    out = {"methods": choices("methods", args.methods, planner.METHODS),
           "splits": choices("splits", args.splits, planner.SPLITS),
           "precisions": choices("precisions", args.precisions, ("fp32", "fp16", "bf16")),
           "rank_layouts": choices("rank-layouts", args.rank_layouts, planner.LAYOUTS),
           "recompute": [r == "on" for r in choices("recompute", args.recompute, ("off", "on"))]}
    text = args.micro_batches or ",".join(map(str, planner.MICRO_BATCHES))
    try:
        out["micro_batches"] = [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--micro-batches: expected integers separated by commas, got {text!r}") from None
    if args.gpus < 1 or any(b < 1 for b in out["micro_batches"]):
        raise ValueError("--gpus and every --micro-batches size must be >= 1")
    out["layouts"] = None
    if args.layouts:
        out["layouts"] = {tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")
                          if re.fullmatch(r"[1-9]\d*x[1-9]\d*", layout)}
        if len(out["layouts"]) != len(set(args.layouts.split(","))):
            raise ValueError(f"--layouts: expected NxD,... (e.g. 8x1,4x2), got {args.layouts!r}")
        wrong = sorted(f"{n}x{d}" for n, d in out["layouts"] if n * d != args.gpus)
        if wrong:
            raise ValueError(f"--layouts: {', '.join(wrong)} do not use --gpus {args.gpus} devices (N x D = G)")
    return out


if __name__ == "__main__":
    sys.exit(main())
