"""cv/main.py end to end: 2-process runs write summary.json with every contract key, and
bad settings or files fail in make_task, before any process group or output exists."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

from cv.fixtures import write_cifar_copy
from cv.main import CvConfig, make_task
from tool.replay import replay
from wpipe import load_config

from launch import ROOT, run_ok

MAIN = ROOT / "cv" / "main.py"
TINY = ROOT / "network_conf" / "cv_tiny.yaml"
SMALL = {"micro_batch_size": "4", "epochs": "1", "max_periods_per_epoch": "2", "max_eval_batches": "2",
         "warmup_periods": "1", "log_every": "1"}
MEMORY_KEYS = {"weights_bytes", "activations_bytes", "optimizer_state_bytes", "peak_bytes"}


def task(tmp_path, **overrides):
    """What the runner does before any process group: load the config, make the task."""
    cfg = load_config(CvConfig, TINY, {"output_dir": str(tmp_path / "out"), **overrides})
    return make_task(cfg)


def cli(overrides: dict) -> list:
    return ["--config", TINY, *[x for k, v in overrides.items() for x in (f"--{k}", v)]]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar_copy(root, "cifar10", num_train=48, num_test=12, seed=0)
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("method, depth, dp", [("wpipe", 2, 1), ("pipedream_2bw", 2, 1), ("data_parallel", 1, 2)])
def test_trains_on_cifar_and_writes_summary(tmp_path, cifar, method, depth, dp):
    out = tmp_path / "out"
    run_ok(MAIN, 2, cli({**SMALL, "method": method, "pipeline_depth": str(depth), "data_parallel": str(dp),
                         "data_dir": str(cifar), "verify_data": "false", "output_dir": str(out)}))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["pipeline_depth"], summary["data_parallel"]) == (method, depth, dp)
    assert summary["micro_batch_size"] == 4
    assert summary["samples_per_second"] > 0 and summary["final_loss"] > 0
    assert set(summary["eval"]) == {"test_top1"} and 0 <= summary["eval"]["test_top1"] <= 1
    assert [r["rank"] for r in summary["memory"]] == [0, 1]
    assert all(MEMORY_KEYS <= set(r) and r["weights_bytes"] > 0 for r in summary["memory"])
    assert (out / "config.yaml").is_file()


@pytest.mark.distributed
def test_trains_on_digits_and_writes_summary(tmp_path):
    """The real handwritten digits, no data_dir: a short wpipe run learns them."""
    out = tmp_path / "out"
    run_ok(MAIN, 2, cli({"dataset": "digits", "epochs": "1", "max_periods_per_epoch": "40",
                         "max_eval_batches": "8", "output_dir": str(out)}))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["dataset"] == "digits" and summary["config"]["data_dir"] is None
    assert set(summary["eval"]) == {"test_top1"}
    assert summary["eval"]["test_top1"] > 0.3          # chance is 0.1; 0.56 here

    # The same run through the single-process oracle (tool/replay.py): same data, initial
    # weights and schedule, wpipe's rule applied literally, in one process.
    replayed = replay(out, {})
    assert replayed["method"] == "wpipe" and replayed["periods"] == 40
    assert replayed["engine_max_abs_diff"] < 1e-5      # float32 rounding; 4.8e-7 here
    assert abs(replayed["eval"]["test_top1"] - summary["eval"]["test_top1"]) <= 1 / 128


@pytest.mark.distributed
def test_throughput_on_synthetic_images(tmp_path):
    out = tmp_path / "out"
    run_ok(MAIN, 2, cli({**SMALL, "mode": "throughput", "throughput_periods": "3",
                         "throughput_warmup_periods": "1", "output_dir": str(out)}))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "throughput" and summary["samples_per_second"] > 0
    assert summary["eval"] == {} and len(summary["losses"]) == 4


@pytest.mark.parametrize("overrides, error, match", [
    ({"dataset": "mnist"}, ValueError, r"dataset must be one of cifar10, cifar100, flowers102, digits, got 'mnist'"),
    ({"image_size": "16"}, ValueError, r"image_size 16 px is too small for ResNeXt.*>= 32"),
    ({"pipeline_depth": "4"}, ValueError, r"resnext_tiny has 6 blocks .* but 8 partitions were asked for"),
    ({"model": "resnet50"}, ValueError, r"unknown model 'resnet50'"),
    ({"pretrained": "no/such/file.pt"}, FileNotFoundError, r"pretrained: no/such/file.pt is not a file"),
])
def test_bad_settings_fail_before_any_output(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        task(tmp_path, **overrides)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_files_name_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR file not found: .*/cifar-100-python/train\. "
                                                r"Expected layout: <data_dir>/cifar-100-python/\{train,test,meta\}"):
        task(tmp_path, dataset="cifar100", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"Flowers-102 file not found: .*/flowers-102/imagelabels\.mat"):
        task(tmp_path, dataset="flowers102", data_dir=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_md5_is_checked_unless_verify_data_is_false(tmp_path, cifar):
    with pytest.raises(RuntimeError, match=r"md5 mismatch for .*cifar-10-batches-py/data_batch_1"):
        task(tmp_path, data_dir=str(cifar))
    assert not (tmp_path / "out").exists()
    assert len(task(tmp_path, data_dir=str(cifar), verify_data="false", micro_batch_size="4").train_data(0, 0)) == 12


def test_loss_rank_reads_labels_only(tmp_path, cifar, monkeypatch):
    """Rank 1 of wpipe 2x1 holds the loss but not partition 0: it gets the labels that rank
    0's loader yields, and no images."""
    monkeypatch.delenv("RANK", raising=False)
    images = task(tmp_path, data_dir=str(cifar), verify_data="false", micro_batch_size="4")
    monkeypatch.setenv("RANK", "1")
    labels = task(tmp_path, data_dir=str(cifar), verify_data="false", micro_batch_size="4")
    for make in (lambda t: t.train_data(1, 0), lambda t: t.eval_data(0)["test"]):
        loaded, light = list(make(images)), list(make(labels))
        assert len(loaded) == len(light) > 0
        for (x, y), (none, y_light) in zip(loaded, light):
            assert x.shape == (4, 3, 32, 32) and none is None and torch.equal(y, y_light)
    assert isinstance(images.train_data(0, 0), DataLoader)


def test_learning_rate_warmup_then_step_decay(tmp_path):
    t = task(tmp_path, warmup_periods="4", lr="0.1", lr_decay_every="2", epochs="3")
    optimizer = t.make_optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 1e-4
    scheduler = t.make_lr_scheduler(optimizer, 15)  # 3 epochs of 5 updates: decay every 10
    lrs = []
    for _ in range(15):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.025, 0.05, 0.075] + [0.1] * 7 + [0.01] * 5)


def test_lr_scale_by_batch(tmp_path):
    # wpipe 2x1, micro-batch 32: 64 samples per update -> lr x 64 / 256.
    t = task(tmp_path, lr="0.1", micro_batch_size="32", lr_scale_by_batch="true")
    assert t.make_optimizer([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == pytest.approx(0.025)


def test_top1(tmp_path):
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert task(tmp_path).metrics("test", logits, torch.tensor([1, 0, 0, 1])) == {"top1": 0.5}
