"""The planner (wpipe.planning.plan, evaluate) and the hardware files (wpipe.planning.hardware),
without processes: enumeration, the memory budget, ranking, the balanced split, the speed
bound, probe profiles, the presets, and one-line errors of tool/plan.py over every preset x
every throughput configuration."""
import dataclasses

import pytest
import yaml

from launch import ROOT
from plan import main as plan_main
from wpipe import schedule
from wpipe.config import load_config
from wpipe.planning import costmodel, plan
from wpipe.planning.blockcost import Affine
from wpipe.planning.evaluate import Configuration, Workload, balanced_ranges, evaluate, stash_multiplicity
from wpipe.planning.hardware import Hardware, load_hardware
from wpipe.planning.optimes import FittedTimes, FlopTimes

from nlp.main import NlpConfig, model_blocks

PRESETS = sorted((ROOT / "network_conf" / "hardware").glob("*.yaml"))
THROUGHPUT_CONFIGS = sorted((ROOT / "network_conf").glob("*_throughput_*.yaml"))
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


def workload(model, hw=None) -> Workload:
    blocks, uniform_plan = model
    hw = hw or hardware()
    return Workload(blocks, uniform_plan, hw, FlopTimes(hw, "fp32"))


def every_configuration(blocks, methods=plan.METHODS):
    return [c for m in methods for group in plan.configurations(m, GPUS, len(blocks)) for c in group]


def test_methods_are_the_schedule_registry():
    assert plan.METHODS == tuple(schedule.METHODS)


def test_enumeration_covers_layouts_micro_batches_recompute_and_rank_layouts(model):
    blocks, _ = model
    configs = every_configuration(blocks)
    assert {(c.pipeline_depth, c.data_parallel) for c in configs if c.method == "wpipe"} == {(1, 4), (2, 2), (4, 1)}
    assert {(c.pipeline_depth, c.data_parallel) for c in configs if c.method == "data_parallel"} == {(1, 4)}
    assert {c.micro_batch_size for c in configs} == {2 ** i for i in range(10)}
    assert {c.recompute for c in configs} == {False, True}
    assert {c.rank_layout for c in configs if c.layout == "2x2"} == set(plan.LAYOUTS)
    assert {c.rank_layout for c in configs if c.data_parallel == 1 or c.pipeline_depth == 1} == {"pipeline_major"}
    assert all(c.pipeline_depth * c.data_parallel == GPUS for c in configs)
    only = [c for m in plan.METHODS for g in plan.configurations(m, GPUS, len(blocks), only_layouts={(2, 2)})
            for c in g]
    assert {c.layout for c in only} == {"2x2"} and {c.method for c in only} == set(plan.METHODS) - {"data_parallel"}


def test_everything_fits_a_huge_budget_and_is_ranked(model):
    hw = hardware(budget_bytes=2 ** 50)
    candidates = plan.plan(workload(model, hw), GPUS, splits=("uniform",))
    assert len(candidates) == len(every_configuration(model[0])) // 2   # one split of two
    speeds = [c.predicted_samples_per_second for c in candidates]
    assert speeds == sorted(speeds, reverse=True) and speeds[-1] > 0


