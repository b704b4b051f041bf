"""Fit the simulator's costs to a traced run, and compare its prediction with the run.

    python -m wpipe.calibrate RUN_DIR [--skip-periods K]

From RUN_DIR/trace.json (written with `trace: true`, see trace.py) it fits:

* per partition, the median forward, backward (+ its recomputation) and update (+ the
  all-reduce launch) times of its compute events;
* the engine's own overhead per op: the time a rank spent neither computing nor waiting
  (bookkeeping between ops), spread evenly over its ops;
* a transfer model: latency + bytes / bandwidth, from the messages whose receiver was
  already waiting when the sender's op ended (where the send is posted): the transfer
  took from there to the end of the wait (least squares over the message sizes; latency
  alone with one size); and the cost of taking a message that arrived long before (the
  median wait then), added to the op that receives it;
* per partition, the data-parallel all-reduce: from its launch to the end of a wait for it.

It then simulates every traced train() call with those costs (simulate.py, updates
deferred as the engine defers them) and compares the time between period ends, the
first `--skip-periods` of the run excluded (warm-up): `measured_s` against `predicted_s`;
`limit_s` is the same prediction without the engine overhead (the schedule's limit for
these compute and transfer costs). Everything goes to RUN_DIR/calibration.json.
Times are seconds in the JSON and milliseconds in the printed table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from ..schedule import Topology, build_schedule, device_of, num_partitions, parse_op, simulate
from ..trace import load_trace

WAITED_S = 50e-6   # an all-reduce wait shorter than this did not block


def _ops(events):
    """(op, event) for the compute events named like an op."""
    out = []
    for e in events:
        if e.get("cat") == "compute":
            try:
                out.append((parse_op(e["name"]), e))
            except ValueError:
                pass
    return out


def _median(values, default=0.0):
    return statistics.median(values) if values else default


def fit_costs(events: list[dict], n: int, windows: dict[int, list[tuple[float, float]]],
              device_of_rank: dict[int, int]) -> dict:
    """Per-partition mean forward, backward and update costs (s) and, per device, the
    overhead per op (s), over the events of each rank that start inside that rank's
    `windows` (µs)."""
    def inside(e):
        return any(a <= e["ts"] < b for a, b in windows.get(e["pid"], []))

    timed = [e for e in events if e.get("cat") in ("compute", "wait") and inside(e)]
    durations = defaultdict(list)       # (kind, partition) -> seconds
    for e in timed:
        if e["cat"] == "compute":
            prefix, _, name = e["name"].rpartition(" ")   # "2F3", or "recompute 2B3", "reduce 2U"
            op = parse_op(name)
            durations[(prefix or op.kind, op.partition)].append(e["dur"] / 1e6)

    def mean(key):
        return statistics.fmean(durations[key]) if durations[key] else 0.0
    costs = {"forward": [mean(("F", p)) for p in range(n)],
             "backward": [mean(("B", p)) + mean(("recompute", p)) for p in range(n)],
             "update": [mean(("U", p)) + mean(("reduce", p)) for p in range(n)]}
    # Overhead: per rank and window, the time between its first event's start and its last
    # event's end that no event covers.
    gaps, ops = defaultdict(float), defaultdict(int)     # per device
    for rank, spans in windows.items():
        device = device_of_rank[rank]
        for a, b in spans:
            mine = [e for e in timed if e["pid"] == rank and a <= e["ts"] < b]
            if mine:
                gaps[device] += (max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)
                                 - sum(e["dur"] for e in mine)) / 1e6
                ops[device] += sum(1 for e in mine if _is_op(e))
    costs["overhead_per_op"] = [max(gaps[d] / ops[d], 0.0) if ops[d] else 0.0
                                for d in range(max(device_of_rank.values()) + 1)]
    return costs


def _is_op(e) -> bool:
    try:
        parse_op(e["name"])
        return e.get("cat") == "compute"
    except ValueError:
        return False


def fit_transfer(events: list[dict]) -> dict:
    """latency (s) and bandwidth (bytes/s, None when one message size gives no slope) of a
    message, the cost (s) of taking one that had arrived, and each stream's median bytes."""
    ends = {(e["pid"], e["name"]): e["ts"] + e["dur"] for e in events if e.get("cat") == "compute"}
    in_flight, arrived, stream_bytes = [], [], defaultdict(list)
    for e in events:
        if e.get("cat") != "wait" or not e["name"].startswith("wait recv "):
            continue
        message, args = e["name"][len("wait recv "):], e.get("args", {})
        op = parse_op(message)
        stream_bytes[(op.kind, op.partition)].append(args.get("bytes", 0))
        sent = ends.get((args.get("peer"), message))
        if sent is None:
            continue
        if e["ts"] <= sent:        # waiting before it was sent: the wait's end is its arrival
            in_flight.append((args.get("bytes", 0), (e["ts"] + e["dur"] - sent) / 1e6))
        else:
            arrived.append((e["ts"] - sent, e["dur"] / 1e6))
    latency, bandwidth = _line(in_flight)
    # Taken long after it was sent (past ten latencies): what remains is the cost of taking it.
    late = [wait for since, wait in arrived if since / 1e6 > max(10 * latency, 1e-3)]
    return {"latency_s": latency, "bandwidth_bytes_per_s": bandwidth, "receive_s": _median(late),
            "samples": len(in_flight), "arrived_samples": len(late),
            "stream_bytes": {f"{k}{p}": _median(v) for (k, p), v in sorted(stream_bytes.items())}}


