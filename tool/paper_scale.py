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
(tool/validate_model.py) as measured figures.
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

from wpipe.planning import plan as planner  # noqa: E402
from wpipe.planning.compare import FACTORS, Decomposition, decompose  # noqa: E402
from wpipe.planning.evaluate import Configuration, evaluate  # noqa: E402
from wpipe.planning.hardware import load_hardware  # noqa: E402
from wpipe.planning.optimes import BACKWARD_PER_FORWARD, FittedTimes, leave_one_out, load_profile  # noqa: E402

HARDWARE = ROOT / "network_conf" / "hardware"
PRESETS = [("V100 16 GB", "v100_16gb_8x"), ("V100 32 GB", "v100_32gb_8x"), ("H100 80 GB", "h100_80gb_8x"),
           ("H200 141 GB", "h200_141gb_8x")]
PRECISIONS = ("fp32", "fp16")
BERT_WIDTHS = {"Base": {"hidden": 768, "heads": 12, "ffn": 3072}, "Large": {"hidden": 1024, "heads": 16, "ffn": 4096}}
BERT_DEPTHS = {8: ("nlp_throughput_bert96", 96), 64: ("nlp_throughput_bert384", 384)}
RESNEXTS = [("ResNeXt-200", "cv_throughput_resnext200", 8), ("ResNeXt-302", "cv_throughput_resnext302", 8),
            ("ResNeXt-500", "cv_throughput_resnext500", 64), ("ResNeXt-800", "cv_throughput_resnext800", 64)]
PAPER_LAYOUTS = {8: [(8, 1), (4, 2), (2, 4)], 64: [(64, 1), (32, 2), (16, 4), (8, 8), (4, 16)]}
COMPARED = ("wpipe", "pipedream_2bw")
PAPER_SPEEDUP, PAPER_MEMORY = 1.4, 0.64
GIB = 2 ** 30
NOTABLE = 0.02
"""A ratio this far from 1 gets its carrying factor's letter in the map."""
SHORT = {"schedule": "S", "recompute": "R", "micro-batch efficiency": "E", "per-update amortisation": "A",
         "layout": "L"}


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


def notable(cell: Cell) -> bool:
    return cell.decomposition is not None and abs(cell.ratio - 1) >= NOTABLE


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


