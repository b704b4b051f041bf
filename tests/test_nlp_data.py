"""nlp.glue: readers on tiny TSVs in GLUE's layouts, the token cache, sharding, metrics."""
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertTokenizerFast

from nlp import glue
from nlp.glue import TASKS, glue_metrics, load_glue, micro_batches, synthetic_glue
from nlp.model import minilm_checkpoint

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "how", "do", "i", "learn", "python",
         "is", "it", "raining", "what", "the", "best", "way", "to", "a", "man", "sleeps",
         "\"", "'", "?", ".", "##s"]

QQP_TRAIN = [
    "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "0\t1\t2\tHow do I learn Python?\tWhat is the best way to learn python?\t1",
    "1\t3\t4\t\"Is it raining?\tIs it raining\t0",   # unbalanced quote opening a field
    "2\t5\t6\tA broken row with too few columns",      # malformed
    "3\t7\t8\tHow do I learn\tIs it raining?\t0",
    "4\t9\t10\tWhat\tis\tthe\tbest\t1",                   # malformed: too many columns
]
MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
               "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
               "sentence2", "label1", "gold_label"]  # train.tsv's 12 columns
MNLI_ROWS = [("A man sleeps.", "A man is sleeping.", "entailment"),
             ("It is raining\"", "It is dry.", "contradiction"),
             ("The man's way.", "A man learns.", "neutral")]