def _line(samples):
    """Least-squares t = latency + bytes / bandwidth, both kept >= 0."""
    if not samples:
        return 0.0, None
    sizes = [b for b, _ in samples]
    if max(sizes) - min(sizes) < 0.1 * max(max(sizes), 1):
        return max(_median([t for _, t in samples]), 0.0), None
    mb, mt = statistics.fmean(sizes), statistics.fmean(t for _, t in samples)
    slope = sum((b - mb) * (t - mt) for b, t in samples) / sum((b - mb) ** 2 for b in sizes)
    if slope <= 0:
        return max(mt, 0.0), None
    return max(mt - slope * mb, 0.0), 1 / slope


def fit_allreduce(events: list[dict], n: int) -> list[float]:
    """Per partition, the median time from an all-reduce's launch to the end of a wait
    for it, over the waits that blocked (0 when none did)."""
    launched, samples = {}, defaultdict(list)
    for e in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"]):
        if e["name"].startswith("reduce "):
            launched[(e["pid"], e["name"][len("reduce "):])] = e["ts"] + e["dur"]
        elif e["name"].startswith("wait allreduce ") and e["dur"] / 1e6 > WAITED_S:
            name = e["name"][len("wait allreduce "):]
            if (e["pid"], name) in launched:
                samples[parse_op(name).partition].append((e["ts"] + e["dur"] - launched[(e["pid"], name)]) / 1e6)
    return [_median(samples[p]) for p in range(n)]


def _calls(events) -> list[list[dict]]:
    """The train() calls: the k-th entry holds every rank's k-th call event."""
    by_rank = defaultdict(list)
    for e in sorted((e for e in events if e["cat"] == "call"), key=lambda e: e["ts"]):
        by_rank[e["pid"]].append(e)
    if not by_rank:
        raise ValueError("the trace holds no train() call")
    return [[calls[k] for calls in by_rank.values()] for k in range(min(map(len, by_rank.values())))]


def _update_ends(ends_by_partition: dict[int, list[float]]) -> list[float]:
    """Period ends: the t-th period ends when every partition's t-th update has ended."""
    lists = [sorted(v) for v in ends_by_partition.values()]
    return [max(v[t] for v in lists) for t in range(min(map(len, lists)))] if lists else []