def heat_map(cells, models: list[MapModel], path: Path) -> str:
    """Ratios as a heat map, each cell annotated with the ratio and its carrying factor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    columns = [(label, key, p) for label, key in PRESETS for p in PRECISIONS]
    values = [[cells[m.label, key, p].ratio or float("nan") for _, key, p in columns] for m in models]
    fig, ax = plt.subplots(figsize=(11, 7.5))
    image = ax.imshow(values, cmap="RdBu", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.7, vmax=1.5), aspect="auto")
    for i, m in enumerate(models):
        for j, (_, key, p) in enumerate(columns):
            cell = cells[m.label, key, p]
            if cell.ratio is None:
                text = "nothing\nfits" if not cell.best else "one\nfits"
            else:
                text = f"{cell.ratio:.2f}" + (f"\n{SHORT[cell.decomposition.carrier]}" if notable(cell) else "")
            strong = cell.ratio is not None and abs(cell.ratio - 1) > 0.3
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if strong else "black",
                    fontweight="bold" if cell.ratio and cell.ratio >= PAPER_SPEEDUP else "normal")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([f"{label}\n{p}" + ("" if cells[models[0].label, key, p].fitted else "\n(FLOP model)")
                        for label, key, p in columns], fontsize=8)
    ax.set_yticks(range(len(models)))
    ax.set_yticklabels([f"{m.label} ({m.gpus} GPUs)" for m in models], fontsize=8)
    ax.set_title("PREDICTED samples/s of WPipe's best / PipeDream-2BW's best on the same devices\n"
                 "letter: the factor that carries the ratio (S schedule, R recompute, E micro-batch efficiency, "
                 "A per-update amortisation, L layout)", fontsize=9)
    fig.colorbar(image, ax=ax, label="WPipe / 2BW (paper: 1.4)", shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def markdown(cells, models, presets, memory, scripts, equal, script_hw, profile, validation, image, seconds) -> str:
    lines = ["# Where WPipe's memory buys speed over PipeDream-2BW (predicted)", "",
             "Generated by `sh experiments/paper_scale.sh` (tool/paper_scale.py); do not edit by hand. "
             "**Every figure on this page is predicted** by the cost model (wpipe.planning) unless a section says "
             "measured; no GPU has run this code.", ""]
    lines += conclusion(cells, models, memory, profile, equal, script_hw)
    lines += method_lines(presets, profile)
    lines += map_lines(cells, models, image)
    lines += factor_lines(cells, models)
    lines += memory_lines(memory)
    lines += script_lines(scripts, equal, script_hw)
    lines += fit_lines(profile)
    lines += probe_command_lines()
    lines += _validation_lines(validation) if validation else [
        "## Validation at CPU scale (measured)", "",
        "Not part of this generation: `VALIDATE=1 sh experiments/paper_scale.sh` first runs tool/validate_model.py "
        "(real 2-process CPU runs against the same chain, about 17 minutes on an idle machine) and adds its measured "
        "table here. The latest recorded validation is in docs/planning.md.", ""]
    lines += ["", "## What the model does not capture", "",
              "* Shape-dependent efficiency beyond the fitted curves: a block of another width or sequence takes the "
              "nearest published curve's fixed cost share and marginal FLOP rate; curves measured up to batch 8 "
              "(BERT) or 64-128 (ResNeXt) are extrapolated as straight lines beyond.",
              f"* Training from inference: backward = {BACKWARD_PER_FORWARD:g} x forward is assumed (see the check "
              "above); the optimizer step is bound by memory bandwidth.",
              "* Contention: concurrent transfers and all-reduces sharing a link or a node's network port; the "
              "all-reduce is a ring over the slowest link of its group.",
              "* Memory beyond the accounting: the CUDA context, allocator fragmentation, temporary buffers inside "
              "an op (a fixed share of the device is kept free instead). fp16 bytes are measured on CPU under "
              "bfloat16 autocast, a stand-in for a GPU's fp16 autocast (same element size; the op lists differ in "
              "a few ops).",
              "* H100 and H200 have no published per-batch curve here: their figures use the FLOP model with an "
              "assumed efficiency and launch cost (their presets say so); the prepared profile command above would "
              "replace that with measured curves.",
              "", f"Generated in {seconds:.0f} s on CPU."]
    return "\n".join(lines) + "\n"


def conclusion(cells, models, memory, profile, equal, script_hw) -> list[str]:
    """The page's first section: where WPipe beats 2BW, by how much, where not, and why."""
    rated = [(key, cell) for key, cell in cells.items() if cell.ratio is not None]
    family = {m.label: m.family for m in models}
    above = sorted((kc for kc in rated if kc[1].ratio >= PAPER_SPEEDUP), key=lambda kc: -kc[1].ratio)
    better = [kc for kc in rated if kc[1].ratio >= 1.05]
    worse = [kc for kc in rated if kc[1].ratio <= 0.97]
    carriers = {}
    for _, cell in better:
        if cell.decomposition:
            carriers[cell.decomposition.carrier] = carriers.get(cell.decomposition.carrier, 0) + 1
    lines = ["## Conclusion", "",
             f"Every figure on this page is **predicted** (the cost model; V100 op times fitted to NVIDIA's "
             f"published measurements, H100 and H200 op times from the FLOP model with assumed constants); none is "
             f"measured on a GPU. Best WPipe against best PipeDream-2BW on the same devices, {len(rated)} of "
             f"{len(cells)} cells (12 models x 4 devices x fp32/fp16) where both fit:", "",
             f"* **WPipe is ahead by 5% or more in {len(better)} cells, between 0.97x and 1.05x in "
             f"{len(rated) - len(better) - len(worse)}, behind by 3% or more in {len(worse)}.**"]
    for name in ("bert", "resnext"):
        mine = [kc for kc in rated if family[kc[0][0]] == name]
        top, low = max(mine, key=lambda kc: kc[1].ratio), min(mine, key=lambda kc: kc[1].ratio)
        lines.append(f"* {'BERT' if name == 'bert' else 'ResNeXt'}: {low[1].ratio:.2f}x to {top[1].ratio:.2f}x. "
                     f"Best: {describe_cell(top)} ({carried(top[1])}). Worst: {describe_cell(low)} "
                     f"({carried(low[1])}).")
    high = [r for r in equal["ratios"] if r[0] >= PAPER_SPEEDUP]
    lines += ["* The paper's **1.4x**, best against best, is reached in " + (
                  "; ".join(f"{describe_cell(kc)} ({kc[1].ratio:.2f}x)" for kc in above) if above else "**no cell**")
              + f". At equal configuration (the paper's way of comparing) it is reached in {len(high)} of the "
              f"{len(equal['ratios'])} configurations of the released scripts' sweep on {script_hw.name.split(',')[0]} "
              f"(up to {equal['ratios'][0][0]:.2f}x), "
              + ("all with data parallelism (D >= 2), " if all(int(r[2].split("x")[1]) > 1 for r in high) else "")
              + "where the data-parallel all-reduce that WPipe's two partitions per device hide and 2BW's one "
              "exposes in this runtime dominates (the released scripts' section says why).",
              "* Where WPipe is 5% or more ahead, what carries it: "
              + (", ".join(f"{name} in {count}" for name, count in sorted(carriers.items(), key=lambda x: -x[1]))
                 if carriers else "nothing") + ". Layout: WPipe's smaller footprint (with recomputation) fits a "
              "shallower pipeline with more data parallelism at the same micro-batch where 2BW must stay deeper. "
              "Schedule: at equal configuration WPipe differs by its 2N half-size partitions: twice the boundary "
              "transfers (its schedule factor is below 1 wherever activations are large), finer balancing, and at "
              "N = 1 an all-reduce of one partition that overlaps the other's backward (this runtime all-reduces "
              "one flat buffer per partition after its backwards; a bucketed all-reduce, as PyTorch DDP's, would "
              "give 2BW the same overlap)."]
    lines += memory_summary(memory, family) + ["", why_text(above, profile), ""]
    return lines


