"""The calibration recovers exactly the costs a synthetic trace was made with, and then
predicts that trace's time exactly.

The synthetic trace is a simulated run written as the engine writes its trace: one
compute event per op at its simulated start and end, a `wait recv` event before every op
that takes a message from another device (from the end of the device's previous event
to the op's start), one train() call per rank.
"""
import json
import subprocess
import sys

import pytest

from wpipe.planning import calibrate
from wpipe.schedule import build_schedule, device_of, num_partitions, simulate
from wpipe.schedule.check import dependency

MESSAGE_BYTES = 4096


def synthetic_trace(method, depth, count, forward, backward, update, latency):
    n = num_partitions(method, depth)
    ops = build_schedule(method, depth, count)
    sim = simulate(ops, method, depth, count, forward, backward, latency, update, defer_updates=True)
    events = []
    for d, device_ops in enumerate(ops):
        order = sorted(range(len(device_ops)), key=lambda i: (sim.start[d][i], sim.end[d][i]))
        last_end = 0.0
        for i in order:
            op = device_ops[i]
            dep = dependency(op, n) if op.kind != "U" else None
            if dep is not None and device_of(method, dep.partition, depth) != d:
                events.append({"name": f"wait recv {dep}", "cat": "wait", "ph": "X", "pid": d, "tid": 0,
                               "ts": last_end * 1e6, "dur": (sim.start[d][i] - last_end) * 1e6,
                               "args": {"peer": device_of(method, dep.partition, depth), "bytes": MESSAGE_BYTES}})
            events.append({"name": str(op), "cat": "compute", "ph": "X", "pid": d, "tid": 0,
                           "ts": sim.start[d][i] * 1e6, "dur": (sim.end[d][i] - sim.start[d][i]) * 1e6})
            last_end = sim.end[d][i]
        events.append({"name": "train", "cat": "call", "ph": "X", "pid": d, "tid": 0, "ts": 0.0,
                       "dur": sim.makespan * 1e6, "args": {"micro_batches": count}})
    period = 1 if method == "data_parallel" else depth
    return {"traceEvents": events, "otherData": {"method": method, "pipeline_depth": depth, "data_parallel": 1,
                                                 "micro_batches_per_update": period,
                                                 "rank_layout": "pipeline_major", "recompute": False}}


CASES = [("wpipe", 2), ("wpipe", 3), ("pipedream_2bw", 2), ("pipedream_flush", 3), ("gpipe", 2)]


@pytest.mark.parametrize("method,depth", CASES)
def test_calibration_reproduces_a_synthetic_trace(method, depth):
    n = num_partitions(method, depth)
    forward = [0.010 + 0.002 * p for p in range(n)]          # unequal partitions, in seconds
    backward = [0.021 + 0.003 * (p % 2) for p in range(n)]
    update = [0.004 + 0.001 * p for p in range(n)]
    latency = 0.0015
    document = synthetic_trace(method, depth, 8 * depth, forward, backward, update, latency)
    result = calibrate.calibrate(document, skip_periods=2)
    costs = result["costs"]
    assert costs["forward"] == pytest.approx(forward, abs=1e-9)
    assert costs["backward"] == pytest.approx(backward, abs=1e-9)
    assert costs["update"] == pytest.approx(update, abs=1e-9)
    assert costs["overhead_per_op"] == pytest.approx([0.0] * depth, abs=1e-9)
    assert result["transfer"]["latency_s"] == pytest.approx(latency, abs=1e-9)
    assert result["transfer"]["receive_s"] == pytest.approx(0.0, abs=1e-9)
    assert result["periods_timed"] == 8 - 2
    assert result["predicted_s"] == pytest.approx(result["measured_s"], rel=1e-9)
    assert result["limit_s"] == pytest.approx(result["measured_s"], rel=1e-9)


def test_calibration_sees_an_engine_overhead():
    """Gaps between a rank's events are engine overhead: the prediction with it is slower
    than the schedule's limit."""
    document = synthetic_trace("wpipe", 2, 16, 0.01, 0.02, 0.004, 0.001)
    for e in document["traceEvents"]:       # every event of rank 1 shifted later by 1 ms per op
        if e["pid"] == 1 and e["cat"] != "call":
            e["ts"] += 1000 * (1 + sum(1 for f in document["traceEvents"]
                                       if f["pid"] == 1 and f["cat"] == "compute" and f["ts"] < e["ts"]))
    result = calibrate.calibrate(document)
    assert result["costs"]["overhead_per_op"][0] == pytest.approx(0.0, abs=1e-9)
    assert result["costs"]["overhead_per_op"][1] > 5e-4
    assert result["predicted_s"] > result["limit_s"]


@pytest.mark.distributed
def test_command_line(tmp_path):
    (tmp_path / "trace.json").write_text(json.dumps(synthetic_trace("wpipe", 2, 12, 0.01, 0.02, 0.004, 0.001)))
    done = subprocess.run([sys.executable, "-m", "wpipe.calibrate", tmp_path], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "predicted" in done.stdout and "error +0.0%" in done.stdout
    written = json.loads((tmp_path / "calibration.json").read_text())
    assert written["predicted_s"] == pytest.approx(written["measured_s"])
    missing = subprocess.run([sys.executable, "-m", "wpipe.calibrate", tmp_path / "nowhere"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"error: {tmp_path / 'nowhere'} does not exist: expected a run folder "
                                      f"holding trace.json (written with --trace true) or a trace.json file")
    (tmp_path / "empty").mkdir()
    untraced = subprocess.run([sys.executable, "-m", "wpipe.calibrate", tmp_path / "empty"], capture_output=True,
                              text=True, timeout=60)
    assert untraced.returncode == 2
    assert untraced.stderr.strip() == f"error: {tmp_path / 'empty' / 'trace.json'} does not exist: run with --trace true to write it"
