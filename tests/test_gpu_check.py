"""tool/gpu_check.sh on this machine: it runs what applies (here, without CUDA: the quick
starts in fp32, bf16 and fp16 through nlp/main.py), says what it skipped and why, writes
its JSON and log, and exits 0. The quick starts are the precision runs that learn: bf16
and fp16 must reach the fp32 run's dev accuracy."""
import json
import sys

import pytest
import torch

from wpipe.launch import run

from launch import ROOT

pytestmark = pytest.mark.distributed

CUDA_CHECKS = ("cuda_exact", "bert96_share")


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    try:
        code, stdout = run(["sh", str(ROOT / "tool" / "gpu_check.sh"), "--out-dir", str(out)], timeout=400,
                           env={"PY": sys.executable}, cwd=ROOT)
    except TimeoutError as error:
        raise AssertionError(str(error)) from None
    return code, stdout, out


def test_writes_its_summary_and_log_and_exits_zero(gpu_check):
    code, stdout, out = gpu_check
    assert code == 0, f"exit code {code}:\n{stdout[-6000:]}"
    document = json.loads((out / "gpu_check.json").read_text())
    assert document["passed"] is True
    assert "nlp/main.py" in (out / "gpu_check.log").read_text()
    names = ["environment", *CUDA_CHECKS, "quickstart_fp32", "quickstart_bf16", "quickstart_fp16", "nccl_p2p"]
    assert set(document["checks"]) == set(names)
    if not torch.cuda.is_available():
        for name in CUDA_CHECKS:
            assert document["skipped"][name].startswith("no CUDA device here"), document["skipped"]
            assert f"{name}: skipped (no CUDA device here" in stdout
        assert document["skipped"]["nccl_p2p"] == "0 GPU(s) here: NCCL point-to-point needs 2 or more"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_quick_start_learns_as_in_fp32(gpu_check, precision):
    _, stdout, out = gpu_check
    checks = json.loads((out / "gpu_check.json").read_text())["checks"]
    fp32, run_ = checks["quickstart_fp32"], checks[f"quickstart_{precision}"]
    assert run_["status"] == "passed", stdout[-4000:]
    assert run_["precision"] == precision and run_["fp32_dev_accuracy"] == fp32["dev_accuracy"]
    assert fp32["dev_accuracy"] >= 0.9, "the fp32 quick start itself should learn the task"
    assert run_["dev_accuracy"] >= fp32["dev_accuracy"]
    # The stash holds autocast's 2-byte copies: smaller than fp32's on every rank.
    assert all(a < b for a, b in zip(run_["activations_bytes"], fp32["activations_bytes"]))
    summary = json.loads((out / f"quickstart_{precision}" / "summary.json").read_text())
    assert {m["precision"] for m in summary["memory"]} == {precision}
    if precision == "fp16":
        assert summary["precision"]["loss_scale_changes"][0] == [0, 65536.0]
