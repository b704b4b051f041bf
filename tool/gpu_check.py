"""The prepared device check: what a lent GPU machine should confirm, in one short run.

    PY=python3 sh tool/gpu_check.sh [--out-dir runs/gpu_check] [--budget-s 480] [--checks a,b] [--rehearse]

Needs only a python with torch, transformers, numpy, pyyaml and pytest: nothing is installed
and nothing downloaded. Every child (torchrun and its workers, pytest, plain processes) gets
this checkout's lib/ and root on PYTHONPATH and the Hugging Face hub offline. The checks,
in order (docs/gpu_check.md says what each proves and how to read the JSON):

    environment             python, torch, transformers, CUDA, GPUs, bf16, NCCL, and the wpipe
                            the children import (it must be this checkout's)
    cuda_nccl_resume        one rank on backend nccl: train with checkpoints, resume, losses and
                            final state equal to the uninterrupted run's, bit for bit
    cuda_exact              engine == reference on CUDA, 2 and 4 ranks sharing the GPU
                            (tests/test_engine.py -k cuda)
    cuda_fp16_overflow      fp16 forced to overflow (loss scale 2^18): skips and scale changes
                            equal the reference's on the same device
    cuda_recompute_dropout  recompute with dropout on == no recompute, bit for bit
    cuda_probe_bert96       probe mode on BERT-96's 8x1 device share, fp32 and bf16; writes
                            network_conf/profiles/<gpu>_bert96_8x1_mb32_<precision>.json
    cuda_trace              a traced one-rank run (wpipe 1x1, both partitions on the GPU):
                            per-op forward and backward times within 15% of probe mode's
                            synchronised ones
    quickstart_fp32, quickstart_bf16, quickstart_fp16
                            the quick start (2 ranks) in each precision: bf16 and fp16 reach
                            fp32's dev accuracy (less ACCURACY_SLACK)
    bert96_share            samples/s and peak memory of BERT-96's 8x1 device share's 12
                            layers as one process, fp32 against bf16
    nccl_p2p                NCCL point-to-point between 2 GPUs (needs 2 or more)

The cuda_* checks and bert96_share need CUDA; without it they are skipped, saying so.
`--rehearse` runs the cuda_* checks but cuda_exact on this machine's CPU instead, at small
sizes, gloo in place of nccl: it tests the checks themselves, and its figures say nothing
about a GPU (profiles then go to <out-dir>/profiles).

A check starts only while the budget has its expected seconds left, and is cut off after
LIMIT_FACTOR times those (or at the budget's end): either way it is skipped, with the reason,
not failed (it could not conclude; a wait that hangs inside a run fails on its timeout_s). Writes
<out-dir>/gpu_check.json after every check and <out-dir>/gpu_check.log (every command and
its output). Exits 0 when every check that ran passed, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))
from wpipe.launch import run, torchrun_command  # noqa: E402
from wpipe.trace import load_trace  # noqa: E402
from wpipe.train import checkpoint  # noqa: E402
from wpipe.train.probe import op_times  # noqa: E402

MAIN = ROOT / "nlp" / "main.py"
WORKER = ROOT / "tool" / "gpu_check_worker.py"
LIMIT_FACTOR = 2

# The quick start, shortened: with 16 tokens and lr 3e-3 its fp32 run reaches dev accuracy
# 1.0 in 2 epochs (as do bf16 and fp16).
QUICKSTART = ["--config", "network_conf/quickstart.yaml", "--lr", "3e-3", "--warmup_periods", "2", "--epochs", "2",
              "--max_seq_length", "16", "--log_every", "100"]
# How far below fp32's dev accuracy a bf16 or fp16 quick start may end: 2 of the dev set's
# 256 samples (quickstart.yaml: 1024 synthetic samples, a quarter as many for dev). On a GPU
# no run is bit-reproducible (some backward kernels add with atomics, in a varying order),
# and bf16/fp16 round far more coarsely still: after 64 updates two runs differ in their
# last bits and a dev sample at the decision boundary can flip either way. What this
# comparison exists to catch (a wrong loss scale, a missing unscale or autocast) leaves the
# model near chance (0.5), far outside 2 samples.
ACCURACY_SLACK = 2 / 256
BERT96_SHARE = ["--config", "network_conf/nlp_throughput_bert96.yaml", "--method", "data_parallel",
                "--pipeline_depth", "1", "--data_parallel", "1", "--num_layers", "12",
                "--micro_batch_size", "32", "--throughput_periods", "20", "--throughput_warmup_periods", "3"]
# Exactness runs: a small BERT with its dropout on (0.1: the RNG states matter) and eager
# attention (the fused one's backward adds with atomics), wpipe with both partitions on one
# device (two weight versions), 2 epochs of 3 updates, a checkpoint every 2.
EXACT_RUN = ["--num_layers", "4", "--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab_size", "50",
             "--max_seq_length", "16", "--micro_batch_size", "4", "--synthetic_samples", "64",
             "--max_eval_batches", "2", "--lr", "1e-2", "--warmup_periods", "1", "--epochs", "2",
             "--max_periods_per_epoch", "3", "--checkpoint_every", "2", "--keep_checkpoints", "0",
             "--log_every", "100", "--timeout_s", "60", "--attn_implementation", "eager",
             "--method", "wpipe", "--pipeline_depth", "1", "--data_parallel", "1"]
RESUME_FROM = (2, 4)          # mid-epoch 1 and mid-epoch 2
# tests/test_engine.py's fp16 case: a loss scale of 2^18 overflows fp16 gradients for a few
# periods, a growth interval of 1 period raises it again.
FP16_CASE = "wpipe:2:1:pipeline_major:adam:8:fp16:scale18:grow1"
# Engine and reference run the same kernels on the same device in the same order: equal in
# practice; tests/test_engine.py's AUTOCAST_TOLERANCE says why 1e-5 still catches any wrong
# scale, skip or version.
AUTOCAST_TOLERANCE = 1e-5
PROBE_BERT96 = ["--config", "network_conf/nlp_throughput_bert96.yaml", "--mode", "probe", "--probe_device", "0",
                "--probe_periods", "3", "--throughput_warmup_periods", "2", "--log_every", "100"]
# Traced against probed: BERT-Base layers, wpipe 1x1, one rank. Not two ranks sharing the GPU:
# their processes' kernels take turns on it, so a rank's span holds the other's kernels too
# (on an H200, x1.5-5 the probe's times). Micro-batch 64 keeps an op bound by the GPU: at 16
# an op of 2-4 ms is partly bound by kernel launches, and probe mode's synchronised times then
# carry the launch ramp and the wait (traced 0.78-0.89 x probe there on an H200).
TRACED = ["--config", "network_conf/nlp_tiny.yaml", "--method", "wpipe", "--pipeline_depth", "1",
          "--num_layers", "4", "--hidden", "768", "--heads", "12", "--ffn", "3072", "--vocab_size", "30522",
          "--max_seq_length", "128", "--micro_batch_size", "64", "--synthetic_samples", "1024",
          "--throughput_periods", "8", "--throughput_warmup_periods", "3", "--probe_periods", "8", "--log_every", "100"]
TRACE_TOLERANCE = 0.15
TRACE_JUDGED = ("forward_s", "backward_s")
OP_EVENT = re.compile(r"(recompute )?\d+[FB]\d+|\d+U")
# --rehearse: the same runs at CPU sizes.
SMALL_BERT = ["--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab_size", "100", "--max_seq_length", "16",
              "--micro_batch_size", "4"]
SMALL_PROBE = [*SMALL_BERT, "--num_layers", "16", "--probe_periods", "1", "--throughput_warmup_periods", "1"]
SMALL_TRACE = [*SMALL_BERT, "--throughput_periods", "4", "--throughput_warmup_periods", "1", "--probe_periods", "4"]


class Failed(Exception):
    """The check ran and found something wrong (the message says what)."""


class OutOfTime(Exception):
    """A run was cut off by the check's time limit or the budget's end."""


@dataclass
class Check:
    name: str
    run: Callable              # (Context, figures) -> None; fills figures, raises Failed
    expected_s: float          # seconds it needs on one H200, generously
    needs: str | None = None   # "cuda", "2 gpus" or None (runs anywhere)
    rehearse: bool = False     # --rehearse runs it on the CPU
    what: str = ""


class Context:
    """What the checks share: where outputs go, the log, the device, every command's time limit."""

    def __init__(self, out_dir: Path, budget_s: float, rehearse: bool):
        self.out_dir, self.budget_s, self.rehearse = out_dir, budget_s, rehearse
        self.end = time.perf_counter() + budget_s
        self.log = (out_dir / "gpu_check.log").open("w")
        self.info: dict = {}
        self.results: dict[str, dict] = {}
        self.check_end = self.end
        self.check_dir = out_dir

    @property
    def on_gpu(self) -> bool:
        return bool(self.info.get("cuda_available")) and not self.rehearse

    @property
    def profiles(self) -> Path:
        return self.out_dir / "profiles" if self.rehearse else ROOT / "network_conf" / "profiles"

    def left(self) -> float:
        return self.end - time.perf_counter()

    def command(self, cmd: list) -> str:
        """Run `cmd` from the repository root until the check's time limit; its output.
        Raises OutOfTime when cut off, Failed on a non-zero exit."""
        cmd = [str(c) for c in cmd]
        timeout = self.check_end - time.perf_counter()
        self.log.write(f"$ {' '.join(cmd)}\n")
        self.log.flush()
        if timeout < 1:
            raise OutOfTime("no time left for its next run")
        try:
            code, out = run(cmd, timeout, cwd=ROOT)
        except TimeoutError as error:
            self.log.write(f"{error}\n[cut off after {timeout:.0f} s]\n\n")
            raise OutOfTime(f"a run did not finish within the {timeout:.0f} s left to it") from None
        self.log.write(out + f"\n[exit {code}]\n\n")
        self.log.flush()
        if code != 0:
            label = next((Path(c).name for c in cmd if c.endswith(".py")), " ".join(cmd[1:4]))
            raise Failed(f"{label} exited {code}: {last_error(out)}")
        return out

    def torchrun(self, script, nproc: int, args) -> str:
        return self.command(torchrun_command(script, nproc, args))

    def python(self, args) -> str:
        return self.command([sys.executable, *args])


