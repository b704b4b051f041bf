"""tool/gpu_check.sh, the prepared device check.

Run as on a bare GPU machine: from a fresh copy of this checkout (no .venv, nothing
installed from it), `PY=<python> PIP_NO_INDEX=1 sh tool/gpu_check.sh`, with a python in
which `import wpipe` works only through the PYTHONPATH the script gives its children. Here,
without CUDA, it runs the quick starts (fp32, bf16, fp16: the precision runs that learn),
lists every CUDA check as skipped with its reason, and exits 0. `--rehearse` runs the
cuda_* checks on the CPU: their comparisons come out as on a GPU. The checks' own logic
(budget, cut-off, op-time ratios, profile names, state comparison) is tested in process.
"""
import json
import os
import shutil
import site
import subprocess
import sys
import time

import pytest
import torch

from tool import gpu_check
from wpipe.launch import run

from launch import ROOT

CUDA_CHECKS = ["cuda_nccl_resume", "cuda_exact", "cuda_fp16_overflow", "cuda_recompute_dropout",
               "cuda_probe_bert96", "cuda_trace", "bert96_share"]
ALL = ["environment", "cuda_nccl_resume", "cuda_exact", "cuda_fp16_overflow", "cuda_recompute_dropout",
       "cuda_probe_bert96", "cuda_trace", "quickstart_fp32", "quickstart_bf16", "quickstart_fp16", "bert96_share",
       "nccl_p2p"]
