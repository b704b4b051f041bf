"""The distributed engine equals the single-process reference, to float64 round-off.

Precision cases (precision.py) too: a reduced-precision wire on the float64 model is as
exact (the casts are deterministic); the fp16 loss scaler's overflows, skips and scales
equal the reference's; autocast runs on a float32 model match to AUTOCAST_TOLERANCE.

Each launch runs many cases in one process group (start-up dominates the cost); the
workers save their partitions' weights, and the test compares every parameter, by name,
with `wpipe.reference.train` on the same partitions and micro-batches.
"""
import glob
import re
import socket

import pytest
import torch
import torch.distributed as dist

import wpipe
from wpipe.runtime import precision, reference

import toy
from launch import ROOT, run_ok, torchrun

WORKER = ROOT / "tests" / "workers" / "engine_cases.py"
METHODS = list(wpipe.schedule.PIPELINES)
FP16_OVERFLOWS = ("fp16", "scale18", "grow1")   # 2^18 overflows fp16 gradients for a few periods
# Under autocast the engine runs the same kernels on the same float32/fp16/bf16 values as
# the reference, in the same order, on one thread: the results agree bit for bit in
# practice (measured: a difference of 0 in every case below). What may differ is float32 round-off where the engine's graph is cut at a
# device boundary (an accumulation order); one such ulp can flip a later fp16/bf16
# rounding (2^-11 / 2^-8 relative) of one element. Weights of size ~1 after a few
# updates at lr 0.01 move by far less than that bound: 1e-5 would still catch a wrong
# scale, a wrong skip, a missing autocast or a wrong version, each off by >= 1e-3.
AUTOCAST_TOLERANCE = 1e-5


def case(method, depth, dp, optimizer="sgd", layout="pipeline_major", periods=3, flags=()):
    return ":".join([method, str(depth), str(dp), layout, optimizer, str(periods), *flags])


# Under NCCL's rules on gloo (p2p_backend nccl_emulated: each communicator created at its
# first use, here the warm-up; receives posted when their op runs; sends complete once received).
EMULATED_TWO = (
    [case(m, 2, 1, opt, flags=("emulated",)) for m in METHODS for opt in ("sgd", "adam")]
    + [case("data_parallel", 1, 2, "adam", flags=("emulated",)),
       case("wpipe", 2, 1, "adam", periods=2, flags=("emulated", "twice")),
       case("wpipe", 2, 1, flags=("emulated", "recompute", "wire_fp16"))]
)
EMULATED_FOUR = (
    [case(m, 4, 1, flags=("emulated",)) for m in METHODS] + [case("wpipe", 4, 1, "adam", flags=("emulated",))]
    + [case(m, 2, 2, layout=layout, flags=("emulated",)) for m in METHODS
       for layout in ("pipeline_major", "replica_major")]
)