def last_error(out: str) -> str:
    """The line of a run's output that says what went wrong: its `error:` line, else the
    last line naming an Error, else its last line."""
    lines = [line.strip() for line in out.strip().splitlines() if line.strip()]
    for wanted in (lambda s: s.startswith("error:"), lambda s: "Error" in s and "Traceback" not in s):
        found = [line for line in lines if wanted(line)]
        if found:
            return found[-1][:400]
    return lines[-1][:400] if lines else "no output"


# ------------------------------------------------------------------------ the checks

def environment(ctx: Context, figures: dict) -> None:
    path = ctx.check_dir / "environment.json"
    ctx.python([WORKER, "environment", path])
    ctx.info = json.loads(path.read_text())
    figures.update(ctx.info)
    if Path(ctx.info["wpipe"]) != ROOT / "lib" / "wpipe":
        raise Failed(f"the children import wpipe from {ctx.info['wpipe']}, not from this checkout's lib/")


def nccl_resume(ctx: Context, figures: dict) -> None:
    backend = "nccl" if ctx.on_gpu else "gloo"
    figures["backend"] = backend
    ctx.torchrun(WORKER, 1, ["resume", ctx.check_dir, ",".join(map(str, RESUME_FROM)), *EXACT_RUN,
                             "--backend", backend])
    full = summary_of(ctx.check_dir / "full", ctx)
    figures.update(device=full["precision"]["device"], updates=len(full["losses"]), losses=full["losses"],
                   resumed_after_updates=list(RESUME_FROM))
    expected = final_state(ctx.check_dir / "full")
    for start in RESUME_FROM:
        resumed = summary_of(ctx.check_dir / f"from{start}", ctx)
        for key in ("losses", "history"):
            if resumed[key] != full[key]:
                raise Failed(f"resumed after update {start}: {key} {resumed[key]} differ from the "
                             f"uninterrupted run's {full[key]}")
        difference = first_difference(final_state(ctx.check_dir / f"from{start}"), expected, "final state")
        if difference:
            raise Failed(f"resumed after update {start}: {difference}")


