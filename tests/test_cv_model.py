"""cv.model against real torchvision ResNeXt models: structure, init, exact forward."""
import logging

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet

from cv.model import build_resnext_partition, check_image_size, num_blocks, resnext_partition_plan, resnext_spec
from wpipe.planning import partition


def _torchvision(name, num_classes):
    if name == "resnext_tiny":
        return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, groups=8,
                      width_per_group=8)
    return getattr(torchvision.models, name)(num_classes=num_classes)


def _partitions(name, num_partitions, num_classes, **kwargs):
    return [build_resnext_partition(i, num_partitions, name, num_classes, **kwargs)
            for i in range(num_partitions)]


def _run(parts, x):
    for p in parts:
        x = p(x)
    return x


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _assert_same_outputs(parts, model, x):
    with torch.no_grad():
        for train in (True, False):  # batch statistics, then running statistics
            model.train(train)
            for p in parts:
                p.train(train)
            diff = _max_diff(_run(parts, x), model(x))
            assert diff <= 1e-5, f"train={train}: max |partitions - torchvision| = {diff}"


def test_partition_weights_in_torchvision_give_the_same_outputs():
    parts = _partitions("resnext_tiny", 3, num_classes=10)
    model = _torchvision("resnext_tiny", 10)
    merged = {}
    for p in parts:
        assert not merged.keys() & p.state_dict().keys()
        merged.update(p.state_dict())
    model.load_state_dict(merged, strict=True)  # same keys, same shapes
    _assert_same_outputs(parts, model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name, num_partitions", [("resnext_tiny", 2), ("resnext50_32x4d", 4)])
def test_pretrained_partitions_equal_torchvision(tmp_path, name, num_partitions):
    torch.manual_seed(0)
    model = _torchvision(name, 1000)
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # move BatchNorm running statistics off 0/1
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    parts = _partitions(name, num_partitions, num_classes=1000, pretrained=path)
    _assert_same_outputs(parts, model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", ["resnext_tiny", "resnext50_32x4d", "resnext101_32x8d"])
def test_every_layer_matches_torchvision(name):
    num_partitions = 5
    with torch.device("meta"):  # shapes and hyper-parameters only: cheap for any depth
        model = _torchvision(name, 1000)
        parts = _partitions(name, num_partitions, num_classes=1000)
    reference, reference_state = dict(model.named_modules()), model.state_dict()
    seen = []
    for p in parts:
        for key, value in p.state_dict().items():
            assert value.shape == reference_state[key].shape, key
        for module_name, module in p.named_modules():
            if not list(module.children()) and module_name:  # leaves: conv, bn, relu, ...
                assert repr(module) == repr(reference[module_name]), module_name
        seen += list(p.state_dict())
    assert sorted(seen) == sorted(reference_state)
    plan = resnext_partition_plan(name, num_partitions)
    assert [p.block_names for p in parts] == plan
    assert sum(map(len, plan)) == num_blocks(name) == sum(resnext_spec(name).layers) + 2


def test_resnext101_32x8d_partitions_build_for_real():
    first = build_resnext_partition(0, 8, "resnext101_32x8d", 100)
    last = build_resnext_partition(7, 8, "resnext101_32x8d", 100)
    assert first.block_names == ["stem", "layer1.0", "layer1.1", "layer1.2"]
    assert last.block_names[-1] == "head"
    assert last.fc.weight.shape == (100, 2048)
    assert first.layer1["0"].conv2.groups == 32 and first.layer1["0"].conv2.in_channels == 256


@pytest.mark.parametrize("depth, layers", [
    (50, (3, 4, 6, 3)), (101, (6, 8, 12, 6)), (152, (9, 12, 18, 9)),
    (200, (12, 16, 24, 12)), (302, (18, 24, 36, 18)), (500, (30, 40, 60, 30)),
    (800, (48, 64, 96, 48)),
])
def test_paper_family_block_counts(depth, layers):
    spec = resnext_spec(f"resnext{depth}_32x4d")
    assert (spec.layers, spec.groups, spec.width_per_group) == (layers, 32, 4)
    assert num_blocks(f"resnext{depth}_32x4d") == sum(layers) + 2


def test_torchvision_specs():
    assert resnext_spec("resnext50_32x4d").layers == (3, 4, 6, 3)
    spec = resnext_spec("resnext101_32x8d")
    assert (spec.layers, spec.groups, spec.width_per_group) == ((3, 4, 23, 3), 32, 8)


def test_partitions_built_apart_form_one_network():
    whole = build_resnext_partition(0, 1, "resnext_tiny", 10, seed=3).state_dict()
    for num_partitions in (2, 6):
        for i in range(num_partitions):
            for key, value in build_resnext_partition(
                    i, num_partitions, "resnext_tiny", 10, seed=3).state_dict().items():
                assert torch.equal(value, whole[key]), (num_partitions, i, key)
    other = build_resnext_partition(0, 1, "resnext_tiny", 10, seed=4).state_dict()
    assert not torch.equal(other["conv1.weight"], whole["conv1.weight"])


def test_initialisation_is_torchvisions():
    part = build_resnext_partition(3, 4, "resnext50_32x4d", 10)  # layer3.5 .. head
    conv = part.layer3["5"].conv1.weight  # (512, 1024, 1, 1)
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / fan_out)
    assert conv.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.02)
    assert conv.mean().abs().item() < 1e-3
    bn = part.layer4["0"].downsample[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    bound = 2048 ** -0.5  # nn.Linear default: uniform(-1/sqrt(in), 1/sqrt(in))
    assert part.fc.weight.abs().max() <= bound and part.fc.weight.abs().max() > 0.9 * bound
    assert part.layer4["2"].bn3.weight.eq(1).all()  # zero_init_residual=False


def test_balance_params_uses_parameter_counts():
    name, n = "resnext50_32x4d", 4

    def sizes(parts):
        return [sum(p.numel() for p in q.parameters()) for q in parts]

    with torch.device("meta"):
        blocks = _partitions(name, 18, num_classes=10)  # one block per partition
        parts = _partitions(name, n, num_classes=10, balance="params")
        uniform = _partitions(name, n, num_classes=10)
    names = [b.block_names[0] for b in blocks]
    expected = [[names[i] for i in r] for r in partition.balanced(sizes(blocks), n)]
    assert resnext_partition_plan(name, n, balance="params", num_classes=10) == expected
    assert [p.block_names for p in parts] == expected
    assert max(sizes(parts)) < max(sizes(uniform))


def test_pretrained_with_other_classes_keeps_seeded_fc(tmp_path, caplog):
    model = _torchvision("resnext_tiny", 1000)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="cv.model"):
        head = build_resnext_partition(1, 2, "resnext_tiny", 10, pretrained=path, seed=5)
    assert "has fc for 1000 classes, 10 asked: fc is initialised from the seed" in caplog.text
    fresh = build_resnext_partition(1, 2, "resnext_tiny", 10, seed=5)
    assert torch.equal(head.fc.weight, fresh.fc.weight)
    assert torch.equal(head.layer4["0"].conv2.weight, model.layer4[0].conv2.weight)


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pretrained file not found: .*nope\.pth "
                       r"\(expected torch\.save\(model\.state_dict\(\)\) of torchvision's"):
        build_resnext_partition(0, 2, "resnext_tiny", 10, pretrained=tmp_path / "nope.pth")
    path = tmp_path / "tiny.pth"
    torch.save(_torchvision("resnext_tiny", 10).state_dict(), path)
    with pytest.raises(ValueError, match=r"tiny\.pth lacks 36 keys of this partition of "
                       r"resnext50_32x4d, e\.g\. \['layer1\.1\.conv1\.weight'"):
        build_resnext_partition(0, 4, "resnext50_32x4d", 10, pretrained=path)
    with pytest.raises(ValueError, match=r"does not fit resnext50_32x4d: shapes differ for .* "
                       r"keys, e\.g\. \['layer1\.0\.conv1\.weight \(64, 64, 1, 1\) "
                       r"\(expected \(128, 64, 1, 1\)\)"):
        build_resnext_partition(1, 18, "resnext50_32x4d", 10, pretrained=path)


