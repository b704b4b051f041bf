"""Measure this machine's device and write a profile the planner fits its op times to.

    python tool/profile_device.py --configs network_conf/nlp_throughput_bert96.yaml,network_conf/cv_...yaml
                                  --micro-batches 1,2,4,8,16,32 --precisions fp32,fp16,bf16
                                  --output network_conf/profiles/<gpu>_measured.yaml [--device cuda] [--repeats 5]

For each configuration's model (its chain of blocks, tool/model_chains.py) and precision, it
times every block kind's forward and backward at each micro-batch size on the device
(wpipe.planning.measure.time_blocks: the median of --repeats after one untimed pass, the
device synchronised around each part, forwards under the precision's autocast) and writes
one forward and one backward curve per model and precision: the samples/s of the whole
chain run block after block (network_conf/profiles/README.md says the form), with the
device's name, this command and the code's commit as the source. A hardware preset uses it
with `op_times: fitted` and `profile: ../profiles/<file>`. Measured backward curves replace
the backward = 2 x forward rule. On a machine without a GPU it measures the CPU (what the
test suite does with a tiny model).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from model_chains import CACHE, ROOT, load_model  # noqa: E402

from wpipe.files import write_atomic  # noqa: E402
from wpipe.planning.measure import PRECISIONS, cached_blocks, time_blocks  # noqa: E402
from wpipe.planning.optimes import load_profile, model_shape  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", required=True, help="cv or nlp YAMLs, comma-separated")
    parser.add_argument("--micro-batches", default="1,2,4,8,16,32")
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--output", required=True, help="the profile YAML to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", default=str(CACHE), help="where measured block FLOPs are kept")
    args = parser.parse_args(argv)
    try:
        sizes = [int(b) for b in args.micro_batches.split(",")]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --micro-batches: expected two or more integers >= 1, got {args.micro_batches!r}",
              file=sys.stderr)
        return 2
    precisions = args.precisions.split(",")
    wrong = [p for p in precisions if p not in PRECISIONS]
    if wrong:
        print(f"error: --precisions: unknown {wrong[0]!r}; choose from {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
        models = [load_model(ROOT / c if not Path(c).is_absolute() else c)[0] for c in args.configs.split(",")]
        shapes = [model_shape(m.description) for m in models]
        unknown = [m.description for m, shape in zip(models, shapes) if shape is None]
        if unknown:
            raise ValueError(f"--configs: no curve family for model {unknown[0]} (BERT and ResNeXt only)")
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    source = {"device": name, "tool": "tool/profile_device.py", "command": " ".join(["python", *sys.argv]),
              "commit": _commit(), "torch": str(torch.__version__), "date": datetime.date.today().isoformat()}
    curves = []
    for model, shape in zip(models, shapes):
        flops = sum(b.forward_flops(1) for b in cached_blocks(model, Path(args.cache_dir) if args.cache_dir else None))
        for precision in precisions:
            seconds = {}
            for b in sizes:
                try:
                    seconds[b] = time_blocks(model.specs, model.make_inputs, model.make_optimizer, b, args.repeats,
                                             precision, device)
                except (ValueError, RuntimeError) as error:    # the model refuses the size (e.g. BatchNorm at 1x1)
                    print(f"error: {model.description} at micro-batch {b}, {precision}: "
                          f"{' '.join(str(error).split())}", file=sys.stderr)
                    return 2
            for pass_ in ("forward", "backward"):
                curves.append({
                    "family": shape["family"], "network": model.description,
                    "shape": {k: v for k, v in shape.items() if k != "family"}, "precision": precision,
                    "pass": pass_, "network_blocks": len(model.specs), "network_forward_flop": float(flops),
                    "points": {b: b / sum(block[pass_] for block in seconds[b]) for b in sizes},
                    "source": dict(source)})
            print(f"{model.description} {precision}: timed at micro-batch {', '.join(map(str, sizes))}", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "# Measured by tool/profile_device.py (its docstring says how); the source of every curve\n"
                      "# names the device, the command and the commit.\n"
                 + yaml.safe_dump({"device": name, "curves": curves}, sort_keys=False))
    load_profile(out)    # what was written reads back as a profile
    print(f"wrote {out}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