TWO_PROCESSES = (
    [case(m, 2, 1, opt) for m in METHODS for opt in ("sgd", "adam")]
    + [case("data_parallel", 1, 2, opt) for opt in ("sgd", "adam")]
    + [case("data_parallel", 1, 2, "adam", flags=("m3",)),                 # DDP accumulates, then averages
       case("data_parallel", 1, 2, flags=("m2", "recompute"))]
    + [case("wpipe", 1, 2, "adam"),                       # both partitions on one device, and D = 2
       case("wpipe", 2, 1, flags=("recompute",)),
       case("pipedream_2bw", 2, 1, flags=("recompute",)),
       case("wpipe", 2, 1, "adam", periods=2, flags=("twice",)),
       case("pipedream_2bw", 2, 1, "adam", periods=2, flags=("twice",)),
       case("wpipe", 2, 1, "adam", periods=2, flags=("resume",)),
       case("pipedream_2bw", 2, 1, flags=("m4",)),
       case("gpipe", 2, 1, flags=("m3",))]
    + [case(m, 2, 1, opt, flags=(wire,)) for m, opt, wire in (
        ("wpipe", "sgd", "wire_fp16"), ("wpipe", "adam", "wire_bf16"), ("pipedream_2bw", "adam", "wire_fp16"),
        ("pipedream_flush", "sgd", "wire_bf16"), ("gpipe", "adam", "wire_fp16"))]
    + [case(m, 2, 1, "adam", periods=8, flags=FP16_OVERFLOWS) for m in ("wpipe", "pipedream_2bw", "gpipe")]
    + [case("wpipe", 2, 1, "adam", periods=8, flags=(*FP16_OVERFLOWS, "recompute", "wire_fp16")),
       case("wpipe", 2, 1, "adam", periods=4, flags=(*FP16_OVERFLOWS, "resume")),   # the scaler's state resumes
       case("data_parallel", 1, 2, "adam", periods=6, flags=FP16_OVERFLOWS),
       case("wpipe", 2, 1, "adam", flags=("bf16",)),
       case("pipedream_flush", 2, 1, "adam", flags=("bf16", "recompute"))]
    + EMULATED_TWO
)
FOUR_PROCESSES = (
    [case(m, 4, 1) for m in METHODS] + [case("wpipe", 4, 1, "adam")]
    + [case(m, 2, 2, layout=layout) for m in METHODS for layout in ("pipeline_major", "replica_major")]
    + [case("wpipe", 2, 2, "adam", layout="replica_major"),
       case("wpipe", 4, 1, "adam", periods=8, flags=FP16_OVERFLOWS),
       case("wpipe", 2, 2, "adam", periods=8, flags=(*FP16_OVERFLOWS, "wire_fp16"))]
    + EMULATED_FOUR
)
# Ranks sharing one GPU, point to point staged through pinned CPU buffers (p2p_backend gloo).
CUDA_TWO = [case(m, 2, 1, "adam", flags=("cuda",)) for m in METHODS] + [case("data_parallel", 1, 2, flags=("cuda",))]
CUDA_FOUR = [case(m, 4, 1, flags=("cuda",)) for m in METHODS] + [case("wpipe", 2, 2, "adam", flags=("cuda",))]
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the GPU path is not exercised")


def reference_result(name):
    method, depth, dp, layout, optimizer, periods, *flags = name.split(":")
    depth, dp = int(depth), int(dp)
    period = next((int(f[1:]) for f in flags if f.startswith("m")), None)
    cfg = wpipe.PipelineConfig(method=method, pipeline_depth=depth, data_parallel=dp,
                               micro_batches_per_update=period, **toy.precision_fields(flags))
    count = int(periods) * cfg.period * (2 if {"twice", "resume"} & set(flags) else 1)
    num_partitions = wpipe.schedule.num_partitions(method, depth)
    dtype = toy.model_dtype(flags)
    partitions = [toy.build_partition(i, num_partitions).to(dtype) for i in range(num_partitions)]
    data = [toy.cast(toy.micro_batches(count, replica=r), dtype) for r in range(dp)]
    policy = precision.Policy.from_config(cfg, "cpu")
    scaler = policy.make_scaler(method, depth)
    losses = reference.train(partitions, toy.loss_fn, toy.OPTIMIZERS[optimizer],
                             data[0] if dp == 1 else data, method, depth,
                             micro_batches_per_update=period, data_parallel=dp, policy=policy, scaler=scaler)
    return partitions, losses, count // cfg.period, scaler


def assert_matches_reference(out_dir, name):
    partitions, losses, periods, scaler = reference_result(name)
    flags = name.split(":")[6:]
    tolerance = AUTOCAST_TOLERANCE if toy.model_dtype(flags) == torch.float32 else 1e-10
    results = [torch.load(f, weights_only=False) for f in sorted(glob.glob(f"{glob.escape(str(out_dir))}/{name}.rank*.pt"))]
    assert results, f"no results for {name}"
    held = set()
    for result in results:
        for p, state in result["state"].items():
            held.add(p)
            expected = partitions[p].state_dict()
            for key, value in state.items():
                diff = (value - expected[key]).abs().max().item()
                assert diff < tolerance, f"{name}: partition {p} {key} differs from the reference by {diff:.3g}"
        assert [t for t, _ in result["periods_seen"]] == list(range(len(result["periods_seen"])))
        if scaler:
            assert result["precision"]["loss_scale_changes"] == scaler.changes(periods), name
            assert result["precision"]["overflow_skips"] == scaler.skipped(), name
    assert held == set(range(len(partitions))), f"{name}: partitions held {sorted(held)}"
    loss_ranks = [r for r in results if r["losses"]]
    dp = int(name.split(":")[2])
    assert len(loss_ranks) == dp
    mean = [sum(r["losses"][t] for r in loss_ranks) / dp for t in range(periods)]
    assert mean == pytest.approx(losses, abs=1e-12 if tolerance == 1e-10 else tolerance)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine2")
    run_ok(WORKER, 2, [out, *TWO_PROCESSES], timeout=300)
    return out


