"""Draw a run's trace as a Gantt chart, one lane per rank, and print a per-rank summary.

    python tool/timeline.py RUN_DIR [--png FILE] [--from-ms X] [--to-ms Y]

Input: RUN_DIR/trace.json (or that file's path), written by the runtime with `trace: true`
(lib/wpipe/trace.py), Chrome trace-event JSON: {"traceEvents": [...], "otherData": {"method",
"pipeline_depth", "data_parallel", "micro_batches_per_update", "recompute", ...}}. "M"
`process_name` records label the ranks; "X" events have `pid` = global rank, `ts`, `dur` in
microseconds from a common origin and `cat`: "compute" (named `str(op)`, e.g. `2F3`, `1B0`,
`2U`, or `<prefix> <op>`: `recompute 2B3`, `reduce 2U`), "wait" (blocked on communication:
`wait recv 1F3`, `wait allreduce 2U`, `wait sends`) or "call" (a train() call, enclosing the others).

Summary per rank, over the events inside train() calls (a trace without calls is one
call): busy ms = compute time, wait ms = time blocked, ops = compute events that are ops
(not their recompute/reduce parts); window ms = the sum over calls of (latest event end -
earliest event start, over all ranks, in the k-th call of each); bubble = 1 - busy/window.

Chart: x in ms from the trace origin; forward blue, backward orange, recompute magenta,
update green (its all-reduce launch dotted), waits grey hatched, train() calls outlined;
lighter shades for partitions < pipeline_depth (wpipe's group G0), darker for the rest (G1);
op names in the bars wide enough. The whole trace is shown unless a rank has more than
MAX_OPS_SHOWN ops; then the busiest rank's last MAX_OPS_SHOWN ops, from the end of the first
update among them (a period boundary). --from-ms, --to-ms override either end. A missing or
malformed trace exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from wpipe.trace import CALL, COMPUTE, RECOMPUTE, REDUCE, WAIT, parse_span, timeline_summary

MAX_OPS_SHOWN = 100
COLOURS = {"F": ("#9ecae1", "#2171b5"), "B": ("#fdae6b", "#d94801"),    # (G0, G1) shades
           RECOMPUTE: ("#e7a9d6", "#ae017e"), "U": ("#a1d99b", "#238b45"), REDUCE: ("#a1d99b", "#238b45")}
LABELS = {"F": "forward", "B": "backward", RECOMPUTE: "recompute (before its backward)",
          "U": "update", REDUCE: "reduce (all-reduce launch)"}
WAIT_COLOUR, HATCH_COLOUR, FONT_PT, DPI = "#e0e0e0", "0.55", 7, 150


def load(path) -> tuple[list[dict], dict]:
    """(events, otherData) of RUN_DIR/trace.json or of a trace.json file; ValueError naming
    the file when it is missing or not a trace."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / "trace.json"
    if not file.is_file():
        raise ValueError(f"{file}: no such file (a run writes it with --trace true)")
    try:
        document = json.loads(file.read_text())
        events = [e for e in document["traceEvents"] if e["ph"] in ("M", "X")]
        spans = [e for e in events if e["ph"] == "X"]
        for e in spans:   # reads every field the tool uses, so that a malformed event fails here
            e["pid"], end(e), e["cat"] == COMPUTE and colour_key(e)
    except (TypeError, KeyError, ValueError) as error:     # ValueError: bad JSON or op name
        raise ValueError(f"{file}: not a wpipe trace ({type(error).__name__}: {error})") from None
    if all(e["cat"] == CALL for e in spans):
        raise ValueError(f"{file}: no compute or wait events (was the run traced?)")
    return events, document.get("otherData", {})


def end(event: dict) -> float:
    return event["ts"] + event["dur"]


def colour_key(event: dict) -> tuple[str, int]:
    """(COLOURS key, partition) of a compute event: its op's kind, or its prefix."""
    prefix, op = parse_span(event["name"])
    return (prefix or op.kind), op.partition


