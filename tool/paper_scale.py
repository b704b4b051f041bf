"""The paper's comparison at its scale, predicted: writes docs/paper_scale.md and its PNGs.

    python tool/paper_scale.py [--hardware network_conf/hardware/v100_32gb_8x.yaml]
                               [--output docs/paper_scale.md] [--validation runs/validate/validate.json]

For BERT-96 and BERT-192 on 8 GPUs, BERT-384 and BERT-768 on 64, ResNeXt-200/302 on 8 and
ResNeXt-500/800 on 64 (network_conf/*_throughput_*.yaml), it plans every method
(wpipe.planning.plan, the largest fitting micro-batch of each configuration) and tabulates each
method's best fitting configuration, its predicted samples/s and per-device memory, and the
WPipe / PipeDream-2BW ratios beside the paper's 1.4x and 36%. Then the same two methods at
equal configuration (the paper's layouts at one micro-batch size, recomputation on as in the
released scripts), which separates "a faster schedule" from "memory buys a better
configuration", and what the balanced split changes for ResNeXt. Every figure is a
prediction of the cost model on the named hardware preset; --validation adds the CPU-scale
check (tool/validate_model.py) as measured figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tool"))

from plan import load_model, measured_blocks, profile_rates  # noqa: E402

from wpipe.planning import costmodel  # noqa: E402
from wpipe import schedule  # noqa: E402
from wpipe.planning import plan as planner  # noqa: E402
from wpipe.planning.hardware import load_hardware  # noqa: E402

MODELS = [("BERT-96", "nlp_throughput_bert96", 8), ("BERT-192", "nlp_throughput_bert192", 8),
          ("BERT-384", "nlp_throughput_bert384", 64), ("BERT-768", "nlp_throughput_bert768", 64),
          ("ResNeXt-200", "cv_throughput_resnext200", 8), ("ResNeXt-302", "cv_throughput_resnext302", 8),
          ("ResNeXt-500", "cv_throughput_resnext500", 64), ("ResNeXt-800", "cv_throughput_resnext800", 64)]
EQUAL_LAYOUTS = {8: [(8, 1), (4, 2), (2, 4)], 64: [(64, 1), (32, 2), (16, 4), (8, 8), (4, 16)]}
EQUAL_MICRO_BATCH = 32
PAPER_SPEEDUP, PAPER_MEMORY_CUT = 1.4, 0.36
GIB = 2 ** 30


def equal_configuration(blocks, uniform_plan, hw, method, n, d, b, recompute, split="uniform", rates=None):
    """(samples/s, largest device bytes, fits) of one configuration, fitting or not."""
    ranges = (planner.ranges_of([x.name for x in blocks], uniform_plan(schedule.num_partitions(method, n)))
              if split == "uniform" else planner.balanced_ranges(blocks, method, n, b, recompute, hw, rates))
    parts = costmodel.partition_costs(blocks, ranges, b)
    memory = max(costmodel.device_memory(method, n, d, parts, recompute))
    speed = costmodel.samples_per_second(method, n, d, "pipeline_major", parts, b, hw, recompute, rates)
    return speed, memory, memory <= hw.memory_budget_bytes


def describe(c) -> str:
    return (f"{c.layout}, mb {c.micro_batch_size}, recompute {'on' if c.recompute else 'off'}, "
            f"{c.rank_layout.replace('_major', '')}-major, {c.split}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardware", default=str(ROOT / "network_conf" / "hardware" / "v100_32gb_8x.yaml"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "paper_scale.md"))
    parser.add_argument("--validation", help="validate.json of tool/validate_model.py, shown as measured")
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    hw = load_hardware(args.hardware)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = (f"predicted: cost model, op times from FLOP counts at {hw.efficiency:.0%} of {hw.peak_tflops:g} "
              f"TFLOP/s" if hw.op_times == "flops" else f"predicted: cost model, op times from the probe {hw.profile}")
    best_rows, equal_rows, split_rows, plots = [], [], [], []
    for label, config, gpus in MODELS:
        model, _ = load_model(ROOT / "network_conf" / f"{config}.yaml")
        blocks = measured_blocks(model, Path(args.cache_dir))
        rates = profile_rates(hw, blocks, model)
        candidates = planner.plan(blocks, model.uniform_plan, hw, gpus, rates=rates, largest_only=True)
        best = planner.best_per_method(candidates)
        base = best.get("pipedream_2bw")
        for method in planner.METHODS:
            c = best.get(method)
            best_rows.append((label, gpus, method, c, base))
        plots.append((label, gpus, best))
        for n, d in EQUAL_LAYOUTS[gpus]:
            row = {}
            for method in ("wpipe", "pipedream_2bw"):
                if schedule.num_partitions(method, n) <= len(blocks):
                    row[method] = equal_configuration(blocks, model.uniform_plan, hw, method, n, d,
                                                      EQUAL_MICRO_BATCH, True, rates=rates)
            if len(row) == 2:
                equal_rows.append((label, gpus, f"{n}x{d}", row))
        if label.startswith("ResNeXt"):
            n, d = EQUAL_LAYOUTS[gpus][1]
            for recompute in (False, True):
                split_rows.append((label, f"{n}x{d}", recompute, {
                    split: equal_configuration(blocks, model.uniform_plan, hw, "wpipe", n, d, EQUAL_MICRO_BATCH,
                                               recompute, split, rates) for split in planner.SPLITS}))
        print(f"{label}: {len(candidates)} fitting candidates ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    validation = json.loads(Path(args.validation).read_text()) if args.validation else None
    images = _plots(plots, equal_rows, out.parent, hw)
    out.write_text(_markdown(hw, source, best_rows, equal_rows, split_rows, validation, images,
                             time.perf_counter() - started))
    print(f"wrote {out} and {', '.join(str(out.parent / i) for i in images)}")
    return 0


def _markdown(hw, source, best_rows, equal_rows, split_rows, validation, images, seconds) -> str:
    lines = [
        "# WPipe vs PipeDream-2BW at the paper's scale (predicted)",
        "",
        "Generated by `sh experiments/paper_scale.sh` (tool/paper_scale.py); do not edit by hand.",
        "",
        f"**Every speed and memory figure below is predicted**, not measured: {source}, on the hardware "
        f"preset *{hw.name}* (`network_conf/hardware/`). No GPU was used: the per-op times come from FLOP "
        "counts, not from a probe of a real device. The memory of each candidate is the runtime's own accounting "
        "(weights incl. versions, stashed activations, optimizer state), predicted from per-block bytes measured "
        "on CPU; it equals real runs' `summary.json` exactly at CPU scale (tests/test_costmodel.py), plus one "
        f"gradient copy and, with data parallelism, the all-reduce buffer. A configuration fits when its largest "
        f"device stays within {hw.usable_memory_fraction:.0%} of {hw.gpu_memory_gib:g} GiB.",
        "",
        "The paper (ICLR 2022) reports, against PipeDream-2BW, **1.4x** the throughput and a **36%** smaller memory "
        "footprint. It does not name its GPUs; the preset above is an assumption (see its YAML).",
        "",
        "## Best fitting configuration per method",
        "",
        "Enumerated: pipeline depth x data parallel = GPUs, micro-batch 1..512 (the largest fitting one of each "
        "configuration is timed), recomputation on and off, both rank layouts, the runtime's uniform split and the "
        "balanced split (wpipe.planning.plan).",
        "",
        "| model | GPUs | method | best configuration | samples/s | memory GiB | x 2BW speed | x 2BW memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, gpus, method, c, base in best_rows:
        if c is None:
            lines.append(f"| {label} | {gpus} | {method} | nothing fits | - | - | - | - |")
            continue
        ratio = (f"{c.predicted_samples_per_second / base.predicted_samples_per_second:.2f} | "
                 f"{c.predicted_memory_bytes / base.predicted_memory_bytes:.2f}") if base else "- | -"
        name = f"**{method}**" if method in ("wpipe", "pipedream_2bw") else method
        lines.append(f"| {label} | {gpus} | {name} | {describe(c)} | {c.predicted_samples_per_second:.1f} | "
                     f"{c.predicted_memory_bytes / GIB:.2f} | {ratio} |")
    summary = [(label, c, base) for label, _, method, c, base in best_rows if method == "wpipe" and c and base]
    lines += ["", "WPipe / 2BW, best against best (paper: 1.4x speed, 0.64x memory):", "",
              "| model | speed ratio | memory ratio |", "| --- | --- | --- |"]
    lines += [f"| {label} | {c.predicted_samples_per_second / base.predicted_samples_per_second:.2f} | "
              f"{c.predicted_memory_bytes / base.predicted_memory_bytes:.2f} |" for label, c, base in summary]
    lines += ["", "In this model an op takes its FLOPs at one efficiency plus a fixed cost per kernel launch, so a "
              "larger micro-batch (what WPipe's smaller footprint can buy) only amortises fixed costs: ratios near 1 "
              "are what the FLOP model allows. A speed-up from larger micro-batches running at a higher efficiency "
              "on a real GPU needs a probe profile of that GPU (op_times: profile) to be predicted. The memory "
              "ratios here compare configurations with different micro-batches; the like-for-like comparison is the "
              "next table.",
              "", f"![best configurations]({images[0]})", "",
              "## Equal configuration",
              "",
              f"WPipe and 2BW at the same layout, micro-batch {EQUAL_MICRO_BATCH}, recomputation on (as every released "
              "throughput script runs), the runtime's uniform split: the schedule alone.",
              "",
              "| model | layout | wpipe samples/s | 2BW samples/s | speed ratio | wpipe GiB | 2BW GiB | memory ratio | fits (wpipe / 2BW) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, _, layout, row in equal_rows:
        (ws, wm, wf), (bs, bm, bf) = row["wpipe"], row["pipedream_2bw"]
        lines.append(f"| {label} | {layout} | {ws:.1f} | {bs:.1f} | {ws / bs:.2f} | {wm / GIB:.2f} | {bm / GIB:.2f} | "
                     f"{wm / bm:.2f} | {'yes' if wf else 'no'} / {'yes' if bf else 'no'} |")
    for family in ("BERT", "ResNeXt"):
        ratios = [row["wpipe"][1] / row["pipedream_2bw"][1] for label, _, _, row in equal_rows
                  if label.startswith(family)]
        speeds = [row["wpipe"][0] / row["pipedream_2bw"][0] for label, _, _, row in equal_rows
                  if label.startswith(family)]
        if ratios:
            lines += ["", f"{family}: WPipe's largest device holds {min(ratios):.2f}-{max(ratios):.2f} of 2BW's "
                          f"(paper: 0.64) at {min(speeds):.2f}-{max(speeds):.2f} of its speed."]
    lines += ["", f"![equal configuration]({images[1]})", "",
              "## What the balanced split changes for ResNeXt (wpipe)", "",
              "Uniform: the released runtime's cut by block count, which puts the stem and the early stages, whose "
              "activations are largest at 224 px, all into G0 (held for up to 2N-s micro-batches). Balanced: a cut "
              f"that balances each partition's time and its memory with that multiplicity. Micro-batch {EQUAL_MICRO_BATCH}.",
              "",
              "| model | layout | recompute | uniform samples/s | uniform GiB | balanced samples/s | balanced GiB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, layout, recompute, row in split_rows:
        (us, um, _), (bs, bm, _) = row["uniform"], row["balanced"]
        lines.append(f"| {label} | {layout} | {'on' if recompute else 'off'} | {us:.1f} | {um / GIB:.2f} | "
                     f"{bs:.1f} | {bm / GIB:.2f} |")
    if validation:
        lines += _validation_lines(validation)
    lines += ["", "## What the model does not capture", "",
              "* Kernel efficiency that depends on shapes: one efficiency for every op, plus a fixed cost per kernel "
              "launch (the FLOP model); a probe profile (op_times: profile) replaces the efficiency by measured FLOP/s.",
              "* Contention: concurrent transfers and all-reduces sharing a link or a node's network port; the "
              "all-reduce is a ring over the slowest link of its group.",
              "* Memory beyond the accounting: the CUDA context, allocator fragmentation, temporary buffers inside an "
              "op and the gradients flowing through a backward (a fixed share of the device is kept free instead).",
              "* Mixed precision: the models train in fp32, as the paper's runtime did.",
              "", f"Generated in {seconds:.0f} s on CPU."]
    return "\n".join(lines) + "\n"


def _plots(plots, equal_rows, folder: Path, hw) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["paper_scale_best.png", "paper_scale_equal.png"]
    methods = list(planner.METHODS)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = []
        for label, gpus, best in plots:
            base, c = best.get("pipedream_2bw"), best.get(method)
            values.append(c.predicted_samples_per_second / base.predicted_samples_per_second if c and base else 0)
        ax.bar([x + i * width for x in range(len(plots))], values, width, label=method)
    ax.axhline(PAPER_SPEEDUP, color="black", linestyle="--", linewidth=1, label="paper: wpipe 1.4x")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(plots))])
    ax.set_xticklabels([f"{label}\n{gpus} GPUs" for label, gpus, _ in plots], fontsize=8)
    ax.set_ylabel("samples/s / pipedream_2bw's best")
    ax.set_title(f"Best fitting configuration per method (PREDICTED: {hw.name.split(',')[0]}, "
                 f"{'FLOP model' if hw.op_times == 'flops' else 'probe profile'})",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(folder / names[0], dpi=110)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    labels = [f"{label} {layout}" for label, _, layout, _ in equal_rows]
    xs = range(len(equal_rows))
    left.bar(xs, [r["wpipe"][0] / r["pipedream_2bw"][0] for *_, r in equal_rows], color="tab:blue")
    left.axhline(PAPER_SPEEDUP, color="black", linestyle="--", linewidth=1, label="paper 1.4x")
    left.axhline(1.0, color="grey", linewidth=0.5)
    left.set_ylabel("wpipe / 2BW samples/s")
    right.bar(xs, [r["wpipe"][1] / r["pipedream_2bw"][1] for *_, r in equal_rows], color="tab:orange")
    right.axhline(1 - PAPER_MEMORY_CUT, color="black", linestyle="--", linewidth=1, label="paper 0.64x")
    right.axhline(1.0, color="grey", linewidth=0.5)
    right.set_ylabel("wpipe / 2BW largest-device memory")
    for ax in (left, right):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7, rotation=90)
        ax.legend(fontsize=7)
    fig.suptitle(f"Equal configuration, micro-batch {EQUAL_MICRO_BATCH}, recompute on (PREDICTED)", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / names[1], dpi=110)
    plt.close(fig)
    return names


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