def cuda_exact(ctx: Context, figures: dict) -> None:
    out = ctx.command([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                       "tests/test_engine.py", "-k", "cuda"])
    figures["pytest"] = out.strip().splitlines()[-1]
    if "passed" not in figures["pytest"] or "skipped" in figures["pytest"]:
        raise Failed(f"pytest: {figures['pytest']}")


def fp16_overflow(ctx: Context, figures: dict) -> None:
    case = FP16_CASE + (":cuda" if ctx.on_gpu else "")
    figures["case"] = case
    ctx.torchrun(WORKER, 2, ["fp16", ctx.check_dir, case])
    reference = torch.load(ctx.check_dir / "reference.pt", weights_only=True)
    ranks = [torch.load(ctx.check_dir / f"{case}.rank{r}.pt", weights_only=False) for r in (0, 1)]
    figures.update(device=ranks[0]["precision"]["device"], loss_scale_changes=reference["loss_scale_changes"],
                   overflow_skips=reference["overflow_skips"])
    if ctx.on_gpu and ranks[0]["memory"]["peak_kind"] != "cuda_max_allocated":
        raise Failed(f"the engine did not run on the GPU (device {figures['device']})")
    scales = [scale for _, scale in reference["loss_scale_changes"]]
    if not all(reference["overflow_skips"].values()) or min(scales) >= scales[0] or \
            not any(b > a for a, b in zip(scales, scales[1:])):
        raise Failed(f"the case did not overflow as intended (a skip in every group, the scale lowered and "
                     f"raised again): {figures}")
    for r, result in enumerate(ranks):
        for key in ("loss_scale_changes", "overflow_skips"):
            if result["precision"][key] != reference[key]:
                raise Failed(f"rank {r}: {key} {result['precision'][key]}, the reference's {reference[key]}")
    weights = max((value - reference["state"][p][key]).abs().max().item()
                  for result in ranks for p, state in result["state"].items() for key, value in state.items())
    losses = max(abs(a - b) for a, b in zip(next(r["losses"] for r in ranks if r["losses"]), reference["losses"]))
    figures.update(max_weight_difference=weights, max_loss_difference=losses, tolerance=AUTOCAST_TOLERANCE)
    if not (weights <= AUTOCAST_TOLERANCE and losses <= AUTOCAST_TOLERANCE):
        raise Failed(f"weights differ from the reference by {weights:.3g}, losses by {losses:.3g} "
                     f"(tolerance {AUTOCAST_TOLERANCE:g})")


