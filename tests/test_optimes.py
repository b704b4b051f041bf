"""Op times (wpipe.planning.optimes): the curve fit, its leave-one-out error on the published
points, the profile files and their provenance, the FLOP conventions the curves are carried
over with, the per-block rule, and the profile tool/profile_device.py writes."""
import dataclasses
import math

import pytest
import torch
import yaml
from torchvision.models.resnet import Bottleneck, ResNet

from launch import ROOT
from flop_model_error import main as flop_error_main
from model_chains import load_model
from profile_device import main as profile_main
from wpipe.planning.blockcost import Affine, BlockCost
from wpipe.planning.hardware import load_hardware
from wpipe.planning.measure import _flop_counter, cached_blocks
from wpipe.planning.optimes import (BACKWARD_PER_FORWARD, Curve, Fit, FittedTimes, FlopTimes, fit, leave_one_out,
                                    load_profile, model_shape, op_times, update_seconds)

PUBLISHED = ROOT / "network_conf" / "profiles" / "v100_published.yaml"
V100 = ROOT / "network_conf" / "hardware" / "v100_16gb_8x.yaml"


@pytest.mark.parametrize("truth", [Fit(0.0, 0.004, 0.002), Fit(0.02, 0.009, 0.0015)])
def test_fit_recovers_the_curve_it_was_given(truth):
    sizes = (1, 2, 4, 8, 16, 32, 64)
    found = fit({b: truth(b) for b in sizes})
    for b in sizes:
        assert found(b) == pytest.approx(truth(b), rel=1e-9)
    assert (found.floor, found.fixed, found.per_sample) == pytest.approx((truth.floor, truth.fixed, truth.per_sample))


def test_a_floor_needs_two_points_of_its_own():
    """One slow point at batch 1 is not a floor (which would fit any three points exactly):
    the line bends to it instead; two flat points are."""
    assert fit({1: 0.030, 2: 0.021, 4: 0.041}).floor == 0.0
    assert fit({1: 0.020, 2: 0.020, 4: 0.041, 8: 0.081}).floor == pytest.approx(0.020)


def test_leave_one_out_predicts_each_point_from_the_others():
    curve = Curve("bert", {"hidden": 768, "seq": 128}, "fp32", "forward", "net", 14, 1e10,
                  {1: 100.0, 2: 150.0, 4: 190.0, 8: 215.0}, {"url": "x"})
    rows = leave_one_out(curve)
    assert [b for b, _, _ in rows] == [1, 2, 4, 8]
    for b, measured, predicted in rows:
        others = {x: x / r for x, r in curve.points.items() if x != b}
        assert measured == curve.points[b] and predicted == pytest.approx(b / fit(others)(b))


def test_published_curves_fit_within_seven_percent_left_out():
    """Every published point, predicted by the fit to the others, within 7% (the worst is 6.7%)."""
    profile = load_profile(PUBLISHED)
    assert len(profile.curves) == 10
    for curve in profile.curves:
        for b, measured, predicted in leave_one_out(curve):
            assert abs(predicted / measured - 1) < 0.07, (curve.label, b)


def test_every_curve_names_its_source():
    for curve in load_profile(PUBLISHED).curves:
        source = curve.source
        assert source["repository"] == "NVIDIA/DeepLearningExamples"
        assert len(source["commit"]) == 40 and source["file"].endswith("README.md") and source["table"]


def test_bert_flops_follow_the_formula_the_curves_use():
    """A measured BERT layer does s (24 h^2 + 4 s h) FLOPs per sample (FFN 4h), the term of
    network_forward_flop; the published BERT curves' totals are that formula's."""
    model, cfg = load_model(ROOT / "network_conf" / "nlp_tiny.yaml", {"ffn": 256})
    h, s = cfg.hidden, cfg.max_seq_length
    layer = next(b for b in model.measure() if b.kind == "layer")
    assert layer.forward_flops(1) == layer.forward_flops(3) / 3 == s * (24 * h * h + 4 * s * h)
    for curve in load_profile(PUBLISHED).curves:
        if curve.family == "bert":
            h, s = curve.shape["hidden"], curve.shape["seq"]
            layers = curve.network_blocks - 2
            assert curve.network_forward_flop == layers * s * (24 * h * h + 4 * s * h) + 4 * s * h


