"""Probe mode (wpipe/probe.py): one device's op list, alone in a plain process, holds exactly
the bytes of weights, stashed activations and optimizer state that the same device reports
in a real multi-process run's summary.json.

The real runs (throughput mode, 5 periods) run in two launches, 2 and 4 processes, each a
process group shared by all its runs; each probe runs in this process, for fewer periods.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from cv.main import CvConfig
from cv.main import make_task as cv_task
from nlp.main import NlpConfig
from nlp.main import make_task as nlp_task
from wpipe.runtime.loopback import Loopback, Spec
from wpipe.schedule import PIPELINES, Topology
from wpipe.train import main
from wpipe.train.probe import op_times

from launch import ROOT, run_ok

WORKER = ROOT / "tests" / "workers" / "memory_runs.py"
ENTRIES = {"nlp": (NlpConfig, nlp_task), "cv": (CvConfig, cv_task)}
METHODS = list(PIPELINES)
MEMORY = ("weights_bytes", "activations_bytes", "optimizer_state_bytes")
OP_KEYS = {"partition", "forward_s", "backward_s", "recompute_s", "update_s", "forward_recv_bytes",
           "forward_send_bytes", "backward_recv_bytes", "backward_send_bytes"}
REAL = ["--throughput_periods", "4", "--throughput_warmup_periods", "1", "--log_every", "100"]
PROBE = ["--mode", "probe", "--probe_periods", "2"]   # 3 periods with the warm-up


def nlp(method, depth=2, dp=1, *extra):
    return ("nlp", ["--config", str(ROOT / "network_conf" / "nlp_tiny.yaml"), "--mode", "throughput",
                    "--method", method, "--pipeline_depth", str(depth), "--data_parallel", str(dp), *extra])


TWO = {f"{method}{'_recompute' if recompute else ''}": nlp(method, 2, 1, "--recompute", str(recompute))
       for method in METHODS for recompute in (False, True)}
TWO.update({
    "pipedream_2bw_m4": nlp("pipedream_2bw", 2, 1, "--micro_batches_per_update", "4"),
    "wpipe_1x2": nlp("wpipe", 1, 2),                    # both partitions on one device, and D = 2
    "data_parallel_1x2": nlp("data_parallel", 1, 2),
    "cv_wpipe": ("cv", ["--config", str(ROOT / "network_conf" / "cv_tiny.yaml"), "--mode", "throughput",
                        "--micro_batch_size", "8"]),
    "cv_pipedream_2bw_recompute": ("cv", ["--config", str(ROOT / "network_conf" / "cv_tiny.yaml"),
                                          "--mode", "throughput", "--micro_batch_size", "8",
                                          "--method", "pipedream_2bw", "--recompute", "true"]),
    # bf16: BERT's boundaries stay float32 (LayerNorm outputs), ResNeXt's become bfloat16
    "wpipe_bf16": nlp("wpipe", 2, 1, "--precision", "bf16"),
    "cv_wpipe_bf16": ("cv", ["--config", str(ROOT / "network_conf" / "cv_tiny.yaml"), "--mode", "throughput",
                             "--micro_batch_size", "8", "--precision", "bf16"]),
})
FOUR = {
    "wpipe_4x1": nlp("wpipe", 4, 1, "--num_layers", "8"),
    "pipedream_2bw_2x2_replica_major": nlp("pipedream_2bw", 2, 2, "--rank_layout", "replica_major"),
}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """name -> summary.json of its real run."""
    out = tmp_path_factory.mktemp("real")
    for nproc, cases in ((2, TWO), (4, FOUR)):
        spec = out / f"cases{nproc}.json"
        spec.write_text(json.dumps({name: [entry, [*argv, *REAL]] for name, (entry, argv) in cases.items()}))
        run_ok(WORKER, nproc, [out, spec], timeout=300)
    return lambda name: json.loads((out / name / "summary.json").read_text())


def probe(name, tmp_path, *extra):
    entry, argv = {**TWO, **FOUR}[name]
    report = main(*ENTRIES[entry], [*argv, *PROBE, *extra, "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "probe.json").read_text()) == json.loads(json.dumps(report))
    return report


@pytest.mark.distributed
@pytest.mark.parametrize("name", [*TWO, *FOUR])
def test_probe_memory_equals_the_real_run(real_runs, name, tmp_path):
    summary = real_runs(name)
    report = probe(name, tmp_path)
    depth, dp = summary["pipeline_depth"], summary["data_parallel"]
    assert (report["method"], report["pipeline_depth"], report["data_parallel"], report["recompute"]) == \
        (summary["method"], depth, dp, summary["config"]["recompute"])
    assert [d["device"] for d in report["devices"]] == list(range(depth))
    for device in report["devices"]:
        real = [m for m in summary["memory"] if m["device"] == device["device"]]
        assert len(real) == dp   # every replica of this device position holds the same bytes
        for memory in real:
            assert device["partitions"] == memory["partitions"]
            for key in MEMORY:
                assert device[key] == memory[key], \
                    f"{name}, device {device['device']}: probe {key} {device[key]}, real run (rank {memory['rank']}) {memory[key]}"
        assert device["peak_bytes"] > 0 and device["peak_kind"] == "cpu_max_rss"
        for op in device["ops"]:
            assert op.keys() == OP_KEYS
            assert all(op[k] > 0 for k in ("forward_s", "backward_s", "update_s")), op
            assert (op["recompute_s"] > 0) == report["recompute"], op


def test_message_bytes(tmp_path):
    """A message's bytes: BERT's (hidden states, additive mask) per micro-batch, counted
    once where sent and once where received; none within a device or past the ends."""
    report = probe("wpipe", tmp_path)
    ops = {op["partition"]: op for device in report["devices"] for op in device["ops"]}
    mbs, seq, hidden = 8, 32, 64          # nlp_tiny.yaml
    message = mbs * seq * hidden * 4 + mbs * seq * 4
    gradient = mbs * seq * hidden * 4     # the mask needs no gradient
    assert [ops[p]["forward_send_bytes"] for p in range(4)] == [message, message, message, 0]
    assert [ops[p]["forward_recv_bytes"] for p in range(4)] == [0, message, message, message]
    assert [ops[p]["backward_send_bytes"] for p in range(4)] == [0, gradient, gradient, gradient]
    assert [ops[p]["backward_recv_bytes"] for p in range(4)] == [gradient, gradient, gradient, 0]
    local = probe("wpipe_1x2", tmp_path / "local")["devices"][0]["ops"]
    assert all(op[k] == 0 for op in local for k in OP_KEYS if k.endswith("_bytes"))


def test_one_device(tmp_path):
    report = probe("gpipe_recompute", tmp_path, "--probe_device", "1")
    assert [(d["device"], d["partitions"]) for d in report["devices"]] == [(1, [1])]


def test_loopback_refuses_a_message_unlike_the_inferred_one():
    outputs = [[Spec((2, 3), torch.float32, True), Spec((2,), torch.int64, False)], [Spec((2, 1), torch.float32, True)]]
    loop = Loopback(Topology("pipedream_flush", 2, 1, "pipeline_major"), 1, outputs, torch.device("cpu"))
    loop.expect([("F", 0, 0), ("B", 1, 0)][:1])
    hidden, ids = loop.recv(("F", 0, 0), "1F0")
    assert (hidden.shape, hidden.dtype, hidden.requires_grad, ids.dtype) == ((2, 3), torch.float32, True, torch.int64)
    assert loop.message("B", 1) == [Spec((2, 3), torch.float32, False)]
    with pytest.raises(RuntimeError, match=r"op 1B0 sends \(float32\[2, 4\]\), but the forward on the meta "
                                           r"device gave \(float32\[2, 3\]\)"):
        loop.send(("B", 1, 0), (torch.zeros(2, 4),))
    with pytest.raises(Exception, match=r"message \('F', 0, 1\) is not among those the schedule says"):
        loop.recv(("F", 0, 1), "1F1")


def test_op_times_are_medians_after_the_warm_up():
    events = [("compute", "0F0", 0.0, 9.0, None), ("compute", "0F1", 10.0, 11.0, None),
              ("compute", "0F2", 12.0, 14.0, None), ("compute", "0F3", 15.0, 18.0, None),
              ("compute", "recompute 0B2", 19.0, 19.5, None), ("compute", "0B2", 20.0, 24.0, None),
              ("wait", "wait recv 1B2", 24.0, 30.0, None),
              ("compute", "0U", 1.0, 100.0, None), ("compute", "0U", 30.0, 30.25, None)]
    assert op_times(events, period=2, warmup_periods=1) == {
        0: {"forward_s": 2.5, "backward_s": 4.0, "recompute_s": 0.5, "update_s": 0.25}}


@pytest.mark.parametrize("recompute", ["false", "true"])
def test_cost_model_predicts_the_probe(tmp_path, recompute):
    """The planner's chain: the cost model's per-device bytes (wpipe.planning.costmodel, from blocks
    measured alone) equal a probe's at 4 devices, and the probe as a profile gives FLOP rates."""
    from nlp.main import model_blocks
    from wpipe import schedule
    from wpipe.config import load_config
    from wpipe.planning import costmodel, plan

    report = probe("wpipe_4x1", tmp_path, "--recompute", recompute)
    cfg = load_config(NlpConfig, ROOT / "network_conf" / "nlp_tiny.yaml", {"num_layers": "8"})
    model = model_blocks(cfg)
    blocks = model.measure()
    method, depth, period = "wpipe", 4, schedule.default_period("wpipe", 4)
    ranges = plan.ranges_of([b.name for b in blocks], model.uniform_plan(schedule.num_partitions(method, depth)))
    parts = costmodel.partition_costs(blocks, ranges, report["micro_batch_size"])
    predicted = costmodel.accounting(method, depth, parts, recompute == "true",
                                     (report["periods"] + report["warmup_periods"]) * period, period)
    for device in report["devices"]:
        for key in MEMORY:
            assert predicted[device["device"]][key] == device[key], f"device {device['device']} {key}"
    forward_rate, backward_rate = plan.probe_rates(report, blocks, model.uniform_plan)
    assert 1e6 < forward_rate < 1e13 and 1e6 < backward_rate < 1e13