def recompute_dropout(ctx: Context, figures: dict) -> None:
    backend = "nccl" if ctx.on_gpu else "gloo"
    ctx.torchrun(WORKER, 1, ["recompute", ctx.check_dir, *EXACT_RUN, "--backend", backend])
    plain, recomputed = (summary_of(ctx.check_dir / name, ctx) for name in ("plain", "recompute"))
    stash = [s["memory"][0]["activations_bytes"] for s in (plain, recomputed)]
    figures.update(backend=backend, device=plain["precision"]["device"], losses=plain["losses"],
                   activations_bytes={"plain": stash[0], "recompute": stash[1]})
    if not stash[1] < stash[0]:
        raise Failed(f"recompute did not take effect: its stash peaks at {stash[1]} bytes, without it {stash[0]}")
    if recomputed["losses"] != plain["losses"]:
        raise Failed(f"losses with recompute {recomputed['losses']} differ from those without {plain['losses']}")
    difference = first_difference(final_state(ctx.check_dir / "recompute"), final_state(ctx.check_dir / "plain"),
                                  "final state")
    if difference:
        raise Failed(f"with recompute, {difference}")


def probe_bert96(ctx: Context, figures: dict) -> None:
    args = [*PROBE_BERT96, *(SMALL_PROBE + ["--backend", "gloo"] if ctx.rehearse else [])]
    for precision in ("fp32", "bf16"):
        if ctx.on_gpu and precision == "bf16" and not ctx.info.get("bf16_supported"):
            figures[precision] = {"skipped": "this GPU does not support bfloat16"}
            continue
        run_dir = ctx.check_dir / precision
        ctx.python([MAIN, *args, "--precision", precision, "--output_dir", run_dir])
        report = json.loads((run_dir / "probe.json").read_text())
        device = report["devices"][0]
        if ctx.on_gpu and device["peak_kind"] != "cuda_max_allocated":
            raise Failed(f"{precision}: the probe did not run on the GPU (peak_kind {device['peak_kind']})")
        profile = ctx.profiles / profile_name(report, precision)
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text((run_dir / "probe.json").read_text())
        figures[precision] = {
            "device_name": report["device_name"], "profile": shown(profile),
            **{k: device[k] for k in ("partitions", "weights_bytes", "activations_bytes", "optimizer_state_bytes",
                                      "peak_bytes", "peak_kind")},
            "ops": [{k: op[k] for k in ("partition", "forward_s", "backward_s", "update_s")} for op in device["ops"]]}


