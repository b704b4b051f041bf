"""The ratio's factors (wpipe.planning.compare): they multiply to best WPipe / best 2BW
exactly, each step changes one thing, and an unchanged step is exactly 1."""
import dataclasses
import math

import pytest

from launch import ROOT
from wpipe.config import load_config
from wpipe.planning import plan
from wpipe.planning.compare import FACTORS, decompose
from wpipe.planning.evaluate import Configuration, Workload, evaluate
from wpipe.planning.hardware import load_hardware
from wpipe.planning.optimes import op_times

from nlp.main import NlpConfig, model_blocks

GPUS = 4


@pytest.fixture(scope="module")
def workload():
    """A small BERT on the V100 16 GB preset's fitted curves, its memory shrunk so that
    memory binds at small micro-batches."""
    tiny = model_blocks(load_config(NlpConfig, ROOT / "network_conf" / "nlp_tiny.yaml",
                                    {"num_layers": "8", "hidden": "128", "ffn": "512", "max_seq_length": "128"}))
    hw = load_hardware(ROOT / "network_conf" / "hardware" / "v100_16gb_8x.yaml")
    hw = dataclasses.replace(hw, gpu_memory_gib=0.05)
    return Workload(tiny.measure(), tiny.uniform_plan, hw,
                    op_times(hw, "fp32", {"family": "bert", "hidden": 128, "seq": 128}))


def test_factors_multiply_to_the_ratio_of_the_bests(workload):
    best = plan.best_per_method(plan.plan(workload, GPUS, ("wpipe", "pipedream_2bw"), best_only=True))
    w, b = best["wpipe"], best["pipedream_2bw"]
    parts = decompose(workload, w.configuration, b.configuration)
    assert parts.ratio == w.predicted_samples_per_second / b.predicted_samples_per_second
    assert list(parts.factors) == list(FACTORS)
    assert math.prod(parts.factors.values()) == pytest.approx(parts.ratio, rel=1e-12)
    assert [c for c, _ in parts.path][0] == b.configuration and [c for c, _ in parts.path][-1] == w.configuration


def test_every_step_changes_one_thing_and_the_factors_are_its_speed_ratios(workload):
    twobw = Configuration("pipedream_2bw", 4, 1, 2, False)
    wpipe = Configuration("wpipe", 2, 2, 16, True, "replica_major")
    parts = decompose(workload, wpipe, twobw)
    path = [c for c, _ in parts.path]
    assert path[1] == dataclasses.replace(twobw, method="wpipe")
    assert path[2] == dataclasses.replace(path[1], recompute=True)
    assert path[3] == dataclasses.replace(path[2], micro_batch_size=16)
    assert path[4] == wpipe
    speeds = [evaluate(workload, c).samples_per_second for c in path]
    assert [s for _, s in parts.path] == speeds
    efficiency = (evaluate(workload, path[3], per_update=False).samples_per_second
                  / evaluate(workload, path[2], per_update=False).samples_per_second)
    assert parts.factors == {"schedule": speeds[1] / speeds[0], "recompute": speeds[2] / speeds[1],
                             "micro-batch efficiency": efficiency,
                             "per-update amortisation": speeds[3] / speeds[2] / efficiency,
                             "layout": speeds[4] / speeds[3]}
    assert all(abs(math.log(f)) > 1e-6 for f in parts.factors.values())
    assert math.prod(parts.factors.values()) == pytest.approx(speeds[4] / speeds[0], rel=1e-12)
    assert parts.carrier == max(FACTORS, key=lambda k: abs(math.log(parts.factors[k])))


def test_unchanged_steps_are_exactly_one(workload):
    twobw = Configuration("pipedream_2bw", 2, 2, 8, True)
    parts = decompose(workload, dataclasses.replace(twobw, method="wpipe"), twobw)
    assert {k: v for k, v in parts.factors.items() if k != "schedule"} == {k: 1.0 for k in FACTORS[1:]}
    assert parts.ratio == parts.factors["schedule"]


def test_no_decomposition_where_wpipe_cannot_cut_twobws_depth(workload):
    deep = Configuration("pipedream_2bw", 8, 1, 1, False)      # wpipe would need 16 of the 10 blocks
    assert decompose(workload, Configuration("wpipe", 4, 2, 1, False), deep) is None
    with pytest.raises(ValueError, match="compares wpipe with pipedream_2bw"):
        decompose(workload, deep, deep)
