"""precision.py in process: the wire casts and their error bounds, the fp16 loss scaler's
rule as literal sequences, autocast in the oracle, and bad precision settings. (The engine
against the oracle under each setting: test_engine.py; runs that learn: test_nlp_main.py.)"""
import pytest
import torch

import wpipe
from wpipe.runtime import precision, reference
from wpipe.runtime.wire import REDUCED, Wire

import toy

FP16_EPS, BF16_EPS = 2.0 ** -11, 2.0 ** -8      # unit round-off of each format


def relative_error(got, want):
    return ((got - want).abs() / want.abs().clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", [1e-9, 1.0, 1e7])
def test_fp16_wire_keeps_relative_precision_at_any_magnitude(dtype, magnitude):
    """Scaled by a power of two before the cast: no overflow (1e7 > fp16's 65504) and no
    underflow (1e-9 < fp16's smallest normal), each element within fp16's round-off."""
    t = (torch.rand(1000, dtype=dtype) + 0.5) * magnitude * torch.where(torch.rand(1000) < 0.5, -1.0, 1.0).to(dtype)
    wire = Wire("fp16")
    sent, restore = wire.encode((t,))
    assert sent[0].dtype == torch.float16 and restore[0] == dtype
    got = wire.decode(sent, restore)[0]
    assert got.dtype == dtype
    assert relative_error(got, t) <= FP16_EPS
    assert torch.equal(wire.roundtrip((t,))[0], got), "the casts must be deterministic"
    if magnitude > 65504:
        assert torch.isinf(t.half()).any(), "a plain cast would overflow"


def test_bf16_wire_relative_precision():
    t = torch.randn(1000) * 1e30
    got = Wire("bf16").roundtrip((t,))[0]
    assert got.dtype == torch.float32 and relative_error(got, t) <= BF16_EPS


def test_wire_passes_non_finite_integer_and_half_tensors():
    bad = torch.tensor([1.0, float("inf"), float("nan"), -2.0])
    ids = torch.tensor([3, 70000])
    half = torch.tensor([1.5], dtype=torch.bfloat16)
    for name in ("fp16", "bf16"):
        got = Wire(name).roundtrip((bad, ids, half))
        assert torch.isinf(got[0][1]) and torch.isnan(got[0][2]) and got[0][3] == -2.0
        assert torch.equal(got[1], ids) and got[2].dtype == torch.bfloat16 and torch.equal(got[2], half)
    same = (bad, ids)
    assert Wire(None).roundtrip(same) == same


def test_across_round_trips_values_forward_and_gradients_backward():
    """The oracle's device boundary: what the engine's receiver gets forward, and the
    gradient message, cast on its own, backward."""
    wire = Wire("fp16")
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(5, dtype=torch.float64)
    y, s = wire.across((x * 3, scale))
    assert not s.requires_grad and torch.equal(y, wire.roundtrip((x.detach() * 3,))[0])
    upstream = torch.randn(5, dtype=torch.float64) * 1e-6
    y.backward(upstream)
    assert torch.equal(x.grad, 3 * wire.roundtrip((upstream,))[0])


def test_loss_scaler_rule():
    """Module docstring, rule 3: the synchronous group's verdict of period t moves
    S_{t+1}, the stale group's moves S_{t+2}; growth after `growth_interval` clean periods."""
    scaler = precision.LossScaler(8.0, growth_interval=2, lags={"stale": 1, "synchronous": 0})
    verdicts = {"synchronous": [False, True, False, False, False], "stale": [True, False, False, True]}
    assert scaler.missing(2) == [("synchronous", 0), ("stale", 0), ("synchronous", 1)]
    for group, values in verdicts.items():
        for t, bad in enumerate(values):
            scaler.record(group, t, bad)
    #          S0   S1: clean  S2: both bad  S3: clean  S4: 2nd clean: x2  S5: stale(3) bad
    assert [scaler.scale(t) for t in range(6)] == [8.0, 8.0, 4.0, 4.0, 8.0, 4.0]
    assert scaler.skipped() == {"stale": [0, 3], "synchronous": [1]}
    assert scaler.missing(6) == [("stale", 4), ("synchronous", 5)]
    restored = precision.LossScaler(1.0, 2, scaler.lags)
    restored.load_state_dict(scaler.state_dict())
    for group, t in [("stale", 4), ("synchronous", 5), ("stale", 5), ("synchronous", 6)]:
        restored.record(group, t, False)
    assert restored.scale(6) == 4.0 and restored.scale(7) == 8.0


def test_scaler_groups_follow_staleness():
    assert precision.scaler_groups("wpipe", 2) == {"stale": 1, "synchronous": 0}
    assert precision.scaler_groups("pipedream_2bw", 2) == {"stale": 1}
    assert precision.scaler_groups("gpipe", 4) == {"synchronous": 0}
    assert precision.Policy("bf16").make_scaler("wpipe", 2) is None


def test_reference_fp32_policy_changes_nothing():
    runs = []
    for policy in (None, precision.Policy("fp32")):
        partitions = [toy.build_partition(i, 4) for i in range(4)]
        losses = reference.train(partitions, toy.loss_fn, toy.OPTIMIZERS["adam"], toy.micro_batches(6), "wpipe", 2,
                                 policy=policy)
        runs.append((losses, [m.state_dict() for m in partitions]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(runs[0][1], runs[1][1]) for k in a)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_reference_autocasts_each_partition_and_computes_the_loss_in_fp32(name):
    seen = []

    def loss_fn(output, target):
        seen.append(output.dtype)
        return toy.loss_fn(output, target)
    linear = torch.nn.Linear(toy.WIDTH, toy.WIDTH)    # its output stays in the autocast dtype
    partitions = [torch.nn.Sequential(linear)]
    data = [(x.float(), t.float()) for (x, _), t in toy.micro_batches(2)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.dtype) or t, lambda t: t):
        reference.train(partitions, loss_fn, toy.OPTIMIZERS["sgd"], data, "gpipe", 1,
                        policy=precision.Policy(name, loss_scale_init=1.0))
    assert seen[0] == REDUCED[name], "the partition ran outside autocast"
    assert torch.float32 in seen[1:] and linear.weight.dtype == torch.float32


@pytest.mark.parametrize("fields, message", [
    ({"precision": "fp8"}, r"precision must be one of fp32, bf16, fp16, got 'fp8'"),
    ({"wire_dtype": "int8"}, r"wire_dtype must be fp16, bf16 or null \(no cast\), got 'int8'"),
    ({"p2p_backend": "mpi"}, r"p2p_backend must be one of auto, nccl, gloo, nccl_emulated, got 'mpi'"),
    ({"p2p_backend": "nccl", "backend": "gloo"}, r"p2p_backend nccl needs backend nccl or null, got backend gloo"),
    ({"loss_scale_init": 0.0}, r"loss_scale_init must be a finite number > 0, got 0.0"),
    ({"loss_scale_growth_interval": 0}, r"loss_scale_growth_interval must be an integer >= 1 \(periods\), got 0"),
])
def test_bad_precision_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        wpipe.PipelineConfig(**fields)


def test_precision_fields_from_text():
    cfg = wpipe.load_config(wpipe.PipelineConfig, None, {"precision": "bf16", "wire_dtype": "null",
                                                         "p2p_backend": "gloo", "loss_scale_init": "1024"})
    assert (cfg.precision, cfg.wire_dtype, cfg.p2p_backend, cfg.loss_scale_init) == ("bf16", None, "gloo", 1024.0)