def test_no_candidate_over_the_budget(model):
    everything = plan.plan(workload(model, hardware(budget_bytes=2 ** 50)), GPUS)
    sizes = sorted(c.predicted_memory_bytes for c in everything)
    budget = sizes[len(sizes) // 2]            # about half fit
    hw = hardware(budget_bytes=budget)
    fitting = plan.plan(workload(model, hw), GPUS)
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
        parts = costmodel.partition_costs(model[0], ranges, c.micro_batch_size)
        assert max(costmodel.device_memory(c.method, c.pipeline_depth, c.data_parallel, parts,
                                           c.recompute)) == c.predicted_memory_bytes


def key(c):
    return (c.method, c.pipeline_depth, c.data_parallel, c.micro_batch_size, c.recompute, c.rank_layout, c.split)


def test_best_only_finds_each_methods_best(model):
    """Skipping groups by their speed bound loses no method's best."""
    for budget in (2 ** 50, 2 ** 27):
        target = workload(model, hardware(budget_bytes=budget))
        full = plan.best_per_method(plan.plan(target, GPUS, largest_only=True))
        pruned = plan.best_per_method(plan.plan(target, GPUS, best_only=True))
        assert {m: key(c) for m, c in pruned.items()} == {m: key(c) for m, c in full.items()}


@pytest.mark.parametrize("preset", ["v100_16gb_8x", "h100_80gb_8x"])
def test_simulated_rates_stay_within_the_bound_slack(model, preset):
    """costmodel.speed_bound x plan.BOUND_SLACK bounds the simulated rate, over a grid."""
    hw = load_hardware(ROOT / "network_conf" / "hardware" / f"{preset}.yaml")
    target = workload(model, dataclasses.replace(hw, gpu_memory_gib=1e6))
    worst = 0.0
    for method in plan.METHODS:
        for group in plan.configurations(method, GPUS, len(model[0]), micro_batches=(1, 8, 64)):
            for c in group:
                e = evaluate(target, c)
                seconds = [target.seconds(r, c.micro_batch_size, c.recompute) for r in e.ranges]
                bound = costmodel.speed_bound(c.method, c.pipeline_depth, c.data_parallel, seconds,
                                              c.micro_batch_size)
                worst = max(worst, e.samples_per_second / bound)
    assert 0.5 < worst <= plan.BOUND_SLACK


def test_stash_multiplicity_follows_the_schedules():
    n = 4
    assert stash_multiplicity("wpipe", n) == tuple([2 * n - s for s in range(n)] + [n - s for s in range(n)])
    assert stash_multiplicity("pipedream_2bw", n) == tuple(n - s for s in range(n))
    assert stash_multiplicity("gpipe", n) == (n,) * n


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
    balanced = balanced_ranges(workload((heavy, uniform_plan), hardware(budget_bytes=largest(uniform) / 2)),
                               method, n, b, False)
    assert [r.start for r in balanced][0] == 0 and balanced[-1].stop == len(heavy)
    assert all(a.stop == c.start for a, c in zip(balanced, balanced[1:])) and len(balanced) == 2 * n
    assert len(balanced[0]) < len(uniform[0])
    assert largest(balanced) < largest(uniform)
    # With memory to spare the cut balances time instead: the blocks' times are equal here.
    roomy = balanced_ranges(workload((heavy, uniform_plan), hardware(budget_bytes=2 ** 50)), method, n, b, False)
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
    parts = [costmodel.PartitionCost(range(p, p + 1), 0, 0, int(a), int(g), 0, 0, 0, 0, 0)
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
    speeds = {}
    for cost in (0, 5000):
        target = workload(model, hardware(p2p_cpu_us_per_mb=cost))
        for method in ("wpipe", "pipedream_2bw"):
            speeds[method, cost] = evaluate(target, Configuration(method, 2, 1, 8, False)).samples_per_second
    assert speeds["wpipe", 5000] < speeds["wpipe", 0] and speeds["pipedream_2bw", 5000] < speeds["pipedream_2bw", 0]
    assert (speeds["wpipe", 5000] / speeds["wpipe", 0]) < (speeds["pipedream_2bw", 5000] / speeds["pipedream_2bw", 0])


def test_per_update_costs_can_be_left_out(model):
    """Without optimizer steps and all-reduces a run is faster, and more so with data parallelism."""
    target = workload(model)
    ratios = {}
    for layout in ((4, 1), (1, 4)):
        c = Configuration("pipedream_2bw", *layout, 8, False)
        ratios[layout] = evaluate(target, c, per_update=False).samples_per_second / evaluate(target, c).samples_per_second
    assert 1 < ratios[4, 1] < ratios[1, 4]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load(preset):
    hw = load_hardware(preset)
    assert hw.gpu_memory_gib > 0 and hw.name and "fp32" in hw.peak_tflops
    assert hw.op_times != "fitted" or hw.profile_path


def test_v100_16gb_preset_is_the_2bw_papers_machine():
    """p3.16xlarge: 8 x V100 16 GB with NVLink, 25 Gb/s between nodes, op times fitted to
    the published V100 curves (BERT and ResNeXt, fp32 and fp16), no bf16."""
    hw = load_hardware(ROOT / "network_conf" / "hardware" / "v100_16gb_8x.yaml")
    big = load_hardware(ROOT / "network_conf" / "hardware" / "v100_32gb_8x.yaml")
    assert hw.memory_budget_bytes == 16 * 0.9 * 2 ** 30 == big.memory_budget_bytes / 2
    assert (hw.ranks_per_node, hw.inter_node_bandwidth_gbs) == (8, 2.8)
    assert hw.op_times == "fitted" and hw.profile_path == big.profile_path
    assert set(hw.peak_tflops) == {"fp32", "fp16"}
    from wpipe.planning.optimes import op_times
    for shape, network in (({"family": "bert", "hidden": 768, "seq": 128}, "BERT-Base"),
                           ({"family": "bert", "hidden": 1024, "seq": 512}, "BERT-Large"),
                           ({"family": "resnext", "image_size": 224}, "ResNeXt-101 32x4d")):
        for precision in ("fp32", "fp16"):
            times = op_times(hw, precision, shape)
            assert isinstance(times, FittedTimes) and times.curves[0].network == network
            assert times.curves[0].precision == precision
    with pytest.raises(ValueError, match="precision bf16 is not among its peak_tflops"):
        op_times(hw, "bf16", {"family": "bert", "hidden": 768, "seq": 128})


@pytest.mark.parametrize("change, message", [
    ({"gpu_memory_gib": -1}, "field 'gpu_memory_gib' must be a number > 0"),
    ({"efficiency": {"fp32": 1.5, "fp16": 0.5}}, "field 'efficiency' is a share, at most 1"),
    ({"efficiency": {"fp32": 0.5}}, "field 'efficiency' must name the precisions of peak_tflops"),
    ({"peak_tflops": {"fp8": 3}}, "field 'peak_tflops' must map precisions"),
    ({"peak_tflops": 15.7}, "field 'peak_tflops' must map precisions"),
    ({"ranks_per_node": 2.5}, "field 'ranks_per_node' must be an integer >= 1"),
    ({"op_times": "guess"}, "field 'op_times' must be one of flops, fitted, measured"),
    ({"op_times": "fitted", "profile": None}, "field 'profile' must name a profile YAML"),
    ({"profile": "../profiles/none.yaml"}, "field 'profile': .*none.yaml does not exist"),
    ({"gpu_mem": 3}, "unknown field 'gpu_mem'"),
    ({"intra_node_latency_us": True}, "field 'intra_node_latency_us' must be a number > 0 \\(or 0\\)"),
])
def test_bad_hardware_fields_are_named(tmp_path, change, message):
    preset = ROOT / "network_conf" / "hardware" / "v100_16gb_8x.yaml"
    raw = yaml.safe_load(preset.read_text())
    raw.update(change)
    folder = tmp_path / "hardware"
    folder.mkdir()
    (tmp_path / "profiles").symlink_to(ROOT / "network_conf" / "profiles")
    path = folder / "bad.yaml"
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


def plan_cli(capsys, *args) -> tuple[int, str, str]:
    code = plan_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_cli_bad_input_is_one_line(tmp_path, capsys):
    config = ROOT / "network_conf" / "nlp_tiny.yaml"
    v100 = ROOT / "network_conf" / "hardware" / "v100_16gb_8x.yaml"
    cpu = ROOT / "network_conf" / "hardware" / "cpu_2x1thread.yaml"
    missing = tmp_path / "none.yaml"
    cases = [
        (["--hardware", missing], f"error: hardware file {missing} does not exist "
                                  f"(presets: network_conf/hardware/*.yaml)"),
        (["--hardware", v100, "--methods", "wpipe,zb"], "error: --methods: unknown value 'zb'"),
        (["--hardware", v100, "--precisions", "bf16"], f"error: hardware {v100}: precision bf16 is not among"),
        (["--hardware", v100, "--layouts", "2x1,3x1"], "error: --layouts: 3x1 do not use --gpus 2 devices"),
        (["--hardware", v100, "--layouts", "2by1"], "error: --layouts: expected NxD"),
        (["--hardware", v100, "--micro-batches", "8,x"], "error: --micro-batches: expected integers"),
        (["--hardware", cpu], f"error: hardware {cpu}: op_times measured times every block on this CPU at each "
                              f"micro-batch size planned: name the sizes with --micro-batches"),
    ]
    for args, line in cases:
        code, _, err = plan_cli(capsys, "--config", config, "--gpus", 2, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(line), err


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_throughput_config_plans_or_names_what_is_missing(preset, capsys):
    """The whole grid, before anything is measured (--check): the op times each precision
    would use, or one error line; a measured preset asks for micro-batch sizes, and plans
    with them."""
    hw = load_hardware(preset)
    for config in THROUGHPUT_CONFIGS:
        for precisions in ("fp32", "fp32,fp16"):
            code, out, err = plan_cli(capsys, "--config", config, "--hardware", preset, "--gpus", 8,
                                      "--precisions", precisions, "--check")
            if hw.op_times == "measured" or "fp16" not in hw.peak_tflops and precisions != "fp32":
                assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
            else:
                assert code == 0 and err == ""
                assert [line.split(":")[0] for line in out.splitlines()[1:]] == \
                       [f"op times, {p}" for p in precisions.split(",")]
        if hw.op_times == "measured":
            code, out, err = plan_cli(capsys, "--config", config, "--hardware", preset, "--gpus", 8,
                                      "--micro-batches", 8, "--check")
            assert code == 0 and "seconds measured per block in this process" in out


def test_plan_cli_prints_the_table(tmp_path, capsys):
    """A real throughput configuration on a fitted preset, and the CPU preset with its one
    measured micro-batch size: the ranked table, then the best per method."""
    bert96 = ROOT / "network_conf" / "nlp_throughput_bert96.yaml"
    v100 = ROOT / "network_conf" / "hardware" / "v100_16gb_8x.yaml"
    code, out, err = plan_cli(capsys, "--config", bert96, "--hardware", v100, "--gpus", 2, "--methods",
                              "wpipe,pipedream_2bw", "--micro-batches", "1,2", "--recompute", "on", "--splits",
                              "uniform", "--cache-dir", tmp_path, "--json", tmp_path / "plan.json")
    assert code == 0 and err == ""
    assert "op times, fp32: fitted to BERT-Base (hidden 768, seq 128), fp32, forward" in out
    assert "best per method" in out and "wpipe" in out and "pipedream_2bw" in out
    rows = yaml.safe_load((tmp_path / "plan.json").read_text())
    assert {r["method"] for r in rows} == {"wpipe", "pipedream_2bw"} and all(r["precision"] == "fp32" for r in rows)
    cpu = ROOT / "network_conf" / "hardware" / "cpu_2x1thread.yaml"
    code, out, err = plan_cli(capsys, "--config", ROOT / "network_conf" / "nlp_tiny.yaml", "--hardware", cpu,
                              "--gpus", 2, "--micro-batches", 8, "--methods", "wpipe", "--cache-dir", "")
    assert code == 0 and err == "" and "fitting candidates" in out
