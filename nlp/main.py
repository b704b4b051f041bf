"""BERT on GLUE QQP / MNLI with any pipeline method: fine-tuning, training from scratch, or
throughput. Run under torchrun (gloo on CPU, nccl with CUDA):

    torchrun --nproc_per_node 2 nlp/main.py --config network_conf/nlp_tiny.yaml [--key value ...]

Reads top to bottom: `NlpConfig` -> `make_task` (BERT config, vocabulary, data: every check,
before any process group exists) -> `wpipe.train.main` (process group, Pipeline, train with
evaluation after each epoch, or throughput; `<output_dir>/summary.json`).
"""
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # torchrun runs this file as a script

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from nlp import glue
from nlp.model import (
    bert_block_seconds,
    bert_block_specs,
    bert_config,
    bert_partition_plan,
    build_bert_partition,
    minilm_checkpoint,
)
from wpipe import schedule
from wpipe.planning.measure import ModelBlocks
from wpipe.train import Task, TrainConfig, cli

log = logging.getLogger("wpipe.nlp")
ATTENTION = ("eager", "sdpa")
BALANCES = ("uniform", "time")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# config field -> (BertConfig attribute, value without a checkpoint: bert-base-uncased's)
ARCHITECTURE = {"num_layers": ("num_hidden_layers", 12), "hidden": ("hidden_size", 768),
                "heads": ("num_attention_heads", 12), "ffn": ("intermediate_size", 3072),
                "vocab_size": ("vocab_size", 30522)}


