"""The cost model's memory equals what real runs report in summary.json, exactly.

Blocks are measured once per model in this process (wpipe.planning.measure, at micro-batch sizes
2 and 4); the prediction at micro-batch 8 (scaled) is compared, field by field and device by
device, with the accounting of real 2-process runs of cv/main.py and nlp/main.py (throughput
mode), for every pipeline method, with and without recomputation, and data parallelism.
"""
import json

import pytest

from launch import ROOT, run_ok
from wpipe.planning import costmodel
from wpipe import schedule
from wpipe.config import load_config
from wpipe.planning.plan import ranges_of

from cv.main import CvConfig, model_blocks as cv_blocks
from nlp.main import NlpConfig, model_blocks as nlp_blocks

pytestmark = pytest.mark.distributed

WORKER = ROOT / "tests" / "workers" / "memory_cases.py"
ENTRIES = {"cv": (CvConfig, cv_blocks, "cv_tiny.yaml"), "nlp": (NlpConfig, nlp_blocks, "nlp_tiny.yaml")}
MICRO_BATCH = 8
FIELDS = ("weights_bytes", "activations_bytes", "optimizer_state_bytes")
CASES = [f"{entry}:{method}:2:1:{recompute}:{MICRO_BATCH}" for entry in ENTRIES
         for method in ("wpipe", "pipedream_2bw", "pipedream_flush", "gpipe") for recompute in ("false", "true")]
CASES += [f"{entry}:data_parallel:1:2:false:{MICRO_BATCH}" for entry in ENTRIES]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    run_ok(WORKER, 2, [out, *CASES], timeout=400)
    return out


@pytest.fixture(scope="module")
def measured():
    """entry -> (blocks, the runtime's uniform plan)."""
    out = {}
    for entry, (config_class, model_blocks, config) in ENTRIES.items():
        model = model_blocks(load_config(config_class, ROOT / "network_conf" / config))
        out[entry] = (model.measure(), model.uniform_plan)
    return out


@pytest.mark.parametrize("case", CASES)
def test_predicted_memory_equals_the_runs(runs, measured, case):
    entry, method, depth, dp, recompute, micro_batch = case.split(":")
    depth, dp, micro_batch = int(depth), int(dp), int(micro_batch)
    summary = json.loads((runs / case.replace(":", "_") / "summary.json").read_text())
    blocks, uniform_plan = measured[entry]
    ranges = ranges_of([b.name for b in blocks], uniform_plan(schedule.num_partitions(method, depth)))
    parts = costmodel.partition_costs(blocks, ranges, micro_batch)
    period = schedule.default_period(method, depth)
    count = (summary["config"]["throughput_periods"] + summary["config"]["throughput_warmup_periods"]) * period
    predicted = costmodel.accounting(method, depth, parts, recompute == "true", count, period)
    for report in summary["memory"]:
        mine = predicted[report["device"]]
        assert mine["partitions"] == report["partitions"]
        for field in FIELDS:
            assert mine[field] == report[field], (f"rank {report['rank']} {field}: predicted {mine[field]}, "
                                                  f"run {report[field]}")
