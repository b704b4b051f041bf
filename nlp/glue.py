"""GLUE QQP and MNLI: TSV readers, WordPiece tokenization with a disk cache, synthetic data,
data-parallel micro-batches and metrics.

Datasets are ``TensorDataset(input_ids, token_type_ids, attention_mask, labels)``: the first
three (samples, max_len) int32 (half of int64's memory), padded to ``max_len``, labels (samples,)
int64 class indices. ``micro_batches`` hands the pipeline int64 tensors.

Expected layout (as written by GLUE's download_glue_data.py), ``data_dir`` being the task's
folder or the GLUE root holding it:
  QQP/train.tsv, QQP/dev.tsv       header: id qid1 qid2 question1 question2 is_duplicate
  MNLI/train.tsv, MNLI/dev_matched.tsv, MNLI/dev_mismatched.tsv
                                   columns found by name: sentence1 sentence2 gold_label
Files are read with quoting disabled (the text holds unbalanced quotes); rows with the wrong
column count are skipped and their count logged. Tokenized tensors are cached beside the TSV
as ``<split>.<key>.pt``, key = hash of (vocab file bytes, lowercasing, max_len), written
atomically and re-made when the TSV's size or modification time changes.
"""
import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from wpipe.files import write_atomic
from wpipe.train.shard import replica_share

log = logging.getLogger(__name__)


class GlueTask(NamedTuple):
    num_labels: int
    dev_splits: tuple[str, ...]
    folder: str
    text_columns: tuple[str, str]
    label_column: str
    labels: tuple[str, ...]  # label string in the TSV, in class-index order


TASKS = {
    "qqp": GlueTask(2, ("dev",), "QQP", ("question1", "question2"), "is_duplicate", ("0", "1")),
    # Class order of transformers' legacy MnliProcessor, which the released runtime used.
    "mnli": GlueTask(3, ("dev_matched", "dev_mismatched"), "MNLI", ("sentence1", "sentence2"),
                     "gold_label", ("contradiction", "entailment", "neutral")),
}


def _task(task: str) -> GlueTask:
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task]


def load_glue(task: str, data_dir, split: str, tokenizer_dir_or_vocab, max_len: int,
              lowercase: bool | None = None) -> TensorDataset:
    """Tokenized split of a GLUE task (see the module docstring for layout and cache).

    ``tokenizer_dir_or_vocab`` is a WordPiece ``vocab.txt`` or a folder holding one (e.g. a
    BERT checkpoint). ``lowercase`` defaults to the folder's ``tokenizer_config.json``
    ``do_lower_case`` (True when absent, as for uncased BERT).
    """
    spec = _task(task)
    splits = ("train",) + spec.dev_splits
    if split not in splits:
        raise ValueError(f"unknown {task} split {split!r}; choose one of {list(splits)}")
    path = _split_file(task, spec, Path(data_dir), split)
    vocab, lowercase = _vocab(Path(tokenizer_dir_or_vocab), lowercase)
    key = hashlib.sha256(vocab.read_bytes() + f"|lower={lowercase}|max_len={max_len}".encode())
    cache = path.with_name(f"{split}.{key.hexdigest()[:16]}.pt")
    stat = path.stat()
    source = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if cache.is_file():
        cached = torch.load(cache, weights_only=True)
        if cached["source"] == source:
            return TensorDataset(*cached["tensors"])
    texts_a, texts_b, labels = _read_tsv(path, spec)
    from transformers import BertTokenizerFast  # slow import, only needed on a cache miss
    # vocab=, not vocab_file=: transformers 5 ignores vocab_file (every token becomes [UNK]).
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=lowercase)
    tensors = (*_tokenize(tokenizer, texts_a, texts_b, max_len), torch.tensor(labels))
    _save_atomic({"source": source, "tensors": tensors}, cache)
    return TensorDataset(*tensors)


def _split_file(task: str, spec: GlueTask, data_dir: Path, split: str) -> Path:
    folder = data_dir / spec.folder if (data_dir / spec.folder).is_dir() else data_dir
    path = folder / f"{split}.tsv"
    if not path.is_file():
        files = ", ".join(f"{spec.folder}/{s}.tsv" for s in ("train",) + spec.dev_splits)
        raise FileNotFoundError(
            f"GLUE {task} {split} split: {path} not found; expected the GLUE layout {files} "
            f"under data_dir (the {spec.folder} folder itself or the GLUE root above it)")
    return path


def _vocab(source: Path, lowercase: bool | None) -> tuple[Path, bool]:
    vocab = source / "vocab.txt" if source.is_dir() else source
    if not vocab.is_file():
        raise FileNotFoundError(f"WordPiece vocabulary {vocab} not found: give a vocab.txt or "
                                "a tokenizer folder holding one")
    if lowercase is None:
        config = source / "tokenizer_config.json"
        lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True)) \
            if source.is_dir() and config.is_file() else True
    return vocab, lowercase


