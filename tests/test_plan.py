"""The planner (wpipe.planning.plan) and the hardware files (wpipe.planning.hardware), without processes:
enumeration, the memory budget, ranking, the balanced split, probe profiles, and one-line
errors for bad hardware files and flags."""
import dataclasses
import sys

import pytest
import yaml

from launch import ROOT
from wpipe.planning import costmodel, plan
from wpipe import schedule
from wpipe.planning.blockcost import Affine
from wpipe.config import load_config
from wpipe.planning.hardware import Hardware, load_hardware

from nlp.main import NlpConfig, model_blocks

PRESETS = sorted((ROOT / "network_conf" / "hardware").glob("*.yaml"))
GPUS = 4


@pytest.fixture(scope="module")
def model():
    tiny = model_blocks(load_config(NlpConfig, ROOT / "network_conf" / "nlp_tiny.yaml", {"num_layers": "8"}))
    return tiny.measure(), tiny.uniform_plan


def hardware(budget_bytes=None, **changes) -> Hardware:
    hw = load_hardware(ROOT / "network_conf" / "hardware" / "v100_32gb_8x.yaml")
    if budget_bytes is not None:
        changes["gpu_memory_gib"] = budget_bytes / hw.usable_memory_fraction / 2 ** 30
    return dataclasses.replace(hw, **changes)


def every_configuration(blocks, methods=plan.METHODS):
    return [(m, n, d, layout, r, split, b) for m in methods
            for n, d, layout, r, split, sizes in plan.configurations(m, GPUS, len(blocks))
            for b in sizes]


def test_enumeration_covers_layouts_micro_batches_recompute_and_rank_layouts(model):
    blocks, _ = model
    configs = every_configuration(blocks)
    assert {(n, d) for m, n, d, *_ in configs if m == "wpipe"} == {(1, 4), (2, 2), (4, 1)}
    assert {(n, d) for m, n, d, *_ in configs if m == "data_parallel"} == {(1, 4)}
    assert {b for *_, b in configs} == {2 ** i for i in range(10)}
    assert {r for *_, r, _, _ in configs} == {False, True}
    assert {layout for m, n, d, layout, *_ in configs if (n, d) == (2, 2)} == set(plan.LAYOUTS)
    assert {layout for m, n, d, layout, *_ in configs if d == 1 or n == 1} == {"pipeline_major"}
    assert all(n * d == GPUS for _, n, d, *_ in configs)


def test_everything_fits_a_huge_budget_and_is_ranked(model):
    blocks, uniform_plan = model
    candidates = plan.plan(blocks, uniform_plan, hardware(budget_bytes=2 ** 50), GPUS, splits=("uniform",))
    assert len(candidates) == len(every_configuration(blocks, plan.METHODS)) // 2   # one split of two
    speeds = [c.predicted_samples_per_second for c in candidates]
    assert speeds == sorted(speeds, reverse=True) and speeds[-1] > 0