def is_op(event: dict) -> bool:
    return event["cat"] == COMPUTE and parse_span(event["name"])[0] == ""


def rank_names(events: list[dict]) -> dict[int, str]:
    """pid -> its process_name (else 'rank PID'), for every rank with events, by pid."""
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    return {pid: names.get(pid, f"rank {pid}") for pid in sorted({e["pid"] for e in events if e["ph"] == "X"})}


def summarize(events: list[dict]) -> list[dict]:
    """One row per rank: rank, name, busy_ms, wait_ms, window_ms, bubble (None if the
    window is empty), ops; wpipe.trace.timeline_summary defines them."""
    names = rank_names(events)
    rows = []
    for row in timeline_summary(events):
        rank = row["rank"]
        calls = [(e["ts"], end(e)) for e in events if e["ph"] == "X" and e["pid"] == rank and e["cat"] == CALL]
        ops = sum(1 for e in events if e["ph"] == "X" and e["pid"] == rank and is_op(e)
                  and (not calls or any(a <= e["ts"] <= b for a, b in calls)))
        rows.append({"rank": rank, "name": names[rank], "busy_ms": row["busy_s"] * 1e3,
                     "wait_ms": row["wait_s"] * 1e3, "window_ms": row["window_s"] * 1e3,
                     "bubble": row["bubble_fraction"], "ops": ops})
    return rows


def default_view(events: list[dict]) -> tuple[float, float]:
    """(from, to) in ms: see the module docstring."""
    spans = sorted((e for e in events if e["ph"] == "X" and e["cat"] != CALL), key=lambda e: e["ts"])
    ops_by_rank: dict[int, list[dict]] = {}
    for e in filter(is_op, spans):
        ops_by_rank.setdefault(e["pid"], []).append(e)
    busiest = max(ops_by_rank.values(), key=len, default=[])
    start = spans[0]["ts"]
    if len(busiest) > MAX_OPS_SHOWN:
        last = busiest[-MAX_OPS_SHOWN:]
        start = next((end(e) for e in last if parse_span(e["name"])[1].kind == "U"), last[0]["ts"])
    return start / 1e3, max(map(end, spans)) / 1e3