@pytest.fixture(scope="module")
def four_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine4")
    run_ok(WORKER, 4, [out, *FOUR_PROCESSES], timeout=300)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("name", TWO_PROCESSES)
def test_two_processes_match_reference(two_process_results, name):
    assert_matches_reference(two_process_results, name)


@pytest.mark.distributed
@pytest.mark.parametrize("name", FOUR_PROCESSES)
def test_four_processes_match_reference(four_process_results, name):
    assert_matches_reference(four_process_results, name)


@pytest.mark.distributed
@NO_CUDA
@pytest.mark.parametrize("nproc, cases", [(2, CUDA_TWO), (4, CUDA_FOUR)])
def test_cuda_ranks_sharing_a_gpu_match_reference(tmp_path, nproc, cases):
    run_ok(WORKER, nproc, [tmp_path, *cases], timeout=300)
    for name in cases:
        assert_matches_reference(tmp_path, name)
        memory = torch.load(f"{tmp_path}/{name}.rank0.pt", weights_only=False)["memory"]
        assert memory["peak_kind"] == "cuda_max_allocated", f"{name} did not run on the GPU"


@pytest.mark.distributed
def test_weight_versions_held(two_process_results):
    """wpipe holds 1.5 copies of its device's weights, 2bw two, the others one."""
    def weights(name, rank):
        memory = torch.load(f"{two_process_results}/{name}.rank{rank}.pt", weights_only=False)["memory"]
        return memory["weights_bytes"]
    one_copy = sum(p.numel() * 8 for p in toy.build_partition(0, 4).parameters())  # every block is the same size
    for rank in (0, 1):
        assert weights(case("wpipe", 2, 1), rank) == 3 * one_copy           # G0: 2 versions, G1: 1
        assert weights(case("pipedream_2bw", 2, 1), rank) == 2 * one_copy
        assert weights(case("pipedream_flush", 2, 1), rank) == one_copy
        assert weights(case("gpipe", 2, 1), rank) == one_copy


@pytest.mark.distributed
def test_stashed_activations(two_process_results):
    """Peak stash follows the memory model: gpipe m micro-batches per stage, 1F1B N-s, and
    wpipe 2N-s half-size partitions; recomputation keeps less."""
    def stash(name, rank):
        return torch.load(f"{two_process_results}/{name}.rank{rank}.pt", weights_only=False)["memory"]["activations_bytes"]
    for rank in (0, 1):
        assert stash(case("wpipe", 2, 1, flags=("recompute",)), rank) < stash(case("wpipe", 2, 1), rank)
    assert stash(case("pipedream_flush", 2, 1), 0) > stash(case("pipedream_flush", 2, 1), 1)
    assert stash(case("wpipe", 2, 1), 0) > stash(case("wpipe", 2, 1), 1)


# ---------------------------------------------------------------- bad input, in process

@pytest.fixture
def single_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_world_size_must_match(single_process_group):
    cfg = wpipe.PipelineConfig(method="wpipe", pipeline_depth=2)
    with pytest.raises(ValueError, match=r"world size is 1 but pipeline_depth 2 x data_parallel 1 = 2"):
        wpipe.Pipeline(lambda i: toy.build_partition(i, 4), toy.loss_fn, toy.OPTIMIZERS["sgd"], cfg)


def test_build_partition_must_return_a_module(single_process_group):
    cfg = wpipe.PipelineConfig(method="gpipe", pipeline_depth=1)
    with pytest.raises(TypeError, match=r"build_partition\(0\) returned function, expected a torch.nn.Module"):
        wpipe.Pipeline(lambda i: (lambda x: x), toy.loss_fn, toy.OPTIMIZERS["sgd"], cfg)