def trace_accuracy(ctx: Context, figures: dict) -> None:
    args = [*TRACED, *(SMALL_TRACE if ctx.rehearse else [])]
    traced_dir, probe_dir = ctx.check_dir / "traced", ctx.check_dir / "probe"
    ctx.torchrun(MAIN, 1, [*args, "--mode", "throughput", "--trace", "true", "--output_dir", traced_dir,
                           *([] if ctx.on_gpu else ["--backend", "gloo"])])
    ctx.python([MAIN, *args, "--mode", "probe", "--output_dir", probe_dir,
                *([] if ctx.on_gpu else ["--backend", "gloo"])])
    summary = json.loads((traced_dir / "summary.json").read_text())
    traced = traced_op_times(load_trace(traced_dir), summary["config"]["throughput_warmup_periods"])
    report = json.loads((probe_dir / "probe.json").read_text())
    probed = {op["partition"]: op for device in report["devices"] for op in device["ops"]}
    ratios = op_time_ratios(traced, probed)
    figures.update(device=summary["precision"]["device"], tolerance=TRACE_TOLERANCE, judged=list(TRACE_JUDGED),
                   traced_s=traced, probe_s={p: {k: op[k] for k in traced[p]} for p, op in probed.items()},
                   ratios=ratios)
    outside = [f"partition {p} {key} x{ratio:.3f}" for p, row in ratios.items() for key, ratio in row.items()
               if key in TRACE_JUDGED and not abs(ratio - 1) <= TRACE_TOLERANCE]
    if outside:
        raise Failed(f"traced op times off probe mode's by more than {TRACE_TOLERANCE:.0%}: {', '.join(outside)}")


def quickstart(precision: str) -> Callable:
    def check(ctx: Context, figures: dict) -> None:
        extra = ["--p2p_backend", "gloo"] if ctx.on_gpu else []
        run_dir = ctx.check_dir
        ctx.torchrun(MAIN, 2, [*QUICKSTART, "--precision", precision, *extra, "--output_dir", run_dir])
        summary = json.loads((run_dir / "summary.json").read_text())
        accuracy = summary["eval"]["dev_accuracy"]
        figures.update(dev_accuracy=accuracy, samples_per_second=summary["samples_per_second"],
                       device=summary["precision"]["device"], precision=summary["precision"],
                       activations_bytes=[m["activations_bytes"] for m in summary["memory"]],
                       peak_bytes=[m["peak_bytes"] for m in summary["memory"]])
        if precision == "fp32":
            return
        fp32 = ctx.results.get("quickstart_fp32", {})
        if fp32.get("status") != "passed":
            raise Failed("no fp32 quick start to compare with")
        target = fp32["figures"]["dev_accuracy"]
        figures.update(fp32_dev_accuracy=target, slack=ACCURACY_SLACK)
        if accuracy < target - ACCURACY_SLACK:
            raise Failed(f"dev accuracy {accuracy:.4f}, fp32's {target:.4f} less {ACCURACY_SLACK:.4f}")
    return check


