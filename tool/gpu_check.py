"""The prepared device check: what a lent GPU machine should confirm, in one short run.

    sh tool/gpu_check.sh [--out-dir runs/gpu_check] [--budget-s 480]

Checks, in order (each a real run of the project's own code, with a timeout):

    environment        torch, CUDA, GPUs, bf16 support (always)
    cuda_exact         engine == reference on CUDA, float64, 2 and 4 ranks sharing one GPU
                       through gloo-staged point-to-point, every method (tests/test_engine.py
                       -k cuda; needs CUDA)
    quickstart_fp32, quickstart_bf16, quickstart_fp16
                       the quick start (network_conf/quickstart.yaml, 2 ranks, 2 epochs of
                       16 tokens at lr 3e-3; on a GPU both ranks share it, p2p_backend gloo) in each
                       precision: the bf16 and fp16 runs pass when they reach the fp32 run's
                       dev accuracy (runs anywhere)
    bert96_share       samples/s and peak memory of BERT-96's 8x1 device share (2 of 16
                       partitions: 12 layers at BERT-Base width, seq 128, micro-batch 32) on
                       one GPU, fp32 against bf16, in one process (needs CUDA)
    nccl_p2p           NCCL init and point-to-point: a wpipe throughput run on 2 GPUs with
                       backend and p2p_backend nccl (needs 2 or more GPUs)

A check that cannot run here is skipped, saying why; so is one that would not fit in what
is left of the budget. Writes <out-dir>/gpu_check.json (one summary: per check its status
passed | failed | skipped, seconds, reason and figures) and <out-dir>/gpu_check.log (every
command and its output). Exits 0 when every check that ran passed, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))
from wpipe.launch import run, torchrun_command  # noqa: E402

# The quick start, shortened: with 16 tokens and lr 3e-3 its fp32 run reaches dev accuracy
# 1.0 in 2 epochs (as do bf16 and fp16).
QUICKSTART = ["--config", "network_conf/quickstart.yaml", "--lr", "3e-3", "--warmup_periods", "2", "--epochs", "2",
              "--max_seq_length", "16", "--log_every", "100"]
BERT96_SHARE = ["--config", "network_conf/nlp_throughput_bert96.yaml", "--method", "data_parallel",
                "--pipeline_depth", "1", "--data_parallel", "1", "--num_layers", "12",
                "--micro_batch_size", "32", "--throughput_periods", "20", "--throughput_warmup_periods", "3"]
# Seconds each check is expected to need at most, to skip what no longer fits.
ESTIMATES = {"environment": 5, "cuda_exact": 150, "quickstart": 90, "bert96_share": 90, "nccl_p2p": 60}


class Check:
    def __init__(self, out_dir: Path, budget_s: float):
        self.out_dir, self.deadline = out_dir, time.perf_counter() + budget_s
        self.log = (out_dir / "gpu_check.log").open("w")
        self.results: dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def command(self, cmd: list[str], timeout: float) -> tuple[int, str]:
        """Run `cmd` from the repository root, logging it and its output."""
        self.log.write(f"$ {' '.join(map(str, cmd))}\n")
        self.log.flush()
        try:
            code, out = run([str(c) for c in cmd], min(timeout, max(self.left(), 1)), {"HF_HUB_OFFLINE": "1"}, ROOT)
        except TimeoutError as error:
            code, out = 124, str(error)
        self.log.write(out + f"\n[exit {code}]\n\n")
        self.log.flush()
        return code, out

    def record(self, name: str, status: str, started: float, **details) -> None:
        self.results[name] = {"status": status, "seconds": round(time.perf_counter() - started, 1), **details}
        line = f"{name}: {status}" + (f" ({details['reason']})" if "reason" in details else "")
        print(line, flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.record(name, "skipped", time.perf_counter(), reason=reason)

    def fits(self, name: str, estimate_key: str | None = None) -> bool:
        if self.left() < ESTIMATES[estimate_key or name]:
            self.skip(name, f"only {self.left():.0f} s of the budget left")
            return False
        return True


def environment(check: Check) -> dict:
    cuda = torch.cuda.is_available()
    info = {"torch": torch.__version__, "cuda_available": cuda, "gpus": torch.cuda.device_count() if cuda else 0,
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    if cuda:
        info.update(gpu_names=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    cuda_version=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported())
    started = time.perf_counter()
    check.record("environment", "passed", started, **info)
    return info


def cuda_exact(check: Check) -> None:
    started = time.perf_counter()
    code, out = check.command([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_engine.py", "-k", "cuda"],
                              ESTIMATES["cuda_exact"])
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    check.record("cuda_exact", "passed" if code == 0 and "skipped" not in summary else "failed", started,
                 pytest=summary)


def nlp_run(check: Check, name: str, nproc: int, args: list[str], estimate: str) -> dict | None:
    """nlp/main.py under torchrun; its summary.json, or None (recorded as failed)."""
    started = time.perf_counter()
    out_dir = check.out_dir / name
    code, out = check.command(torchrun_command(ROOT / "nlp" / "main.py", nproc, [*args, "--output_dir", out_dir]),
                              ESTIMATES[estimate])
    if code != 0:
        last = out.strip().splitlines()[-1] if out.strip() else ""
        check.record(name, "failed", started, reason=f"exit {code}: {last}")
        return None
    return json.loads((out_dir / "summary.json").read_text())


def quickstarts(check: Check, gpu: bool) -> None:
    """fp32, then bf16 and fp16: each must reach the fp32 run's dev accuracy."""
    target = None
    for precision in ("fp32", "bf16", "fp16"):
        name = f"quickstart_{precision}"
        if not check.fits(name, "quickstart"):
            continue
        started = time.perf_counter()
        extra = ["--p2p_backend", "gloo"] if gpu else []
        summary = nlp_run(check, name, 2, [*QUICKSTART, "--precision", precision, *extra], "quickstart")
        if summary is None:
            continue
        accuracy = summary["eval"]["dev_accuracy"]
        figures = {"dev_accuracy": accuracy, "fp32_dev_accuracy": target,
                   "samples_per_second": summary["samples_per_second"], "device": summary["precision"]["device"],
                   "activations_bytes": [m["activations_bytes"] for m in summary["memory"]],
                   "peak_bytes": [m["peak_bytes"] for m in summary["memory"]]}
        if precision == "fp32":
            target = accuracy
            check.record(name, "passed", started, **figures)
        elif target is None:
            check.record(name, "failed", started, reason="no fp32 run to compare with", **figures)
        else:
            figures.update(summary["precision"])
            check.record(name, "passed" if accuracy >= target else "failed", started, **figures)


