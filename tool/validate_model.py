"""Check the chain blocks -> cost model -> simulator against real 2-process CPU runs.

    python tool/validate_model.py [--methods LIST] [--recompute] [--rounds 3] [--skip-bench]
                                  [--skip-nlp] [--output-dir runs/validate]

Runs, for each method, (1) tool/bench.py's configuration (4 TransformerEncoderLayer blocks,
hidden 256, sequence 128, micro-batch 8, depth 2, AdamW) and (2) nlp/main.py in throughput
mode on a BERT of the same size (4 layers, hidden 256, 4 heads, FFN 1024, sequence 128,
micro-batch 8), each as 2 processes of one thread. It predicts both the way tool/plan.py
predicts a GPU run: the model's blocks measured one at a time in this process (bytes, and
seconds at the run's micro-batch: network_conf/hardware/cpu_2x1thread.yaml says op_times
measured), the cost model, the simulator. A run's 2 processes share this machine, and two
processes run an op slower than one alone: the seconds are measured while DEPTH - 1 helper
processes run the same blocks over and over (measure_beside_load). Messages between the
processes go through their own CPUs (loopback TCP), which slows the ops that run meanwhile:
that cost per MB is measured too (measure_message_cost) and stands in for the preset's
p2p_cpu_us_per_mb. The prediction from seconds measured alone and the preset's message cost,
as tool/plan.py predicts, is printed beside it.

The speed of these shared machines drifts by tens of percent from one minute to the next,
so one run says little: each of `--rounds` rounds measures the messages' cost, then runs
every method (the order rotated from round to round), each right after its blocks are
measured, and the medians are compared. Printed per
method: the medians of predicted (beside load, and alone) and measured samples/s, their
errors, the measured range, for the bench runs the largest share of a timed window that a
rank was runnable but starved of a CPU, and whether every run's per-rank weights,
activations and optimizer bytes equal the prediction (exit status 1 otherwise).
Everything goes to <output-dir>/validate.json (rounds, message_costs: us per MB by round,
rows, summary, load_average, report).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from model_chains import ROOT, build_blocks, load_model, make_optimizer  # noqa: E402

from wpipe import schedule  # noqa: E402
from wpipe.launch import run, torchrun_command  # noqa: E402
from wpipe.planning import partition  # noqa: E402
from wpipe.planning.evaluate import Configuration, Workload, evaluate  # noqa: E402
from wpipe.planning.hardware import load_hardware  # noqa: E402
from wpipe.planning.measure import BlockSpec, ModelBlocks, time_blocks  # noqa: E402
from wpipe.planning.optimes import MeasuredTimes  # noqa: E402

HARDWARE = ROOT / "network_conf" / "hardware" / "cpu_2x1thread.yaml"
METHODS = ("wpipe", "pipedream_2bw", "pipedream_flush", "gpipe")
DEPTH, MICRO_BATCH, LAYERS, HIDDEN, SEQ = 2, 8, 4, 256, 128
PERIODS, WARMUP = 10, 2
NLP = {"num_layers": LAYERS, "hidden": HIDDEN, "heads": 4, "ffn": 4 * HIDDEN, "max_seq_length": SEQ,
       "micro_batch_size": MICRO_BATCH, "vocab_size": 1000, "synthetic_samples": 256}
LOAD_START_TIMEOUT_S, LOAD_LIMIT_S, TIMED_REPEATS, LOAD_REPEATS = 120, 900, 20, 50
MESSAGE_BYTES, MESSAGES, MESSAGE_ROUNDS = 2 ** 20, 3, 12
FIELDS = ("weights_bytes", "activations_bytes", "optimizer_state_bytes")


def bench_model() -> ModelBlocks:
    """tool/bench.py's model as blocks (its builders, model_chains.build_blocks)."""
    args = argparse.Namespace(hidden=HIDDEN, seq=SEQ, micro_batch=MICRO_BATCH)
    return ModelBlocks(
        "bench", [BlockSpec(f"layer.{i}", "layer", lambda i=i: build_blocks(args, [i])) for i in range(LAYERS)],
        lambda b: (torch.randn(b, SEQ, HIDDEN),), make_optimizer,
        lambda k: [[f"layer.{i}" for i in r] for r in partition.uniform(LAYERS, k)])


