"""LoRA wrapping: what trains, what stays frozen, target checks, and adapter round trips."""

from __future__ import annotations

import math
import re

import peft
import pytest
import torch

from lorakit.config import GUIDE_TARGETS, LoraConfig, ModelConfig
from lorakit.errors import ModelError
from lorakit.model.load import load_model
from lorakit.model.lora import apply_lora, count_parameters, describe_parameters, linear_layer_names


@pytest.fixture
def base(tiny_model_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), gradient_checkpointing="off"))
    return model


def _batch():
    return torch.tensor([[5, 17, 42, 99, 7, 3], [8, 8, 120, 33, 2, 61]])


def _lora_modules(model) -> set[str]:
    return {name for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_one_step_moves_lora_only(base):
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()

    after = dict(model.named_parameters())
    for name, old in before.items():
        if "lora_B" in name:  # B starts at 0 and is the factor that gets a gradient first
            assert not torch.equal(old, after[name]), f"{name} did not move"
        elif "lora_" not in name:
            assert torch.equal(old, after[name]), f"frozen {name} changed"
    # every guide target in every layer is adapted
    assert {n.rsplit(".", 1)[-1] for n in _lora_modules(model)} == set(GUIDE_TARGETS)


def test_unknown_target_lists_linear_layers(base):
    with pytest.raises(ModelError) as err:
        apply_lora(base, LoraConfig(target_modules=["q_proj", "query_key_value"]))
    msg = str(err.value)
    assert "'query_key_value'" in msg and "'q_proj'" not in msg
    for name in GUIDE_TARGETS + ["lm_head"]:
        assert name in msg
    assert "fix:" in msg


def test_regex_targets(base):
    model = apply_lora(base, LoraConfig(target_modules=r".*\.(q|v)_proj"))
    assert {n.rsplit(".", 1)[-1] for n in _lora_modules(model)} == {"q_proj", "v_proj"}
    assert len(_lora_modules(model)) == 4  # 2 layers x 2


def test_regex_must_match_full_name(base):
    # a bare name given as a string is a regex and must match whole module names
    with pytest.raises(ModelError, match=r"matches no layer's full name"):
        apply_lora(base, LoraConfig(target_modules="q_proj"))
    with pytest.raises(ModelError, match="not a valid regex"):
        apply_lora(base, LoraConfig(target_modules="(q_proj"))


def test_all_linear_skips_lm_head(base):
    model = apply_lora(base, LoraConfig(target_modules="all-linear"))
    names = {n.rsplit(".", 1)[-1] for n in _lora_modules(model)}
    assert names == set(GUIDE_TARGETS)


def test_dotted_suffix_target(base):
    model = apply_lora(base, LoraConfig(target_modules=["self_attn.q_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in _lora_modules(model)} == {"q_proj"}


def test_rslora_and_dora_reach_peft(base):
    model = apply_lora(base, LoraConfig(r=4, alpha=8, use_rslora=True, use_dora=True, target_modules=["q_proj"]))
    cfg = model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora and cfg.task_type == peft.TaskType.CAUSAL_LM
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "scaling"))
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert "default" in layer.lora_magnitude_vector


def test_plain_scaling_and_settings(base):
    lcfg = LoraConfig(r=4, alpha=8, dropout=0.1, bias="lora_only", modules_to_save=["lm_head"])
    model = apply_lora(base, lcfg)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (4, 8, 0.1, "lora_only")
    assert cfg.modules_to_save == ["lm_head"]
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "scaling"))
    assert layer.scaling["default"] == pytest.approx(2.0)


@pytest.mark.parametrize("init,expected", [("true", True), ("False", False), ("gaussian", "gaussian")])
def test_init_option(base, init, expected):
    model = apply_lora(base, LoraConfig(init=init, target_modules=["q_proj"]))
    assert model.peft_config["default"].init_lora_weights == expected
    b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert bool(b.abs().sum() == 0) == (expected is not False)  # B = 0 except with init false


def test_unknown_modules_to_save(base):
    with pytest.raises(ModelError, match="lora.modules_to_save: 'lm_heads'"):
        apply_lora(base, LoraConfig(modules_to_save=["lm_heads"]))


def test_saved_adapter_reloads_with_plain_peft(base, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = _batch()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = apply_lora(base, LoraConfig(r=4, alpha=8, init="false", dropout=0.0)).eval()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base_logits)  # init false: a non-trivial adapter
    model.save_pretrained(tmp_path / "adapter")

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert torch.equal(again, tuned)


def test_count_and_describe(base):
    total_base = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = count_parameters(model)
    # q_proj is hidden x hidden = 64 x 64 in the tiny model; 2 layers; A: 2x64, B: 64x2
    assert trainable == 2 * (2 * 64 + 64 * 2)
    assert total == total_base + trainable
    text = describe_parameters(model)
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", text)
    assert f"{trainable:,}" in text


def test_linear_layer_names(base):
    assert linear_layer_names(base) == GUIDE_TARGETS + ["lm_head"]


def test_lora_gets_gradients_with_checkpointing(tiny_model_dir):
    base, _ = load_model(ModelConfig(name=str(tiny_model_dir), gradient_checkpointing="on"))
    model = apply_lora(base, LoraConfig(r=4, dropout=0.0))
    assert model.base_model.model.is_activation_checkpointing
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