def test_resnext101_flops_recounted():
    """ResNeXt-101 32x4d at 224 px, counted as wpipe.planning.measure counts."""
    with torch.device("meta"):
        net = ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
        with _flop_counter() as counter:
            net(torch.empty(1, 3, 224, 224))
    curve = next(c for c in load_profile(PUBLISHED).curves if c.family == "resnext")
    assert counter.get_total_flops() == curve.network_forward_flop
    assert curve.network_blocks == 1 + (3 + 4 + 23 + 3) + 1


@pytest.mark.parametrize("groups", [1, 32])
def test_convolution_backward_counts_twice_the_forward(groups):
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    with _flop_counter() as forward:
        y = conv(x)
    with _flop_counter() as backward:
        y.sum().backward()
    assert backward.get_total_flops() == 2 * forward.get_total_flops()


def block(forward_flops: float) -> BlockCost:
    return BlockCost("b", "layer", 4000, 8000, Affine(1, 1), Affine(1, 1), [], [], Affine(forward_flops, forward_flops),
                     Affine(2 * forward_flops, 2 * forward_flops), 10, 12)


def test_fitted_times_carry_the_network_curve_to_a_block():
    hw = load_hardware(V100)
    curve = next(c for c in load_profile(PUBLISHED).curves if c.family == "resnext" and c.precision == "fp32")
    f = curve.fit()
    times = FittedTimes(hw, curve)
    n, flop = curve.network_blocks, curve.network_forward_flop
    for flops, b in ((4e8, 1), (4e8, 64), (1e6, 32)):
        forward, backward, update = times.block_seconds(block(flops), b)
        assert forward == max(f.floor / n, f.fixed / n + flops * b * f.per_sample / flop)
        assert backward == BACKWARD_PER_FORWARD * forward
        assert update == update_seconds(block(flops), hw.memory_bandwidth_gbs) == 2 * (2 * 4000 + 8000) / 900e9
    # The whole network made of identical blocks runs at the curve's own speed.
    share = flop / n
    assert n * times.block_seconds(block(share), 16)[0] == pytest.approx(f(16))


def test_op_times_take_the_nearest_curve_or_say_why_not():
    hw = load_hardware(V100)
    nearest = op_times(hw, "fp32", {"family": "bert", "hidden": 768, "seq": 512})
    assert isinstance(nearest, FittedTimes) and nearest.curves[0].shape == {"hidden": 768, "seq": 384}
    assert "backward = 2 x forward (assumed)" in nearest.description
    fallback = op_times(hw, "fp32", None)
    assert isinstance(fallback, FlopTimes) and "fallback: the model's family is not known" in fallback.description
    flops = op_times(load_hardware(ROOT / "network_conf" / "hardware" / "h100_80gb_8x.yaml"), "fp16",
                     {"family": "bert", "hidden": 768, "seq": 128})
    assert isinstance(flops, FlopTimes) and flops.rate == 989e12 * 0.35


def test_model_shapes_from_descriptions():
    assert model_shape("bert_L96_h768_a12_f3072_v30522_s128_qqp_sdpa") == {"family": "bert", "hidden": 768, "seq": 128}
    assert model_shape("resnext200_32x4d_c102_px224") == {"family": "resnext", "image_size": 224}
    assert model_shape("bench") is None


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("source"), "field 'source' is missing"),
    (lambda c: c.update(family="gpt"), "field 'family' must be one of bert, resnext"),
    (lambda c: c.update(shape={"hidden": 768}), "field 'shape' must give hidden, seq"),
    (lambda c: c.update(points={1: 66.88}), "field 'points' must map at least two batch sizes"),
    (lambda c: c.update(network_forward_flop=0), "field 'network_forward_flop' must be a number > 0"),
    (lambda c: c.update({"pass": "both"}), "field 'pass' must be one of forward, backward"),
])
def test_bad_profiles_name_the_field(tmp_path, change, message):
    raw = yaml.safe_load(PUBLISHED.read_text())
    change(raw["curves"][0])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=f"{path}: curves\\[0\\]: {message}"):
        load_profile(path)


