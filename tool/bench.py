"""Throughput and memory of wpipe, pipedream_2bw, pipedream_flush and gpipe on one
BERT-like model, against a single-process run of the whole model and, with --peers,
against torch.distributed.pipelining's schedules.

    python tool/bench.py [--layers 4 --hidden 256 --seq 128 --micro-batch 8 --depth 2
                          --periods 10 --warmup 2 --repeat 1 --recompute --methods LIST
                          --peers [LIST] --trace --precision fp32 --wire-dtype none
                          --output-dir runs/bench]

What runs. Each method runs in its own torchrun launch (depth processes x 1 thread,
loopback, a free port, a timeout; its own processes are killed on the way out), so that
each process's measured peak memory is its own. Every method trains the same model on the
same data with the same global batch: N micro-batches per update (m = N).
--peers adds torch.distributed.pipelining on the same blocks, seeds, micro-batch, data
shapes, AdamW and loss (gradients of loss / m, as our engine), one optimizer step per
schedule step, at m = 2 and m = 8 micro-batches per step, one launch each:

    torch_gpipe_m2, torch_gpipe_m8              ScheduleGPipe, N stages (one per rank)
    torch_1f1b_m2, torch_1f1b_m8                Schedule1F1B, N stages
    torch_interleaved_m2, torch_interleaved_m8  ScheduleInterleaved1F1B, 2N stages, rank s
                                                holding stages s and N + s (wpipe's placement)

Bare --peers runs all six; --peers NAME,NAME a subset. Stages are cut with
partition.uniform over the layers, as our partitions are.

How it is timed. Samples/s are measured at the loss rank between the end of the last
warm-up update and the end of the last update; the ideal is N x the single-process
samples/s ("x ideal" in the table, peers included). Our methods measure --periods updates
(periods x N micro-batches) after --warmup; a peer at m micro-batches per step measures
ceil(periods x N / m) steps after ceil(warmup x N / m) warm-up steps (at least one each):
the same samples as ours when m divides periods x N, else up to m - 1 micro-batches more.
Each rank's share of that window is split into cpu (computing), starved (runnable but
without a CPU: other load on the machine) and blocked (waiting on receives: bubbles and
transfers), from the Linux scheduler. With --trace our methods record every op (tracing
on while timed) and the last run's timeline of each goes to <output-dir>/<method>/trace.json.

What is printed. One row per method and rank: samples/s, x ideal, time shares, and per
rank weights (including versions), peak stashed activations, optimizer state and peak
RSS in MB; a peer shows "-" for the stash, which pipelining does not report. --precision
(bf16, fp16: autocast, as the engine's precision field; the single-process run too) and
--wire-dtype apply to our methods; the stash is in the bytes as stored. Then checks
and targets. The model is a stack of identical torch.nn.TransformerEncoderLayer blocks
(4 heads, FFN 4 x hidden, no dropout, batch first) on float inputs (micro_batch, seq,
hidden) with an MSE loss against a random target: when the layers divide into 2N
partitions, every partition has the same parameter count, so wpipe's weight bytes must be
exactly 0.75 x 2bw's (a checked line; a failed check makes the exit status 1). The table
and lines are also written to <output-dir>/bench.txt, everything as JSON to bench.json.

Medians. Timings on a shared machine vary with its load: --repeat R runs every method
R times, interleaved (a busy spell hits every method), and the table shows each method's
MEDIAN run by loss-rank samples/s (the lower median when R is even, so that every column
comes from one real run). The load average before and after is printed and saved.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

import wpipe
from wpipe import schedule, trace
from wpipe.launch import run, torchrun_command
from wpipe.planning import partition
from wpipe.runtime import memory, precision
from model_chains import build_blocks, make_optimizer  # the model, shared with tool/validate_model.py

METHODS = list(schedule.PIPELINES)
PEER_SCHEDULES = {"gpipe": (ScheduleGPipe, 1), "1f1b": (Schedule1F1B, 1),
                  "interleaved": (ScheduleInterleaved1F1B, 2)}   # kind: (class, stages per rank)
PEER_MICRO_BATCHES = (2, 8)
PEERS = {f"torch_{kind}_m{m}": (kind, m) for kind in PEER_SCHEDULES for m in PEER_MICRO_BATCHES}
MB = 2 ** 20
NAME_WIDTH = max(map(len, [*METHODS, *PEERS]))


# ------------------------------------------------------------------ model and data

def micro_batches(args, count: int) -> list:
    g = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq, args.hidden)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(count)]


def loss_fn(output, target):
    return nn.functional.mse_loss(output, target)


# ------------------------------------------------------------------ measurement

def clock() -> tuple[float, float, float]:
    """(wall, CPU, run-queue wait) seconds of the calling thread, from the Linux scheduler."""
    with open("/proc/thread-self/schedstat") as f:
        cpu_ns, wait_ns = map(int, f.read().split()[:2])
    return time.perf_counter(), cpu_ns / 1e9, wait_ns / 1e9


def measure(update_ends: list[tuple[float, ...]], warmup: int, samples_per_update: int) -> tuple[float, dict]:
    """Samples per second between the end of the `warmup`-th update and the end of the
    last, and how this process's main thread spent that time: on a CPU, runnable but
    starved of one (a loaded machine), or blocked (waiting on receives: bubbles and transfers)."""
    start, end = update_ends[warmup - 1], update_ends[-1]
    wall, cpu, starved = (b - a for a, b in zip(start, end))
    measured = len(update_ends) - warmup
    return (measured * samples_per_update / wall,
            {"cpu": cpu / wall, "starved": starved / wall, "blocked": 1 - (cpu + starved) / wall})


def peer_steps(args, m: int) -> tuple[int, int]:
    """(warm-up, measured) steps of a peer at m micro-batches per step: at least as many
    micro-batches as our methods' (warmup, periods) x N, and at least one step each."""
    return tuple(max(1, math.ceil(periods * args.depth / m)) for periods in (args.warmup, args.periods))


