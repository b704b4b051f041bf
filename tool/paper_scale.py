"""Where WPipe's memory buys speed over PipeDream-2BW, predicted: writes docs/paper_scale.md and its PNG.

    python tool/paper_scale.py [--hardware network_conf/hardware/v100_16gb_8x.yaml]
                               [--output docs/paper_scale.md] [--validation runs/validate/validate.json]

* The map: BERT (BERT-Base and BERT-Large widths, sequence 128 and 512; 96 layers on 8
  GPUs, 384 on 64) and the paper's ResNeXts (200 and 302 on 8 GPUs, 500 and 800 on 64), on
  the V100 16 and 32 GB, H100 and H200 presets, fp32 and fp16: best WPipe over best 2BW,
  each the fastest configuration that fits the same device (wpipe.planning.plan, the
  largest fitting micro-batch of each configuration timed), as a table and a heat map, each
  ratio split into factors (wpipe.planning.compare).
* Memory like for like: the largest micro-batch each method fits at each of the paper's
  layouts, and both methods' memory at one configuration.
* The released scripts: exactly the configurations experiments/*_throughput_*.sh sweep at
  paper scale (parsed from their headers), on --hardware, fp32 as they run.
* The op-time fits (network_conf/profiles/): parameters, leave-one-out errors, the check of
  the inference-to-training rule against published training throughput.
Every figure is a prediction of the cost model; --validation adds the CPU-scale check
(tool/validate_model.py) as measured figures. This module computes; tool/paper_scale_page.py
writes the page and draws the heat map.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_chains import CACHE, ROOT, load_model, workload  # noqa: E402
from paper_scale_page import PRECISIONS, PRESETS, heat_map, markdown  # noqa: E402

from wpipe.planning import plan as planner  # noqa: E402
from wpipe.planning.compare import Decomposition, decompose  # noqa: E402
from wpipe.planning.evaluate import Configuration, evaluate  # noqa: E402
from wpipe.planning.hardware import load_hardware  # noqa: E402
from wpipe.planning.optimes import FittedTimes, load_profile  # noqa: E402

HARDWARE = ROOT / "network_conf" / "hardware"
BERT_WIDTHS = {"Base": {"hidden": 768, "heads": 12, "ffn": 3072}, "Large": {"hidden": 1024, "heads": 16, "ffn": 4096}}
BERT_DEPTHS = {8: ("nlp_throughput_bert96", 96), 64: ("nlp_throughput_bert384", 384)}
RESNEXTS = [("ResNeXt-200", "cv_throughput_resnext200", 8), ("ResNeXt-302", "cv_throughput_resnext302", 8),
            ("ResNeXt-500", "cv_throughput_resnext500", 64), ("ResNeXt-800", "cv_throughput_resnext800", 64)]
PAPER_LAYOUTS = {8: [(8, 1), (4, 2), (2, 4)], 64: [(64, 1), (32, 2), (16, 4), (8, 8), (4, 16)]}
COMPARED = ("wpipe", "pipedream_2bw")

@dataclass
class MapModel:
    label: str
    config: str
    overrides: dict
    gpus: int
    family: str


@dataclass
class Cell:
    """One model on one preset at one precision: each method's best and the ratio's factors."""
    best: dict                    # method -> plan.Candidate (absent: nothing fits)
    decomposition: Decomposition | None
    times: str                    # the op-time source, in words
    fitted: bool                  # op times from fitted curves (else the FLOP model)

    @property
    def ratio(self) -> float | None:
        w, b = self.best.get("wpipe"), self.best.get("pipedream_2bw")
        return w.predicted_samples_per_second / b.predicted_samples_per_second if w and b else None


def map_models() -> list[MapModel]:
    out = []
    for gpus, (config, layers) in BERT_DEPTHS.items():
        for width, sizes in BERT_WIDTHS.items():
            for seq in (128, 512):
                out.append(MapModel(f"BERT-{width} x{layers}, seq {seq}", config,
                                    {**sizes, "max_seq_length": seq}, gpus, "bert"))
    out += [MapModel(label, config, {}, gpus, "resnext") for label, config, gpus in RESNEXTS]
    return out


def script_sweeps() -> list[dict]:
    """What experiments/*_throughput_*.sh sweep at paper scale, read from the invocation each
    one documents in its header (the line that sets CONFIG and runs the script), with the
    methods they default to: per script `script`, `gpus`, `layouts` [(N, D)], `configs`,
    `micro_batches`, `recompute` [bool], `methods`."""
    out = []
    for path in sorted((ROOT / "experiments").glob("*_throughput_*.sh")):
        text = path.read_text()
        comment = "\n".join(line[1:] for line in text.splitlines() if line.startswith("#"))
        joined = re.sub(r"\\\n\s*", " ", comment)
        line = re.search(r'^(.*\bCONFIG="[^"]*".*\bsh experiments/\S+)\s*$', joined, re.M)
        if not line:
            raise ValueError(f"{path}: no documented paper-scale invocation (a line setting CONFIG=...)")
        values = {k: v.strip('"').split() for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', line.group(1))}
        methods = re.search(r"METHODS=\$\{METHODS:-([^}]*)\}", text)
        if not methods:   # a multi-node script runs the single-node one with the same defaults
            runs = re.search(r'exec sh "\$\(dirname "\$0"\)/(\S+\.sh)"', text)
            methods = re.search(r"METHODS=\$\{METHODS:-([^}]*)\}", (path.parent / runs.group(1)).read_text())
        out.append({"script": f"experiments/{path.name}",
                    "gpus": int(values.get("NNODES", ["1"])[0]) * int(values["NPROC_PER_NODE"][0]),
                    "layouts": [tuple(int(x) for x in layout.split("x")) for layout in values["LAYOUTS"]],
                    "configs": values["CONFIG"], "micro_batches": [int(b) for b in values["MICRO_BATCHES"]],
                    "recompute": [r == "true" for r in values["RECOMPUTE"]], "methods": methods.group(1).split()})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardware", default=str(HARDWARE / "v100_16gb_8x.yaml"),
                        help="the preset of the released scripts' section")
    parser.add_argument("--output", default=str(ROOT / "docs" / "paper_scale.md"))
    parser.add_argument("--validation", help="validate.json of tool/validate_model.py, shown as measured")
    parser.add_argument("--cache-dir", default=str(CACHE))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cache = Path(args.cache_dir)
    presets = {key: load_hardware(HARDWARE / f"{key}.yaml") for _, key in PRESETS}
    script_hw = load_hardware(args.hardware)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)

    def progress(what):
        print(f"{what} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    models = [(m, load_model(ROOT / "network_conf" / f"{m.config}.yaml", m.overrides)[0]) for m in map_models()]
    cells = {}
    for m, model in models:
        for _, key in PRESETS:
            for precision in PRECISIONS:
                cells[m.label, key, precision] = map_cell(model, m, presets[key], precision, cache)
        progress(f"map: {m.label}")
    memory = memory_rows(models, presets["v100_16gb_8x"], cache)
    progress("memory like for like")
    scripts = script_rows(script_hw, cache)
    equal = equal_ratios(scripts, script_hw, cache)
    progress("released scripts")
    validation = json.loads(Path(args.validation).read_text()) if args.validation else None
    image = heat_map(cells, [m for m, _ in models], out.parent / "paper_scale_map.png")
    profile = load_profile(presets["v100_16gb_8x"].profile_path)
    out.write_text(markdown(cells, [m for m, _ in models], presets, memory, scripts, equal, script_hw, profile,
                            validation, image, time.perf_counter() - started))
    print(f"wrote {out} and {out.parent / image}")
    return 0


def map_cell(model, m: MapModel, hw, precision: str, cache: Path) -> Cell:
    target = workload(model, hw, precision, cache)
    splits = ("uniform", "balanced") if m.family == "resnext" else ("uniform",)
    candidates = planner.plan(target, m.gpus, COMPARED, splits=splits, best_only=True)
    best = planner.best_per_method(candidates)
    parts = None
    if len(best) == 2:
        parts = decompose(target, best["wpipe"].configuration, best["pipedream_2bw"].configuration)
    return Cell(best, parts, target.times.description, isinstance(target.times, FittedTimes))


def memory_rows(models, hw, cache: Path) -> list[dict]:
    """For the paper's own models (BERT-Base, sequence 128; the ResNeXts) at the paper's
    layouts on `hw`, fp32, recompute off and on: the largest micro-batch each method fits,
    and both methods' memory at one configuration: 2BW's largest fitting micro-batch."""
    rows = []
    for m, model in models:
        if not (m.family == "resnext" or (m.label.startswith("BERT-Base") and m.overrides["max_seq_length"] == 128)):
            continue
        target = workload(model, hw, "fp32", cache)
        for (n, d), recompute in ((x, r) for x in PAPER_LAYOUTS[m.gpus] for r in (False, True)):
            largest = {method: largest_fitting(target, Configuration(method, n, d, 1, recompute))
                       for method in COMPARED}
            b = largest["pipedream_2bw"] or 1
            equal = {method: evaluate(target, Configuration(method, n, d, b, recompute), timed=False)
                     for method in COMPARED}
            rows.append({"model": m.label, "layout": f"{n}x{d}", "recompute": recompute, "largest": largest,
                         "micro_batch": b, "memory": {k: e.memory_bytes for k, e in equal.items()},
                         "fits": {k: e.fits for k, e in equal.items()}})
    return rows


def largest_fitting(target, c: Configuration) -> int | None:
    """The largest micro-batch (of plan.MICRO_BATCHES) at which c fits, or None."""
    best = None
    for b in planner.MICRO_BATCHES:
        if not evaluate(target, Configuration(c.method, c.pipeline_depth, c.data_parallel, b, c.recompute),
                        timed=False).fits:
            break
        best = b
    return best


def script_rows(hw, cache: Path) -> list[dict]:
    """Every configuration the released scripts sweep (script_sweeps), on `hw` in fp32 with
    their rank layout (pipeline-major) and split (uniform): predicted samples/s per
    micro-batch size, None where it does not fit."""
    rows = []
    for sweep in script_sweeps():
        for config in sweep["configs"]:
            model, _ = load_model(ROOT / config)
            target = workload(model, hw, "fp32", cache)
            for (n, d), recompute, method in ((x, r, k) for x in sweep["layouts"] for r in sweep["recompute"]
                                               for k in sweep["methods"]):
                depth, dp = (1, n * d) if method == "data_parallel" else (n, d)
                speeds = {}
                for b in sweep["micro_batches"]:
                    c = Configuration(method, depth, dp, b, recompute)
                    fits = evaluate(target, c, timed=False).fits
                    speeds[b] = evaluate(target, c).samples_per_second if fits else None
                    if not fits:
                        break
                rows.append({"script": sweep["script"], "config": config, "layout": f"{n}x{d}", "method": method,
                             "recompute": recompute, "speeds": speeds, "sizes": sweep["micro_batches"]})
    return rows


def equal_ratios(rows, hw, cache: Path) -> dict:
    """WPipe / 2BW at equal configuration over the released scripts' sweep (where both fit):
    every ratio, and for the largest the same ratio with optimizer steps and all-reduces made
    free (what the per-update costs account for)."""
    speeds = {(r["config"], r["layout"], r["recompute"], r["method"]): r["speeds"] for r in rows}
    ratios = []
    for (config, layout, recompute, method), mine in speeds.items():
        other = speeds.get((config, layout, recompute, "pipedream_2bw"))
        if method == "wpipe" and other:
            ratios += [(mine[b] / other[b], config, layout, recompute, b) for b in mine if mine[b] and other.get(b)]
    ratios.sort(reverse=True)
    top = ratios[0]
    target = workload(load_model(ROOT / top[1])[0], hw, "fp32", cache)
    n, d = (int(x) for x in top[2].split("x"))
    free = [evaluate(target, Configuration(m, n, d, top[4], top[3]), per_update=False).samples_per_second
            for m in COMPARED]
    return {"ratios": ratios, "top_without_updates": free[0] / free[1]}


if __name__ == "__main__":
    sys.exit(main())