def bert96_share(ctx: Context, figures: dict) -> None:
    for precision in ("fp32", "bf16"):
        run_dir = ctx.check_dir / precision
        ctx.torchrun(MAIN, 1, [*BERT96_SHARE, "--precision", precision, "--output_dir", run_dir])
        summary = json.loads((run_dir / "summary.json").read_text())
        memory = summary["memory"][0]
        figures[precision] = {"samples_per_second": summary["samples_per_second"],
                              "peak_bytes": memory["peak_bytes"], "activations_bytes": memory["activations_bytes"]}
    figures["bf16_over_fp32_samples_per_second"] = (figures["bf16"]["samples_per_second"]
                                                    / figures["fp32"]["samples_per_second"])
    figures["bf16_over_fp32_peak_bytes"] = figures["bf16"]["peak_bytes"] / figures["fp32"]["peak_bytes"]
    figures["note"] = ("one process runs the device's 12 layers as one partition; weights and optimizer state are "
                       "the whole share's (cuda_probe_bert96 measures the share as wpipe holds it)")


def nccl_p2p(ctx: Context, figures: dict) -> None:
    ctx.torchrun(MAIN, 2, ["--config", "network_conf/nlp_tiny.yaml", "--mode", "throughput", "--backend", "nccl",
                           "--p2p_backend", "nccl", "--throughput_periods", "4", "--throughput_warmup_periods", "1",
                           "--output_dir", ctx.check_dir])
    summary = json.loads((ctx.check_dir / "summary.json").read_text())
    figures.update(samples_per_second=summary["samples_per_second"], p2p_backend=summary["precision"]["p2p_backend"])


CHECKS = [
    Check("environment", environment, 20, what="the python, its devices, and the wpipe its children import"),
    Check("cuda_nccl_resume", nccl_resume, 45, "cuda", True,
          "one rank on NCCL: train, checkpoint, resume == the uninterrupted run, bit for bit"),
    Check("cuda_exact", cuda_exact, 120, "cuda",
          what="engine == reference on CUDA, 2 and 4 ranks sharing the GPU, every method"),
    Check("cuda_fp16_overflow", fp16_overflow, 45, "cuda", True,
          "fp16 forced to overflow: skips and loss-scale changes == the reference's on the same device"),
    Check("cuda_recompute_dropout", recompute_dropout, 45, "cuda", True,
          "recompute with dropout == no recompute, bit for bit"),
    Check("cuda_probe_bert96", probe_bert96, 75, "cuda", True,
          "probe mode on BERT-96's 8x1 device share in fp32 and bf16, written as profiles"),
    Check("cuda_trace", trace_accuracy, 75, "cuda", True,
          f"traced op times (one rank, both partitions) within {TRACE_TOLERANCE:.0%} of probe mode's"),
    *[Check(f"quickstart_{p}", quickstart(p), 60, what=f"the quick start learns in {p}"
            + ("" if p == "fp32" else " as in fp32")) for p in ("fp32", "bf16", "fp16")],
    Check("bert96_share", bert96_share, 75, "cuda", what="samples/s and peak memory of BERT-96's 8x1 device "
          "share, fp32 against bf16"),
    Check("nccl_p2p", nccl_p2p, 60, "2 gpus", what="NCCL point-to-point between 2 GPUs"),
]


# ------------------------------------------------------------------------ helpers

