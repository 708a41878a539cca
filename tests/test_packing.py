"""Padding-free packing: same loss, same per-example logits, no cross-example attention."""

import pytest
import torch

from lorakit.config import LoraConfig, ModelConfig
from lorakit.data.collate import Collator, PackedCollator
from lorakit.model.load import load_model
from lorakit.model.lora import apply_lora
from lorakit.model.loss import labelled_loss, split_head


def _examples(vocab: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((9, 5), (17, 10), (4, 1)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m, _ = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), training=True)
    m = apply_lora(m, LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian"))
    m.eval()
    return m


def test_packed_collator_layout():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    b = PackedCollator()(feats)
    assert "attention_mask" not in b
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the first label of each example never counts (it would be predicted across the boundary)
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_packed_loss_equals_padded_loss(model):
    feats = _examples(model.config.vocab_size)
    padded, packed = Collator(0)(feats), PackedCollator()(feats)
    assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
        n = int((packed["labels"][:, 1:] != -100).sum())
        assert n == int((padded["labels"][:, 1:] != -100).sum())
        fast = labelled_loss(*split_head(model), packed, n)
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast, loss_padded, rtol=1e-5, atol=1e-6)


def test_examples_do_not_attend_to_each_other(model):
    feats = _examples(model.config.vocab_size)
    packed = PackedCollator(longest_first=False)(feats)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for f in feats:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            assert torch.allclose(logits[start:start + n], alone, atol=1e-5), "an example saw its neighbours"
            start += n
    # and the check has teeth: without position restarts the second example does see the first
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"]).logits[0]
        n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
        alone = model(input_ids=torch.tensor([feats[1]["input_ids"]])).logits[0]
    assert not torch.allclose(leaky[n0:n0 + n1], alone, atol=1e-3)