def carried(cell) -> str:
    if cell.decomposition is None:
        return "WPipe cannot run 2BW's layout: no decomposition"
    d = cell.decomposition
    return f"carried by {d.carrier} {d.factors[d.carrier]:.2f}; " + factor_text(d)


def memory_summary(memory, family) -> list[str]:
    """Memory at equal configuration, per family and recomputation setting."""
    out = []
    for name in ("bert", "resnext"):
        for recompute in (True, False):
            ratios = [r["memory"]["wpipe"] / r["memory"]["pipedream_2bw"] for r in memory
                      if family[r["model"]] == name and r["recompute"] == recompute and all(r["fits"].values())]
            out.append(f"{'BERT' if name == 'bert' else 'ResNeXt'} {'with' if recompute else 'without'} "
                       f"recomputation {span(ratios)}")
    return [f"* Memory at equal configuration (the paper's like-for-like: V100 16 GB, fp32, the paper's layouts, "
            f"uniform split; paper: 0.64): WPipe's largest device holds {'; '.join(out)} of 2BW's. With "
            "recomputation WPipe keeps 1.5 weight copies to 2BW's 2 and recomputes half-size partitions, but its "
            "first device stashes the inputs of 3N micro-batches (2N of partition 0, N of partition N) to 2BW's "
            "N, which dominates where partitions are small (ResNeXt at depth 32-64: the values above 1). Without "
            "recomputation its first device stashes 2N micro-batches of a half-size G0 partition and N of a "
            "half-size G1 partition, 1.5x the activations of 2BW's first device (N of a full-size partition), "
            "which eats the weight saving. The paper's 36% cut is a with-recomputation figure at moderate depth."]


