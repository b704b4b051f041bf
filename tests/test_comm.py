"""Point-to-point streams whose shapes change (transport.py: the filler path over gloo, the
receives posted when taken over nccl_emulated): training whose micro-batch size changes
between train() calls, and an evaluation whose sizes change from one micro-batch to the
next, equal the single-process reference exactly."""
import glob

import pytest
import torch

from wpipe import schedule
from wpipe.runtime import reference

import toy
from launch import ROOT, run_ok
from workers.comm_cases import EVAL_BATCHES, TRAIN_BATCHES

pytestmark = pytest.mark.distributed

WORKER = ROOT / "tests" / "workers" / "comm_cases.py"
SEND_COMPLETION = ROOT / "tests" / "workers" / "send_completion.py"


@pytest.mark.parametrize("method, p2p_backend", [("wpipe", "auto"), ("pipedream_2bw", "auto"),
                                                 ("wpipe", "nccl_emulated")])
def test_changing_shapes_match_reference(tmp_path, method, p2p_backend):
    run_ok(WORKER, 2, [tmp_path, method, p2p_backend], timeout=180)
    n = schedule.num_partitions(method, 2)
    partitions = [toy.build_partition(i, n) for i in range(n)]
    period = schedule.default_period(method, 2)
    data = [mb for call, batch in enumerate(TRAIN_BATCHES)
            for mb in toy.micro_batches(2 * period, batch=batch, seed=call)]
    reference.train(partitions, toy.loss_fn, toy.OPTIMIZERS["sgd"], data, method, 2)
    results = [torch.load(f, weights_only=False) for f in sorted(glob.glob(f"{glob.escape(str(tmp_path))}/{method}.rank*.pt"))]
    for result in results:
        for p, state in result["state"].items():
            for key, value in state.items():
                diff = (value - partitions[p].state_dict()[key]).abs().max().item()
                assert diff < 1e-10, f"partition {p} {key} differs by {diff:.3g}"
    (outputs,) = [r["outputs"] for r in results if r["outputs"]]
    assert [len(o) for o in outputs] == list(EVAL_BATCHES)
    with torch.no_grad():
        for i, (batch, got) in enumerate(zip(EVAL_BATCHES, outputs)):
            x = toy.micro_batches(1, batch=batch, seed=10 + i)[0][0]
            for module in partitions:
                x = module(*x) if isinstance(x, tuple) else module(x)
            assert torch.equal(got, x), f"evaluation micro-batch {i} (size {batch})"


def test_a_send_completes_only_once_its_receive_is_posted():
    """NCCL's sends are rendezvous: one completes only once its receive is posted. The
    emulation relies on gloo's protocol for it (the sender moves the payload only once the
    receiver said it posted the receive): a send's wait times out while the receive is not
    posted, and returns once it is."""
    out = run_ok(SEND_COMPLETION, 2, timeout=120)
    assert "completed before its receive was posted: False; once posted: True" in out, out[-3000:]
