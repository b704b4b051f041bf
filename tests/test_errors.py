"""Bad input gets one line: `error: <message>` on stderr, exit status 2, no traceback,
nothing written to output_dir (wpipe.train.cli, as the entry points run it).

A table of bad inputs runs in process (everything is refused before a process group
exists, except the world size, checked on a one-rank group); two launches under torchrun
check that two ranks still print the line once.
"""
import dataclasses
import json
import pickle
import re
import shutil

import pytest
import torch
import torch.distributed as dist

from cv.fixtures import write_cifar_copy
from cv.main import CvConfig
from cv.main import make_task as cv_task
from nlp.fixtures import write_pairs
from nlp.main import NlpConfig
from nlp.main import make_task as nlp_task
from wpipe import load_config
from wpipe.launch import free_port
from wpipe.train import checkpoint, cli

from launch import ROOT, torchrun

NLP = ["--num_layers", "4", "--hidden", "16", "--heads", "2", "--ffn", "32", "--vocab_size", "50",
       "--max_seq_length", "12", "--micro_batch_size", "4", "--synthetic_samples", "64",
       "--epochs", "2", "--max_periods_per_epoch", "3"]
CV = ["--config", str(ROOT / "network_conf" / "cv_tiny.yaml"), "--micro_batch_size", "4"]
MINILM = ["--model_name_or_path", "minilm", *(x for name in ("num_layers", "hidden", "heads", "ffn", "vocab_size")
                                               for x in (f"--{name}", "null"))]