def test_micro_batches_must_fill_whole_periods(single_process_group):
    cfg = wpipe.PipelineConfig(method="wpipe", pipeline_depth=1, micro_batches_per_update=None)
    pipe = wpipe.Pipeline(lambda i: toy.build_partition(i, 2), toy.loss_fn, toy.OPTIMIZERS["sgd"], cfg)
    cfg2 = wpipe.PipelineConfig(method="gpipe", pipeline_depth=1, micro_batches_per_update=2)
    pipe2 = wpipe.Pipeline(lambda i: toy.build_partition(i, 1), toy.loss_fn, toy.OPTIMIZERS["sgd"], cfg2)
    with pytest.raises(ValueError, match=r"num_micro_batches must be a positive multiple of the period "
                                         r"\(micro_batches_per_update = 2\), got 3"):
        pipe2.train(toy.micro_batches(3))
    assert len(pipe.train(toy.micro_batches(2))) == 2


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'wpip': choose one of wpipe, pipedream_2bw"):
        wpipe.PipelineConfig(method="wpip")


def test_failing_stage_is_reported_in_process(single_process_group):
    """An exception inside a partition names rank, step and op, with the grid."""
    class Broken(torch.nn.Module):
        def forward(self, x, scale):
            raise ValueError("boom")
    cfg = wpipe.PipelineConfig(method="gpipe", pipeline_depth=1)
    pipe = wpipe.Pipeline(lambda i: Broken(), toy.loss_fn, lambda p: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), cfg)
    with pytest.raises(RuntimeError, match=r"(?s)rank 0 \(replica 0, device 0\), step 0, op 0F0: ValueError: boom.*<-- device 0, step 0"):
        pipe.train(toy.micro_batches(1))


# ---------------------------------------------------------------- a rank that stops

FAILING = ROOT / "tests" / "workers" / "failing_rank.py"
LAZY = ROOT / "tests" / "workers" / "lazy_creation.py"


@pytest.mark.distributed
def test_stuck_rank_times_out_with_a_clear_message():
    code, out = torchrun(FAILING, 2, ["hang"], timeout=120)
    assert code != 0
    assert re.search(r"rank 0, op 1B\d+: waited for the header of the input gradients of op 2B\d+ from rank 1 "
                     r"and none came within 3 s.*Likely cause: rank 1 stopped", out) or \
        re.search(r"rank 0, op \d[FB]\d+: waited for .* from rank 1 and none came within 3 s", out), out[-4000:]


@pytest.mark.distributed
def test_dead_rank_fails_the_launch():
    code, out = torchrun(FAILING, 2, ["exit"], timeout=120)
    assert code != 0, out[-4000:]


@pytest.mark.distributed
def test_lazy_communicator_creation_deadlocks_wpipe():
    """NCCL's default, emulated: a communicator is created at its first use, which waits
    for every member's. wpipe at depth 2 in one call of three periods: rank 0 blocks in
    2B0, sending the first message of stream B2, while rank 1 waits in 1F2 for 0F2's
    output; each rank's timeout names its op and the rank it waited for. communicators
    eager (the default) runs this call: the emulated cases above."""
    code, out = torchrun(LAZY, 2, ["lazy"], timeout=120)
    assert code != 0, out[-4000:]
    assert ("rank 0, op 2B0: its first use of the data group of stream B2 waited for rank 1's first use, which "
            "did not come within 3 s (NCCL creates a communicator at its first use") in out, out[-4000:]
    assert "rank 1, op 1F2: waited for the header of the output of op 0F2 from rank 0 and none came within 3 s" in out


def test_fp16_cases_overflow_skip_and_regrow():
    """The fp16 cases above exercise what they claim: updates skipped in every group, the
    scale lowered and raised again."""
    for name in [n for n in TWO_PROCESSES + FOUR_PROCESSES if "fp16" in n.split(":")]:
        *_, scaler = reference_result(name)
        assert all(scaler.skipped().values()), f"{name}: no skipped update in some group: {scaler.skipped()}"
        assert min(scaler.scales) < scaler.scales[0], name
        assert any(b > a for a, b in zip(scaler.scales, scaler.scales[1:])), f"{name}: the scale never grew"
