"""nlp/main.py end to end under torchrun: wpipe, pipedream_2bw and data_parallel fine-tune a
tiny BERT on a generated QQP-format set, and a throughput run on synthetic data (one launch
each: a process group cannot be re-created reliably inside one process); bad settings fail
in process, before any process group, leaving output_dir empty.
"""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml

from nlp.fixtures import write_pairs
from nlp.main import NlpConfig, make_task
from wpipe import load_config
from wpipe.train import main

from launch import ROOT, run_ok

MAIN = ROOT / "nlp" / "main.py"
TINY = ["--num_layers", "4", "--hidden", "32", "--heads", "2", "--ffn", "64",
        "--max_seq_length", "24", "--micro_batch_size", "8", "--lr", "1e-3", "--warmup_periods", "2",
        "--log_every", "100"]
TRAIN_RUNS = {  # same global batch (16) and number of updates for all three
    "wpipe": ["--method", "wpipe", "--pipeline_depth", "2", "--data_parallel", "1"],
    "pipedream_2bw": ["--method", "pipedream_2bw", "--pipeline_depth", "2", "--data_parallel", "1"],
    "data_parallel": ["--method", "data_parallel", "--pipeline_depth", "1", "--data_parallel", "2"],
}
CONTRACT = {"method", "pipeline_depth", "data_parallel", "micro_batch_size", "samples_per_second",
            "final_loss", "eval", "memory"}
MEMORY = {"weights_bytes", "activations_bytes", "optimizer_state_bytes", "peak_bytes"}


def tiny_fields():
    """TINY as NlpConfig fields, for the in-process tests."""
    return dict(num_layers=4, hidden=32, heads=2, ffn=64, max_seq_length=24, micro_batch_size=8)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"), "qqp", num_train=160, num_dev=40, seed=0)


@pytest.fixture(scope="module")
def runs(pairs, tmp_path_factory):
    """name -> output_dir of each run, launched on first use with two processes."""
    out, done = tmp_path_factory.mktemp("runs"), {}
    data = ["--data_dir", pairs, "--tokenizer", pairs / "vocab.txt", "--epochs", "2"]
    args = {name: [*TINY, *data, *method] for name, method in TRAIN_RUNS.items()}
    args["throughput"] = ["--config", ROOT / "network_conf" / "nlp_tiny.yaml", "--mode", "throughput",
                          "--throughput_periods", "4", "--throughput_warmup_periods", "1"]

    def run(name):
        if name not in done:
            run_ok(MAIN, 2, ["--output_dir", out / name, *args[name]], timeout=300)
            done[name] = out / name
        return done[name]
    return run


def read_summary(folder):
    summary = json.loads((folder / "summary.json").read_text())
    assert CONTRACT <= summary.keys(), f"missing {CONTRACT - summary.keys()}"
    assert len(summary["memory"]) == 2
    for report in summary["memory"]:
        assert MEMORY <= report.keys() and all(report[k] > 0 for k in ("weights_bytes", "peak_bytes"))
    assert summary["samples_per_second"] > 0 and math.isfinite(summary["final_loss"])
    assert yaml.safe_load((folder / "config.yaml").read_text())["method"] == summary["method"]
    return summary


@pytest.mark.distributed
@pytest.mark.parametrize("method", list(TRAIN_RUNS))
def test_fine_tuning_writes_the_summary(runs, method):
    summary = read_summary(runs(method))
    depth, dp = (1, 2) if method == "data_parallel" else (2, 1)
    assert (summary["method"], summary["pipeline_depth"], summary["data_parallel"],
            summary["micro_batch_size"]) == (method, depth, dp, 8)
    assert summary["micro_batches_per_update"] * dp == 2  # global batch 16 everywhere
    assert len(summary["losses"]) == 2 * 160 // 16  # 2 epochs of whole global batches
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    losses = summary["losses"]  # per-epoch means of the replica-averaged losses, also on pipelines
    assert [h["loss"] for h in summary["history"]] == pytest.approx([sum(losses[:10]) / 10, sum(losses[10:]) / 10])
    assert summary["eval"].keys() == {"dev_accuracy", "dev_f1"}
    assert all(0 <= v <= 1 for v in summary["eval"].values())
    held = sorted(p for report in summary["memory"] for p in report["partitions"])
    assert held == {"wpipe": [0, 1, 2, 3], "pipedream_2bw": [0, 1], "data_parallel": [0, 0]}[method]


@pytest.mark.distributed
def test_throughput_on_synthetic_data(runs):
    summary = read_summary(runs("throughput"))
    assert (summary["mode"], summary["method"], summary["eval"]) == ("throughput", "wpipe", {})
    assert len(summary["losses"]) == 4 + 1
    assert summary["config"]["num_layers"] == 4 and summary["config"]["data_dir"] is None


@pytest.mark.distributed
def test_partitions_balanced_by_time(tmp_path):
    """balance: time measures the blocks on rank 0 and every rank builds the same cut."""
    out = run_ok(MAIN, 2, ["--config", ROOT / "network_conf" / "nlp_tiny.yaml", "--mode", "throughput",
                           "--method", "pipedream_2bw", "--balance", "time", "--throughput_periods", "2",
                           "--throughput_warmup_periods", "1", "--output_dir", tmp_path], timeout=300)
    assert out.count("partitions balanced by block costs measured on rank 0") == 2   # both ranks log it
    summary = read_summary(tmp_path)
    assert sorted(p for report in summary["memory"] for p in report["partitions"]) == [0, 1]
    assert sum(report["weights_bytes"] for report in summary["memory"]) > 0


