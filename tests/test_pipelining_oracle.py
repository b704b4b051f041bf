"""The synchronous methods equal an external oracle, torch.distributed.pipelining.

One launch (2 ranks, gloo, float64) trains the toy model split in 2 stages with
ScheduleGPipe / Schedule1F1B and with our gpipe / pipedream_flush for 3 periods of SGD
with momentum, at m = 2 and m = 4 micro-batches per update (see the worker for how the
loss scaling is matched). Every parameter must agree, by name, to 1e-10.
"""
import pytest
import torch

import toy
from launch import ROOT, run_ok

pytestmark = pytest.mark.distributed

WORKER = ROOT / "tests" / "workers" / "pipelining_oracle.py"
CASES = [(method, period) for period in (2, 4) for method in ("gpipe", "pipedream_flush")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipelining")
    run_ok(WORKER, 2, [out, *sorted({period for _, period in CASES})], timeout=300)
    merged = {}
    for rank in (0, 1):
        for key, result in torch.load(out / f"rank{rank}.pt", weights_only=False).items():
            entry = merged.setdefault(key, {"state": {}, "losses": []})
            entry["state"].update(result["state"])
            entry["losses"] += result["losses"]
    return merged


@pytest.mark.parametrize("method, period", CASES)
def test_matches_torch_pipelining(results, method, period):
    theirs, ours = results[("pipelining", method, period)], results[("wpipe", method, period)]
    assert sorted(theirs["state"]) == sorted(ours["state"]) == [0, 1]
    for p, state in theirs["state"].items():
        initial = toy.build_partition(p, 2).state_dict()
        assert state.keys() == ours["state"][p].keys()
        for name, value in state.items():
            diff = (value - ours["state"][p][name]).abs().max().item()
            assert diff < 1e-10, (f"{method}, m = {period}: partition {p} {name} differs from "
                                  f"torch.distributed.pipelining by {diff:.3g}")
            # Guards against two runs that both failed to train.
            assert not torch.equal(value, initial[name]), f"{method}: partition {p} {name} never changed"
    assert len(ours["losses"]) == 3
    assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-12)