def weights_bytes(modules) -> int:
    return memory.nbytes(p for module in modules for p in module.parameters())


# ------------------------------------------------------------------ workers

def pipeline_config(args, method: str) -> wpipe.PipelineConfig:
    """Our methods' configuration; the parent rebuilds it to write the traces."""
    return wpipe.PipelineConfig(method=method, pipeline_depth=args.depth, recompute=args.recompute,
                                timeout_s=args.timeout, trace=args.trace, precision=args.precision,
                                wire_dtype=None if args.wire_dtype == "none" else args.wire_dtype)


def pipeline_worker(args) -> dict:
    """One rank of our method `args.worker` (under torchrun)."""
    wpipe.init_distributed(timeout_s=args.timeout)
    cfg = pipeline_config(args, args.worker)
    ranges = partition.uniform(args.layers, schedule.num_partitions(args.worker, args.depth))
    pipe = wpipe.Pipeline(lambda p: build_blocks(args, ranges[p]), loss_fn, make_optimizer, cfg)
    data = micro_batches(args, (args.warmup + args.periods) * cfg.period)
    ends = []
    pipe.train(data, on_period=lambda t, loss: ends.append(clock()))
    samples_per_s, time_shares = measure(ends, args.warmup, cfg.period * args.micro_batch)
    result = {"memory": pipe.memory_report(), "time_shares": time_shares}
    if pipe.computes_loss:
        result["samples_per_s"] = samples_per_s
    if args.trace:
        result["trace"] = pipe.trace_events()
    dist.destroy_process_group()
    return result


