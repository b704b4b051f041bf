"""Which configuration of a model trains fastest on G devices of a given kind, predicted.

    python tool/plan.py --config network_conf/X.yaml --hardware network_conf/hardware/H.yaml
                        --gpus G [--methods LIST] [--micro-batches LIST] [--recompute on,off]
                        [--splits uniform,balanced] [--top K] [--largest-only] [--json FILE]

For each method it enumerates pipeline depth x data parallel = G, micro-batch sizes 1..512,
recomputation on and off, both rank layouts and two splits (wpipe.planning.plan), keeps those whose
predicted per-device memory fits the hardware's budget, and prints them ranked by predicted
samples/s, then the best per method with ratios to pipedream_2bw's best. `--json FILE`
writes the fitting candidates (a list of objects with method, pipeline_depth,
data_parallel, micro_batch_size, recompute, predicted_samples_per_second,
predicted_memory_bytes: the largest device's, and more).

The model's blocks are measured once on this machine's CPU (wpipe.planning.measure: a few seconds,
one block at a time) and cached under --cache-dir. Op times come from the hardware file:
FLOP counts at its efficiency, or the FLOP/s its probe profile measured (op_times: profile).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wpipe.planning import plan as planner  # noqa: E402
from wpipe.planning.blockcost import BlockCost  # noqa: E402
from wpipe.config import load_config  # noqa: E402
from wpipe.planning.hardware import load_hardware  # noqa: E402


def load_model(config_path: str | Path):
    """(ModelBlocks, config) of a cv or nlp configuration file (cv when it names a `model`)."""
    import yaml
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if "model" in raw:
        from cv.main import CvConfig, model_blocks
        cfg = load_config(CvConfig, path)
    else:
        from nlp.main import NlpConfig, model_blocks
        cfg = load_config(NlpConfig, path)
    return model_blocks(cfg), cfg


def measured_blocks(model, cache_dir: Path | None) -> list[BlockCost]:
    """The model's block costs, from the cache when measured before on this code."""
    cache = cache_dir / f"blocks_{model.description}.json" if cache_dir else None
    if cache and cache.is_file():
        return [BlockCost.from_json(b) for b in json.loads(cache.read_text())]
    blocks = model.measure()
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([b.to_json() for b in blocks]))
    return blocks


def profile_rates(hw, blocks, model):
    """(forward, backward) FLOP/s that the hardware's probe profile measured, or None."""
    if hw.op_times != "profile":
        return None
    path = ROOT / hw.profile
    if not path.is_file():
        raise FileNotFoundError(f"hardware {hw.name}: profile {path} does not exist")
    return planner.probe_rates(json.loads(path.read_text()), blocks, model.uniform_plan)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a cv or nlp YAML (network_conf/...)")
    parser.add_argument("--hardware", required=True, help="network_conf/hardware/*.yaml")
    parser.add_argument("--gpus", type=int, required=True, help="devices G = pipeline depth x data parallel")
    parser.add_argument("--methods", default=",".join(planner.METHODS))
    parser.add_argument("--micro-batches", default=",".join(map(str, planner.MICRO_BATCHES)))
    parser.add_argument("--recompute", default="off,on", help="off, on or off,on")
    parser.add_argument("--splits", default=",".join(planner.SPLITS))
    parser.add_argument("--top", type=int, default=15, help="ranked candidates printed")
    parser.add_argument("--largest-only", action="store_true",
                        help="time only the largest fitting micro-batch of each configuration (faster)")
    parser.add_argument("--json", help="write the fitting candidates here")
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"),
                        help="where measured block costs are kept ('' for none)")
    args = parser.parse_args(argv)
    try:
        methods = [m for m in args.methods.split(",") if m]
        for m in methods:
            if m not in planner.METHODS:
                raise ValueError(f"--methods: unknown method {m!r}; choose from {', '.join(planner.METHODS)}")
        splits = [s for s in args.splits.split(",") if s]
        for s in splits:
            if s not in planner.SPLITS:
                raise ValueError(f"--splits: unknown split {s!r}; choose from {', '.join(planner.SPLITS)}")
        recompute = []
        for r in args.recompute.split(","):
            if r not in ("on", "off"):
                raise ValueError(f"--recompute: expected on, off or off,on, got {args.recompute!r}")
            recompute.append(r == "on")
        try:
            sizes = [int(b) for b in args.micro_batches.split(",")]
        except ValueError:
            raise ValueError(f"--micro-batches: expected integers separated by commas, got "
                             f"{args.micro_batches!r}") from None
        if args.gpus < 1 or any(b < 1 for b in sizes):
            raise ValueError("--gpus and every --micro-batches size must be >= 1")
        hw = load_hardware(args.hardware)
        model, _ = load_model(args.config)
        blocks = measured_blocks(model, Path(args.cache_dir) if args.cache_dir else None)
        rates = profile_rates(hw, blocks, model)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    candidates = planner.plan(blocks, model.uniform_plan, hw, args.gpus, methods, sizes, recompute, splits, rates,
                              args.largest_only)
    print(f"{model.description} on {args.gpus} devices; op times: "
          + ("FLOP/s measured by the probe " + hw.profile if rates else
             f"FLOP counts at {hw.efficiency:.0%} of {hw.peak_tflops:g} TFLOP/s" if hw.op_times == "flops"
             else "measured per block"))
    print(planner.format_table(candidates, hw, args.top))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([c.to_json() for c in candidates], indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
