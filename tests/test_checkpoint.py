"""Checkpoints and exact resume (wpipe.train.checkpoint, through wpipe.train and nlp/main.py).

One launch per world size runs, for every method, an uninterrupted run with a checkpoint
every 2 updates and runs resumed from two of its checkpoints (mid-epoch in each epoch);
a resumed run's losses, history and final state (weights and their versions, optimizer,
LR schedule, RNG states) must equal the uninterrupted run's bit for bit.
"""
import json
import os

import pytest
import torch

from wpipe.train import checkpoint

from launch import ROOT, run_ok

WORKER = ROOT / "tests" / "workers" / "resume_cases.py"
STARTS = (2, 4)        # mid-epoch 1 and mid-epoch 2 (3 updates per epoch)
TWO = [("wpipe", 2, 1), ("pipedream_2bw", 2, 1), ("pipedream_flush", 2, 1), ("gpipe", 2, 1),
       ("data_parallel", 1, 2), ("wpipe", 1, 2), ("wpipe", 2, 1, "recompute"), ("pipedream_2bw", 2, 1, "m4")]
FOUR = [("wpipe", 2, 2)]


def cases(layouts):
    return [":".join([m, str(n), str(d), ",".join(map(str, STARTS)), *flags]) for m, n, d, *flags in layouts]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    run_ok(WORKER, 2, [out, *cases(TWO)], timeout=300)
    return out


@pytest.fixture(scope="module")
def runs4(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume4")
    run_ok(WORKER, 4, [out, *cases(FOUR)], timeout=300)
    return out


def assert_equal(a, b, where):
    """Exact equality of nested state (tensors bit for bit), naming the first difference."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), \
            f"{where}: differs (max {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def final_state(run_dir, world):
    folder = checkpoint.latest(run_dir / "checkpoints")
    assert folder is not None and folder.name == checkpoint.folder_name(6)
    return [torch.load(folder / checkpoint.rank_file(r), weights_only=True) for r in range(world)]


def check_resumed(out, method, depth, dp, *flags):
    base = out / "_".join([f"{method}_{depth}x{dp}", *flags])
    full = json.loads((base / "full" / "summary.json").read_text())
    assert len(full["losses"]) == 6 and len(full["history"]) == 2
    expected = final_state(base / "full", depth * dp)
    for start in STARTS:
        resumed = json.loads((base / f"from{start}" / "summary.json").read_text())
        assert resumed["losses"] == full["losses"], f"from {start}"
        assert resumed["history"] == full["history"], f"from {start}"
        for r, (a, b) in enumerate(zip(final_state(base / f"from{start}", depth * dp), expected)):
            assert_equal(a, b, f"{method} {depth}x{dp} resumed after update {start}, rank {r}")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", TWO, ids=lambda layout: "_".join(map(str, layout)))
def test_resume_is_exact(runs, layout):
    check_resumed(runs, *layout)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", FOUR, ids=lambda layout: "_".join(map(str, layout)))
def test_resume_is_exact_four_ranks(runs4, layout):
    check_resumed(runs4, *layout)


@pytest.mark.distributed
def test_checkpoint_folders_and_manifest(runs):
    root = runs / "wpipe_2x1" / "full" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [checkpoint.folder_name(n) for n in (2, 3, 4, 6)]
    manifest = json.loads((root / checkpoint.folder_name(4) / "manifest.json").read_text())
    assert (manifest["period"], manifest["epoch"], manifest["period_in_epoch"], manifest["world_size"]) == (4, 1, 1, 2)
    assert manifest["config"]["method"] == "wpipe"
    assert [e["name"] for e in manifest["files"]] == ["rank00000.pt", "rank00001.pt"]
    for entry in manifest["files"]:
        checkpoint.verify_file(root / checkpoint.folder_name(4), entry)
    assert not list(root.glob("*/.*.tmp"))


def test_prune_keeps_the_newest_complete_and_any_newer_partial(tmp_path):
    for n, complete in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        folder = tmp_path / checkpoint.folder_name(n)
        folder.mkdir()
        (folder / checkpoint.rank_file(0)).write_bytes(b"x")
        if complete:
            (folder / checkpoint.MANIFEST).write_text("{}")
    assert checkpoint.latest(tmp_path).name == checkpoint.folder_name(4)
    checkpoint.prune(tmp_path, keep=2)
    # 1 is old, 2 an abandoned partial one; 5 may still be being written
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.folder_name(n) for n in (3, 4, 5)]
    checkpoint.prune(tmp_path, keep=0)
    assert len(list(tmp_path.iterdir())) == 3
    assert checkpoint.latest(tmp_path / "nowhere") is None


def test_written_last_wins_over_more_periods(tmp_path):
    """A run started afresh (or resumed from an older checkpoint) into a folder holding
    checkpoints of more periods: its own newest is the latest, and pruning keeps it."""
    def write(n, at):
        folder = tmp_path / checkpoint.folder_name(n)
        folder.mkdir(exist_ok=True)
        (folder / checkpoint.MANIFEST).write_text("{}")
        os.utime(folder / checkpoint.MANIFEST, ns=(at, at))
    write(6, 1_000), write(8, 2_000)          # an earlier run
    write(2, 3_000)                           # this run's first checkpoint
    assert checkpoint.latest(tmp_path).name == checkpoint.folder_name(2)
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.folder_name(n) for n in (2, 8)]
    write(4, 4_000)
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.folder_name(n) for n in (2, 4)]


@pytest.mark.distributed
def test_the_same_run_twice_into_one_output_dir(tmp_path):
    """Running a command again starts afresh over the first run's checkpoints."""
    args = ["--config", ROOT / "network_conf" / "nlp_tiny.yaml", "--epochs", "2", "--max_periods_per_epoch", "3",
            "--checkpoint_every", "1", "--synthetic_samples", "200", "--max_eval_batches", "2",
            "--output_dir", tmp_path]
    run_ok(ROOT / "nlp" / "main.py", 2, args, timeout=300)
    run_ok(ROOT / "nlp" / "main.py", 2, args, timeout=300)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        [checkpoint.folder_name(n) for n in (5, 6)]
    assert json.loads((tmp_path / "summary.json").read_text())["losses"]