def peer_worker(args) -> dict:
    """One rank of torch.distributed.pipelining's `args.worker` (a PEERS name, under
    torchrun): stages cut uniformly, rank s holding stages s, N + s, ...; m micro-batches
    per step, then one AdamW step per stage."""
    kind, m = PEERS[args.worker]
    schedule_class, per_rank = PEER_SCHEDULES[kind]
    wpipe.init_distributed(timeout_s=args.timeout)
    rank, num_stages = dist.get_rank(), per_rank * args.depth
    ranges = partition.uniform(args.layers, num_stages)
    indices = [rank + k * args.depth for k in range(per_rank)]
    modules = [build_blocks(args, ranges[i]) for i in indices]
    stages = [PipelineStage(module, i, num_stages, torch.device("cpu")) for module, i in zip(modules, indices)]
    optimizers = [make_optimizer(list(module.parameters())) for module in modules]
    # Our engine back-propagates loss / m per micro-batch: the same here, unscaled afterwards.
    steps = schedule_class(stages[0] if issubclass(schedule_class, PipelineScheduleSingle) else stages,
                           n_microbatches=m, scale_grads=False,
                           loss_fn=lambda output, target: loss_fn(output, target) / m)
    warmup, measured = peer_steps(args, m)
    data = micro_batches(args, (warmup + measured) * m)
    ends = []
    for start in range(0, len(data), m):
        chunk = data[start:start + m]
        # Whole batches, which the schedule splits back into these micro-batches (the call
        # every torch >= 2.11 takes; pre-split arg_mbs came later).
        inputs = (torch.cat([x for x, _ in chunk]),) if 0 in indices else ()
        target = torch.cat([target for _, target in chunk]) if num_stages - 1 in indices else None
        steps.step(*inputs, target=target, return_outputs=False)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ends.append(clock())
    samples_per_s, time_shares = measure(ends, warmup, m * args.micro_batch)
    report = {"rank": rank, "partitions": indices, "weights_bytes": weights_bytes(modules),
              "activations_bytes": None, "optimizer_state_bytes": memory.optimizer_state_bytes(optimizers),
              "peak_bytes": memory.process_peak(torch.device("cpu"))[0]}
    result = {"memory": report, "time_shares": time_shares}
    if num_stages - 1 in indices:
        result["samples_per_s"] = samples_per_s
    dist.destroy_process_group()
    return result


def single_worker(args) -> dict:
    """The whole model in one process: N micro-batches of gradient accumulation per update.
    --recompute checkpoints every block (the same extra forward as the pipelines); its
    stash is then the saved block inputs, without the working set of a recomputation."""
    model = build_blocks(args, range(args.layers))
    optimizer = make_optimizer(list(model.parameters()))
    data = micro_batches(args, (args.warmup + args.periods) * args.depth)
    saved, peak_saved = {}, 0
    ends = []
    autocast = precision.Policy(args.precision).autocast
    for start in range(0, len(data), args.depth):
        for x, target in data[start:start + args.depth]:
            saved.clear()
            with memory.count_saved(saved, model.parameters()):   # as the engine counts
                with autocast():   # fp16 here without a loss scale: a timing, not a training run
                    out = x
                    for block in model:
                        out = (torch.utils.checkpoint.checkpoint(block, out, use_reentrant=False)
                               if args.recompute else block(out))
                loss = loss_fn(out.float(), target) / args.depth
            peak_saved = max(peak_saved, sum(saved.values()))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(clock())
    report = {"rank": 0, "partitions": [0], "weights_bytes": weights_bytes([model]),
              "activations_bytes": peak_saved, "optimizer_state_bytes": memory.optimizer_state_bytes([optimizer]),
              "peak_bytes": memory.process_peak(torch.device("cpu"))[0]}
    samples_per_s, time_shares = measure(ends, args.warmup, args.depth * args.micro_batch)
    return {"memory": report, "samples_per_s": samples_per_s, "time_shares": time_shares}


# ------------------------------------------------------------------ launcher

def launch(args, worker: str, out_dir: str) -> list[dict]:
    """Run this file as `worker` (single, a method or a peer) in its own processes
    (torchrun with N ranks unless single); return each rank's result. Its processes are
    killed on timeout or interrupt."""
    nproc = 1 if worker == "single" else args.depth
    script = [str(Path(__file__).resolve()), "--worker", worker, "--result-dir", out_dir,
              *sys.argv[1:]]
    cmd = [sys.executable, *script] if worker == "single" else torchrun_command(script[0], nproc, script[1:])
    code, out = run(cmd, args.timeout)
    if code != 0:
        raise RuntimeError(f"{worker} failed (exit code {code}):\n{out[-6000:]}")
    return [json.loads(Path(out_dir, f"{worker}.rank{r}.json").read_text()) for r in range(nproc)]


# ------------------------------------------------------------------ report

def loss_rank_speed(ranks: list[dict]) -> float:
    """Samples/s of one launch, as measured at its loss rank."""
    return next(r["samples_per_s"] for r in ranks if "samples_per_s" in r)


