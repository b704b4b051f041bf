"""Op lists of every method: literal orders, wpipe's rule for any depth, argument errors,
op spelling and the command line (`python -m wpipe`). Pure: only the command-line tests
spawn, to run `python -m wpipe` as a user does."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import wpipe.schedule.methods
from wpipe.__main__ import main
from wpipe.schedule import METHODS, Op, build_schedule, parse_op

GOLDEN = Path(__file__).parent / "golden"


def rows(text: str) -> list[list[str]]:
    """'dev0: 0F0 0F1 ...' lines -> one list of op tokens per device ('#' lines skipped)."""
    return [line.split(":", 1)[1].split() for line in text.strip().splitlines()
            if line.strip() and not line.startswith("#")]


def spelled(schedule) -> list[list[str]]:
    return [[str(op) for op in ops] for ops in schedule]


def paper(ops: list[str], depth: int) -> list[str]:
    """Op tokens in the paper's notation (docs/design.md §3.2) ('2F3' -> 'F3b' at depth 2), updates dropped."""
    ops = [parse_op(op) for op in ops]
    return [f"{op.kind}{op.micro_batch}{'ab'[op.partition // depth]}" for op in ops if op.kind != "U"]


# --------------------------------------------------------------------------- literal orders

# docs/design.md §3.2, verbatim.
WPIPE_N2_M6_PAPER = """
dev0: F0a F1a F0b F1b B0b F2a B1b F3a B0a F2b B1a F3b B2b F4a B3b F5a B2a F4b B3a F5b B4b B5b B4a B5a
dev1: F0a F1a F0b B0b F1b B1b F2a B0a F3a B1a F2b B2b F3b B3b F4a B2a F5a B3a F4b B4b F5b B5b B4a B5a
"""


def test_wpipe_order_is_the_papers():
    assert [paper(ops, 2) for ops in spelled(build_schedule("wpipe", 2, 6))] == rows(WPIPE_N2_M6_PAPER)


def test_wpipe_golden_file():
    golden = rows((GOLDEN / "wpipe_N2_M6.txt").read_text())
    assert spelled(build_schedule("wpipe", 2, 6)) == golden
    assert [paper(ops, 2) for ops in golden] == rows(WPIPE_N2_M6_PAPER)


@pytest.mark.parametrize("method, depth, micro_batches, period, expected", [
    ("wpipe", 2, 2, None, """
        dev0: 0F0 0F1 2F0 2F1 2B0 2B1 2U  0B0 0B1 0U
        dev1: 1F0 1F1 3F0 3B0 3F1 3B1 3U  1B0 1B1 1U
    """),
    ("wpipe", 1, 2, None, """
        dev0: 0F0 1F0 1B0 1U  0F1 0B0 0U  1F1 1B1 1U  0B1 0U
    """),
    ("pipedream_flush", 3, 3, None, """
        dev0: 0F0 0F1 0F2 0B0 0B1 0B2 0U
        dev1: 1F0 1F1 1B0 1F2 1B1 1B2 1U
        dev2: 2F0 2B0 2F1 2B1 2F2 2B2 2U
    """),
    ("pipedream_flush", 2, 4, 2, """
        dev0: 0F0 0F1 0B0 0B1 0U  0F2 0F3 0B2 0B3 0U
        dev1: 1F0 1B0 1F1 1B1 1U  1F2 1B2 1F3 1B3 1U
    """),
    ("gpipe", 2, 4, None, """
        dev0: 0F0 0F1 0B0 0B1 0U  0F2 0F3 0B2 0B3 0U
        dev1: 1F0 1F1 1B0 1B1 1U  1F2 1F3 1B2 1B3 1U
    """),
    ("pipedream_2bw", 2, 4, None, """
        dev0: 0F0 0F1 0B0 0F2 0B1 0U  0F3 0B2 0B3 0U
        dev1: 1F0 1B0 1F1 1B1 1U  1F2 1B2 1F3 1B3 1U
    """),
    ("pipedream_2bw", 3, 6, None, """
        dev0: 0F0 0F1 0F2 0B0 0F3 0B1 0F4 0B2 0U  0F5 0B3 0B4 0B5 0U
        dev1: 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1U  1F4 1B3 1F5 1B4 1B5 1U
        dev2: 2F0 2B0 2F1 2B1 2F2 2B2 2U  2F3 2B3 2F4 2B4 2F5 2B5 2U
    """),
    ("data_parallel", 1, 2, None, """
        dev0: 0F0 0B0 0U  0F1 0B1 0U
    """),
])
def test_small_orders(method, depth, micro_batches, period, expected):
    assert spelled(build_schedule(method, depth, micro_batches, period)) == rows(expected)


