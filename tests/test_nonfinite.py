"""A NaN loss (wpipe.nonfinite through nlp/main.py): on_nonfinite stop names update,
partition and micro-batch and keeps the last checkpoint; skip drops that update on every
partition (both wpipe groups; every replica of data_parallel) and goes on."""
import json
import math

import pytest
import torch
from test_checkpoint import assert_equal
from test_preemption import ENTRIES

from wpipe.train import checkpoint

from launch import ROOT, run_ok, torchrun

pytestmark = pytest.mark.distributed

WORKER = ROOT / "tests" / "workers" / "poison.py"


def test_stop_names_update_partition_and_micro_batch(tmp_path):
    # rank 1 computes wpipe 2x1's loss; its 6th loss is micro-batch 1 of update 3
    code, out = torchrun(WORKER, 2, [1, 5, *ENTRIES["nlp"], "--output_dir", tmp_path / "run"], timeout=120)
    assert code != 0
    assert ("stopped: rank 1 (replica 0, device 1), step 6, op 3U: NonFiniteError: non-finite gradient at "
            "update 3 of the run in partition 3") in out, out[-3000:]
    assert "non-finite loss at micro-batch 1 (nan) of that update" in out
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == checkpoint.folder_name(2)
    assert not (tmp_path / "run" / "summary.json").exists()


def states(run_dir, period, world=2):
    folder = run_dir / "checkpoints" / checkpoint.folder_name(period)
    return [torch.load(folder / checkpoint.rank_file(r), weights_only=True)["pipeline"]["partitions"]
            for r in range(world)]


@pytest.mark.parametrize("rank, call, layout, skipped", [
    (1, 5, [], 3),                                                                        # wpipe 2x1
    (0, 3, ["--method", "data_parallel", "--pipeline_depth", "1", "--data_parallel", "2"], 4),  # one replica's loss
])
def test_skip_drops_the_update_everywhere(tmp_path, rank, call, layout, skipped):
    run = tmp_path / "run"
    out = run_ok(WORKER, 2, [rank, call, *ENTRIES["nlp"], *layout, "--output_dir", run,
                             "--on_nonfinite", "skip", "--keep_checkpoints", "0"], timeout=120)
    assert f"skipped update(s) {skipped}: non-finite loss or gradients" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_updates"] == [skipped]
    assert [math.isfinite(x) for x in summary["losses"]] == [t != skipped for t in range(1, 7)]
    assert math.isfinite(summary["final_loss"])
    # every partition's weights and optimizer state after the skipped update are those before it
    before, after = states(run, skipped - 1), states(run, skipped)
    for r, (a, b) in enumerate(zip(before, after)):
        assert a.keys() == b.keys() and a
        for p in a:
            assert_equal(a[p]["module"], b[p]["module"], f"rank {r} partition {p} weights")
            assert_equal(a[p]["optimizer"]["state"], b[p]["optimizer"]["state"], f"rank {r} partition {p} optimizer")
    later, first = states(run, 6), next(iter(after[0]))
    assert any(not torch.equal(t, later[0][first]["module"][k]) for k, t in after[0][first]["module"].items())
