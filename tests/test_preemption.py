"""Runs that are stopped go on exactly: SIGTERM to torchrun (preemption) checkpoints and
exits non-zero, and a relaunch with --resume auto finishes the run; a worker killed with
SIGKILL under torchrun --max-restarts is restarted with the others and resumes from the
latest checkpoint by itself. Both end with the uninterrupted run's losses and state, bit
for bit (nlp/main.py and cv/main.py)."""
import json

import pytest
from test_checkpoint import assert_equal, final_state

from wpipe.train import checkpoint

from launch import ROOT, run_ok, torchrun

pytestmark = pytest.mark.distributed

WORKER = ROOT / "tests" / "workers" / "interrupt.py"
COMMON = ["--micro_batch_size", "4", "--synthetic_samples", "64", "--max_eval_batches", "2",
          "--warmup_periods", "1", "--epochs", "2", "--max_periods_per_epoch", "3",
          "--checkpoint_every", "2", "--log_every", "100", "--timeout_s", "20"]
ENTRIES = {
    "nlp": ["--num_layers", "4", "--hidden", "16", "--heads", "2", "--ffn", "32", "--vocab_size", "50",
            "--max_seq_length", "12", "--lr", "1e-2", *COMMON],
    "cv": ["--config", ROOT / "network_conf" / "cv_tiny.yaml", *COMMON],
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """entry -> output_dir of the run with nothing stopping it, launched on first use."""
    out, done = tmp_path_factory.mktemp("uninterrupted"), {}

    def run(entry):
        if entry not in done:
            run_ok(ROOT / entry / "main.py", 2, [*ENTRIES[entry], "--output_dir", out / entry])
            done[entry] = out / entry
        return done[entry]
    return run


def assert_same_run(run_dir, reference_dir):
    got = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((reference_dir / "summary.json").read_text())
    assert got["losses"] == expected["losses"] and len(got["losses"]) == 6
    assert got["history"] == expected["history"]
    for r, (a, b) in enumerate(zip(final_state(run_dir, 2), final_state(reference_dir, 2))):
        assert_equal(a, b, f"rank {r}")


@pytest.mark.parametrize("what, name", [("term", "SIGTERM"), ("int", "SIGINT")])
def test_signal_checkpoints_exits_and_resumes(tmp_path, uninterrupted, what, name):
    run = tmp_path / "run"
    args = ["nlp", what, 1, 1, tmp_path / "marker", *ENTRIES["nlp"], "--output_dir", run, "--resume", "auto"]
    code, out = torchrun(WORKER, 2, args, timeout=120)
    assert code != 0, out[-3000:]
    stopped = [line for line in out.splitlines() if f"stopped by {name}" in line]
    assert len(stopped) == 1 and stopped[0].endswith(
        f"after update 2: checkpoint {run / 'checkpoints' / checkpoint.folder_name(2)}; continue with --resume auto"), out[-3000:]
    assert checkpoint.latest(run / "checkpoints").name == checkpoint.folder_name(2)
    assert not (run / "summary.json").exists()
    out = run_ok(WORKER, 2, args, timeout=120)  # the marker exists: runs plainly, resumes
    assert "resumed from" in out
    assert_same_run(run, uninterrupted("nlp"))


@pytest.mark.parametrize("entry", ["nlp", "cv"])
def test_killed_rank_restarts_and_resumes(tmp_path, uninterrupted, entry):
    run = tmp_path / "run"
    # rank 1 dies during update 3: the group restarts from the checkpoint after update 2
    out = run_ok(WORKER, 2, [entry, "kill", 1, 3, tmp_path / "marker", *ENTRIES[entry], "--output_dir", run,
                             "--resume", "auto"], timeout=180, options=["--max-restarts=1"])
    assert (tmp_path / "marker").exists() and "exitcode: -9" in out
    assert f"resumed from {run / 'checkpoints' / checkpoint.folder_name(2)}" in out
    # keep_checkpoints 2 (the default): the older ones went once newer ones were complete
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [checkpoint.folder_name(n) for n in (4, 6)]
    assert_same_run(run, uninterrupted(entry))