def why_text(above, profile) -> str:
    """Why the ratios are what they are, from the fitted curves: the micro-batch up to which
    one doubling still gains 1.4x."""
    steep = []
    for c in profile.curves:
        f = c.fit()
        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if (2 * b / f(2 * b)) / (b / f(b)) >= PAPER_SPEEDUP]
        name = c.network + (f" seq {c.shape['seq']}" if c.family == "bert" else "") + f" {c.precision}"
        steep.append(f"{name} from {max(sizes)} to {2 * max(sizes)}" if sizes else f"{name} never")
    head = ("Why 1.4x appears best against best: " if above else "Why no 1.4x best against best: ")
    return (head + "a doubled micro-batch gains 1.4x or more only on the steep part of the efficiency curve "
            "(the fitted V100 curves, last doubling that gains 1.4x: " + "; ".join(steep) + "). With "
            "recomputation both methods fit micro-batches well past that point, so the memory WPipe saves buys "
            "a few percent; without it WPipe's first device holds more activations than 2BW's and fits no larger "
            "micro-batch. A 1.4x from the curve alone needs 2BW "
            "held below those sizes while WPipe fits twice as much, or 2BW forced into recomputation (1.33x) "
            "where WPipe fits without: at these models' sizes neither happens on 16 GB or larger devices, in "
            "this model.")


def equal_text(equal) -> str:
    """The released scripts' sweep, WPipe against 2BW configuration by configuration."""
    ratios = equal["ratios"]
    values = sorted(r for r, *_ in ratios)
    top = ratios[0]
    high = [r for r in ratios if r[0] >= PAPER_SPEEDUP]
    return (f"At equal configuration (the paper's comparison: the same layout, micro-batch and recomputation), "
            f"WPipe / 2BW over the {len(ratios)} configurations of the sweep where both fit: median "
            f"{values[len(values) // 2]:.2f}, from {values[0]:.2f} to {values[-1]:.2f}; at least 1.4 in {len(high)}"
            + (f" ({', '.join(sorted({Path(c).stem.split('_')[-1] for _, c, *_ in high}))}; layouts "
               f"{', '.join(sorted({lay for _, _, lay, *_ in high}))}; recompute "
               f"{', '.join(sorted({'on' if rc else 'off' for *_, rc, _ in high}))}; micro-batch "
               f"{', '.join(str(b) for b in sorted({b for *_, b in high}))})" if high else "")
            + f". The largest, {top[0]:.2f} ({Path(top[1]).stem} {top[2]}, recompute {'on' if top[3] else 'off'}, "
            f"micro-batch {top[4]}), is {equal['top_without_updates']:.2f} with optimizer steps and all-reduces made "
            "free: it is the data-parallel all-reduce. This runtime all-reduces a partition's gradients in one "
            "buffer after the period's last backward and applies the update before that partition's next op; "
            "2BW's next op on a device is its one partition's next forward, so the all-reduce waits in full, "
            "while WPipe runs its other group's ops meanwhile. Where replicas span nodes over a slow network and "
            "micro-batches are small this is worth 1.4x and more at equal configuration; each method's best "
            "configuration (the map) avoids it with larger micro-batches or shallower data parallelism, and an "
            "all-reduce overlapped with the backward (bucketed, as PyTorch DDP's) would hide it for 2BW too.")


def describe_cell(kc) -> str:
    (label, key, precision), cell = kc
    name = dict((k, v) for v, k in PRESETS)[key]
    return f"{label}, {name}, {precision}" + ("" if cell.fitted else " [FLOP model]")


def factor_text(d: Decomposition) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in d.factors.items())