def summary_of(run_dir: Path, ctx: Context) -> dict:
    """A run's summary.json; on a GPU check, Failed unless the run computed on the GPU."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if ctx.on_gpu and not summary["precision"]["device"].startswith("cuda"):
        raise Failed(f"{run_dir.name} ran on {summary['precision']['device']}, not on the GPU")
    return summary


def final_state(run_dir: Path) -> dict:
    """Rank 0's state in the run's latest checkpoint (weights, versions, optimizers, RNG...)."""
    folder = checkpoint.latest(run_dir / "checkpoints")
    if folder is None:
        raise Failed(f"{run_dir} wrote no checkpoint")
    return torch.load(folder / checkpoint.rank_file(0), map_location="cpu", weights_only=True)


def first_difference(a, b, where: str) -> str | None:
    """Where nested state `a` differs from `b` (tensors bit for bit), or None."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} against {type(b).__name__}"
    if torch.is_tensor(a):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return f"{where} differs" + (f" (by up to {(a.double() - b.double()).abs().max().item():.3g})"
                                         if a.shape == b.shape and a.is_floating_point() else "")
        return None
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(map(str, a))} against {sorted(map(str, b))}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} against {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))),
                    None)
    return None if a == b else f"{where}: {a!r} against {b!r}"


def profile_name(report: dict, precision: str) -> str:
    """nvidia_h200_bert96_8x1_mb32_bf16.json: the device, the model, the layout, the
    micro-batch size and the precision a probe.json measured."""
    device = re.sub(r"[^a-z0-9]+", "_", report["device_name"].lower()).strip("_")
    return (f"{device}_bert96_{report['pipeline_depth']}x{report['data_parallel']}_"
            f"mb{report['micro_batch_size']}_{precision}.json")


