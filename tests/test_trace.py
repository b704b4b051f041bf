"""The trace of a real 2-process run (nlp/main.py --trace true): every rank's compute events
are exactly the ops of its schedule, once each, forwards and backwards in the schedule's
order, never overlapping; waits are their own events; summary.json carries the timeline;
the timeline tool and the calibration read it. The recorder itself, in process.
"""
import json
import os
import subprocess
import sys
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from wpipe import schedule
from wpipe.schedule import Topology
from wpipe.trace import DeviceClock, Recorder, parse_span, span_name, timeline_summary

from launch import ROOT, run_ok

MAIN = ROOT / "nlp" / "main.py"
RUN = ["--config", ROOT / "network_conf" / "nlp_tiny.yaml", "--epochs", "2", "--max_periods_per_epoch", "3",
       "--max_eval_batches", "3", "--synthetic_samples", "200", "--num_layers", "4", "--hidden", "32",
       "--ffn", "64", "--heads", "2"]


@pytest.fixture(scope="module", params=["wpipe", "pipedream_2bw"])
def traced(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"trace_{request.param}")
    run_ok(MAIN, 2, [*RUN, "--method", request.param, "--output_dir", out, "--trace", "true"], timeout=300)
    return request.param, out


def ops_of(events, rank):
    """This rank's events per train() call, in time order, call events left out."""
    mine = sorted((e for e in events if e.get("ph") == "X" and e["pid"] == rank), key=lambda e: e["ts"])
    calls = [e for e in mine if e["cat"] == "call"]
    return [[e for e in mine if e["cat"] != "call" and c["ts"] <= e["ts"] <= c["ts"] + c["dur"]] for c in calls], calls


@pytest.mark.distributed
def test_trace_holds_each_ranks_schedule_once(traced):
    method, out = traced
    document = json.loads((out / "trace.json").read_text())
    cfg = document["otherData"]
    assert cfg["method"] == method and cfg["pipeline_depth"] == 2
    events = document["traceEvents"]
    topology = Topology(method, 2, 1, "pipeline_major")
    for rank in (0, 1):
        device = topology.coordinates(rank)[1]
        per_call, calls = ops_of(events, rank)
        assert len(calls) == 2                                   # one per epoch
        for call, inside in zip(calls, per_call):
            expected = schedule.build_schedule(method, 2, call["args"]["micro_batches"], 2)[device]
            names = [e["name"] for e in inside if e["cat"] == "compute" and " " not in e["name"]]
            assert Counter(names) == Counter(str(op) for op in expected)
            # Forwards and backwards run in the schedule's order; updates may run earlier
            # than their place (while the rank would wait), never before their period's
            # last backward of that partition.
            assert [n for n in names if "U" not in n] == [str(op) for op in expected if op.kind != "U"]
            for a, b in zip(inside, inside[1:]):                 # never overlapping
                assert b["ts"] >= a["ts"] + a["dur"] - 1e-3, (a, b)
            assert all(e["name"].startswith("wait") for e in inside if e["cat"] == "wait")
            assert any(e["name"].startswith("wait recv") for e in inside)