@dataclass
class NlpConfig(TrainConfig):
    task: str = "qqp"
    """GLUE task: qqp (2 classes; accuracy and F1) or mnli (3 classes; accuracy)."""
    data_dir: str | None = None
    """GLUE root or the task's folder: QQP/{train,dev}.tsv or MNLI/{train,dev_matched,
    dev_mismatched}.tsv. None: synthetic token data."""
    model_name_or_path: str | None = None
    """Local Hugging Face BERT folder (config.json, model.safetensors or pytorch_model.bin,
    vocab.txt), or `minilm` for the offline MiniLM-L6-H384. None: random initialisation."""
    tokenizer: str | None = None
    """WordPiece vocab.txt, or a folder holding one, to tokenize data_dir. None: the
    checkpoint's."""
    num_layers: int | None = None
    """Encoder layers. This and the next four: None takes the checkpoint's value, or without
    one bert-base-uncased's; a value given with a checkpoint must equal the checkpoint's."""
    hidden: int | None = None
    """Hidden size (None: 768)."""
    heads: int | None = None
    """Attention heads (None: 12)."""
    ffn: int | None = None
    """Feed-forward inner size (None: 3072)."""
    vocab_size: int | None = None
    """Embedding rows (None: the tokenizer's token count, else 30522)."""
    max_seq_length: int = 128
    """Tokens per sample, [CLS] and [SEP]s included; longer pairs are truncated."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, on every parameter except biases and LayerNorm weights."""
    attn_implementation: str = "sdpa"
    """eager or sdpa (torch scaled_dot_product_attention)."""
    synthetic_samples: int = 2048
    """Without data_dir: synthetic training samples (each dev split gets a quarter as many);
    throughput mode cycles through this many."""
    balance: str = "uniform"
    """How encoder layers are cut into partitions: uniform (by count, the released
    runtime's rule) or time (balanced by the forward + backward time of the embeddings, a
    layer and the head, measured on rank 0 at start-up)."""

    def validate(self) -> None:
        super().validate()
        if self.task not in glue.TASKS:
            raise ValueError(f"task must be one of {', '.join(sorted(glue.TASKS))}, got {self.task!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {self.balance!r}")
        if self.attn_implementation not in ATTENTION:
            raise ValueError(f"attn_implementation must be one of {', '.join(ATTENTION)}, "
                             f"got {self.attn_implementation!r}")
        for name in (*ARCHITECTURE, "synthetic_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2 ([CLS] and [SEP]), got {self.max_seq_length}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def make_task(cfg: NlpConfig) -> Task:
    """Everything the runner needs for BERT on cfg.task. Reads the checkpoint's config and the
    data now, so that a bad path or setting fails before any process group exists."""
    spec = glue.TASKS[cfg.task]
    checkpoint = _checkpoint(cfg)
    vocab = _vocabulary(cfg, checkpoint)
    config = _bert_config(cfg, spec.num_labels, checkpoint, vocab)
    if cfg.mode != "train" or cfg.data_dir is None:   # synthetic data, made after the process group starts
        glue.check_synthetic(config.vocab_size, spec.num_labels)
    num_partitions = schedule.num_partitions(cfg.method, cfg.pipeline_depth)
    if config.num_hidden_layers < num_partitions:
        raise ValueError(f"num_layers={config.num_hidden_layers} is fewer than the {num_partitions} "
                         f"partitions of {cfg.method} with pipeline_depth={cfg.pipeline_depth} (each "
                         f"needs an encoder layer): use more layers or a smaller pipeline_depth")
    train, evals = _datasets(cfg, spec, config, vocab)
    mbs, replicas = cfg.micro_batch_size, cfg.data_parallel

    def synthetic_data(count: int, replica: int) -> glue.MicroBatches:
        """`count` micro-batches cycling through synthetic_samples samples (no data cost)."""
        data = glue.synthetic_glue(max(cfg.synthetic_samples, mbs), cfg.max_seq_length,
                                   config.vocab_size, spec.num_labels, seed=cfg.seed + replica)
        pool = len(data) // mbs
        return glue.MicroBatches(data.tensors, [np.arange(i % pool * mbs, (i % pool + 1) * mbs)
                                                for i in range(count)], cfg.pin_memory)

    source = f"from {checkpoint}" if checkpoint else "random init"
    data = "synthetic" if cfg.mode != "train" or cfg.data_dir is None else cfg.data_dir
    return Task(
        build_partition=lambda i, block_costs=None: build_bert_partition(i, num_partitions, config, checkpoint,
                                                                         cfg.seed, block_costs),
        measure_block_costs=((lambda: bert_block_seconds(config, mbs, cfg.max_seq_length))
                             if cfg.balance == "time" else None),
        loss_fn=torch.nn.functional.cross_entropy,
        make_optimizer=lambda params: _adamw(params, cfg.lr, cfg.weight_decay),
        make_lr_scheduler=lambda optimizer, total: _warmup_then_linear_decay(
            optimizer, cfg.warmup_periods, total),
        train_data=lambda epoch, replica: glue.micro_batches(train, mbs, replica, replicas, cfg.seed, epoch,
                                                             pin=cfg.pin_memory),
        eval_data=lambda replica: {split: glue.micro_batches(dev, mbs, replica, replicas, cfg.seed, 0,
                                                             shuffle=False, drop_last=False, pin=cfg.pin_memory)
                                   for split, dev in evals.items()},
        metrics=lambda split, logits, labels: glue.glue_metrics(cfg.task, logits, labels),
        synthetic_data=synthetic_data,
        describe=(f"BERT {config.num_hidden_layers} layers x {config.hidden_size} ({source}), "
                  f"{cfg.task} ({data}), max_seq_length {cfg.max_seq_length}"),
    )


def model_blocks(cfg: NlpConfig) -> ModelBlocks:
    """cfg's BERT as the cost model's chain of blocks (wpipe.planning.measure, tool/plan.py): the
    inputs are the task's synthetic micro-batches, the optimizer the task's."""
    config = _bert_config(cfg, glue.TASKS[cfg.task].num_labels, _checkpoint(cfg), None)

    def inputs(b: int) -> tuple:
        return make_task(replace(cfg, mode="throughput", micro_batch_size=b, synthetic_samples=b)) \
            .synthetic_data(1, 0)[0][0]
    return ModelBlocks(
        f"bert_L{config.num_hidden_layers}_h{config.hidden_size}_a{config.num_attention_heads}_"
        f"f{config.intermediate_size}_v{config.vocab_size}_s{cfg.max_seq_length}_{cfg.task}_{cfg.attn_implementation}",
        bert_block_specs(config), inputs, make_task(replace(cfg, mode="throughput")).make_optimizer,
        lambda k: bert_partition_plan(config.num_hidden_layers, k))


def _checkpoint(cfg: NlpConfig) -> Path | None:
    if cfg.model_name_or_path is None:
        return None
    path = minilm_checkpoint() if cfg.model_name_or_path == "minilm" else Path(cfg.model_name_or_path)
    if not (path / "config.json").is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(
            f"model_name_or_path: {path} is not a Hugging Face BERT checkpoint folder (it needs "
            f"config.json and {' or '.join(WEIGHT_FILES)}); give a local folder, e.g. one made by "
            f"`huggingface-cli download bert-base-uncased --local-dir DIR`, or `minilm`")
    return path


def _vocabulary(cfg: NlpConfig, checkpoint: Path | None) -> Path | None:
    """The WordPiece vocabulary (file or folder) that tokenizes data_dir; None without data."""
    if cfg.data_dir is None or cfg.mode != "train":
        return None
    source = Path(cfg.tokenizer) if cfg.tokenizer else checkpoint
    if source is None:
        raise ValueError(f"data_dir {cfg.data_dir} needs a WordPiece vocabulary: set tokenizer "
                         f"(a vocab.txt or a folder holding one) or model_name_or_path")
    if not (source / "vocab.txt" if source.is_dir() else source).is_file():
        raise FileNotFoundError(f"tokenizer: no WordPiece vocabulary at {source} (expected a "
                                f"vocab.txt file or a folder holding one)")
    return source


def _vocab_tokens(vocab: Path) -> int:
    path = vocab / "vocab.txt" if vocab.is_dir() else vocab
    return len(path.read_text(encoding="utf-8").splitlines())


def _bert_config(cfg: NlpConfig, num_labels: int, checkpoint: Path | None, vocab: Path | None):
    """BertConfig from the checkpoint (given sizes must agree) or from the config's sizes."""
    tokens = _vocab_tokens(vocab) if vocab else None
    if checkpoint:
        config = bert_config(num_labels=num_labels, attn_implementation=cfg.attn_implementation,
                             checkpoint=checkpoint)
        for name, (attribute, _) in ARCHITECTURE.items():
            given, stored = getattr(cfg, name), getattr(config, attribute)
            if given is not None and given != stored:
                raise ValueError(f"{name}={given} does not match the checkpoint {checkpoint} "
                                 f"({attribute}={stored} in its config.json): leave {name} unset "
                                 f"(null) to take the checkpoint's")
    else:
        sizes = {name: default if getattr(cfg, name) is None else getattr(cfg, name)
                 for name, (_, default) in ARCHITECTURE.items()}
        if cfg.vocab_size is None and tokens:
            sizes["vocab_size"] = tokens
        config = bert_config(**sizes, max_len=max(512, cfg.max_seq_length), num_labels=num_labels,
                             attn_implementation=cfg.attn_implementation)
    if tokens and tokens > config.vocab_size:
        raise ValueError(f"the vocabulary {vocab} has {tokens} tokens but the model's vocab_size is "
                         f"{config.vocab_size}: token ids would index past the embedding; use the "
                         f"checkpoint's own vocabulary or a vocab_size >= {tokens}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden={config.hidden_size} is not a multiple of heads="
                         f"{config.num_attention_heads}")
    if cfg.max_seq_length > config.max_position_embeddings:
        raise ValueError(f"max_seq_length={cfg.max_seq_length} exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}: use max_seq_length <= "
                         f"{config.max_position_embeddings}")
    return config


def _datasets(cfg: NlpConfig, spec: glue.GlueTask, config, vocab: Path | None):
    """(training set, {dev split: set}); none for throughput and probe, which make their own."""
    if cfg.mode != "train":
        if cfg.data_dir is not None:
            log.warning("%s mode times synthetic data: data_dir %s is not read", cfg.mode, cfg.data_dir)
        return None, {}
    if cfg.data_dir is None:
        def make(count, seed):
            return glue.synthetic_glue(count, cfg.max_seq_length, config.vocab_size, spec.num_labels, seed)
        return (make(cfg.synthetic_samples, cfg.seed),
                {split: make(max(cfg.synthetic_samples // 4, 1), cfg.seed + 1 + i)
                 for i, split in enumerate(spec.dev_splits)})

    def load(split):
        return glue.load_glue(cfg.task, cfg.data_dir, split, vocab, cfg.max_seq_length)
    evals = {split: load(split) for split in spec.dev_splits}  # small files first: fail fast
    return load("train"), evals


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; BERT's rule of no decay on biases and LayerNorm weights is, in BERT, the same
    as no decay on 1-D parameters (as nanoGPT puts it), which needs no parameter names."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=lr, eps=1e-8)


def _warmup_then_linear_decay(optimizer, warmup: int, total: int) -> LambdaLR:
    """Hugging Face's linear schedule, one step per update: lr x t / warmup for t < warmup,
    then down linearly to 0 at update `total`."""
    def factor(t: int) -> float:
        if t < warmup:
            return t / warmup
        return max(0.0, (total - t) / max(1, total - warmup))
    return LambdaLR(optimizer, factor)


if __name__ == "__main__":
    cli(NlpConfig, make_task)