def span(values) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def method_lines(presets, profile) -> list[str]:
    lines = ["## How these figures are made", "",
             "For each cell the planner enumerates WPipe's and 2BW's configurations on the cell's devices (pipeline "
             "depth N x data parallel D, micro-batch 1..512, recomputation on and off, both rank layouts; for "
             "ResNeXt also the balanced split), keeps those whose predicted largest device fits the preset (90% of"
             " its memory), times the largest fitting micro-batch of each (skipping those whose speed bound cannot"
             " beat the best found), and compares each method's fastest. Memory is the runtime's own accounting "
             "(weights incl. versions, stashed activations, optimizer state; equal to real runs' summary.json at "
             "CPU scale, tests/test_costmodel.py) plus one gradient and, with data parallelism, the all-reduce "
             "buffer, from per-block bytes measured on CPU (fp16: under autocast). Time: per-block op times "
             "(below), the engine's per-op overhead, p2p transfers and the ring all-reduce by link type, and the "
             "event simulator. fp16 means mixed precision as with apex (fp16 compute under autocast, fp32 master "
             "weights, gradients and optimizer state).", "",
             "Op times per preset:", ""]
    for label, key in PRESETS:
        hw = presets[key]
        lines.append(f"* **{label}** (`network_conf/hardware/{key}.yaml`, {hw.name}): "
                     + ("curves fitted to the published measurements of "
                        f"`{Path(hw.profile_path).relative_to(ROOT)}` (*{profile.device}*)"
                        if hw.op_times == "fitted" else
                        "FLOP model (fallback: no published per-batch curve for this GPU): "
                        + ", ".join(f"{p} {hw.efficiency[p]:.0%} of {hw.peak_tflops[p]:g} TFLOP/s" for p in PRECISIONS)
                        + f", {hw.kernel_overhead_us:g} us per kernel launch (assumed)"))
    return lines + [""]


def map_lines(cells, models, image) -> list[str]:
    flop_model = {key for (_, key, _), cell in cells.items() if not cell.fitted}
    head = "| model | GPUs | " + " | ".join(f"{label} {p}{' †' if key in flop_model else ''}"
                                            for label, key in PRESETS for p in PRECISIONS) + " |"
    lines = ["## The map: best WPipe / best 2BW on the same devices", "",
             "Predicted samples/s of WPipe's fastest fitting configuration over 2BW's fastest fitting "
             "configuration (each method free to choose layout, micro-batch and recomputation within the same "
             "memory). Bold: at least the paper's 1.4x. The letter names the factor that carries the ratio "
             "(next section).", "", head, "|" + " --- |" * (2 + len(PRESETS) * len(PRECISIONS))]
    for m in models:
        row = []
        for _, key in PRESETS:
            for p in PRECISIONS:
                cell = cells[m.label, key, p]
                if cell.ratio is None:
                    row.append("nothing fits" if not cell.best else f"only {next(iter(cell.best))} fits")
                    continue
                text = f"{cell.ratio:.2f}" + (f" {SHORT[cell.decomposition.carrier]}" if notable(cell) else "")
                row.append(f"**{text}**" if cell.ratio >= PAPER_SPEEDUP else text)
        lines.append(f"| {m.label} | {m.gpus} | " + " | ".join(row) + " |")
    return lines + ["", "† op times from the FLOP model with assumed constants (no published per-batch curve for "
                    "this GPU).", "", f"![WPipe / 2BW heat map]({image})", ""]


def factor_lines(cells, models) -> list[str]:
    lines = ["## The ratio's factors", "",
             "Along a path from 2BW's best configuration to WPipe's best, one change at a time "
             "(wpipe.planning.compare): **schedule** = WPipe at 2BW's configuration / 2BW there; **recompute** = "
             "WPipe switching to its own recomputation setting; **micro-batch efficiency** = moving to WPipe's "
             "micro-batch with optimizer steps and all-reduces made free (what the ops themselves gain); "
             "**per-update amortisation** = the rest of that move (per-update costs over N x b samples); "
             "**layout** = moving to WPipe's N x D, rank layout and split. The five multiply to the ratio exactly "
             "(tests/test_compare.py). Intermediate configurations need not fit: this is bookkeeping of "
             "predicted speeds.", "",
             "| model | device | prec | 2BW best | WPipe best | ratio | " + " | ".join(FACTORS) + " |",
             "|" + " --- |" * (6 + len(FACTORS))]
    for m in models:
        for label, key in PRESETS:
            for p in PRECISIONS:
                cell = cells[m.label, key, p]
                w, b = cell.best.get("wpipe"), cell.best.get("pipedream_2bw")
                config = [best_text(b), best_text(w)]
                if cell.decomposition:
                    factors = [f"{cell.decomposition.factors[f]:.2f}" for f in FACTORS]
                else:
                    factors = ["-"] * len(FACTORS)
                ratio = f"{cell.ratio:.2f}" if cell.ratio else "-"
                lines.append(f"| {m.label} ({m.gpus}) | {label} | {p} | " + " | ".join(config) + f" | {ratio} | "
                             + " | ".join(factors) + " |")
    return lines + [""]


