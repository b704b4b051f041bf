"""nlp.model: BERT partitions run one after another equal transformers' BERT exactly."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from transformers import BertForSequenceClassification, BertTokenizerFast

from nlp.model import bert_block_seconds, bert_config, bert_partition_plan, build_bert_partition, minilm_checkpoint


def tiny_config(attn="sdpa", num_layers=4, vocab_size=500):
    return bert_config(num_layers=num_layers, hidden=64, heads=4, ffn=128, vocab_size=vocab_size,
                       max_len=64, num_labels=3, attn_implementation=attn)


def tiny_inputs(seq=24, vocab=500):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([seq, 17, 5])
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(1, vocab, (3, seq), generator=gen) * attention_mask
    token_type_ids = (torch.arange(seq)[None, :] >= lengths[:, None] // 2).long() * attention_mask
    return input_ids, token_type_ids, attention_mask


def run_partitions(parts, inputs):
    out = inputs
    for part in parts:
        out = part(*out)
    return out


def merged_state(parts):
    state = {}
    for part in parts:
        assert not state.keys() & part.state_dict().keys()
        state.update(part.state_dict())
    return state


def hf_model(config, state):
    model = BertForSequenceClassification(config).eval()
    model.load_state_dict(state, strict=True)  # partition keys are exactly HF's
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("num_partitions", [1, 2, 4])
def test_partitions_equal_hf_model(attn, num_partitions):
    config = tiny_config(attn)
    parts = [build_bert_partition(i, num_partitions, config, seed=3).eval()
             for i in range(num_partitions)]
    model = hf_model(config, merged_state(parts))
    assert model.config._attn_implementation == attn
    inputs = tiny_inputs()
    with torch.no_grad():
        logits = run_partitions(parts, inputs)
        expected = model(input_ids=inputs[0], token_type_ids=inputs[1],
                         attention_mask=inputs[2]).logits
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_gradients_equal_hf_model():
    config = tiny_config("sdpa")
    parts = [build_bert_partition(i, 2, config, seed=5).eval() for i in range(2)]
    model = hf_model(config, merged_state(parts))
    inputs, labels = tiny_inputs(), torch.tensor([0, 2, 1])
    hidden, mask = parts[0](*inputs)
    assert not mask.requires_grad and mask.dtype == hidden.dtype
    assert mask.shape == (3, 1, 1, 24) and mask[2, 0, 0, 5:].eq(torch.finfo(mask.dtype).min).all()
    torch.nn.functional.cross_entropy(parts[1](hidden, mask), labels).backward()
    model(input_ids=inputs[0], token_type_ids=inputs[1], attention_mask=inputs[2],
          labels=labels).loss.backward()
    expected = dict(model.named_parameters())
    for part in parts:
        for name, param in part.named_parameters():
            torch.testing.assert_close(param.grad, expected[name].grad, rtol=0, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_partition_counts_are_slices_of_one_model():
    config = tiny_config()
    full = build_bert_partition(0, 1, config, seed=7).state_dict()
    for num_partitions in (2, 4):
        state = merged_state([build_bert_partition(i, num_partitions, config, seed=7)
                              for i in range(num_partitions)])
        assert state.keys() == full.keys()
        for name, tensor in full.items():
            assert torch.equal(state[name], tensor), name
    other = build_bert_partition(0, 1, config, seed=8).state_dict()
    assert not torch.equal(other["bert.encoder.layer.0.attention.self.query.weight"],
                           full["bert.encoder.layer.0.attention.self.query.weight"])
    assert full["bert.embeddings.word_embeddings.weight"][0].eq(0).all()  # padding row
    assert full["bert.encoder.layer.0.output.dense.bias"].eq(0).all()


def test_plan_puts_embeddings_first_and_head_last():
    assert bert_partition_plan(4, 2) == [["embeddings", "layer.0", "layer.1"],
                                         ["layer.2", "layer.3", "head"]]
    plan = bert_partition_plan(10, 4)  # remainder to the last partitions: 2, 2, 3, 3
    assert [len(p) for p in plan] == [3, 2, 3, 4]
    assert plan[3] == ["layer.7", "layer.8", "layer.9", "head"]
    assert bert_partition_plan(1, 1) == [["embeddings", "layer.0", "head"]]


def test_errors_name_the_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"num_hidden_layers=2 .* num_partitions=4"):
        build_bert_partition(0, 4, tiny_config(num_layers=2))
    with pytest.raises(ValueError, match=r"num_hidden_layers=3 .* num_partitions=5"):
        bert_partition_plan(3, 5)
    with pytest.raises(ValueError, match=r"partition index 2 is outside range\(2\)"):
        build_bert_partition(2, 2, tiny_config())
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        build_bert_partition(0, 2, tiny_config(), checkpoint=tmp_path)


def test_checkpoint_with_gamma_beta_names_and_bin_file(tmp_path):
    config = tiny_config("eager")
    reference = hf_model(config, merged_state(
        [build_bert_partition(i, 2, config, seed=11) for i in range(2)]))
    # Old BERT checkpoints (bert-base-uncased's pytorch_model.bin) name LayerNorm gamma/beta.
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                      "LayerNorm.beta"): v
             for k, v in reference.state_dict().items() if not k.startswith("classifier.")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    config.save_pretrained(tmp_path)
    loaded = bert_config(checkpoint=tmp_path, num_labels=3, attn_implementation="eager")
    parts = [build_bert_partition(i, 2, loaded, checkpoint=tmp_path, seed=11).eval()
             for i in range(2)]
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            run_partitions(parts, inputs),
            reference(input_ids=inputs[0], token_type_ids=inputs[1],
                      attention_mask=inputs[2]).logits, rtol=0, atol=1e-5)


def test_checkpoint_errors_name_key_and_file(tmp_path):
    config = tiny_config()
    torch.save({"bert.pooler.dense.weight": torch.zeros(64, 64)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: no weights for \d+ tensors of "
                                         r"partition 0, e.g. \['bert.embeddings"):
        build_bert_partition(0, 2, config, checkpoint=tmp_path)
    small = tiny_config(vocab_size=400)
    torch.save(build_bert_partition(0, 1, config).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"word_embeddings.weight has shape \(500, 64\), the "
                                         r"config gives \(400, 64\)"):
        build_bert_partition(0, 2, small, checkpoint=tmp_path)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_layers=6 but checkpoint .* num_hidden_layers=4"):
        bert_config(num_layers=6, checkpoint=tmp_path)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_minilm_checkpoint_partitions_equal_from_pretrained(attn):
    folder = minilm_checkpoint()
    config = bert_config(checkpoint=folder, num_labels=3, attn_implementation=attn)
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    assert config._attn_implementation == attn and config.num_labels == 3
    parts = [build_bert_partition(i, 4, config, checkpoint=folder, seed=42).eval()
             for i in range(4)]
    model = BertForSequenceClassification.from_pretrained(
        folder, num_labels=3, attn_implementation=attn).eval()
    model.classifier.load_state_dict(parts[-1].classifier.state_dict())
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert torch.equal(parts[2].state_dict()["bert.encoder.layer.3.output.dense.weight"],
                           f.get_tensor("encoder.layer.3.output.dense.weight"))
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    batch = tokenizer(["How do I learn Python?", "Is it raining?"],
                      ["What's the best way to learn Python?", "Why \"is\" the sky blue?"],
                      padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert batch["attention_mask"][1].sum() < 32  # padding is exercised
    inputs = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(run_partitions(parts, inputs),
                                   model(**batch).logits, rtol=0, atol=1e-5)
    fresh = build_bert_partition(3, 4, config, checkpoint=folder, seed=42)
    assert torch.equal(fresh.classifier.weight, parts[-1].classifier.weight)  # same on all ranks


def test_balance_by_block_costs():
    """Measured costs move layers away from a heavy embedding or head; the partitions hold
    exactly the planned layers."""
    def heaviest(plan, costs):
        embeddings, layer, head = costs
        return max(sum({"embeddings": embeddings, "head": head}.get(n, layer) for n in names) for names in plan)
    heavy_embeddings = bert_partition_plan(8, 4, block_costs=(3.0, 1.0, 0.0))
    assert heavy_embeddings[0] == ["embeddings", "layer.0"]
    assert heaviest(heavy_embeddings, (3.0, 1.0, 0.0)) == 4.0            # the least possible
    assert heaviest(bert_partition_plan(8, 4), (3.0, 1.0, 0.0)) == 5.0    # uniform: 3 + 2 layers
    heavy_head = bert_partition_plan(8, 4, block_costs=(0.0, 1.0, 3.0))
    assert heavy_head[-1] == ["layer.7", "head"]
    assert bert_partition_plan(8, 4, block_costs=(0.0, 1.0, 0.0)) == bert_partition_plan(8, 4)
    config = bert_config(num_layers=8, hidden=32, heads=2, ffn=64, vocab_size=100)
    for index, names in enumerate(heavy_embeddings):
        part = build_bert_partition(index, 4, config, block_costs=(3.0, 1.0, 0.0))
        assert [f"layer.{i}" for i in part.bert.encoder.layer] == [n for n in names if n.startswith("layer.")]


def test_block_seconds_are_measured():
    costs = bert_block_seconds(bert_config(num_layers=2, hidden=32, heads=2, ffn=64, vocab_size=100), 4, 16)
    assert len(costs) == 3 and all(c > 0 for c in costs)