def _read_tsv(path: Path, spec: GlueTask) -> tuple[list[str], list[str], list[int]]:
    label_index = {name: i for i, name in enumerate(spec.labels)}
    texts_a, texts_b, labels, skipped = [], [], [], 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty: expected a header line")
        wanted = (*spec.text_columns, spec.label_column)
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {missing}; header is {header}")
        col_a, col_b, col_label = (header.index(c) for c in wanted)
        for row in reader:
            if len(row) != len(header):
                skipped += 1
                continue
            label = row[col_label]
            if label not in label_index:
                raise ValueError(f"{path}, line {reader.line_num}: {spec.label_column} "
                                 f"{label!r} is not one of {list(spec.labels)}")
            texts_a.append(row[col_a])
            texts_b.append(row[col_b])
            labels.append(label_index[label])
    if skipped:
        log.warning("%s: skipped %d malformed rows (not %d tab-separated columns)",
                    path, skipped, len(header))
    return texts_a, texts_b, labels


def _tokenize(tokenizer, texts_a, texts_b, max_len):
    enc = tokenizer(texts_a, texts_b, max_length=max_len, padding="max_length",
                    truncation=True, return_tensors="pt")
    return tuple(enc[k].to(torch.int32)
                 for k in ("input_ids", "token_type_ids", "attention_mask"))


def _save_atomic(obj, path: Path) -> None:
    """Cache `obj` at `path` (files.write_atomic: readers never see a partial cache)."""
    try:
        write_atomic(path, lambda f: torch.save(obj, f))
    except OSError as err:  # e.g. a read-only data folder: run on without a cache
        log.warning("cannot cache tokenized data in %s (%s)", path.parent, err)


def check_synthetic(vocab_size: int, num_labels: int) -> None:
    """Synthetic samples draw their label from a token id (modulo num_labels): refuse a
    vocabulary that cannot give every label."""
    if vocab_size <= num_labels:
        raise ValueError(f"vocab_size={vocab_size} must exceed num_labels={num_labels}: synthetic data "
                         f"takes its labels from token ids; use a vocab_size > {num_labels}")


def synthetic_glue(num_samples: int, seq_len: int, vocab_size: int, num_labels: int,
                   seed: int) -> TensorDataset:
    """Random sentence pairs in the layout of ``load_glue``, reproducible from ``seed``.

    Lengths are uniform in [seq_len // 2, seq_len], padding id 0, token type 1 on the second
    half of each pair. The label is the id of token 1 modulo ``num_labels``, so it can be learnt.
    """
    check_synthetic(vocab_size, num_labels)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(seq_len // 2, 2), seq_len + 1, (num_samples, 1), generator=gen)
    positions = torch.arange(seq_len)[None, :]
    attention_mask = (positions < lengths).to(torch.int32)
    input_ids = torch.randint(1, vocab_size, (num_samples, seq_len), generator=gen,
                              dtype=torch.int32) * attention_mask
    token_type_ids = (positions >= lengths // 2).to(torch.int32) * attention_mask
    labels = input_ids[:, 1].long() % num_labels
    return TensorDataset(input_ids, token_type_ids, attention_mask, labels)


class MicroBatches(Sequence):
    """Micro-batches ((input_ids, token_type_ids, attention_mask), labels), made on access,
    in pinned memory when `pin` (a GPU then copies them without the host waiting)."""

    def __init__(self, tensors, batches: list[np.ndarray], pin: bool = False):
        self._tensors, self._batches, self._pin = tensors, batches, pin

    def __len__(self):
        return len(self._batches)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        idx = torch.from_numpy(self._batches[i])
        input_ids, token_type_ids, attention_mask, labels = (
            t[idx].long().pin_memory() if self._pin else t[idx].long() for t in self._tensors)
        return (input_ids, token_type_ids, attention_mask), labels


def micro_batches(dataset: TensorDataset, micro_batch_size: int, replica: int, num_replicas: int,
                  seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = True, pin: bool = False) -> MicroBatches:
    """This replica's micro-batches for one epoch.

    The order is a permutation drawn from (seed, epoch), the same on every rank; replicas take
    disjoint shards of it (`wpipe.train.shard.replica_share`: dealt in turn). With
    ``drop_last`` every replica gets the same number of full micro-batches (what data
    parallelism needs; the tail is dropped). Without it every sample is used once over all
    replicas (for evaluation) and a replica's last micro-batch may be short.
    """
    n = len(dataset)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    shard = replica_share(order, micro_batch_size, replica, num_replicas, drop_last)
    batches = [shard[i:i + micro_batch_size] for i in range(0, len(shard), micro_batch_size)]
    return MicroBatches(dataset.tensors, batches, pin)


def glue_metrics(task: str, logits, labels) -> dict[str, float]:
    """Accuracy for every task; QQP adds F1 of the duplicate class (1). Values in [0, 1]."""
    _task(task)
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match labels of shape "
                         f"{tuple(labels.shape)}: expected (samples, classes) and (samples,)")
    preds = logits.argmax(dim=1)
    metrics = {"accuracy": (preds == labels).double().mean().item()}
    if task == "qqp":
        tp = ((preds == 1) & (labels == 1)).sum().item()
        wrong = (preds != labels).sum().item()  # false positives + false negatives
        metrics["f1"] = 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0
    return metrics