def fake_checkpoint(folder, argv, world=2, **changes):
    """A complete checkpoint folder of the run `argv` would make (rank files hold no
    state: these runs are refused before loading one). `changes` edit the saved config."""
    cfg = load_config(NlpConfig, None, dict(zip(argv[::2], argv[1::2])))
    config = {**dataclasses.asdict(cfg), **changes}
    folder.mkdir(parents=True)
    files = []
    for r in range(world):
        size, digest = checkpoint._write_atomic(folder / checkpoint.rank_file(r),
                                                lambda f, r=r: torch.save({"rank": r}, f))
        files.append({"name": checkpoint.rank_file(r), "rank": r, "size": size, "sha256": digest})
    manifest = {"format": checkpoint.FORMAT, "period": 2, "epoch": 0, "period_in_epoch": 2,
                "periods_per_epoch": 3, "world_size": world, "config": config, "files": files}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files the table points at: data sets (good and broken), YAML files, checkpoints."""
    root = tmp_path_factory.mktemp("inputs")
    pairs = write_pairs(root / "pairs", "qqp", num_train=40, num_dev=8, seed=0)
    good_tsv = (pairs / "QQP" / "train.tsv").read_text()
    for name, text in {"no_column": good_tsv.replace("is_duplicate", "label", 1),
                       "bad_label": good_tsv.rstrip("\n").rsplit("\t", 1)[0] + "\tmaybe\n",
                       "empty": ""}.items():
        (root / name / "QQP").mkdir(parents=True)
        (root / name / "QQP" / "train.tsv").write_text(text)
        shutil.copy(pairs / "QQP" / "dev.tsv", root / name / "QQP" / "dev.tsv")
    write_cifar_copy(root / "cifar", "cifar10", num_train=20, num_test=8, seed=0)
    shutil.copytree(root / "cifar", root / "cifar_broken")
    (root / "cifar_broken" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    shutil.copytree(root / "cifar", root / "cifar_labels")
    batch = root / "cifar_labels" / "cifar-10-batches-py" / "data_batch_2"
    entry = pickle.loads(batch.read_bytes(), encoding="latin1")
    entry["labels"][0] = 11
    batch.write_bytes(pickle.dumps(entry))
    (root / "list.yaml").write_text("- method: wpipe\n")
    (root / "syntax.yaml").write_text("method: [wpipe\n")
    (root / "unknown.yaml").write_text("methd: wpipe\n")
    (root / "type.yaml").write_text("epochs: two\n")
    good = fake_checkpoint(root / "ckpt" / "good", [a.lstrip("-") for a in NLP])
    for name in ("sha", "size", "missing", "manifest"):
        shutil.copytree(good, root / "ckpt" / name)
    for r in (0, 1):
        path = root / "ckpt" / "sha" / checkpoint.rank_file(r)
        data = bytearray(path.read_bytes())
        data[-30] ^= 0xFF
        path.write_bytes(bytes(data))
    with open(root / "ckpt" / "size" / "rank00000.pt", "ab") as f:
        f.write(b"\0")
    (root / "ckpt" / "missing" / "rank00001.pt").unlink()
    (root / "ckpt" / "manifest" / "manifest.json").write_text("{not json")
    fake_checkpoint(root / "ckpt" / "gpipe", [a.lstrip("-") for a in NLP], method="gpipe")
    fake_checkpoint(root / "ckpt" / "world", [a.lstrip("-") for a in NLP], world=3)
    fake_checkpoint(root / "ckpt" / "other_program", [a.lstrip("-") for a in NLP], model="resnext_tiny")
    (root / "ckpt" / "empty").mkdir()
    return root


def table(i):
    """(entry point, argv, message regex) for every bad input."""
    ck = i / "ckpt"
    data = ["--data_dir", str(i / "pairs"), "--tokenizer", str(i / "pairs" / "vocab.txt")]

    def with_data(name):
        return ["--data_dir", str(i / name), "--tokenizer", str(i / "pairs" / "vocab.txt"), "--vocab_size", "100"]
    return [
        # configuration: keys, values, the command line, YAML files
        ("nlp", ["--no_such_key", "1"], r"overrides: unknown config key 'no_such_key'; valid keys: "),
        ("nlp", ["--lr", "abc"], r"config key 'lr' expects float, got 'abc'"),
        ("nlp", ["--micro_batch_size", "-3"], r"micro_batch_size must be >= 1, got -3"),
        ("nlp", ["--method", "wpip"], r"unknown method 'wpip': choose one of wpipe"),
        ("nlp", ["stray"], r"unexpected argument 'stray': use --config FILE and --key value overrides"),
        ("nlp", ["--lr"], r"--lr needs a value"),
        ("nlp", ["--pipeline_depth", "0"], r"pipeline_depth must be an integer >= 1, got 0"),
        ("nlp", ["--method", "data_parallel", "--pipeline_depth", "2"], r"pipeline_depth must be 1 for data_parallel"),
        ("nlp", ["--rank_layout", "diagonal"], r"rank_layout must be one of pipeline_major, replica_major"),
        ("nlp", ["--recompute", "maybe"], r"config key 'recompute' expects bool, got 'maybe'"),
        ("nlp", ["--precision", "fp8"], r"precision must be one of fp32, bf16, fp16, got 'fp8'"),
        ("cv", ["--wire_dtype", "int8"], r"wire_dtype must be fp16, bf16 or null \(no cast\), got 'int8'"),
        ("nlp", ["--checkpoint_every", "-1"], r"checkpoint_every must be >= 0, got -1"),
        ("nlp", ["--keep_checkpoints", "-2"], r"keep_checkpoints must be >= 0, got -2"),
        ("nlp", ["--max_periods_per_epoch", "0"], r"max_periods_per_epoch must be >= 1 or null, got 0"),
        ("nlp", ["--mode", "probe", "--probe_device", "2"],
         r"probe_device must be a device position 0 \.\. 1 \(pipeline_depth 2\) or null \(every device\), got 2"),
        ("nlp", ["--mode", "probe", "--probe_periods", "0"], r"probe_periods must be >= 1, got 0"),
        ("nlp", ["--mode", "probe", "--precision", "fp16"],
         r"mode probe measures fp32 and bf16 runs without a wire cast: precision is 'fp16' and wire_dtype None"),
        ("nlp", ["--mode", "probe", "--wire_dtype", "bf16"], r"precision is 'fp32' and wire_dtype 'bf16'; set precision"),
        ("cv", ["--mode", "probe", "--probe_device", "-1"], r"probe_device must be a device position 0 \.\. 1"),
        ("nlp", ["--mode", "throughput", "--resume", "auto"], r"resume applies to mode train, not throughput"),
        ("nlp", ["--task", "sst2"], r"task must be one of mnli, qqp, got 'sst2'"),
        ("nlp", ["--num_layers", "3"], r"num_layers=3 is fewer than the 4 partitions of wpipe with pipeline_depth=2"),
        ("nlp", ["--config", str(i / "missing.yaml")], r"config file .*missing.yaml does not exist"),
        ("nlp", ["--config", str(i / "list.yaml")], r"list.yaml: expected a mapping of field: value at the top level"),
        ("nlp", ["--config", str(i / "syntax.yaml")], r"syntax.yaml is not valid YAML: "),
        ("nlp", ["--config", str(i / "unknown.yaml")], r"unknown.yaml: unknown config key 'methd'"),
        ("nlp", ["--config", str(i / "type.yaml")], r"type.yaml: config key 'epochs' expects int, got 'two'"),
        # data files: missing or malformed
        ("nlp", with_data("nowhere"), r"GLUE qqp dev split: .*nowhere/dev.tsv not found"),
        ("nlp", with_data("no_column"), r"no_column/QQP/train.tsv: header lacks column\(s\) \['is_duplicate'\]"),
        ("nlp", with_data("bad_label"), r"bad_label/QQP/train.tsv, line \d+: is_duplicate 'maybe' is not one of"),
        ("nlp", with_data("empty"), r"empty/QQP/train.tsv is empty: expected a header line"),
        ("nlp", data, r"vocab.txt has \d+ tokens but the model's vocab_size is 50"),
        ("nlp", ["--data_dir", str(i / "pairs")], r"needs a WordPiece vocabulary: set tokenizer"),
        ("nlp", [*data, "--tokenizer", str(i / "nope.txt")], r"tokenizer: no WordPiece vocabulary at .*nope.txt"),
        ("cv", ["--dataset", "mnist"], r"dataset must be one of cifar10, cifar100, flowers102, digits, got 'mnist'"),
        ("cv", ["--data_dir", str(i / "nowhere")], r"CIFAR file not found: .*nowhere/cifar-10-batches-py/data_batch_1"),
        ("cv", ["--data_dir", str(i / "cifar")], r"md5 mismatch for .*cifar-10-batches-py/data_batch_1"),
        ("cv", ["--data_dir", str(i / "cifar_broken"), "--verify_data", "false"],
         r"cifar_broken/cifar-10-batches-py/data_batch_1 is not a CIFAR python pickle"),
        ("cv", ["--pipeline_depth", "4"], r"resnext_tiny has 6 blocks .* but 8 partitions were asked for"),
        # limits the model knows: refused before any process starts, in every mode
        ("cv", ["--micro_batch_size", "1"], r"image_size 32 px with micro_batch_size 1: ResNeXt downsamples it to "
                                            r"1 x 1 px, where BatchNorm \(training\) sees one value per channel"),
        ("cv", ["--mode", "throughput", "--micro_batch_size", "1"], r"image_size 32 px with micro_batch_size 1"),
        ("cv", ["--mode", "probe", "--image_size", "31"], r"image_size 31 px is too small for ResNeXt"),
        ("cv", ["--data_dir", str(i / "cifar_labels"), "--verify_data", "false"],
         r"cifar_labels/cifar-10-batches-py/data_batch_2: label 11 is outside the 10 classes of cifar10"),
        ("nlp", ["--mode", "throughput", "--vocab_size", "2"], r"vocab_size=2 must exceed num_labels=2: synthetic data"),
        ("nlp", ["--mode", "probe", "--vocab_size", "2"], r"vocab_size=2 must exceed num_labels=2"),
        ("nlp", [*MINILM, "--max_seq_length", "600"],
         r"max_seq_length=600 exceeds the model's max_position_embeddings=512: use max_seq_length <= 512"),
        # checkpoints: missing, corrupt, of another run
        ("nlp", ["--resume", str(ck / "nowhere")], r"resume: .*nowhere is not a checkpoint \(no manifest.json"),
        ("nlp", ["--resume", str(ck / "empty")], r"resume: .*empty is not a checkpoint"),
        ("nlp", ["--resume", str(ck / "sha")], r"checkpoint file .*sha/rank00000.pt is corrupt: its sha256 differs"),
        ("nlp", ["--resume", str(ck / "size")], r"checkpoint file .*size/rank00000.pt is corrupt: \d+ bytes, the manifest says \d+"),
        ("nlp", ["--resume", str(ck / "missing")], r"checkpoint file .*missing/rank00001.pt is missing"),
        ("nlp", ["--resume", str(ck / "manifest")], r"checkpoint .*manifest/manifest.json: unreadable"),
        ("nlp", ["--resume", str(ck / "gpipe")], r"checkpoint .*gpipe was written with method='gpipe' but this run has method='wpipe'"),
        ("nlp", ["--resume", str(ck / "good"), "--hidden", "32"], r"was written with hidden=16 but this run has hidden=32"),
        ("nlp", ["--resume", str(ck / "good"), "--max_periods_per_epoch", "2"],
         r"was written with max_periods_per_epoch=3 but this run has max_periods_per_epoch=2"),
        ("nlp", ["--resume", str(ck / "world")], r"holds 3 rank files of world size 3, this run has 2 ranks"),
        ("nlp", ["--resume", str(ck / "other_program")], r"was written by another program: config field 'model'"),
        # launch
        ("nlp", [], r"RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set: launch with torchrun"),
        ("nlp", ["--resume", str(ck / "good")], r"RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"),  # a good one passes
    ]


ENTRY = {"nlp": (NlpConfig, nlp_task, NLP), "cv": (CvConfig, cv_task, CV)}


def one_error_line(capsys, config_class, make_task, argv) -> str:
    with pytest.raises(SystemExit) as exit:
        cli(config_class, make_task, argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_inputs_give_one_error_line(inputs, tmp_path, capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WPIPE_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    cases = table(inputs)
    assert len(cases) >= 25
    for n, (entry, argv, message) in enumerate(cases):
        config_class, make_task, base = ENTRY[entry]
        out = tmp_path / f"out{n}"
        line = one_error_line(capsys, config_class, make_task, [*base, "--output_dir", str(out), *argv])
        assert re.search(message, line), f"{argv}: {line}"
        assert not out.exists(), f"{argv} left {sorted(out.rglob('*'))}"


def test_a_rank_reports_its_own_corrupt_file(inputs, tmp_path, capsys, monkeypatch):
    """Each rank hashes only its own file: rank 1 finds its corruption and says so itself."""
    monkeypatch.setenv("RANK", "1")
    line = one_error_line(capsys, NlpConfig, nlp_task, [*NLP, "--output_dir", str(tmp_path / "out"),
                                                        "--resume", str(inputs / "ckpt" / "sha")])
    assert re.search(r"checkpoint file .*sha/rank00001.pt is corrupt: its sha256 differs", line)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):  # rank 1 is silent about what rank 0 reports (another run)
        cli(NlpConfig, nlp_task, [*NLP, "--output_dir", str(tmp_path / "out"), "--resume", str(inputs / "ckpt" / "gpipe")])
    assert capsys.readouterr().err == ""


def test_world_size_on_a_one_rank_group(tmp_path, capsys, monkeypatch):
    port = free_port()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    try:
        line = one_error_line(capsys, NlpConfig, nlp_task, [*NLP, "--output_dir", str(tmp_path / "out")])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "world size is 1 but pipeline_depth 2 x data_parallel 1 = 2: launch 2 processes" in line
    assert not (tmp_path / "out").exists()


def test_probe_refuses_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = one_error_line(capsys, NlpConfig, nlp_task, [*NLP, "--mode", "probe", "--output_dir", str(tmp_path / "out")])
    assert "mode probe runs as one plain process (python cv/main.py or nlp/main.py --mode probe ...), " \
           "not under torchrun: WORLD_SIZE is 2" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "abc"], "error: overrides: config key 'lr' expects float, got 'abc'"),
    (["--method", "gpipe", "--pipeline_depth", "4"], "error: world size is 2 but pipeline_depth 4 x data_parallel 1 = 4"),
])
@pytest.mark.distributed
def test_two_ranks_print_the_line_once(tmp_path, argv, message):
    code, out = torchrun(ROOT / "nlp" / "main.py", 2, [*NLP, *argv, "--output_dir", tmp_path / "out"], timeout=120)
    assert code != 0
    assert [line for line in out.splitlines() if line.startswith("error: ")] == \
        [line for line in out.splitlines() if line.startswith(message)] and out.count("error: ") == 1, out[-3000:]
    # torchrun's own failure report (a traceback through torch) may follow; none through ours
    assert not re.search(r'File ".*(wpipe|nlp|cv)/[a-z_]+\.py"', out), out[-3000:]
    assert "exitcode  : 2" in out, out[-3000:]
    assert not (tmp_path / "out").exists()