def write_tsv(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def mnli_lines(rows, extra_columns=0):
    header = MNLI_HEADER + [f"label{i}" for i in range(2, 2 + extra_columns)]
    lines = ["\t".join(header)]
    for i, (s1, s2, label) in enumerate(rows):
        row = [str(i)] * len(header)
        row[header.index("sentence1")], row[header.index("sentence2")] = s1, s2
        row[header.index("gold_label")] = label
        lines.append("\t".join(row))
    return lines


@pytest.fixture
def vocab(tmp_path):
    path = tmp_path / "tok" / "vocab.txt"
    write_tsv(path, VOCAB)
    return path


@pytest.fixture
def glue_root(tmp_path):
    write_tsv(tmp_path / "glue" / "QQP" / "train.tsv", QQP_TRAIN)
    write_tsv(tmp_path / "glue" / "QQP" / "dev.tsv", QQP_TRAIN[:2])
    write_tsv(tmp_path / "glue" / "MNLI" / "train.tsv", mnli_lines(MNLI_ROWS))
    # dev files have 16 columns; the reader finds its columns by name
    write_tsv(tmp_path / "glue" / "MNLI" / "dev_matched.tsv", mnli_lines(MNLI_ROWS[:2], 4))
    return tmp_path / "glue"


def test_qqp_skips_malformed_rows_and_keeps_quotes(glue_root, vocab, caplog):
    with caplog.at_level(logging.WARNING, logger="nlp.glue"):
        data = load_glue("qqp", glue_root / "QQP", "train", vocab, max_len=16)
    assert "skipped 2 malformed rows" in caplog.text and "train.tsv" in caplog.text
    input_ids, token_type_ids, attention_mask, labels = data.tensors
    assert input_ids.shape == token_type_ids.shape == attention_mask.shape == (3, 16)
    assert labels.tolist() == [1, 0, 0] and labels.dtype == torch.int64
    ids = dict(zip(VOCAB, range(len(VOCAB))))
    expected = ["[CLS]", "\"", "is", "it", "raining", "?", "[SEP]", "is", "it", "raining",
                "[SEP]"]  # the lone quote is text, not the start of a quoted field
    assert input_ids[1, :11].tolist() == [ids[t] for t in expected]
    assert input_ids[1, 11:].eq(0).all() and attention_mask[1].sum() == 11
    assert token_type_ids[1].tolist() == [0] * 7 + [1] * 4 + [0] * 5
    assert input_ids[0, 1:3].tolist() == [ids["how"], ids["do"]]  # lowercased


def test_mnli_columns_by_name_and_glue_root(glue_root, vocab):
    train = load_glue("mnli", glue_root, "train", vocab, max_len=12)  # GLUE root works too
    assert train.tensors[3].tolist() == [1, 0, 2]  # contradiction, entailment, neutral
    dev = load_glue("mnli", glue_root / "MNLI", "dev_matched", vocab, max_len=12)
    assert dev.tensors[3].tolist() == [1, 0]
    assert TASKS["mnli"].num_labels == 3 and TASKS["mnli"].dev_splits == ("dev_matched",
                                                                          "dev_mismatched")
    assert TASKS["qqp"].num_labels == 2 and TASKS["qqp"].dev_splits == ("dev",)


def test_cache_hit_does_not_tokenize_again(glue_root, vocab, monkeypatch):
    calls = []
    real = glue._tokenize
    monkeypatch.setattr(glue, "_tokenize", lambda *a: calls.append(1) or real(*a))
    first = load_glue("qqp", glue_root, "train", vocab, max_len=16)
    (cache,) = (glue_root / "QQP").glob("train.*.pt")
    mtime = cache.stat().st_mtime_ns
    second = load_glue("qqp", glue_root, "train", vocab, max_len=16)
    assert calls == [1] and cache.stat().st_mtime_ns == mtime
    for a, b in zip(first.tensors, second.tensors):
        assert torch.equal(a, b)
    assert not list((glue_root / "QQP").glob(".*tmp"))  # no temporary file left behind
    load_glue("qqp", glue_root, "train", vocab, max_len=8)  # another key: another cache file
    load_glue("qqp", glue_root, "train", vocab, max_len=16, lowercase=False)
    assert calls == [1, 1, 1] and len(list((glue_root / "QQP").glob("train.*.pt"))) == 3
    train = glue_root / "QQP" / "train.tsv"  # an edited TSV is tokenized again
    write_tsv(train, QQP_TRAIN[:2])
    assert len(load_glue("qqp", glue_root, "train", vocab, max_len=16)) == 1
    assert calls == [1, 1, 1, 1]


def test_unwritable_data_folder_loads_without_cache(glue_root, vocab, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")
    monkeypatch.setattr("wpipe.files.tempfile.mkstemp", refuse)   # root may write anywhere: refuse it here
    with caplog.at_level(logging.WARNING, logger="nlp.glue"):
        data = load_glue("qqp", glue_root, "dev", vocab, max_len=8)
    assert len(data) == 1 and "cannot cache tokenized data" in caplog.text
    assert not list((glue_root / "QQP").glob("dev.*.pt"))


def test_real_vocab_matches_bert_tokenizer(glue_root):
    folder = minilm_checkpoint()
    data = load_glue("qqp", glue_root, "dev", folder, max_len=32)
    expected = BertTokenizerFast.from_pretrained(folder)(
        "How do I learn Python?", "What is the best way to learn python?",
        max_length=32, padding="max_length", truncation=True)
    assert data.tensors[0][0].tolist() == expected["input_ids"]
    assert data.tensors[1][0].tolist() == expected["token_type_ids"]
    assert 100 not in expected["input_ids"]  # no [UNK]: the vocabulary was really used


def test_label_and_layout_errors(glue_root, vocab, tmp_path):
    write_tsv(glue_root / "MNLI" / "dev_mismatched.tsv",
              mnli_lines(MNLI_ROWS[:1] + [("a", "b", "-")]))
    with pytest.raises(ValueError, match=r"dev_mismatched.tsv, line 3: gold_label '-' is not "
                                         r"one of \['contradiction', 'entailment', 'neutral'\]"):
        load_glue("mnli", glue_root, "dev_mismatched", vocab, max_len=8)
    with pytest.raises(FileNotFoundError, match=r"nowhere/dev.tsv not found; expected the GLUE "
                                                r"layout QQP/train.tsv, QQP/dev.tsv"):
        load_glue("qqp", tmp_path / "nowhere", "dev", vocab, max_len=8)
    with pytest.raises(FileNotFoundError, match="WordPiece vocabulary .*missing.txt not found"):
        load_glue("qqp", glue_root, "dev", tmp_path / "missing.txt", max_len=8)
    with pytest.raises(ValueError, match=r"unknown qqp split 'test'; choose one of "
                                         r"\['train', 'dev'\]"):
        load_glue("qqp", glue_root, "test", vocab, max_len=8)
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst2'; choose one of "
                                         r"\['mnli', 'qqp'\]"):
        load_glue("sst2", glue_root, "dev", vocab, max_len=8)
    write_tsv(glue_root / "QQP" / "dev.tsv", ["id\tquestion1\tquestion2\tlabel"])
    with pytest.raises(ValueError, match=r"QQP/dev.tsv: header lacks column\(s\) "
                                         r"\['is_duplicate'\]"):
        load_glue("qqp", glue_root, "dev", vocab, max_len=8)


def test_synthetic_is_reproducible_and_learnable():
    a = synthetic_glue(64, 16, vocab_size=100, num_labels=3, seed=4)
    b = synthetic_glue(64, 16, vocab_size=100, num_labels=3, seed=4)
    for x, y in zip(a.tensors, b.tensors):
        assert torch.equal(x, y)
    input_ids, token_type_ids, attention_mask, labels = a.tensors
    assert input_ids.shape == (64, 16) and input_ids.max() < 100
    assert input_ids[attention_mask == 0].eq(0).all() and attention_mask.sum(1).min() >= 8
    assert torch.equal(labels, input_ids[:, 1].long() % 3) and set(labels.tolist()) == {0, 1, 2}
    assert not torch.equal(input_ids, synthetic_glue(64, 16, 100, 3, seed=5).tensors[0])
    with pytest.raises(ValueError, match="vocab_size=3 must exceed num_labels=3"):
        synthetic_glue(4, 8, vocab_size=3, num_labels=3, seed=0)


def sample_ids(batches):
    # token 1 of a synthetic sample identifies it well enough with a 10**6 vocabulary
    return [int(x) for (ids, _, _), _ in batches for x in ids[:, 1]]


def test_micro_batches_shard_disjointly_and_reproducibly():
    data = synthetic_glue(50, 8, vocab_size=10**6, num_labels=2, seed=0)
    shards = [micro_batches(data, 4, r, 3, seed=1, epoch=0) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # 50 // (3 * 4) full micro-batches each
    (ids, types, mask), labels = shards[0][0]
    assert ids.shape == types.shape == mask.shape == (4, 8) and labels.shape == (4,)
    assert ids.dtype == types.dtype == mask.dtype == labels.dtype == torch.int64
    seen = [sample_ids(s) for s in shards]
    assert len(set().union(*seen)) == 48  # disjoint
    assert sample_ids(micro_batches(data, 4, 1, 3, seed=1, epoch=0)) == seen[1]  # same on ranks
    assert sample_ids(micro_batches(data, 4, 1, 3, seed=1, epoch=1)) != seen[1]
    assert sample_ids(micro_batches(data, 4, 1, 3, seed=2, epoch=0)) != seen[1]
    assert sample_ids(shards[2][1:3]) == seen[2][4:12]  # slices are micro-batch lists
    everything = [micro_batches(data, 4, r, 3, seed=1, epoch=0, drop_last=False)
                  for r in range(3)]
    assert sorted(sum((sample_ids(s) for s in everything), [])) == sorted(
        data.tensors[0][:, 1].tolist())
    assert [len(s[-1][1]) for s in everything] == [1, 1, 4]  # 17, 17, 16 samples
    ordered = micro_batches(data, 5, 0, 1, seed=1, epoch=0, shuffle=False)
    assert sample_ids(ordered) == data.tensors[0][:, 1].tolist()


def test_micro_batch_errors():
    data = synthetic_glue(10, 8, vocab_size=50, num_labels=2, seed=0)
    with pytest.raises(ValueError, match=r"replica 2 is out of range for 2 replicas"):
        micro_batches(data, 2, 2, 2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="micro_batch_size must be an integer >= 1, got 0"):
        micro_batches(data, 0, 0, 1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="10 samples cannot fill one micro-batch of 8 on each of "
                                         "2 replicas"):
        micro_batches(data, 8, 0, 2, seed=0, epoch=0)


def test_metrics_against_hand_computed_values():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 1, 0, 0, 1])  # preds 1, 0, 1, 0, 1: tp 2, fp 1, fn 1, tn 1
    qqp = glue_metrics("qqp", logits, labels)
    assert qqp == pytest.approx({"accuracy": 3 / 5, "f1": 2 * 2 / (2 * 2 + 1 + 1)})
    assert glue_metrics("qqp", logits, torch.tensor([0, 0, 0, 0, 0]))["f1"] == 0.0
    mnli = glue_metrics("mnli", torch.eye(3)[[0, 1, 2, 2]], torch.tensor([0, 1, 1, 2]))
    assert mnli == pytest.approx({"accuracy": 3 / 4})
    with pytest.raises(ValueError, match=r"unknown GLUE task 'cola'; choose one of"):
        glue_metrics("cola", logits, labels)
    with pytest.raises(ValueError, match=r"logits of shape \(5, 2\) do not match labels of "
                                         r"shape \(4,\)"):
        glue_metrics("qqp", logits, labels[:4])