def test_errors():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50': valid names are "
                       r"resnext\{D\}_32x4d with 50 <= D <= 800 .*resnext101_32x8d"):
        resnext_spec("resnet50")
    with pytest.raises(ValueError, match="unknown model 'resnext900_32x4d'"):
        num_blocks("resnext900_32x4d")
    with pytest.raises(ValueError, match=r"resnext_tiny has 6 blocks \(stem, 4 Bottleneck "
                       r"blocks, head\) but 8 partitions were asked for.*use at most 6"):
        build_resnext_partition(0, 8, "resnext_tiny", 10)
    with pytest.raises(ValueError, match="partition index 2 is out of range for 2 partitions"):
        build_resnext_partition(2, 2, "resnext_tiny", 10)
    with pytest.raises(ValueError, match=r"unknown balance 'flops': valid values are"):
        resnext_partition_plan("resnext_tiny", 2, balance="flops")
    with pytest.raises(ValueError, match=r"image_size 16 px is too small for ResNeXt.*>= 32"):
        check_image_size(16)
    check_image_size(32)


def test_partition_boundary_tensors_are_not_modified_in_place():
    parts = _partitions("resnext_tiny", 6, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    for p in parts:
        before = x.clone()
        y = p(x)
        assert torch.equal(x, before), p.block_names  # the runtime may still need its input
        x = y.detach()