def bert96_share(check: Check) -> None:
    figures = {}
    started = time.perf_counter()
    for precision in ("fp32", "bf16"):
        summary = nlp_run(check, f"bert96_share_{precision}", 1, [*BERT96_SHARE, "--precision", precision],
                          "bert96_share")
        if summary is None:
            return
        memory = summary["memory"][0]
        figures[precision] = {"samples_per_second": summary["samples_per_second"], "peak_bytes": memory["peak_bytes"],
                              "activations_bytes": memory["activations_bytes"]}
    figures["bf16_over_fp32_samples_per_second"] = (figures["bf16"]["samples_per_second"]
                                                    / figures["fp32"]["samples_per_second"])
    figures["bf16_over_fp32_peak_bytes"] = figures["bf16"]["peak_bytes"] / figures["fp32"]["peak_bytes"]
    check.record("bert96_share", "passed", started, note="a single process runs the device's 12 layers as one "
                 "partition (no probe mode in this tree); weights and optimizer state are the whole share's", **figures)


def nccl_p2p(check: Check) -> None:
    started = time.perf_counter()
    summary = nlp_run(check, "nccl_p2p", 2, ["--config", "network_conf/nlp_tiny.yaml", "--mode", "throughput",
                                             "--backend", "nccl", "--p2p_backend", "nccl",
                                             "--throughput_periods", "4", "--throughput_warmup_periods", "1"],
                      "nccl_p2p")
    if summary is not None:
        check.record("nccl_p2p", "passed", started, samples_per_second=summary["samples_per_second"],
                     p2p_backend=summary["precision"]["p2p_backend"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/gpu_check", help="where gpu_check.json and gpu_check.log go")
    parser.add_argument("--budget-s", type=float, default=480, help="seconds for all checks together")
    args = parser.parse_args()
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: writing {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.log'}", flush=True)
    check = Check(out_dir, args.budget_s)

    info = environment(check)
    gpu = info["cuda_available"]
    if not gpu:
        check.skip("cuda_exact", "no CUDA device here")
    elif check.fits("cuda_exact"):
        cuda_exact(check)
    quickstarts(check, gpu)
    if not gpu:
        check.skip("bert96_share", "no CUDA device here (BERT-96's device share is a GPU measurement)")
    elif check.fits("bert96_share"):
        bert96_share(check)
    if info["gpus"] < 2:
        check.skip("nccl_p2p", f"{info['gpus']} GPU(s) here: NCCL point-to-point needs 2 or more")
    elif check.fits("nccl_p2p"):
        nccl_p2p(check)

    ok = all(r["status"] != "failed" for r in check.results.values())
    document = {"passed": ok, "checks": check.results,
                "skipped": {n: r["reason"] for n, r in check.results.items() if r["status"] == "skipped"}}
    (out_dir / "gpu_check.json").write_text(json.dumps(document, indent=1))
    print(f"gpu_check: {'all checks that ran passed' if ok else 'FAILED'}; "
          f"{len(document['skipped'])} skipped; {out_dir / 'gpu_check.json'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