# --------------------------------------------------------------------------- wpipe's rule

DEPTHS = range(1, 17)


@pytest.mark.parametrize("depth", DEPTHS)
def test_wpipe_follows_the_rule(depth):
    """docs/design.md §3.2, restated op by op for every device."""
    n = depth
    for micro_batches in (n, 2 * n, 3 * n):
        for s, ops in enumerate(build_schedule("wpipe", n, micro_batches)):
            forwards = [op for op in ops if op.kind == "F"]
            backwards = [op for op in ops if op.kind == "B"]
            assert forwards == [Op("F", s + n * ((f // n) % 2), f // (2 * n) * n + f % n)
                                for f in range(2 * micro_batches)]
            assert backwards == [Op("B", s + n * (1 - (k // n) % 2), k // (2 * n) * n + k % n)
                                 for k in range(2 * micro_batches)]
            warmup = 2 * n - 1 - s
            kinds = "".join(op.kind for op in ops if op.kind != "U")
            assert kinds == "F" * warmup + "FB" * (2 * micro_batches - warmup) + "B" * warmup
            # A group's update comes right after its N-th backward of a period, and only there.
            k = -1
            for i, op in enumerate(ops):
                if op.kind == "B":
                    k += 1
                    closes_block = k % n == n - 1
                    assert (i + 1 < len(ops) and ops[i + 1] == Op("U", op.partition)) == closes_block
                elif op.kind == "U":
                    assert ops[i - 1].kind == "B"


@pytest.mark.parametrize("depth", DEPTHS)
def test_wpipe_group_properties(depth):
    """On every device: all G0 forwards of period p+1 run before G0's update ending period
    p; all G1 backwards of period p run before any G1 forward of period p+1."""
    n = depth
    for micro_batches in (2 * n, 4 * n):
        for s, ops in enumerate(build_schedule("wpipe", n, micro_batches)):
            def steps(kind, partition, period):
                return [i for i, op in enumerate(ops) if op.kind == kind and op.partition == partition
                        and op.micro_batch // n == period]

            g0_updates = [i for i, op in enumerate(ops) if op == Op("U", s)]
            for p in range(micro_batches // n - 1):
                assert max(steps("F", s, p + 1)) < g0_updates[p]
                assert max(steps("B", n + s, p)) < min(steps("F", n + s, p + 1))


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("args, message", [
    (("pipedream", 2, 4), r"unknown method 'pipedream': choose one of wpipe, pipedream_2bw, "
                          r"pipedream_flush, gpipe, data_parallel"),
    (("wpipe", 0, 4), r"depth must be an integer >= 1, got 0"),
    (("data_parallel", 2, 4), r"depth must be 1 for data_parallel"),
    (("wpipe", 4, 6), r"num_micro_batches must be a positive multiple of the period "
                      r"\(micro_batches_per_update = 4\), got 6"),
    (("gpipe", 2, 6, 4), r"num_micro_batches must be a positive multiple .* = 4\), got 6"),
    (("gpipe", 2, 0), r"num_micro_batches must be a positive multiple"),
    (("wpipe", 4, 8, 2), r"micro_batches_per_update must equal depth \(4\) for wpipe .*got 2"),
    (("pipedream_2bw", 4, 6, 3), r"micro_batches_per_update must be >= depth \(4\) for pipedream_2bw .*got 3"),
    (("pipedream_flush", 2, 4, 0), r"micro_batches_per_update must be an integer >= 1, got 0"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(*args)


# --------------------------------------------------------------------------- op spelling

@pytest.mark.parametrize("text, op", [
    ("2F3", Op("F", 2, 3)), ("0B1", Op("B", 0, 1)), ("1U", Op("U", 1)), ("15F120", Op("F", 15, 120)),
])
def test_parse_op(text, op):
    assert parse_op(text) == op
    assert str(op) == text


def test_parse_op_round_trips_every_schedule():
    for method in METHODS:
        depth = 1 if method == "data_parallel" else 3
        for ops in build_schedule(method, depth, 2 * depth):
            assert [parse_op(str(op)) for op in ops] == ops


@pytest.mark.parametrize("text", ["", "F3", "2X3", "2U3", "2F", "2B", "-1F0", "2f3", "2F3x", "2 F3", "U"])
def test_parse_op_rejects(text):
    with pytest.raises(ValueError, match=f"cannot parse op {text!r}: expected e.g. '2F3'"):
        parse_op(text)


# --------------------------------------------------------------------------- command line

def test_command_line(capsys):
    main(["--method", "wpipe", "--depth", "2", "--micro-batches", "6"])
    out = capsys.readouterr().out
    assert "per partition op: forward 0.25, backward 0.5, transfer 0" in out
    assert "    0 0F0\n    1 0F1    1F0\n    2 2F0    1F1\n" in out
    lines = out.splitlines()
    partitions = lines.index("partition  device  semantics  always newest  versions alive")
    assert [line.split() for line in lines[partitions + 1:partitions + 5]] == [
        ["0", "0", "t-1", "yes", "2"],
        ["1", "1", "t-1", "yes", "2"],
        ["2", "0", "t", "yes", "1"],
        ["3", "1", "t", "yes", "1"],
    ]
    # 2M(tf + tb) + (N - 1)(tf + tb) with tf = 1/4, tb = 1/2: 39/4; idle 3/4 per device.
    assert "makespan 9.75, ideal 9 (the busiest device's work), bubble fraction 0.077" in out
    devices = lines.index("device  busy  idle  stash peak [A]  weight copies [W]")
    assert [line.split() for line in lines[devices + 1:]] == [
        ["0", "9", "0.75", "1", "0.75"],
        ["1", "9", "0.75", "0.75", "0.75"],
    ]


@pytest.mark.parametrize("argv, message", [
    (["--method", "wpipe", "--depth", "4", "--micro-batches", "6"],
     "num_micro_batches must be a positive multiple of the period"),
    (["--method", "nope", "--depth", "2", "--micro-batches", "2"], "unknown method 'nope': choose one of"),
    (["--method", "gpipe", "--depth", "2", "--micro-batches", "2", "--backward-cost", "-1"],
     "costs must be >= 0, got -1"),
])
def test_command_line_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def run_wpipe(*argv: str) -> tuple[str, set[str]]:
    """Run `python -X importtime -m wpipe ARGV`; return its stdout and the modules it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "wpipe", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    return done.stdout, imported


@pytest.mark.distributed
def test_python_m_wpipe_prints_the_grid_without_torch():
    out, imported = run_wpipe("--method", "wpipe", "--depth", "2", "--micro-batches", "6")
    assert out.startswith("wpipe: depth 2, 6 micro-batches, 2 per update, 4 partitions;")
    assert "    0 0F0\n    1 0F1    1F0\n    2 2F0    1F1\n" in out
    assert {"wpipe.schedule", "wpipe.schedule.check", "wpipe.schedule.simulate"} <= imported
    assert not {name for name in imported if name.split(".")[0] == "torch"}


@pytest.mark.distributed
def test_python_m_wpipe_help_does_not_import_torch():
    out, imported = run_wpipe("--help")
    assert out.startswith("usage: python -m wpipe ")
    assert "wpipe.schedule.simulate" in imported         # the import log was read
    assert not {name for name in imported if name.split(".")[0] == "torch"}


def test_methods_module_imports_no_wpipe_module():
    """check.py and simulate.py import methods.py, so methods.py imports neither of them
    (nor any other wpipe module, not even inside a function), and has no `__main__` block."""
    tree = ast.parse(Path(wpipe.schedule.methods.__file__).read_text())
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imports.append("." * node.level + (node.module or ""))
    assert imports and not [name for name in imports
                            if name.startswith(".") or name.split(".")[0] == "wpipe"], imports
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not calls & {"import_module", "__import__"}
    assert not [node for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and node.value == "__main__"]