REHEARSED = ["cuda_nccl_resume", "cuda_fp16_overflow", "cuda_recompute_dropout", "cuda_probe_bert96", "cuda_trace"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the checks would run")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A python with this one's packages but without its wpipe: a venv whose site-packages
    lists this python's site-packages as plain paths, so that their .pth files (an editable
    install of wpipe is one) are not processed."""
    where = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", where], check=True, timeout=120)
    python = where / "bin" / "python"
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (where / own / "packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh copy of this checkout: the files git sees (tracked or untracked, not ignored),
    as a clone of the working tree would hold them: no .venv, no runs/, no caches."""
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.split("\0")
    copy = tmp_path_factory.mktemp("checkout") / "repo"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def bare_run(bare_python, checkout, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    try:
        code, stdout = run(["sh", checkout / "tool" / "gpu_check.sh", "--out-dir", out], timeout=400,
                           env={"PY": str(bare_python), "PIP_NO_INDEX": "1", "PYTHONPATH": ""}, cwd=out)
    except TimeoutError as error:
        raise AssertionError(str(error)) from None
    return code, stdout, out, json.loads((out / "gpu_check.json").read_text()), checkout


@pytest.mark.distributed
def test_wpipe_is_importable_only_through_the_scripts_pythonpath(bare_python, checkout):
    """The premise of the bare run: this python has torch, but no wpipe of its own."""
    assert subprocess.run([bare_python, "-c", "import torch, transformers, yaml"], timeout=120).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([bare_python, "-c", "import wpipe"], capture_output=True, text=True, timeout=60,
                          cwd=checkout, env=env)
    assert "No module named 'wpipe'" in done.stderr


@pytest.mark.distributed
@NO_CUDA
def test_bare_run_skips_every_cuda_check_and_exits_zero(bare_run):
    code, stdout, out, document, checkout = bare_run
    assert code == 0, f"exit code {code}:\n{stdout[-6000:]}"
    assert document["passed"] is True and document["device"] == "cpu" and document["budget_s"] == 480
    assert list(document["checks"]) == ALL
    environment = document["checks"]["environment"]
    assert environment["status"] == "passed"
    assert environment["figures"]["wpipe"] == str(checkout / "lib" / "wpipe")    # the children import the copy's
    for name in CUDA_CHECKS:
        record = document["checks"][name]
        assert (record["status"], record["reason"]) == ("skipped", "no CUDA device here"), name
        assert record["what"] and document["skipped"][name] == "no CUDA device here"
        assert f"{name}: skipped (0 s): no CUDA device here" in stdout
    assert document["skipped"]["nccl_p2p"] == "0 GPU(s) here: NCCL point-to-point needs 2 or more"
    assert set(document["skipped"]) == {*CUDA_CHECKS, "nccl_p2p"} and document["failed"] == {}
    log = (out / "gpu_check.log").read_text()
    assert "nlp/main.py" in log and "pip install" not in log and "init.sh" not in log
    assert not (checkout / ".venv").exists() and not (checkout / ".venv-installed").exists()   # no tool/init.sh


@pytest.mark.distributed
@NO_CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_quick_start_learns_as_in_fp32(bare_run, precision):
    _, stdout, out, document, _ = bare_run
    fp32 = document["checks"]["quickstart_fp32"]["figures"]
    record = document["checks"][f"quickstart_{precision}"]
    assert record["status"] == "passed", stdout[-4000:]
    figures = record["figures"]
    assert figures["precision"]["precision"] == precision and figures["fp32_dev_accuracy"] == fp32["dev_accuracy"]
    assert fp32["dev_accuracy"] >= 0.9, "the fp32 quick start itself should learn the task"
    assert figures["dev_accuracy"] >= fp32["dev_accuracy"] - gpu_check.ACCURACY_SLACK
    # The stash holds autocast's 2-byte copies: smaller than fp32's on every rank.
    assert all(a < b for a, b in zip(figures["activations_bytes"], fp32["activations_bytes"]))
    summary = json.loads((out / f"quickstart_{precision}" / "summary.json").read_text())
    assert {m["precision"] for m in summary["memory"]} == {precision}
    if precision == "fp16":
        assert summary["precision"]["loss_scale_changes"][0] == [0, 65536.0]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    profiles = sorted((ROOT / "network_conf" / "profiles").iterdir())
    try:
        code, stdout = run([sys.executable, ROOT / "tool" / "gpu_check.py", "--rehearse", "--out-dir", out,
                            "--checks", ",".join(REHEARSED)], timeout=400, cwd=ROOT)
    except TimeoutError as error:
        raise AssertionError(str(error)) from None
    assert sorted((ROOT / "network_conf" / "profiles").iterdir()) == profiles, "a rehearsal wrote a profile there"
    return stdout, out, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.distributed
def test_rehearsal_runs_the_exactness_checks_on_the_cpu(rehearsal):
    stdout, out, document = rehearsal
    checks = document["checks"]
    assert document["device"] == "cpu (rehearsal)"
    for name in ("cuda_nccl_resume", "cuda_fp16_overflow", "cuda_recompute_dropout", "cuda_probe_bert96"):
        assert checks[name]["status"] == "passed", f"{name}: {checks[name]}\n{stdout[-4000:]}"
    assert {n for n, r in checks.items() if r["status"] == "skipped"} == set(ALL) - {"environment", *REHEARSED}
    resume = checks["cuda_nccl_resume"]["figures"]
    assert resume["backend"] == "gloo" and resume["updates"] == 6 and resume["resumed_after_updates"] == [2, 4]
    fp16 = checks["cuda_fp16_overflow"]["figures"]
    assert all(fp16["overflow_skips"].values()) and fp16["max_weight_difference"] <= gpu_check.AUTOCAST_TOLERANCE
    stash = checks["cuda_recompute_dropout"]["figures"]["activations_bytes"]
    assert stash["recompute"] < stash["plain"]


@pytest.mark.distributed
def test_rehearsal_probes_in_both_precisions_and_writes_profiles_beside_its_output(rehearsal):
    _, out, document = rehearsal
    figures = document["checks"]["cuda_probe_bert96"]["figures"]
    for precision in ("fp32", "bf16"):
        profile = out / "profiles" / f"cpu_bert96_8x1_mb4_{precision}.json"
        assert figures[precision]["profile"] == str(profile) and figures[precision]["partitions"] == [0, 8]
        report = json.loads(profile.read_text())
        assert report["config"]["precision"] == precision and report["devices"][0]["device"] == 0


@pytest.mark.distributed
def test_rehearsal_compares_every_traced_op_with_the_probe(rehearsal):
    """Op times of toy sizes on a shared CPU say nothing (the verdict may go either way);
    the comparison itself must cover every partition's forward and backward."""
    stdout, _, document = rehearsal
    record = document["checks"]["cuda_trace"]
    assert record["status"] in ("passed", "failed"), stdout[-4000:]
    ratios = record["figures"]["ratios"]
    assert sorted(ratios) == ["0", "1"]                 # wpipe 1x1: partitions 0 and 1
    assert all(set(gpu_check.TRACE_JUDGED) <= set(row) and all(r > 0 for r in row.values()) for row in ratios.values())
    if record["status"] == "failed":
        assert record["reason"].startswith("traced op times off probe mode's by more than 15%")


# ------------------------------------------------------------------------ in process

def fake_environment(ctx, figures):
    ctx.info = {"cuda_available": False, "gpus": 0}


def test_a_check_that_no_longer_fits_is_skipped_with_the_reason(tmp_path):
    ran = []
    checks = [gpu_check.Check("environment", fake_environment, 0.01),
              gpu_check.Check("big", lambda ctx, figures: ran.append("big"), 1000),
              gpu_check.Check("small", lambda ctx, figures: figures.update(ok=1), 0.01),
              gpu_check.Check("gpu", lambda ctx, figures: ran.append("gpu"), 0.01, "cuda")]
    document = gpu_check.run_checks(gpu_check.Context(tmp_path, 60, False), checks, {"big", "small", "gpu"})
    assert ran == [] and document["passed"] is True
    assert document["skipped"]["big"].endswith("s of the budget left, it needs up to 1000 s")
    assert document["skipped"]["gpu"] == "no CUDA device here"
    assert document["checks"]["small"] == {"status": "passed", "seconds": 0.0, "what": "", "figures": {"ok": 1}}
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == document


def test_failures_and_broken_checks_are_failed_and_the_others_still_run(tmp_path):
    def fails(ctx, figures):
        figures["partial"] = True
        raise gpu_check.Failed("losses differ")

    checks = [gpu_check.Check("environment", fake_environment, 0.01),
              gpu_check.Check("fails", fails, 0.01), gpu_check.Check("breaks", lambda ctx, figures: {}["x"], 0.01),
              gpu_check.Check("after", lambda ctx, figures: None, 0.01)]
    document = gpu_check.run_checks(gpu_check.Context(tmp_path, 60, False), checks, {"fails", "breaks", "after"})
    assert document["passed"] is False and document["checks"]["after"]["status"] == "passed"
    assert document["failed"] == {"fails": "losses differ", "breaks": "the check itself broke: KeyError: 'x'"}
    assert document["checks"]["fails"]["figures"] == {"partial": True}


@pytest.mark.distributed
def test_a_run_cut_off_by_time_is_skipped_not_failed(tmp_path):
    """As bert96_share overrunning its time: the check could not conclude; its figures so far stay."""
    def slow(ctx, figures):
        figures["first_part"] = 1.0
        ctx.python(["-c", "import time; time.sleep(30)"])

    checks = [gpu_check.Check("environment", fake_environment, 0.01), gpu_check.Check("slow", slow, 1)]
    started = time.perf_counter()
    document = gpu_check.run_checks(gpu_check.Context(tmp_path, 60, False), checks, {"slow"})
    assert time.perf_counter() - started < 20
    record = document["checks"]["slow"]
    assert record["status"] == "skipped" and document["passed"] is True
    assert record["reason"].startswith("cut off after 2 s (its limit): a run did not finish within")
    assert record["figures"] == {"first_part": 1.0}


def test_op_time_ratios_from_a_trace():
    """The trace contract: compute events named like ops, `ts` and `dur` in microseconds;
    medians over the periods after the warm-up (probe.op_times), traced over probed."""
    events = [{"ph": "M", "name": "process_name", "pid": 0}]
    for t in range(3):                      # wpipe 1x1: partitions 0 and 1, period 1
        events += [{"ph": "X", "cat": "compute", "name": f"{p}{kind}{t}", "pid": 0, "ts": 1e6 * t + 10 * i,
                    "dur": (1 + t) * (100 if kind == "F" else 300)} for i, (p, kind) in enumerate([(0, "F"), (1, "F"), (1, "B"), (0, "B")])]
        events += [{"ph": "X", "cat": "wait", "name": "wait sends", "pid": 0, "ts": 1e6 * t + 50, "dur": 5000}]
        events += [{"ph": "X", "cat": "compute", "name": "reduce 0U", "pid": 0, "ts": 1e6 * t + 60, "dur": 7000}]
    document = {"traceEvents": events, "otherData": {"micro_batches_per_update": 1}}
    traced = gpu_check.traced_op_times(document, warmup_periods=1)
    assert traced[0]["forward_s"] == pytest.approx(250e-6) and traced[1]["backward_s"] == pytest.approx(750e-6)
    probed = {p: {"forward_s": 250e-6, "backward_s": 600e-6, "update_s": 1e-3} for p in (0, 1)}
    assert gpu_check.op_time_ratios(traced, probed) == {p: {"forward_s": pytest.approx(1.0), "backward_s": pytest.approx(1.25)}
                                                        for p in (0, 1)}
    with pytest.raises(gpu_check.Failed, match=r"the trace has partitions \[0, 1\], the probe \[0\]"):
        gpu_check.op_time_ratios(traced, {0: probed[0]})


def test_profile_name_and_state_comparison():
    report = {"device_name": "NVIDIA H200", "pipeline_depth": 8, "data_parallel": 1, "micro_batch_size": 32}
    assert gpu_check.profile_name(report, "bf16") == "nvidia_h200_bert96_8x1_mb32_bf16.json"
    a = {"pipeline": {"w": torch.ones(2), "versions": [1, 2]}, "rng": torch.zeros(3, dtype=torch.uint8)}
    assert gpu_check.first_difference(a, {"pipeline": {"w": torch.ones(2), "versions": [1, 2]},
                                          "rng": torch.zeros(3, dtype=torch.uint8)}, "s") is None
    assert gpu_check.first_difference(a, {**a, "pipeline": {"w": torch.tensor([1.0, 1.5]), "versions": [1, 2]}}, "s") \
        == "s.pipeline.w differs (by up to 0.5)"
    assert gpu_check.first_difference(a, {**a, "pipeline": {"w": torch.ones(2), "versions": [1, 3]}}, "s") \
        == "s.pipeline.versions[1]: 2 against 3"


def test_last_error_picks_the_line_that_says_what_went_wrong():
    assert gpu_check.last_error("starting\nerror: bad config\ntorchrun noise\n") == "error: bad config"
    assert gpu_check.last_error("Traceback (most recent call last):\n  x\nRuntimeError: boom\nexit\n") == "RuntimeError: boom"
    assert gpu_check.last_error("") == "no output"