def test_no_candidate_over_the_budget(model):
    blocks, uniform_plan = model
    everything = plan.plan(blocks, uniform_plan, hardware(budget_bytes=2 ** 50), GPUS)
    sizes = sorted(c.predicted_memory_bytes for c in everything)
    budget = sizes[len(sizes) // 2]            # about half fit
    hw = hardware(budget_bytes=budget)
    fitting = plan.plan(blocks, uniform_plan, hw, GPUS)
    assert 0 < len(fitting) < len(everything)
    assert all(c.predicted_memory_bytes <= hw.memory_budget_bytes for c in fitting)
    # The uniform split is the same whatever the budget (the balanced one depends on it).
    assert ({key(c) for c in fitting if c.split == "uniform"}
            == {key(c) for c in everything if c.split == "uniform" and c.predicted_memory_bytes <= hw.memory_budget_bytes})
    for c in fitting[:10]:   # the memory reported is the cost model's for that very split
        ranges, start = [], 0
        for size in c.partition_blocks:
            ranges.append(range(start, start + size))
            start += size
        parts = costmodel.partition_costs(blocks, ranges, c.micro_batch_size)
        assert max(costmodel.device_memory(c.method, c.pipeline_depth, c.data_parallel, parts,
                                           c.recompute)) == c.predicted_memory_bytes


def key(c):
    return (c.method, c.pipeline_depth, c.data_parallel, c.micro_batch_size, c.recompute, c.rank_layout, c.split)


def test_stash_multiplicity_follows_the_schedules():
    n = 4
    assert plan.stash_multiplicity("wpipe", n) == [2 * n - s for s in range(n)] + [n - s for s in range(n)]
    assert plan.stash_multiplicity("pipedream_2bw", n) == [n - s for s in range(n)]
    assert plan.stash_multiplicity("gpipe", n) == [n] * n


def test_balanced_split_moves_activation_heavy_blocks_out_of_wpipe_g0(model):
    """Blocks whose activations are large at the front, memory tight: the balanced cut gives
    G0 (held for up to 2N-s micro-batches) fewer of them than the uniform cut and lowers the
    largest device."""
    blocks, uniform_plan = model
    heavy = [dataclasses.replace(b, saved=[(label, Affine(size.at1 * (8 if i < 4 else 1),
                                                                     size.slope * (8 if i < 4 else 1)))
                                           for label, size in b.saved])
             for i, b in enumerate(blocks)]
    method, n, b = "wpipe", 2, 32
    uniform = plan.ranges_of([x.name for x in heavy], uniform_plan(2 * n))

    def largest(ranges):
        return max(costmodel.device_memory(method, n, 1, costmodel.partition_costs(heavy, ranges, b), False))
    balanced = plan.balanced_ranges(heavy, method, n, b, False, hardware(budget_bytes=largest(uniform) / 2))
    assert [r.start for r in balanced][0] == 0 and balanced[-1].stop == len(heavy)
    assert all(a.stop == c.start for a, c in zip(balanced, balanced[1:])) and len(balanced) == 2 * n
    assert len(balanced[0]) < len(uniform[0])

    assert largest(balanced) < largest(uniform)
    # With memory to spare the cut balances time instead: the blocks' times are equal here.
    roomy = plan.balanced_ranges(heavy, method, n, b, False, hardware(budget_bytes=2 ** 50))
    assert [len(r) for r in roomy] == [len(r) for r in uniform]


def test_probe_profile_gives_the_measured_flop_rates(model):
    blocks, uniform_plan = model
    method, depth, b = "wpipe", 2, 8
    ranges = plan.ranges_of([x.name for x in blocks], uniform_plan(schedule.num_partitions(method, depth)))
    parts = costmodel.partition_costs(blocks, ranges, b)
    forward_rate, backward_rate = 3e12, 2e12
    probe = {"method": method, "pipeline_depth": depth, "micro_batch_size": b, "recompute": True,
             "devices": [{"device": s, "ops": [{"partition": p, "forward_s": parts[p].forward_flops / forward_rate,
                                                "backward_s": parts[p].backward_flops / backward_rate,
                                                "recompute_s": parts[p].forward_flops / backward_rate}
                                               for p in (s, s + depth)]} for s in range(depth)]}
    assert plan.probe_rates(probe, blocks, uniform_plan) == pytest.approx((forward_rate, backward_rate))


def test_ring_allreduce_and_links():
    hw = hardware()
    nbytes = 8e9
    within = hw.allreduce_seconds(list(range(8)), nbytes)
    assert within == pytest.approx(2 * 7 / 8 * nbytes / (hw.intra_node_bandwidth_gbs * 1e9)
                                   + 14 * hw.intra_node_latency_us * 1e-6)
    across = hw.allreduce_seconds([0, 8], nbytes)
    assert across == pytest.approx(nbytes / (hw.inter_node_bandwidth_gbs * 1e9) + 2 * hw.inter_node_latency_us * 1e-6)
    assert hw.allreduce_seconds([3], nbytes) == 0


def test_messages_cost_both_ends_compute_where_partitions_change_device():
    """Partition p's forward receives its inputs (a[p] bytes) and sends a[p+1]; its backward
    receives g[p+1] bytes of gradients and sends g[p]; each where the neighbour partition is
    on another device, at p2p_cpu_us_per_mb per MB."""
    inputs, grads = [100e6, 200e6, 300e6, 400e6], [0, 20e6, 30e6, 40e6]
    parts = [costmodel.PartitionCost(range(p, p + 1), 0, 0, int(a), int(g), 0, 0, 0, 0, 0, None)
             for p, (a, g) in enumerate(zip(inputs, grads))]
    hw = hardware(p2p_cpu_us_per_mb=1000)    # 1 ms per MB
    wpipe = costmodel.message_cpu_seconds(parts, costmodel.Topology("wpipe", 2, 1, "pipeline_major"), hw)
    expected = [(0.2, 0.02, 0), (0.2 + 0.3, 0.03 + 0.02, 0), (0.3 + 0.4, 0.04 + 0.03, 0), (0.4, 0.04, 0)]
    assert [x for op in wpipe for x in op] == pytest.approx([x for op in expected for x in op])
    # wpipe with N = 1: both partitions on the one device, nothing crosses
    one = costmodel.message_cpu_seconds(parts[:2], costmodel.Topology("wpipe", 1, 1, "pipeline_major"), hw)
    assert one == [(0, 0, 0), (0, 0, 0)]
    free = costmodel.message_cpu_seconds(parts, costmodel.Topology("wpipe", 2, 1, "pipeline_major"),
                                         hardware(p2p_cpu_us_per_mb=0))
    assert free == [(0, 0, 0)] * 4


def test_message_cost_slows_wpipe_more_than_2bw(model):
    """wpipe's 2N partitions cross devices 2N - 1 times, 2BW's N partitions N - 1 times."""
    blocks, uniform_plan = model
    speeds = {}
    for cost in (0, 5000):
        hw = hardware(p2p_cpu_us_per_mb=cost)
        for method in ("wpipe", "pipedream_2bw"):
            ranges = plan.ranges_of([b.name for b in blocks], uniform_plan(schedule.num_partitions(method, 2)))
            parts = costmodel.partition_costs(blocks, ranges, 8)
            speeds[method, cost] = costmodel.samples_per_second(method, 2, 1, "pipeline_major", parts, 8, hw, False)
    assert speeds["wpipe", 5000] < speeds["wpipe", 0] and speeds["pipedream_2bw", 5000] < speeds["pipedream_2bw", 0]
    assert (speeds["wpipe", 5000] / speeds["wpipe", 0]) < (speeds["pipedream_2bw", 5000] / speeds["pipedream_2bw", 0])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load(preset):
    hw = load_hardware(preset)
    assert hw.gpu_memory_gib > 0 and hw.name


@pytest.mark.parametrize("change, message", [
    ({"gpu_memory_gib": -1}, "field 'gpu_memory_gib' must be a number > 0"),
    ({"efficiency": 1.5}, "field 'efficiency' is a share, at most 1"),
    ({"ranks_per_node": 2.5}, "field 'ranks_per_node' must be an integer >= 1"),
    ({"op_times": "guess"}, "field 'op_times' must be one of flops, profile, measured"),
    ({"op_times": "profile"}, "field 'profile' must name a probe.json"),
    ({"gpu_mem": 3}, "unknown field 'gpu_mem'"),
    ({"peak_tflops": None}, "field 'peak_tflops' must be a number > 0"),
])
def test_bad_hardware_fields_are_named(tmp_path, change, message):
    raw = yaml.safe_load(PRESETS[0].read_text())
    raw.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_hardware(path)


def test_missing_field_is_named(tmp_path):
    raw = yaml.safe_load(PRESETS[0].read_text())
    del raw["inter_node_latency_us"]
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="field 'inter_node_latency_us' is missing"):
        load_hardware(path)


def test_plan_cli_bad_input_is_one_line(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tool"))
    from plan import main as plan_main
    missing = tmp_path / "none.yaml"
    args = ["--config", str(ROOT / "network_conf" / "nlp_tiny.yaml"), "--gpus", "2"]
    assert plan_main([*args, "--hardware", str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: hardware file {missing} does not exist (presets: network_conf/hardware/*.yaml)"]
    assert plan_main([*args, "--hardware", str(PRESETS[0]), "--methods", "wpipe,zb"]) == 2
    assert "error: --methods: unknown method 'zb'" in capsys.readouterr().err
