"""tool/timeline.py as a user runs it: on small synthetic traces whose summary figures are
worked out by hand below, and on a missing trace."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
TIMELINE = ROOT / "tool" / "timeline.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def event(pid: int, name: str, ts: float, dur: float, cat: str | None = None, **args) -> dict:
    """One "X" event; the category follows from the name unless given."""
    cat = cat or ("wait" if name.startswith("wait") else "compute")
    return {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": 0, "ts": ts, "dur": dur, "args": args}


def write_trace(path: Path, events: list[dict], ranks: int = 2, **other) -> Path:
    names = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r} (replica 0, device {r})"}}
             for r in range(ranks)]
    other = {"method": "wpipe", "pipeline_depth": 2, "data_parallel": 1, "micro_batches_per_update": 2,
             "rank_layout": "pipeline_major", "recompute": True, **other}
    path.write_text(json.dumps({"traceEvents": names + events, "otherData": other}))
    return path


def timeline(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TIMELINE), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


# wpipe at depth 2 on 2 ranks (rank 0 holds partitions 0 and 2, rank 1 holds 1 and 3), two
# train() calls and one forward outside any call (not counted). Times in microseconds.
EVENTS = [
    event(0, "train", 0, 10000, "call", micro_batches=2),
    event(0, "0F0", 100, 1000), event(0, "2F0", 1100, 1000),
    event(0, "wait recv 3B0", 2100, 1500, peer=1, bytes=1024, op="2B0"),
    event(0, "recompute 2B0", 3600, 500), event(0, "2B0", 4100, 2000), event(0, "2U", 6100, 300),
    event(0, "wait recv 1B0", 6400, 400, peer=1, bytes=1024, op="0B0"),
    event(0, "0B0", 6800, 2000), event(0, "0U", 8800, 200), event(0, "wait sends", 9000, 250),
    event(1, "train", 50, 10000, "call", micro_batches=2),
    event(1, "wait recv 0F0", 60, 1040), event(1, "1F0", 1100, 1000), event(1, "wait recv 2F0", 2100, 100),
    event(1, "3F0", 2200, 700), event(1, "3B0", 2900, 700), event(1, "3U", 3600, 300),
    event(1, "wait recv 2B0", 3900, 2200), event(1, "1B0", 6100, 700), event(1, "1U", 6800, 200),
    event(1, "wait sends", 7000, 100),
    event(0, "train", 20000, 3000, "call", micro_batches=1),
    event(0, "0F1", 20500, 1000), event(0, "wait sends", 21500, 100),
    event(1, "train", 20100, 3000, "call", micro_batches=1),
    event(1, "wait recv 0F1", 20200, 1300), event(1, "1F1", 21500, 1000),
    event(0, "0F9", 30000, 5000),
]
# Windows: call 1 from 60 (rank 1's first wait) to 9250 (rank 0's last wait) = 9190;
# call 2 from 20200 to 22500 = 2300; together 11490 us.
# rank 0: busy 1000+1000+500+2000+300+2000+200 + 1000 = 8000, wait 1500+400+250 + 100 = 2250,
#         bubble 1 - 8000/11490 = 0.3037, ops 6 + 1 (the recompute is not an op, 0F9 is outside).
# rank 1: busy 1000+700+700+300+700+200 + 1000 = 4600, wait 1040+100+2200+100 + 1300 = 4740,
#         bubble 1 - 4600/11490 = 0.5997, ops 6 + 1.


def test_chart_and_summary(tmp_path):
    write_trace(tmp_path / "trace.json", EVENTS)
    png = tmp_path / "timeline.png"
    done = timeline(tmp_path, "--png", png)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    lines = done.stdout.splitlines()
    assert lines[0] == "wpipe, depth 2 x data_parallel 1: 2 train() call(s), window 11.490 ms"
    assert lines[1].split() == ["rank", "busy", "ms", "wait", "ms", "bubble", "ops", "name"]
    assert [line.split()[:5] for line in lines[2:4]] == [
        ["0", "8.000", "2.250", "0.304", "7"],
        ["1", "4.600", "4.740", "0.600", "7"],
    ]
    assert lines[2].endswith("  rank 0 (replica 0, device 0)")
    assert lines[4] == f"wrote {png} (0.060 to 35.000 ms)"


def test_dense_trace_shows_its_last_ops_from_a_period_boundary(tmp_path):
    """Rank 0 runs 24 periods of 0F 0F 0B 0B 0U, 100 us each: 120 ops. Its last 100 start
    at op 20 (a forward); the first update among them is op 24, ending at 2500 us."""
    names = [name for p in range(24)
             for name in (f"0F{2 * p}", f"0F{2 * p + 1}", f"0B{2 * p}", f"0B{2 * p + 1}", "0U")]
    events = [event(0, name, 100 * i, 100) for i, name in enumerate(names)] + [event(1, "1F0", 50, 100)]
    trace = write_trace(tmp_path / "dense.json", events, method="pipedream_flush", recompute=False)
    png = tmp_path / "dense.png"
    done = timeline(trace, "--png", png)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"wrote {png} (2.500 to 12.000 ms)"
    done = timeline(trace, "--png", png, "--from-ms", 1, "--to-ms", 2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"wrote {png} (1.000 to 2.000 ms)"
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_missing_trace_is_one_clear_line(tmp_path):
    done = timeline(tmp_path, "--png", tmp_path / "timeline.png")
    assert done.returncode == 2
    assert done.stderr == (f"timeline.py: error: {tmp_path / 'trace.json'}: no such file "
                           f"(a run writes it with --trace true)\n")
    assert not (tmp_path / "timeline.png").exists()
