"""No host sync on the hot path (on a GPU a read of a tensor's value waits for the device):
forwards and backwards read no tensor value, an update at most one (the fp16 overflow
verdict, or else the non-finite check), counted in real 2-process runs on CPU."""
import glob
import json

import pytest

from launch import ROOT, run_ok

pytestmark = pytest.mark.distributed

WORKER = ROOT / "tests" / "workers" / "host_reads.py"
CASES = ["wpipe:2:1", "pipedream_2bw:2:1", "wpipe:2:1:wire_fp16", "wpipe:2:1:guard", "wpipe:2:1:fp16",
         "pipedream_flush:2:1:guard", "wpipe:1:2:guard", "data_parallel:1:2:guard"]


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    out = tmp_path_factory.mktemp("reads")
    run_ok(WORKER, 2, [out, *CASES], timeout=300)
    return {case: [json.loads(open(f).read()) for f in sorted(glob.glob(f"{out}/{case}.rank*.json"))]
            for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_forwards_and_backwards_read_no_value_updates_at_most_one(reads, case):
    checked = {"guard" in case.split(":"), "fp16" in case.split(":")}
    for rank, counts in enumerate(reads[case]):
        assert counts["F"] and counts["B"] and counts["U"], f"{case} rank {rank}: no ops counted"
        assert set(counts["F"] + counts["B"]) == {0}, f"{case} rank {rank}: {counts}"
        per_update = [u + f for u, f in zip(counts["U"], counts["finish"])]
        assert max(per_update) == (1 if True in checked else 0), f"{case} rank {rank}: {counts}"