def draw(events: list[dict], other: dict, rows: list[dict], view: tuple[float, float], png: Path) -> None:
    """Write the chart of `events` between view = (from, to) ms to `png`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lane = {row["rank"]: i for i, row in enumerate(rows)}
    depth = other.get("pipeline_depth", 1)
    x0, x1 = view
    fig, ax = plt.subplots(figsize=(20, 1.8 + 0.8 * len(lane)), dpi=DPI, layout="constrained")
    ax.set(xlim=(x0, x1), ylim=(len(lane) - 0.5, -0.5), xlabel="time since the trace origin (ms)")
    bars, labels, used = [], [], set()   # bars: (lane, from ms, width ms, height, colour, hatch)
    for e in events:
        if e["ph"] != "X" or e["ts"] / 1e3 >= x1 or end(e) / 1e3 <= x0:
            continue
        y, start, width = lane[e["pid"]], e["ts"] / 1e3, e["dur"] / 1e3
        if e["cat"] == COMPUTE:
            key, partition = colour_key(e)
            group = min(partition // depth, 1)
            used.add((key, group))
            bars.append((y, start, width, 0.8, COLOURS[key][group], "..." if key == "reduce" else None))
            labels.append((y, start, width, e["name"].rpartition(" ")[2], "white" if group else "black", True))
        elif e["cat"] == WAIT:
            bars.append((y, start, width, 0.45, WAIT_COLOUR, "////"))
            labels.append((y, start, width, e["name"].removeprefix("wait "), "0.25", False))
        else:
            bars.append((y, start, width, 0.9, "none", None))
    if bars:
        y, left, width, height, colour, hatch = zip(*bars)
        ax.barh(y, width, left=left, height=height, color=colour, hatch=hatch, hatchcolor=HATCH_COLOUR,
                edgecolor=["0.75" if c == "none" else "white" for c in colour], linewidth=0.5)
    box = ax.get_window_extent()
    px_per_ms, bar_px, pt_px = box.width / (x1 - x0), 0.8 * box.height / len(lane), DPI / 72
    for y, start, width, text, colour, may_turn in labels:   # horizontal if it fits, else upright
        left, right = max(start, x0), min(start + width, x1)
        text_px, wide_px = (len(text) * 0.62 + 0.8) * FONT_PT * pt_px, (right - left) * px_per_ms
        if wide_px > text_px or (may_turn and wide_px > 1.2 * FONT_PT * pt_px and bar_px > text_px):
            ax.text((left + right) / 2, y, text, ha="center", va="center", fontsize=FONT_PT, color=colour,
                    rotation=0 if wide_px > text_px else 90,   # a wait's name is masked from its hatching
                    bbox=None if may_turn else dict(facecolor=WAIT_COLOUR, edgecolor="none", pad=1))
    ax.set_yticks(range(len(rows)), [row["name"] + ("" if row["bubble"] is None else
                                                    f"\nbubble {row['bubble']:.2f}, {row['ops']} ops")
                                     for row in rows], fontsize=8)
    ax.grid(axis="x", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    two_groups = any(group for _, group in used)
    handles = [Patch(facecolor=COLOURS[key][group], hatch="..." if key == "reduce" else None,
                     hatchcolor=HATCH_COLOUR, label=LABELS[key] + (f" G{group}" if two_groups else ""))
               for key in COLOURS for group in (0, 1) if (key, group) in used]
    handles.append(Patch(facecolor=WAIT_COLOUR, hatch="////", hatchcolor=HATCH_COLOUR, label="wait (communication)"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False, title_fontsize=8,
               ncol=math.ceil(len(handles) / 2) if two_groups else len(handles),    # G0 above G1
               title=f"G0 = partitions < {depth} (lighter), G1 = the others (darker)" if two_groups else None)
    ax.set_title(f"{other.get('method', '?')}: depth {depth} x data_parallel {other.get('data_parallel', '?')}, "
                 f"{other.get('micro_batches_per_update', '?')} micro-batches per update"
                 f"{', recompute' if other.get('recompute') else ''}  ({x0:.1f} to {x1:.1f} ms shown; "
                 f"bubble over the whole trace)", fontsize=10)
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", metavar="RUN_DIR", help="a run's output folder, or its trace.json")
    parser.add_argument("--png", type=Path, metavar="FILE", help="write the chart to this PNG")
    parser.add_argument("--from-ms", type=float, metavar="X", help="start of the window drawn (ms)")
    parser.add_argument("--to-ms", type=float, metavar="Y", help="end of the window drawn (ms)")
    args = parser.parse_args(argv)
    try:
        events, other = load(args.trace)
        rows = summarize(events)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    default = default_view(events)
    view = (default[0] if args.from_ms is None else args.from_ms, default[1] if args.to_ms is None else args.to_ms)
    if view[0] >= view[1]:
        parser.exit(2, f"{parser.prog}: error: nothing to draw from {view[0]} ms to {view[1]} ms\n")

    calls = max(1, sum(1 for e in events if e["ph"] == "X" and e["cat"] == CALL and e["pid"] == rows[0]["rank"]))
    print(f"{other.get('method', '?')}, depth {other.get('pipeline_depth', '?')} x data_parallel "
          f"{other.get('data_parallel', '?')}: {calls} train() call(s), window {rows[0]['window_ms']:.3f} ms")
    print("rank   busy ms   wait ms  bubble   ops  name")
    for row in rows:
        bubble = "-" if row["bubble"] is None else f"{row['bubble']:.3f}"
        print(f"{row['rank']:>4}  {row['busy_ms']:>8.3f}  {row['wait_ms']:>8.3f}  {bubble:>6}  {row['ops']:>4}  "
              f"{row['name']}")
    if args.png:
        draw(events, other, rows, view, args.png)
        print(f"wrote {args.png} ({view[0]:.3f} to {view[1]:.3f} ms)")


if __name__ == "__main__":
    main()