# ---------------------------------------------------------------- in process, no process group

def test_task_shards_data_and_builds_the_optimizer(pairs):
    cfg = NlpConfig(**tiny_fields(), data_dir=str(pairs), tokenizer=str(pairs / "vocab.txt"),
                    data_parallel=2, warmup_periods=2)
    task = make_task(cfg)
    shards = [task.train_data(0, r) for r in range(2)]
    assert [len(s) for s in shards] == [10, 10]  # 160 samples / (2 replicas x 8)
    (ids, types, mask), labels = shards[0][0]
    tokens = len((pairs / "vocab.txt").read_text().splitlines())
    assert ids.shape == (8, 24) and ids.max() < tokens and set(labels.tolist()) <= {0, 1}
    assert sum(len(b[1]) for r in range(2) for b in task.eval_data(r)["dev"]) == 40
    part = task.build_partition(0)
    optimizer = task.make_optimizer(list(part.parameters()))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in part.named_parameters()}
    assert all("LayerNorm" in names[id(p)] or names[id(p)].endswith("bias") for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(names)
    scheduler = task.make_lr_scheduler(optimizer, 6)
    factors = []
    for _ in range(7):
        factors.append(scheduler.get_last_lr()[0] / cfg.lr)
        optimizer.step()
        scheduler.step()
    assert factors == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25, 0])


def test_mnli_evaluates_matched_and_mismatched(tmp_path):
    root = write_pairs(tmp_path, "mnli", num_train=48, num_dev=16, seed=1)
    task = make_task(NlpConfig(**tiny_fields(), task="mnli", data_dir=str(root),
                               tokenizer=str(root / "vocab.txt")))
    assert task.eval_data(0).keys() == {"dev_matched", "dev_mismatched"}
    labels = torch.cat([b[1] for b in task.train_data(0, 0)])
    assert set(labels.tolist()) == {0, 1, 2}
    assert task.metrics("dev_matched", torch.eye(3)[labels], labels) == {"accuracy": 1.0}



def bad_runs(pairs, tmp_path):
    tiny = ["--config", str(ROOT / "network_conf" / "nlp_tiny.yaml")]
    data = ["--data_dir", str(pairs), "--tokenizer", str(pairs / "vocab.txt")]
    (tmp_path / "no_dev" / "QQP").mkdir(parents=True)
    (tmp_path / "no_dev" / "QQP" / "train.tsv").write_text((pairs / "QQP" / "train.tsv").read_text())
    return [
        (tiny + ["--task", "sst2"], ValueError, r"task must be one of mnli, qqp, got 'sst2'"),
        (tiny + ["--data_dir", str(tmp_path / "nowhere"), "--tokenizer", str(pairs)], FileNotFoundError,
         r"GLUE qqp dev split: .*nowhere/dev.tsv not found; expected the GLUE layout QQP/train.tsv, QQP/dev.tsv"),
        (tiny + ["--data_dir", str(tmp_path / "no_dev"), "--tokenizer", str(pairs)], FileNotFoundError,
         r"no_dev/QQP/dev.tsv not found"),
        (tiny + data + ["--num_layers", "3"], ValueError,
         r"num_layers=3 is fewer than the 4 partitions of wpipe with pipeline_depth=2"),
        (tiny + ["--model_name_or_path", "minilm", "--vocab_size", "1000", "--num_layers", "null",
                 "--hidden", "null", "--heads", "null", "--ffn", "null"], ValueError,
         r"vocab_size=1000 does not match the checkpoint .*model \(vocab_size=30522 in its config.json\)"),
        (tiny + ["--data_dir", str(pairs), "--tokenizer", str(tmp_path / "missing.txt")], FileNotFoundError,
         r"tokenizer: no WordPiece vocabulary at .*missing.txt"),
        (tiny + ["--data_dir", str(pairs)], ValueError, r"data_dir .* needs a WordPiece vocabulary: set tokenizer"),
        (tiny + data + ["--vocab_size", "20"], ValueError,
         r"the vocabulary .*vocab.txt has \d+ tokens but the model's vocab_size is 20"),
        (tiny + ["--model_name_or_path", str(tmp_path)], FileNotFoundError,
         r"model_name_or_path: .* is not a Hugging Face BERT checkpoint folder \(it needs config.json"),
    ]


def test_bad_settings_fail_before_anything_is_written(pairs, tmp_path):
    for i, (argv, error, message) in enumerate(bad_runs(pairs, tmp_path)):
        out = tmp_path / f"out{i}"
        with pytest.raises(error, match=message):
            main(NlpConfig, make_task, argv + ["--output_dir", str(out)])
        assert not out.exists(), f"{argv}: {sorted(out.iterdir())}"


def test_fine_tuning_configs_load():
    for name in ("bert_base", "bert_large"):
        cfg = load_config(NlpConfig, ROOT / "network_conf" / f"nlp_finetune_{name}.yaml")
        assert (cfg.pipeline_depth, cfg.data_parallel, cfg.epochs, cfg.seed, cfg.max_seq_length) == (4, 2, 15, 42, 128)
        assert cfg.model_name_or_path is None and cfg.data_dir is None
    for model in (96, 192, 384, 768):
        cfg = load_config(NlpConfig, ROOT / "network_conf" / f"nlp_throughput_bert{model}.yaml")
        assert (cfg.num_layers, cfg.hidden, cfg.heads, cfg.ffn, cfg.mode) == (model, 768, 12, 3072, "throughput")