def calibrate(document: dict, skip_periods: int = 2) -> dict:
    """Fit the costs of a trace (see the module docstring) and predict its time."""
    cfg = document["otherData"]
    method, depth, period = cfg["method"], cfg["pipeline_depth"], cfg["micro_batches_per_update"]
    n = num_partitions(method, depth)
    devices = [device_of(method, p, depth) for p in range(n)]
    events = [e for e in document["traceEvents"] if e.get("ph") == "X"]
    updates = [(op, e) for op, e in _ops(events) if op.kind == "U"]

    # Measured: per call, period ends (s from the call's start); the timed windows skip the
    # first `skip_periods` periods of the run.
    calls, windows = [], defaultdict(list)
    for k, call in enumerate(_calls(events)):
        start, stop = min(e["ts"] for e in call), max(e["ts"] + e["dur"] for e in call)
        ends = defaultdict(list)
        for op, e in updates:
            if start <= e["ts"] <= stop:
                ends[op.partition].append((e["ts"] + e["dur"] - start) / 1e6)
        period_ends = _update_ends(ends)
        if not period_ends:
            raise ValueError(f"train() call {k} holds no complete period")
        skip = min(skip_periods, len(period_ends) - 1) if k == 0 else 0
        calls.append((call[0]["args"]["micro_batches"], period_ends, skip))
        for e in call:
            windows[e["pid"]].append((start + (period_ends[skip - 1] * 1e6 if skip else 0), stop))

    topology = Topology(method, depth, cfg.get("data_parallel", 1), cfg.get("rank_layout", "pipeline_major"))
    device_of_rank = {rank: topology.coordinates(rank)[1] for rank in windows}
    costs = fit_costs(events, n, windows, device_of_rank)
    transfer, allreduce = fit_transfer(events), fit_allreduce(events, n)

    def moved(kind, p):   # stream (kind, p): F carries p's outputs, B the gradients of p's inputs
        size = transfer["stream_bytes"].get(f"{kind}{p}", 0)
        bandwidth = transfer["bandwidth_bytes_per_s"]
        return transfer["latency_s"] + (size / bandwidth if bandwidth else 0.0)

    forward_transfer = [moved("F", p) for p in range(n)]
    backward_transfer = [moved("B", p + 1) for p in range(n)]
    receive = transfer["receive_s"]   # on the ops that take a message from another device
    forward = [c + (receive if p > 0 and devices[p - 1] != devices[p] else 0.0)
               for p, c in enumerate(costs["forward"])]
    backward = [c + (receive if p < n - 1 and devices[p + 1] != devices[p] else 0.0)
                for p, c in enumerate(costs["backward"])]

    def predict(count, with_overhead: bool) -> list[float]:
        schedule = build_schedule(method, depth, count, period)
        extra = [costs["overhead_per_op"][devices[p]] if with_overhead else 0.0 for p in range(n)]
        sim = simulate(schedule, method, depth, count,
                       [c + x for c, x in zip(forward, extra)], [c + x for c, x in zip(backward, extra)],
                       forward_transfer, [c + x for c, x in zip(costs["update"], extra)],
                       micro_batches_per_update=period, backward_transfer_cost=backward_transfer,
                       allreduce_cost=allreduce, defer_updates=True)
        ends = defaultdict(list)
        for d, ops in enumerate(schedule):
            for i, op in enumerate(ops):
                if op.kind == "U":
                    ends[op.partition].append(sim.end[d][i])
        return _update_ends(ends)

    def span(period_ends, skip):
        return period_ends[-1] - (period_ends[skip - 1] if skip else 0.0)

    measured = sum(span(ends, skip) for _, ends, skip in calls)
    predicted = sum(span(predict(count, True), skip) for count, _, skip in calls)
    limit = sum(span(predict(count, False), skip) for count, _, skip in calls)
    return {"method": method, "pipeline_depth": depth, "data_parallel": cfg.get("data_parallel", 1),
            "micro_batches_per_update": period, "recompute": cfg.get("recompute"),
            "calls": len(calls), "periods_timed": sum(len(ends) - skip for _, ends, skip in calls),
            "skip_periods": skip_periods,
            "measured_s": measured, "predicted_s": predicted, "limit_s": limit,
            "error": predicted / measured - 1 if measured else None,
            "costs": {**costs, "forward_transfer": forward_transfer, "backward_transfer": backward_transfer,
                      "allreduce": allreduce, "devices": devices},
            "transfer": transfer}


def format_report(result: dict, source: str) -> str:
    c = result["costs"]
    ms = 1e3
    lines = [f"calibration of {source}: {result['method']} {result['pipeline_depth']}x{result['data_parallel']}, "
             f"{result['micro_batches_per_update']} micro-batches per update, recompute "
             f"{'on' if result['recompute'] else 'off'}, {result['calls']} train() call(s)",
             "",
             "partition  device  forward ms  backward ms  update ms  all-reduce ms  transfer fwd/bwd ms"]
    for p, d in enumerate(c["devices"]):
        lines.append(f"{p:>9}  {d:>6}  {c['forward'][p] * ms:>10.2f}  {c['backward'][p] * ms:>11.2f}  "
                     f"{c['update'][p] * ms:>9.2f}  {c['allreduce'][p] * ms:>13.2f}  "
                     f"{c['forward_transfer'][p] * ms:>8.3f} / {c['backward_transfer'][p] * ms:.3f}")
    t = result["transfer"]
    bandwidth = t["bandwidth_bytes_per_s"]
    lines += ["",
              f"transfer: latency {t['latency_s'] * ms:.3f} ms"
              + (f" + bytes / {bandwidth / 1e9:.2f} GB/s" if bandwidth else " (one message size: no bandwidth term)")
              + f", from {t['samples']} messages waited for before they were sent; taking one that "
              f"had arrived: {t['receive_s'] * ms:.3f} ms (from {t['arrived_samples']})",
              "engine overhead per op (neither computing nor waiting), per device: "
              + ", ".join(f"{x * ms:.3f}" for x in c["overhead_per_op"]) + " ms",
              "",
              f"{result['periods_timed']} periods timed (the first {result['skip_periods']} skipped):",
              f"  measured  {result['measured_s']:.4f} s",
              f"  predicted {result['predicted_s']:.4f} s  (error {result['error']:+.1%})",
              f"  limit     {result['limit_s']:.4f} s  (no engine overhead; measured reaches "
              f"{result['limit_s'] / result['measured_s']:.3f} of it)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wpipe.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder holding trace.json (or the trace file itself)")
    parser.add_argument("--skip-periods", type=int, default=2, help="warm-up periods left out (default 2)")
    args = parser.parse_args(argv)
    try:
        document = load_trace(args.run_dir)
        result = calibrate(document, args.skip_periods)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent
    (out / "calibration.json").write_text(json.dumps(result, indent=1))
    print(format_report(result, args.run_dir))
    print(f"\nwrote {out / 'calibration.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