@pytest.mark.distributed
def test_summary_timeline_and_tools(traced, tmp_path):
    method, out = traced
    summary = json.loads((out / "summary.json").read_text())
    timeline = summary["timeline"]
    assert [row["rank"] for row in timeline] == [0, 1]
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    assert timeline == timeline_summary(events)
    for row in timeline:
        assert 0 < row["busy_s"] < row["window_s"] and row["wait_s"] >= 0
        assert 0 < row["bubble_fraction"] < 1
    assert "trace" not in summary
    picture = tmp_path / "t.png"
    done = subprocess.run([sys.executable, ROOT / "tool" / "timeline.py", out, "--png", picture],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = subprocess.run([sys.executable, "-m", "wpipe.calibrate", out, "--skip-periods", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["measured_s"] > 0 and calibration["predicted_s"] > 0
    assert calibration["periods_timed"] == 2 * 3 - 1


@pytest.mark.distributed
def test_untraced_run_writes_no_trace(tmp_path):
    run_ok(MAIN, 2, [*RUN, "--epochs", "1", "--output_dir", tmp_path], timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "timeline" not in summary and not (tmp_path / "trace.json").exists()


def test_recorder_events():
    off = Recorder(False)
    with off.span("compute", "0F0"):
        pass
    assert off.chrome_events(3) == [{"name": "process_name", "ph": "M", "pid": 3, "args": {"name": "rank 3"}}]
    on = Recorder(True)
    on.set_origin(on.origin)
    with on.span("call", "train", {"micro_batches": 2}):
        with on.span("wait", "wait recv 0F0", {"peer": 0}):
            pass
        with on.span("compute", schedule.Op("F", 1, 0)):
            pass
    label, call, wait, compute = on.chrome_events(1, "rank 1 (replica 0, device 1)")
    assert label["args"]["name"] == "rank 1 (replica 0, device 1)"
    assert (call["name"], call["cat"], call["args"]) == ("train", "call", {"micro_batches": 2})
    assert (wait["name"], wait["cat"], wait["args"]) == ("wait recv 0F0", "wait", {"peer": 0})
    assert (compute["name"], compute["cat"], compute["pid"], compute["ph"]) == ("1F0", "compute", 1, "X")
    assert call["ts"] <= wait["ts"] <= compute["ts"] and compute["ts"] + compute["dur"] <= call["ts"] + call["dur"]
    (row,) = timeline_summary([call, wait, compute])
    assert row["busy_s"] == pytest.approx(compute["dur"] / 1e6)
    assert row["wait_s"] == pytest.approx(wait["dur"] / 1e6)


@pytest.mark.parametrize("name, prefix, op", [
    ("2F3", "", schedule.Op("F", 2, 3)), ("recompute 1B0", "recompute", schedule.Op("B", 1, 0)),
    ("reduce 2U", "reduce", schedule.Op("U", 2)), ("wait recv 1F3", "wait recv", schedule.Op("F", 1, 3)),
    ("wait allreduce 0U", "wait allreduce", schedule.Op("U", 0)), ("wait sends", "wait sends", None),
    ("train", "train", None)])
def test_span_names_are_written_and_read_one_way(name, prefix, op):
    assert parse_span(name) == (prefix, op)
    if op is not None:
        assert (span_name(prefix, op) if prefix else str(op)) == name


def test_unknown_span_name_is_refused():
    with pytest.raises(ValueError, match="unknown trace event name 'resend 1F0'"):
        parse_span("resend 1F0")


class FakeEvent:
    """A CUDA timing event's interface, on a device clock the test moves by hand (ms)."""
    device_ms = 0.0

    def record(self):
        self.at = FakeEvent.device_ms

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return other.at - self.at


def test_spans_timed_by_device_events_land_on_the_host_clock():
    """On a GPU a span holds what the device did: its events' elapsed times, placed after
    the host time at which the call's first event was recorded (read once, by resolve)."""
    rec = Recorder(True)
    rec.clock = DeviceClock(FakeEvent)
    with rec.span("call", "train"):
        FakeEvent.device_ms += 2.0          # the host launched 2 ms of work before the op
        with rec.span("compute", schedule.Op("F", 0, 0)):
            FakeEvent.device_ms += 5.0
        with rec.span("wait", "wait recv 1B0"):
            FakeEvent.device_ms += 1.5      # the stream held by a message
    host = rec.clock.reference[1]
    rec.resolve()
    assert rec.clock.reference is None and all(isinstance(t, float) for e in rec.events for t in e[2:4])
    spans = {name: (start - host, end - host) for _, name, start, end, _ in rec.events}
    assert spans["0F0"] == pytest.approx((0.002, 0.007))
    assert spans["wait recv 1B0"] == pytest.approx((0.007, 0.0085))
    assert spans["train"] == pytest.approx((0.0, 0.0085))