def median_run(runs: list[list[dict]]) -> list[dict]:
    """The run with the median loss-rank samples/s (the lower median of an even count)."""
    return sorted(runs, key=loss_rank_speed)[(len(runs) - 1) // 2]


def _column(value, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def report(args, results: dict) -> tuple[list[str], bool]:
    """The table and the ratio lines; whether every check passed."""
    def speed(method):
        return loss_rank_speed(results[method])

    ideal = args.depth * speed("single")
    lines = [f"BERT-like: {args.layers} layers x hidden {args.hidden} x seq {args.seq}, micro-batch "
             f"{args.micro_batch}, depth {args.depth}, m = {args.depth}, {args.periods} periods after "
             f"{args.warmup} warm-up, AdamW, recompute {'on' if args.recompute else 'off'}, precision "
             f"{args.precision}, wire {args.wire_dtype}"
             f"{', traced' if args.trace else ''}; each row the MEDIAN of {args.repeat} run(s) by samples/s",
             f"ideal = {args.depth} x single-process = {ideal:.2f} samples/s; on an idle machine "
             f"{args.depth} x {speed('single') / results['single'][0]['time_shares']['cpu']:.2f} "
             f"(single-process samples per CPU-second)"]
    for m in sorted({PEERS[name][1] for name in results if name in PEERS}):
        warmup, measured = peer_steps(args, m)
        lines.append(f"torch_*_m{m}: torch.distributed.pipelining, {m} micro-batches per step, "
                     f"{measured} measured steps ({measured * m} micro-batches) after {warmup} warm-up step(s)")
    lines += ["",
              f"{'method':<{NAME_WIDTH}} {'samples/s':>9} {'x ideal':>7}  {'rank':>4} {'cpu':>4} {'starved':>7} "
              f"{'blocked':>7} {'weights MB':>10} {'stash MB':>8} {'optim MB':>8} {'peak RSS MB':>11}"]
    for method, ranks in results.items():
        for i, r in enumerate(ranks):
            m, shares = r["memory"], r["time_shares"]
            head = (f"{method:<{NAME_WIDTH}} {speed(method):>9.2f} {speed(method) / ideal:>7.3f}" if i == 0
                    else " " * (NAME_WIDTH + 18))
            mb = {key: None if m[key] is None else m[key] / MB
                  for key in ("weights_bytes", "activations_bytes", "optimizer_state_bytes", "peak_bytes")}
            lines.append(f"{head}  {m['rank']:>4} {shares['cpu']:>4.2f} {shares['starved']:>7.2f} "
                         f"{shares['blocked']:>7.2f} {_column(mb['weights_bytes'], 10, 2)} "
                         f"{_column(mb['activations_bytes'], 8, 2)} {_column(mb['optimizer_state_bytes'], 8, 2)} "
                         f"{_column(mb['peak_bytes'], 11, 1)}")
    lines.append("")
    ok = True
    if "wpipe" in results and "pipedream_2bw" in results:
        ratios = [w["memory"]["weights_bytes"] / b["memory"]["weights_bytes"]
                  for w, b in zip(results["wpipe"], results["pipedream_2bw"])]
        exact = all(4 * w["memory"]["weights_bytes"] == 3 * b["memory"]["weights_bytes"]
                    for w, b in zip(results["wpipe"], results["pipedream_2bw"]))
        expected = args.layers % (2 * args.depth) == 0   # equal partitions: 1.5 W/N vs 2 W/N
        ok = exact or not expected
        lines.append(f"wpipe / 2bw weight bytes per rank: {', '.join(f'{x:.4f}' for x in ratios)}"
                     + (f"  CHECK exactly 0.75: {'ok' if exact else 'FAILED'}" if expected else ""))
    targets = [("wpipe", None, 0.9), ("wpipe", "pipedream_2bw", 0.97), ("wpipe", "pipedream_flush", 1.25),
               ("pipedream_2bw", "pipedream_flush", 1.25)]
    for method, base, target in targets:
        if method in results and (base is None or base in results):
            value = speed(method) / (ideal if base is None else speed(base))
            lines.append(f"{method} / {base or 'ideal'} samples/s: {value:.3f}  "
                         f"(target >= {target}: {'met' if value >= target else 'missed'})")
    return lines, ok


# ------------------------------------------------------------------ main

def parse_args() -> tuple[argparse.Namespace, list[str], list[str]]:
    """The arguments, our methods and the peers to run; every setting checked before any launch."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2, help="pipeline depth N (processes per pipeline)")
    parser.add_argument("--periods", type=int, default=10, help="measured periods (N micro-batches each)")
    parser.add_argument("--warmup", type=int, default=2, help="periods run before the measurement starts")
    parser.add_argument("--recompute", action="store_true", help="recompute activations in the backward")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of our methods")
    parser.add_argument("--peers", nargs="?", const=",".join(PEERS), default="",
                        help=f"torch.distributed.pipelining schedules to run too: all when bare, or a "
                             f"comma-separated subset of {', '.join(PEERS)}")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of every method, interleaved; the table shows each method's median run")
    parser.add_argument("--trace", action="store_true",
                        help="record our methods' timelines: <output-dir>/<method>/trace.json (last run)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast dtype of our methods and the single-process run")
    parser.add_argument("--wire-dtype", choices=["none", "fp16", "bf16"], default="none",
                        help="point-to-point dtype of our methods")
    parser.add_argument("--output-dir", default="runs/bench", help="where bench.json, bench.txt and traces go")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each launch may take")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.periods < 1 or args.repeat < 1:
        parser.error("--warmup, --periods and --repeat must be >= 1 (the rate is taken between two update ends)")
    methods = [m for m in args.methods.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]
    for name in methods + peers:
        if name not in METHODS + list(PEERS):
            flag = "--methods" if name in methods else "--peers"
            parser.error(f"unknown {flag} name {name!r}: choose from "
                         f"{', '.join(METHODS if name in methods else PEERS)}")
        stages = (schedule.num_partitions(name, args.depth) if name in METHODS
                  else PEER_SCHEDULES[PEERS[name][0]][1] * args.depth)
        try:
            partition.uniform(args.layers, stages)
        except ValueError as error:
            parser.error(f"--layers {args.layers} for {name} at --depth {args.depth}: {error}")
        if name in PEERS and PEERS[name][0] == "1f1b" and PEERS[name][1] < args.depth:
            parser.error(f"{name}: Schedule1F1B needs at least --depth ({args.depth}) micro-batches per "
                         f"step; drop it from --peers or lower --depth")
    return args, methods, peers


def main() -> None:
    args, methods, peers = parse_args()
    if args.worker:
        torch.set_num_threads(1)
        worker = (single_worker if args.worker == "single" else peer_worker if args.worker in PEERS
                  else pipeline_worker)
        result = worker(args)
        rank = int(os.environ.get("RANK", 0))
        Path(args.result_dir, f"{args.worker}.rank{rank}.json").write_text(json.dumps(result))
        return

    load_before = os.getloadavg()
    trials = {worker: [] for worker in ["single", *methods, *peers]}
    traces = {}   # method: one list of events per rank, from its last run
    with tempfile.TemporaryDirectory() as out_dir:
        for repeat in range(args.repeat):   # interleaved, so that a busy spell hits every method
            for worker in trials:
                started = time.perf_counter()
                ranks = launch(args, worker, out_dir)
                if args.trace and worker in methods:
                    traces[worker] = [r.pop("trace") for r in ranks]
                trials[worker].append(ranks)
                print(f"{worker} (run {repeat + 1}/{args.repeat}): {time.perf_counter() - started:.1f} s",
                      file=sys.stderr)
    results = {worker: median_run(runs) for worker, runs in trials.items()}
    load = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}
    lines, ok = report(args, results)
    lines.append(f"load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in load['before'])}, "
                 f"after {', '.join(f'{x:.2f}' for x in load['after'])} on {load['cpus']} CPUs")
    print("\n".join(lines))

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.txt").write_text("\n".join(lines) + "\n")
    (out / "bench.json").write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_dir")},
        "results": results, "trials": trials, "report": lines, "checks_ok": ok, "load_average": load}, indent=1))
    written = [out / "bench.txt", out / "bench.json"]
    for method, events_per_rank in traces.items():
        written.append(trace.write_trace(out / method / "trace.json", events_per_rank,
                                         pipeline_config(args, method)))
    print(f"wrote {', '.join(map(str, written))}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