def best_text(c) -> str:
    if c is None:
        return "nothing fits"
    return (f"{c.layout} mb {c.micro_batch_size} rc {'on' if c.recompute else 'off'}"
            f"{' ' + c.rank_layout.split('_')[0] if c.pipeline_depth > 1 and c.data_parallel > 1 else ''}"
            f"{' bal' if c.split == 'balanced' else ''}: {c.predicted_samples_per_second:.0f}/s "
            f"{c.predicted_memory_bytes / GIB:.1f} GiB")


def memory_lines(memory) -> list[str]:
    lines = ["## Memory, like for like", "",
             "The paper's own models (BERT-Base at sequence 128, the ResNeXts) at the paper's layouts on the "
             "V100 16 GB preset, fp32: the largest micro-batch (of 1..512) each method fits, and both methods' "
             "largest device at one configuration, 2BW's largest fitting micro-batch (the paper compares memory at "
             "equal configuration; the map above compares speed at different ones).", "",
             "| model | layout | recompute | largest mb WPipe | largest mb 2BW | at mb | WPipe GiB | 2BW GiB | "
             "WPipe / 2BW memory |", "|" + " --- |" * 9]
    for r in memory:
        w, b = r["memory"]["wpipe"], r["memory"]["pipedream_2bw"]
        lines.append(f"| {r['model']} | {r['layout']} | {'on' if r['recompute'] else 'off'} | "
                     f"{r['largest']['wpipe'] or 'none'} | {r['largest']['pipedream_2bw'] or 'none'} | "
                     f"{r['micro_batch']} | {w / GIB:.2f} | {b / GIB:.2f} | {w / b:.2f} |")
    return lines + [""]


def script_lines(rows, equal, hw) -> list[str]:
    lines = ["## The released scripts' runs", "",
             "Exactly the configurations `experiments/*_throughput_*.sh` sweep at paper scale (the invocation "
             "each documents in its header: layouts, micro-batches, recompute off and on, methods "
             f"{', '.join(sorted({r['method'] for r in rows}))}), on *{hw.name}* "
             f"(`{Path(hw.file).relative_to(ROOT) if Path(hw.file).is_absolute() else hw.file}`), fp32 as the "
             "scripts run, their rank layout (pipeline-major) and the runtime's uniform split: predicted "
             "samples/s per micro-batch size; `-` = predicted not to fit (the sweep's run would fail out of "
             "memory; larger sizes are not tried). Run the same script on your GPUs and compare with "
             "`tool/report.py`'s table.", "", equal_text(equal), ""]
    for script in dict.fromkeys(r["script"] for r in rows):
        mine = [r for r in rows if r["script"] == script]
        sizes = mine[0]["sizes"]
        lines += [f"### `{script}`", "",
                  "| config | layout | recompute | method | " + " | ".join(f"mb {b}" for b in sizes) + " |",
                  "|" + " --- |" * (4 + len(sizes))]
        for r in mine:
            values = [f"{r['speeds'][b]:.1f}" if r["speeds"].get(b) else "-" for b in sizes]
            lines.append(f"| {Path(r['config']).stem} | {r['layout']} | {'on' if r['recompute'] else 'off'} | "
                         f"{r['method']} | " + " | ".join(values) + " |")
        lines.append("")
    return lines


