"""Tables and plots from run folders (each holding a summary.json written by cv/ or nlp/main.py).

    python tool/report.py runs/                 # markdown table of every run below runs/
    python tool/report.py runs/ --plot out.png  # plus loss curves and throughput/memory bars

Columns: run, method, layout (N x D), micro-batch, samples/s, final loss, evaluation
metrics, and the largest per-rank runtime memory (weights incl. versions + stashed
activations + optimizer state) and measured peak, in MiB.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MIB = 2 ** 20


def load_runs(root: Path) -> list[tuple[str, dict]]:
    """(run name, summary) for every summary.json below `root`, sorted by name."""
    runs = []
    for path in sorted(root.rglob("summary.json")):
        try:
            runs.append((str(path.parent.relative_to(root)) or path.parent.name, json.loads(path.read_text())))
        except json.JSONDecodeError as error:
            print(f"skipping {path}: not valid JSON ({error})", file=sys.stderr)
    return runs


def runtime_bytes(memory: dict) -> int:
    return memory["weights_bytes"] + memory["activations_bytes"] + memory["optimizer_state_bytes"]


def table(runs: list[tuple[str, dict]]) -> str:
    metric_names = sorted({k for _, s in runs for k in (s.get("eval") or {})})
    header = ["run", "method", "N x D", "micro-batch", "samples/s", "final loss", *metric_names,
              "runtime MiB (max rank)", "peak MiB (max rank)"]
    rows = [header, ["---"] * len(header)]
    for name, s in runs:
        memory = s.get("memory") or []
        rows.append([
            name, s["method"], f"{s['pipeline_depth']} x {s['data_parallel']}", str(s["micro_batch_size"]),
            _num(s.get("samples_per_second")), _num(s.get("final_loss")),
            *[_num((s.get("eval") or {}).get(m)) for m in metric_names],
            _num(max((runtime_bytes(m) for m in memory), default=None), MIB),
            _num(max((m["peak_bytes"] for m in memory), default=None), MIB),
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(runs: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, speed, memory) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, s in runs:
        if s.get("losses"):
            curves.plot(range(1, len(s["losses"]) + 1), s["losses"], label=name, linewidth=1)
    curves.set(title="training loss", xlabel="update (period)", ylabel="loss")
    if curves.lines:
        curves.legend(fontsize=7)
    names = [name for name, _ in runs]
    speed.barh(names, [s.get("samples_per_second") or 0 for _, s in runs])
    speed.set(title="throughput", xlabel="samples/s")
    memory.barh(names, [max((runtime_bytes(m) for m in s.get("memory") or []), default=0) / MIB for _, s in runs])
    memory.set(title="runtime memory, largest rank", xlabel="MiB (weights + stash + optimizer)")
    for ax in (speed, memory):
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def _num(x, scale: float = 1) -> str:
    return "-" if x is None else f"{x / scale:.4g}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder searched for summary.json files")
    parser.add_argument("--plot", type=Path, help="write loss curves and bars to this PNG")
    args = parser.parse_args(argv)
    runs = load_runs(args.root)
    if not runs:
        parser.error(f"no summary.json below {args.root}")
    print(table(runs))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