@pytest.mark.distributed   # it asks git for the commit
def test_profile_device_writes_a_profile_the_planner_fits(tmp_path, capsys):
    """The prepared GPU command, on this CPU with tiny models: forward and backward curves
    per model and precision, with the device, command and commit as their source; a preset
    pointing at it takes measured backward curves instead of the 2 x rule."""
    out = tmp_path / "profiles" / "cpu.yaml"
    assert profile_main(["--configs", "network_conf/nlp_tiny.yaml,network_conf/cv_tiny.yaml", "--micro-batches",
                         "2,4", "--precisions", "fp32,bf16", "--repeats", "1", "--output", str(out),
                         "--cache-dir", ""]) == 0
    profile = load_profile(out)
    assert {(c.family, c.precision, c.pass_) for c in profile.curves} == {
        (f, p, k) for f in ("bert", "resnext") for p in ("fp32", "bf16") for k in ("forward", "backward")}
    curve = profile.curves[0]
    assert set(curve.points) == {2, 4} and curve.source["device"].startswith("CPU") and curve.source["command"]
    assert curve.network_blocks == 6 and curve.shape == {"hidden": 64, "seq": 32}
    preset = yaml.safe_load(V100.read_text())
    preset.update(profile="../profiles/cpu.yaml", peak_tflops={"fp32": 1, "bf16": 1}, efficiency={"fp32": 1, "bf16": 1})
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "cpu.yaml").write_text(yaml.safe_dump(preset))
    hw = load_hardware(tmp_path / "hardware" / "cpu.yaml")
    times = op_times(hw, "bf16", {"family": "bert", "hidden": 64, "seq": 32})
    assert isinstance(times, FittedTimes) and times.curves[1].pass_ == "backward"
    assert profile_main(["--configs", "network_conf/cv_tiny.yaml", "--micro-batches", "1,2", "--precisions", "fp32",
                         "--output", str(tmp_path / "x.yaml"), "--cache-dir", ""]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: resnext_tiny_c10_px32 at micro-batch 1, fp32: image_size 32 px with micro_batch_size 1: ResNeXt "
        "downsamples it to 1 x 1 px, where BatchNorm (training) sees one value per channel")


def test_flop_model_error_is_the_model_over_the_measured(tmp_path, capsys):
    """A profile measured at half the FLOP model's speed reads 2.00 at every point; a
    profile of another model is one error line."""
    hardware = ROOT / "network_conf" / "hardware" / "h200_141gb_8x.yaml"
    model = load_model(ROOT / "network_conf" / "nlp_tiny.yaml")[0]
    blocks = cached_blocks(model, None)
    times = FlopTimes(load_hardware(hardware), "fp32")
    shape = model_shape(model.description)
    family = shape.pop("family")
    curves = [{"family": family, "network": model.description, "shape": shape, "precision": "fp32",
               "pass": pass_, "network_blocks": len(blocks),
               "network_forward_flop": sum(b.forward_flops(1) for b in blocks), "source": {"device": "half"},
               "points": {b: b / sum(times.block_seconds(x, b)[column] for x in blocks) / 2 for b in (2, 4)}}
              for column, pass_ in enumerate(("forward", "backward"))]
    profile = tmp_path / "half.yaml"
    profile.write_text(yaml.safe_dump({"device": "half", "curves": curves}))
    args = ["--hardware", str(hardware), "--profile", str(profile), "--cache-dir", ""]
    assert flop_error_main([*args, "--configs", "network_conf/nlp_tiny.yaml"]) == 0
    table = capsys.readouterr().out
    assert "| fp32 | forward | 2.00 | 2.00 |" in table and "| fp32 | backward | 2.00 | 2.00 |" in table
    assert flop_error_main([*args, "--configs", "network_conf/cv_tiny.yaml"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {profile} measured no curve of resnext_tiny_c10_px32"


def test_a_measured_backward_curve_replaces_the_rule():
    hw = load_hardware(V100)
    forward = Curve("bert", {"hidden": 64, "seq": 32}, "fp32", "forward", "net", 4, 4e9, {1: 100.0, 2: 180.0},
                    {"url": "x"})
    backward = dataclasses.replace(forward, pass_="backward", points={1: 40.0, 2: 70.0})
    times = FittedTimes(hw, forward, backward)
    f, bwd, _ = times.block_seconds(block(1e9), 2)
    assert f == pytest.approx(forward.fit()(2) / 4) and bwd == pytest.approx(backward.fit()(2) / 4)
    assert not math.isclose(bwd, BACKWARD_PER_FORWARD * f)