def fit_lines(profile) -> list[str]:
    lines = ["## The op-time fits", "",
             f"`{Path(profile.path).relative_to(ROOT)}` holds NVIDIA's published inference throughput of "
             f"*{profile.device}* at several batch sizes, each curve with its repository, file, commit and table. "
             "Seconds per batch are fitted as t(b) = max(floor, fixed + b x per_sample) (least squares in relative "
             "error; a floor needs two points of its own), and a block of a model of that family pays its share of "
             "the network's fixed cost and floor plus its FLOPs at the network's marginal rate "
             "(wpipe.planning.optimes). fp16 = NVIDIA's mixed precision (TF-AMP, PyTorch AMP).", "",
             "| curve | points (batch: samples/s) | floor ms | fixed ms | marginal TFLOP/s | leave-one-out error "
             "per point | worst |", "| --- | --- | --- | --- | --- | --- | --- |"]
    worst_all = 0.0
    for c in profile.curves:
        f = c.fit()
        loo = leave_one_out(c)
        errors = [predicted / measured - 1 for _, measured, predicted in loo]
        worst = max(errors, key=abs)
        worst_all = max(worst_all, abs(worst))
        lines.append(f"| {c.label} | " + ", ".join(f"{b}: {r:g}" for b, r in c.points.items())
                     + f" | {f.floor * 1e3:.1f} | {f.fixed * 1e3:.2f} | "
                     f"{c.network_forward_flop / f.per_sample / 1e12:.1f} | "
                     + ", ".join(f"{b}: {e:+.1%}" for (b, _, _), e in zip(loo, errors)) + f" | {worst:+.1%} |")
    lines += ["", f"Leave-one-out: each point predicted by the fit to the others; the worst error is "
              f"{worst_all:.1%}.", "",
              f"**Inference to training.** The tables time forwards only. Training time is taken as forward + "
              f"backward with backward = {BACKWARD_PER_FORWARD:g} x forward: an assumption, from the FLOP counts (a "
              "backward does twice a forward's multiply-adds, as wpipe.planning.measure counts for transformer "
              "layers and convolutions) and consistent with the PipeDream-2BW paper's recompute cost of 4/3 = "
              "(1 + 2 + 1) / (1 + 2). Checked against the published training throughput of the same GPU at one "
              "batch size (the rule predicts batch / (3 x t_forward(batch)); the optimizer step and data loading "
              "are not in it):", "",
              "| network | precision | batch | published training samples/s | rule's samples/s | rule's step time "
              "error | published step - rule's step | source |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    gaps = {}
    for check in profile.checks:
        curve = profile.curve(check["family"], check["precision"], check["shape"])
        step = (1 + BACKWARD_PER_FORWARD) * curve.fit()(check["batch"])
        published = check["batch"] / check["samples_per_second"]
        gaps.setdefault(check["family"], []).append((published - step) * 1e3)
        source = check["source"]
        lines.append(f"| {check['network']} | {check['precision']} | {check['batch']} | "
                     f"{check['samples_per_second']:g} | {check['batch'] / step:.1f} | "
                     f"{step / published - 1:+.0%} | {(published - step) * 1e3:+.0f} ms | {source['repository']} "
                     f"{source['file']} @{source['commit'][:8]}: {source['table']} |")
    bert = gaps.get("bert", [])
    lines += ["", "The rule is close for ResNeXt in fp32, pessimistic for ResNeXt in mixed precision (the training "
              "run used channels-last memory, the inference table may not have), and optimistic for BERT "
              "fine-tuning, by about the same time per step at both batch sizes and precisions ("
              + " and ".join(f"{g:.0f}" for g in bert) + " ms): a fixed cost per step (TensorFlow's optimizer, loss "
              "and input pipeline around the model). A per-sample error scales both methods alike. A fixed cost "
              "per update of that size would be amortised over N x b samples, so larger micro-batches (what "
              "WPipe's memory can buy) would be worth more than this page predicts for BERT; the per-update "
              "amortisation factor is where it would show.", ""]
    gains = []
    for c in profile.curves:
        f = c.fit()
        gains.append(f"{c.label.split(', forward')[0]}: " + ", ".join(
            f"{b}->{2 * b} {(2 * b / f(2 * b)) / (b / f(b)):.2f}" for b in (1, 2, 4, 8, 16, 32)))
    lines += ["Speed gained per doubling of the micro-batch under each fit (training time is proportional to the "
              "forward's, so the same holds for training):", ""] + [f"* {g}" for g in gains] + [""]
    return lines


def probe_command_lines() -> list[str]:
    return ["## Measuring a GPU instead (prepared, not run: no GPU was available)", "",
            "On a machine with one GPU, this times every block kind of BERT-96 (the paper's BERT at BERT-Base "
            "width; its device share under any layout is made of these blocks) and of ResNeXt-200 forward, "
            "backward and optimizer step at micro-batch 1..32 in fp32 and bf16, fits the curves, and writes a "
            "profile with the device's name, the command and this code's commit:", "",
            "```sh",
            "python tool/profile_device.py --configs network_conf/nlp_throughput_bert96.yaml,"
            "network_conf/cv_throughput_resnext200.yaml --micro-batches 1,2,4,8,16,32 --precisions fp32,bf16 "
            "--output network_conf/profiles/h200_measured.yaml",
            "```", "",
            "Then set `op_times: fitted` and `profile: ../profiles/h200_measured.yaml` in "
            "`network_conf/hardware/h200_141gb_8x.yaml` (keep its `bf16` peak) and rerun `sh "
            "experiments/paper_scale.sh`: measured curves replace the FLOP model (measured beats published). "
            "Recomputation needs no extra timing (it is a forward again); probe mode (`--mode probe`, fp32) "
            "can cross-check a whole device's op times and memory at 8x1 and 4x2.", ""]


def _validation_lines(validation: dict) -> list[str]:
    """The CPU-scale check (tool/validate_model.py's validate.json) as a section."""
    summary = validation["summary"]
    lines = ["", "## Validation at CPU scale (measured)", "",
             "Real 2-process CPU runs (tool/validate_model.py: tool/bench.py's model and nlp/main.py throughput "
             f"mode), {validation['rounds']} interleaved rounds, against the same chain with per-block seconds "
             "measured right before each run in one process beside one other running the same blocks (a "
             "run's two processes share the machine), and, for comparison, alone"
             + _message_cost_words(validation.get("message_costs")) + ". Samples/s are medians over the "
             "rounds; the measured range shows how much the machine drifted. Memory: predicted and reported bytes "
             "per rank, every run.", "",
             "| run | method | predicted samples/s | measured samples/s | error | predicted from blocks timed alone "
             "(error) | measured range | memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        lines.append(f"| {s['run']} | {s['method']} | {s['predicted']:.2f} | {s['measured']:.2f} | "
                     f"{s['error']:+.1%} | {s['predicted_alone']:.2f} ({s['error_alone']:+.1%}) | "
                     f"{s['measured_min']:.2f}-{s['measured_max']:.2f} | "
                     f"{'equal' if s['memory_equal'] else 'DIFFERENT'} in {s['rounds']} runs |")
    within = [f"{s['run']} {s['method']}" for s in summary if abs(s["error"]) <= 0.10]
    beyond = [f"{s['run']} {s['method']} ({s['error']:+.0%})" for s in summary if abs(s["error"]) > 0.10]
    lines += ["", validation["report"][-1], "",
              ("The memory accounting is exact in every run. " if all(s["memory_equal"] for s in summary)
               else "The memory accounting DIFFERS in some runs. ")
              + (f"Within 10%: {', '.join(within)}. " if within else "No median is within 10%. ")
              + (f"Beyond: {', '.join(beyond)}." if beyond else "")]
    return lines


def _message_cost_words(costs: list[float] | None) -> str:
    """The messages' compute cost measured in each round, in words (none in a validate.json
    written before it was measured)."""
    if not costs:
        return ""
    return (f"; the compute each MB of point-to-point messages takes from both ends (p2p_cpu_us_per_mb) is "
            f"measured in each round too, by two processes exchanging messages while they compute: "
            f"{', '.join(f'{c:.0f}' for c in costs)} us per MB (the blocks-alone prediction takes the "
            f"preset's figure, as tool/plan.py does)")


if __name__ == "__main__":
    sys.exit(main())