def shown(path: Path) -> str:
    """`path` relative to the repository root when inside it."""
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def traced_op_times(document: dict, warmup_periods: int) -> dict[int, dict[str, float]]:
    """Per partition, the median seconds of its ops (probe.op_times) in a trace.json of the
    trace contract: compute events named like ops (`2F3`, `recompute 1B0`; others, such as a
    data-parallel `reduce 2U`, are not op times), `ts` and `dur` in microseconds."""
    events = [(e["cat"], e["name"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, None)
              for e in document["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") == "compute" and OP_EVENT.fullmatch(e["name"])]
    return op_times(events, document["otherData"]["micro_batches_per_update"], warmup_periods)


def op_time_ratios(traced: dict[int, dict[str, float]], probed: dict[int, dict]) -> dict[int, dict[str, float]]:
    """Per partition and op kind measured in both (seconds > 0), traced over probed."""
    if set(traced) != set(probed):
        raise Failed(f"the trace has partitions {sorted(traced)}, the probe {sorted(probed)}")
    return {p: {k: traced[p][k] / probed[p][k] for k in traced[p] if traced[p][k] > 0 and probed[p].get(k, 0) > 0}
            for p in sorted(traced)}


def child_environment() -> None:
    """What every child inherits: this checkout first on PYTHONPATH (lib/ for wpipe, the root
    for cv/ and nlp/), the Hugging Face hub offline."""
    paths = [str(ROOT / "lib"), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


# ------------------------------------------------------------------------ the run

def unavailable(check: Check, ctx: Context) -> str | None:
    """Why `check` cannot run here, or None."""
    if check.needs == "cuda" and not ctx.on_gpu:
        if ctx.rehearse and not check.rehearse:
            return "not rehearsed on the CPU (a GPU measurement or GPU-only test cases)"
        if not ctx.rehearse:
            return "no CUDA device here"
    if check.needs == "2 gpus" and (ctx.rehearse or ctx.info.get("gpus", 0) < 2):
        return f"{0 if ctx.rehearse else ctx.info.get('gpus', 0)} GPU(s) here: NCCL point-to-point needs 2 or more"
    return None


def run_check(check: Check, ctx: Context) -> dict:
    """Run one check within its time limit; its record: status, seconds, what, reason, figures."""
    figures: dict = {}
    started = time.perf_counter()
    allowed = min(LIMIT_FACTOR * check.expected_s, ctx.left())
    ctx.check_end = started + allowed
    ctx.check_dir = ctx.out_dir / check.name
    ctx.check_dir.mkdir(parents=True, exist_ok=True)
    limited_by = "its limit" if allowed == LIMIT_FACTOR * check.expected_s else "the rest of the budget"
    status, reason = "passed", None
    try:
        check.run(ctx, figures)
    except OutOfTime as error:
        status = "skipped"
        reason = f"cut off after {allowed:.0f} s ({limited_by}): {error}; gpu_check.log has its output"
    except Failed as error:
        status, reason = "failed", str(error)
    except Exception as error:   # a bug of the check itself: the others still run
        ctx.log.write(traceback.format_exc() + "\n")
        status, reason = "failed", f"the check itself broke: {type(error).__name__}: {error}"
    record = {"status": status, "seconds": round(time.perf_counter() - started, 1), "what": check.what}
    if reason:
        record["reason"] = reason
    record["figures"] = figures
    return record


def run_checks(ctx: Context, checks: list[Check], selected: set[str]) -> dict:
    """Run `checks` in order (the first is the environment, which the others need), each
    unless unavailable, not selected or out of budget; write gpu_check.json after each.
    Returns the final document."""
    started = time.perf_counter()
    for check in checks:
        reason = None
        if check is not checks[0] and ctx.results[checks[0].name]["status"] != "passed":
            reason = f"the {checks[0].name} check did not pass"
        elif check is not checks[0] and check.name not in selected:
            reason = "not among --checks"
        elif (reason := unavailable(check, ctx)) is None and ctx.left() < check.expected_s:
            reason = f"{max(ctx.left(), 0):.0f} s of the budget left, it needs up to {check.expected_s:.0f} s"
        if reason:
            record = {"status": "skipped", "seconds": 0.0, "what": check.what, "reason": reason, "figures": {}}
        else:
            record = run_check(check, ctx)
        ctx.results[check.name] = record
        print(f"{check.name}: {record['status']} ({record['seconds']:.0f} s)"
              + (f": {record['reason']}" if "reason" in record else ""), flush=True)
        document = summary_document(ctx, time.perf_counter() - started)
        (ctx.out_dir / "gpu_check.json").write_text(json.dumps(document, indent=1))
    return document


def summary_document(ctx: Context, seconds: float) -> dict:
    results = ctx.results
    return {"passed": all(r["status"] != "failed" for r in results.values()),
            "device": "cpu (rehearsal)" if ctx.rehearse else "cuda" if ctx.on_gpu else "cpu",
            "budget_s": ctx.budget_s, "seconds": round(seconds, 1), "checks": results,
            "skipped": {n: r["reason"] for n, r in results.items() if r["status"] == "skipped"},
            "failed": {n: r["reason"] for n, r in results.items() if r["status"] == "failed"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/gpu_check", help="where gpu_check.json, gpu_check.log and "
                        "every check's runs go")
    parser.add_argument("--budget-s", type=float, default=480, help="seconds for all checks together")
    parser.add_argument("--checks", default=None, help="comma-separated names: run only these (the "
                        "environment always runs); the others are listed as skipped")
    parser.add_argument("--rehearse", action="store_true", help="run the cuda_* checks that can on this "
                        "machine's CPU, at small sizes (tests the checks; says nothing about a GPU)")
    args = parser.parse_args()
    names = [c.name for c in CHECKS]
    selected = set(names if args.checks is None else args.checks.split(","))
    if selected - set(names):
        parser.exit(2, f"error: --checks: unknown {', '.join(sorted(selected - set(names)))}; "
                       f"checks are {', '.join(names)}\n")
    if not args.budget_s > 0:
        parser.exit(2, f"error: --budget-s must be > 0 seconds, got {args.budget_s:g}\n")
    child_environment()
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: writing {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.log'}", flush=True)
    document = run_checks(Context(out_dir, args.budget_s, args.rehearse), CHECKS, selected)
    print(f"gpu_check: {'all checks that ran passed' if document['passed'] else 'FAILED'}; "
          f"{len(document['skipped'])} skipped; {out_dir / 'gpu_check.json'}", flush=True)
    sys.exit(0 if document["passed"] else 1)


if __name__ == "__main__":
    main()
