"""tool/bench.py end to end at a tiny size (two of our methods and one
torch.distributed.pipelining peer, traced), and its choice of the median run."""
import importlib.util
import json
import sys

import pytest

from wpipe.launch import run

from launch import ROOT

BENCH = ROOT / "tool" / "bench.py"
METHODS = ["wpipe", "pipedream_2bw"]
PEER = "torch_1f1b_m2"
TINY = ["--layers", "4", "--hidden", "32", "--seq", "8", "--micro-batch", "2",
        "--periods", "2", "--warmup", "1", "--repeat", "1"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(BENCH), *TINY, "--methods", ",".join(METHODS), "--peers", PEER,
           "--trace", "--output-dir", str(out), "--timeout", "60"]
    try:
        code, stdout = run(cmd, timeout=180, env={"HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    except TimeoutError as error:
        raise AssertionError(str(error)) from None
    assert code == 0, f"exit code {code}; output:\n{stdout[-8000:]}"
    return out, stdout


@pytest.mark.distributed
def test_table_has_a_row_per_method_and_peer(bench_run):
    out, stdout = bench_run
    table = (out / "bench.txt").read_text()
    assert table in stdout.replace("\r", "")
    lines = table.splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("method")) + 1:]
    body = body[:body.index("")]
    rows = {line.split()[0]: line.split() for line in body if not line[0].isspace()}
    for name in ["single", *METHODS, PEER]:
        assert name in rows, f"no row for {name} in:\n{table}"
        assert float(rows[name][1]) > 0, f"{name}: samples/s {rows[name][1]}"
    assert rows[PEER][-3] == "-", "the peer's stash column should be '-'"
    assert "MEDIAN of 1 run(s)" in table
    assert "wpipe / pipedream_2bw samples/s:" in table
    assert set(json.loads((out / "bench.json").read_text())["results"]) == {"single", *METHODS, PEER}


@pytest.mark.distributed
def test_trace_per_method(bench_run):
    out, _ = bench_run
    for method in METHODS:
        document = json.loads((out / method / "trace.json").read_text())
        assert document["traceEvents"], f"{method}: empty traceEvents"
        assert document["otherData"]["method"] == method
    assert not (out / PEER).exists(), "peers are not traced"


def test_median_run():
    bench = load_bench()

    def fake(speed):   # loss rank last, as in a pipeline
        return [{"time_shares": {}}, {"samples_per_s": speed, "id": speed}]

    runs = [fake(9.0), fake(3.0), fake(5.0)]
    assert bench.median_run(runs) is runs[2]
    assert bench.median_run([fake(1.0), fake(4.0), fake(2.0), fake(3.0)])[1]["id"] == 2.0   # lower median
    assert bench.median_run([fake(7.0)])[1]["id"] == 7.0