def nlp_model() -> ModelBlocks:
    return load_model(ROOT / "network_conf" / "nlp_tiny.yaml", NLP)[0]


def measure_beside_load(name: str, model: ModelBlocks, blocks: list) -> list:
    """`blocks` (measured alone) with their seconds timed again (median of TIMED_REPEATS)
    while DEPTH - 1 helper processes run the same blocks' forward, backward and step over
    and over: a real run's processes share this machine, and each runs its ops beside the
    others'."""
    helpers = [subprocess.Popen([sys.executable, __file__, "--load-blocks", name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE) for _ in range(DEPTH - 1)]
    try:
        for helper in helpers:     # each says "ready" once its loop runs
            ready, _, _ = select.select([helper.stdout], [], [], LOAD_START_TIMEOUT_S)
            if not ready or helper.stdout.readline().strip() != b"ready":
                status = helper.wait(5) if ready else None   # a line that is not "ready": its end
                raise RuntimeError(f"load helper (pid {helper.pid}) for the {name} blocks "
                                   + (f"exited with status {status}" if ready else
                                      f"did not report ready within {LOAD_START_TIMEOUT_S} s")
                                   + " before its loop ran")
        seconds = time_blocks(model.specs, model.make_inputs, model.make_optimizer, MICRO_BATCH, TIMED_REPEATS)
        return [dataclasses.replace(block, seconds={MICRO_BATCH: s}) for block, s in zip(blocks, seconds)]
    finally:
        for helper in helpers:     # exactly the processes started here
            helper.kill()
            helper.wait()


def load_blocks(model: ModelBlocks) -> None:
    """The load of measure_beside_load: the blocks' forward, backward and step again and
    again (LOAD_REPEATS per pass, so that rebuilding them between passes is a small part),
    "ready" printed after the first pass, until the parent closes stdin (or dies) or
    LOAD_LIMIT_S passes."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    deadline = time.monotonic() + LOAD_LIMIT_S
    while not stop.is_set() and time.monotonic() < deadline:
        time_blocks(model.specs, model.make_inputs, model.make_optimizer, MICRO_BATCH, LOAD_REPEATS)
        print("ready", flush=True)


def measure_message_cost(out: Path, rounds: int = MESSAGE_ROUNDS) -> float:
    """Microseconds of compute one MB of point-to-point messages takes from each end
    (the CPU preset's p2p_cpu_us_per_mb): 2 processes (torchrun, gloo over loopback) each
    time tool/bench.py's layer forward and backward over and over, in blocks with and
    without MESSAGES messages of MESSAGE_BYTES each way arriving and leaving meanwhile
    (message_cost_worker, `rounds` blocks of each); the difference of the medians per MB
    and message end, the median over both ranks."""
    out.mkdir(parents=True, exist_ok=True)
    code, text = run(torchrun_command(Path(__file__), DEPTH, ["--message-cost-worker", out,
                                                              "--message-rounds", rounds]), 300)
    if code != 0:
        raise RuntimeError(f"message cost measurement failed (exit status {code}):\n{text[-3000:]}")
    return statistics.median(json.loads((out / "message_cost.json").read_text()))


def message_cost_worker(out: Path, rounds: int) -> None:
    """One rank of measure_message_cost (under torchrun): rank 0 writes both ranks'
    microseconds per MB to <out>/message_cost.json."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    peer = (rank + 1) % DEPTH
    layer = build_blocks(argparse.Namespace(hidden=HIDDEN), [rank])
    x = torch.randn(MICRO_BATCH, SEQ, HIDDEN, requires_grad=True)
    elements = MESSAGE_BYTES // 4

    def iteration(messages: int) -> float:
        received = [torch.empty(elements) for _ in range(messages)]
        works = [dist.irecv(t, peer) for t in received]
        start = time.perf_counter()
        out = layer(x)
        works += [dist.isend(torch.randn(elements), peer) for _ in range(messages)]
        out.sum().backward()
        seconds = time.perf_counter() - start
        for work in works:
            work.wait()
        return seconds

    seconds = {0: [], MESSAGES: []}
    for _ in range(rounds):
        for messages in seconds:
            dist.barrier()
            seconds[messages] += [iteration(messages) for _ in range(8)]
    extra = statistics.median(seconds[MESSAGES]) - statistics.median(seconds[0])
    per_mb = [None] * DEPTH
    dist.all_gather_object(per_mb, extra / (2 * MESSAGES * MESSAGE_BYTES / 1e6) * 1e6)
    if rank == 0:
        (Path(out) / "message_cost.json").write_text(json.dumps(per_mb))
    dist.destroy_process_group()


def predict(model: ModelBlocks, blocks, hw, method: str, recompute: bool) -> tuple[float, list[dict]]:
    """(samples/s, per-device accounting) of a DEPTH x 1 run of PERIODS + WARMUP periods."""
    target = Workload(blocks, model.uniform_plan, hw, MeasuredTimes(hw))
    e = evaluate(target, Configuration(method, DEPTH, 1, MICRO_BATCH, recompute),
                 run_micro_batches=(PERIODS + WARMUP) * schedule.default_period(method, DEPTH))
    return e.samples_per_second, e.accounting


def run_bench(method: str, recompute: bool, out: Path) -> tuple[float, list[dict], float]:
    cmd = [sys.executable, str(ROOT / "tool" / "bench.py"), "--methods", method, "--layers", str(LAYERS),
           "--hidden", str(HIDDEN), "--seq", str(SEQ), "--micro-batch", str(MICRO_BATCH), "--depth", str(DEPTH),
           "--periods", str(PERIODS), "--warmup", str(WARMUP), "--output-dir", str(out),
           *(["--recompute"] if recompute else [])]
    code, text = run(cmd, 900)
    if code != 0:
        raise RuntimeError(f"bench {method} failed:\n{text[-3000:]}")
    ranks = json.loads((out / "bench.json").read_text())["results"][method]
    starved = max(r["time_shares"]["starved"] for r in ranks)
    return next(r["samples_per_s"] for r in ranks if "samples_per_s" in r), [r["memory"] for r in ranks], starved


def run_nlp(method: str, recompute: bool, out: Path) -> tuple[float, list[dict], None]:
    overrides = [x for k, v in NLP.items() for x in (f"--{k}", str(v))]
    cmd = torchrun_command(ROOT / "nlp" / "main.py", DEPTH, [
        "--config", ROOT / "network_conf" / "nlp_tiny.yaml", "--mode", "throughput", "--method", method,
        "--pipeline_depth", DEPTH, "--recompute", str(recompute).lower(), "--throughput_periods", PERIODS,
        "--throughput_warmup_periods", WARMUP, "--output_dir", out, *overrides])
    code, text = run(cmd, 900, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"nlp/main.py {method} failed:\n{text[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return summary["samples_per_second"], summary["memory"], None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are compared")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-nlp", action="store_true")
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "validate"))
    parser.add_argument("--load-blocks", choices=("bench", "nlp"), help=argparse.SUPPRESS)
    parser.add_argument("--message-cost-worker", help=argparse.SUPPRESS)
    parser.add_argument("--message-rounds", type=int, default=MESSAGE_ROUNDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.load_blocks:
        load_blocks({"bench": bench_model, "nlp": nlp_model}[args.load_blocks]())
        return 0
    if args.message_cost_worker:
        message_cost_worker(args.message_cost_worker, args.message_rounds)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    hw = load_hardware(HARDWARE)
    load_before = os.getloadavg()
    suites = [(name, make, runner) for name, make, runner, skip in
              (("bench", bench_model, run_bench, args.skip_bench), ("nlp", nlp_model, run_nlp, args.skip_nlp))
              if not skip]
    rows, message_costs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            message_cost = measure_message_cost(Path(tmp) / f"message_cost_{round_}")
            message_costs.append(message_cost)
            hw_round = dataclasses.replace(hw, p2p_cpu_us_per_mb=message_cost)
            print(f"round {round_ + 1}/{args.rounds}: messages take {message_cost:.0f} us of compute per MB "
                  f"at each end", flush=True)
            for name, make, runner in suites:
                model = make()
                shift = round_ % len(methods)                           # no method always runs first
                for method in methods[shift:] + methods[:shift]:
                    alone = model.measure(timed_micro_batch=MICRO_BATCH)    # op seconds right before the run
                    blocks = measure_beside_load(name, model, alone)
                    predicted, memory = predict(model, blocks, hw_round, method, args.recompute)
                    predicted_alone, _ = predict(model, alone, hw, method, args.recompute)
                    measured, reported, starved = runner(method, args.recompute,
                                                         Path(tmp) / f"{name}_{method}_{round_}")
                    same = all(memory[r["device"] if "device" in r else r["rank"]][f] == r[f]
                               for r in reported for f in FIELDS)
                    rows.append({"round": round_, "run": name, "method": method, "predicted": predicted,
                                 "predicted_alone": predicted_alone, "measured": measured, "starved": starved,
                                 "memory_equal": same, "memory_predicted": memory, "memory_reported": reported})
                    print(f"round {round_ + 1}/{args.rounds} {name} {method}: predicted {predicted:.2f} (alone "
                          f"{predicted_alone:.2f}), measured {measured:.2f} samples/s, memory "
                          f"{'equal' if same else 'DIFFERENT'}", flush=True)
    load = (load_before, os.getloadavg())
    summary = summarize(rows)
    lines = [f"{'run':<6} {'method':<16} {'predicted':>9} {'measured':>9} {'error':>7}  {'alone':>6} {'error':>7}  "
             f"{'measured min-max':>16}  {'starved':>7}  memory"]
    for s in summary:
        lines.append(f"{s['run']:<6} {s['method']:<16} {s['predicted']:>9.2f} {s['measured']:>9.2f} "
                     f"{s['error']:>+7.1%}  "
                     f"{s['predicted_alone']:>6.2f} {s['error_alone']:>+7.1%}  "
                     f"{s['measured_min']:>7.2f}-{s['measured_max']:<8.2f}  "
                     + (f"{s['starved']:>7.2f}" if s["starved"] is not None else f"{'-':>7}")
                     + f"  {'equal' if s['memory_equal'] else 'DIFFERENT'} in {s['rounds']} runs")
    lines.append(f"samples/s, medians over {args.rounds} interleaved round(s) (each measures the messages' cost, "
                 f"then runs every method, the order rotated, right after timing its blocks beside load and "
                 f"alone); recompute "
                 f"{'on' if args.recompute else 'off'}; load average (1, 5, 15 min) before "
                 f"{', '.join(f'{x:.2f}' for x in load[0])}, after {', '.join(f'{x:.2f}' for x in load[1])} "
                 f"on {os.cpu_count()} CPUs")
    print("\n".join(lines))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate.json").write_text(json.dumps({"rounds": args.rounds, "message_costs": message_costs,
                                                   "rows": rows, "summary": summary, "load_average": load,
                                                   "report": lines}, indent=1))
    return 0 if all(r["memory_equal"] for r in rows) else 1


def summarize(rows: list[dict]) -> list[dict]:
    """Per (run, method): the medians of predicted (op seconds measured beside load, and
    alone) and measured samples/s over the rounds, the errors of the medians, the measured
    range, the most any rank was starved, and whether every run's memory accounting
    equalled the prediction."""
    out = []
    for key in dict.fromkeys((r["run"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["run"], r["method"]) == key]
        predicted = statistics.median(r["predicted"] for r in mine)
        alone = statistics.median(r["predicted_alone"] for r in mine)
        measured = [r["measured"] for r in mine]
        median = statistics.median(measured)
        starved = [r["starved"] for r in mine if r["starved"] is not None]
        out.append({"run": key[0], "method": key[1], "rounds": len(mine), "predicted": predicted,
                    "measured": median, "error": predicted / median - 1,
                    "predicted_alone": alone, "error_alone": alone / median - 1,
                    "measured_min": min(measured), "measured_max": max(measured),
                    "starved": max(starved) if starved else None,
                    "memory_equal": all(r["memory_equal"] for r in mine)})
    return out


if __name__ == "__main__":
    sys.exit(main())
